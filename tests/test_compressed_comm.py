"""Compressed messages through the communicators: the simulator's definition, real gloo ranks, bytes counted.

Definitions: ``mix_compressed`` gives ``x_i <- sum_j W[i, j] C(x_j)`` (own term ``C(x_i)``);
``average_compressed`` gives ``C_s((1/n) sum_j C_s(x_j))`` shard by shard, the same on every rank.
The real point-to-point and all-reduce communicators run in one spawned 4-rank gloo world (slow tests).
"""

from __future__ import annotations

import pytest
import torch
from mp_launch import run_gloo_world

from lightning_decent.algorithms import Bucket, ErrorFeedback, allocate_residuals, get_algorithm
from lightning_decent.algorithms.error_feedback import RESIDUAL, SHARD_RESIDUAL
from lightning_decent.assembly import refuse_compression_unsupported_by
from lightning_decent.comm import (
    AllReduceCommunicator,
    HierarchicalCommunicator,
    P2PCommunicator,
    SimulatedCommunicator,
    get_compressor,
)
from lightning_decent.comm.compressed_collectives import shard_length
from lightning_decent.topology import get_topology

N, DIM, STEPS = 4, 300, 3
COMPRESSION = [("int8", {"block": 64}), ("topk", {"fraction": 0.1}), ("randomk", {"fraction": 0.1})]
TOPOLOGIES = ["ring", "exponential"]  # undirected, and directed with one-way rounds


def values(n: int = N) -> torch.Tensor:
    return torch.randn(n, DIM, dtype=torch.float64, generator=torch.Generator().manual_seed(5))


def simulated_mix(topology: str, name: str, options: dict) -> tuple[torch.Tensor, SimulatedCommunicator]:
    comm = SimulatedCommunicator(get_topology(topology, N))
    x = values()
    for step in range(STEPS):
        comm.mix_compressed([x], step, get_compressor(name, **options))
    return x, comm


def simulated_average(name: str, options: dict) -> torch.Tensor:
    x = values()
    SimulatedCommunicator(get_topology("ring", N)).average_compressed([x], get_compressor(name, **options), 2)
    return x


# ---- the simulator against the definitions --------------------------------------------------------------
@pytest.mark.parametrize(("name", "options"), COMPRESSION)
def test_simulated_mix_is_w_times_the_decoded_rows(name: str, options: dict) -> None:
    topology = get_topology("exponential", N)
    compressor = get_compressor(name, **options)
    comm = SimulatedCommunicator(topology)
    x, residual = values(), torch.empty(N, DIM, dtype=torch.float64)
    comm.mix_compressed([x], 7, compressor, residuals=[residual])
    decoded = compressor.roundtrip(values(), key=(7, 0))
    torch.testing.assert_close(x, topology.weights(7) @ decoded, rtol=0, atol=1e-14)
    torch.testing.assert_close(residual, values() - decoded, rtol=0, atol=0)
    edges = 2 * N  # every node sends to 2 peers
    assert comm.stats.bytes_sent == edges * compressor.payload_bytes(DIM, torch.float64)
    assert comm.stats.messages_sent == edges


@pytest.mark.parametrize(("name", "options"), [*COMPRESSION, ("none", {})])
def test_simulated_average_is_the_two_stage_average(name: str, options: dict) -> None:
    compressor = get_compressor(name, **options)
    comm = SimulatedCommunicator(get_topology("ring", N))
    x, residual = values(), torch.empty(N, DIM, dtype=torch.float64)
    comm.average_compressed([x], compressor, 2, residuals=[residual])
    length = shard_length(DIM, N, compressor.alignment)
    padded = torch.nn.functional.pad(values(), (0, N * length - DIM)).view(N, N, length)  # [node, shard, :]
    first = torch.stack([compressor.roundtrip(padded[i], key=(2, 0, 0)) for i in range(N)])
    expected = compressor.roundtrip(first.mean(0), key=(2, 0, 1)).reshape(-1)[:DIM]
    for row in x:
        assert torch.equal(row, x[0])  # the same on every node
    torch.testing.assert_close(x[0], expected, rtol=0, atol=1e-14)
    torch.testing.assert_close(residual, values() - first.reshape(N, -1)[:, :DIM], rtol=0, atol=0)
    if name == "none":
        torch.testing.assert_close(x[0], values().mean(0), rtol=0, atol=1e-15)
    assert comm.stats.bytes_sent == N * 2 * (N - 1) * compressor.payload_bytes(length, torch.float64)


def test_compressed_messages_preserve_the_network_mean_of_what_was_sent() -> None:
    compressor = get_compressor("topk", fraction=0.05)
    x = values()
    SimulatedCommunicator(get_topology("torus", N)).mix_compressed([x], 0, compressor)
    torch.testing.assert_close(x.mean(0), compressor.roundtrip(values(), key=(0, 0)).mean(0), rtol=0, atol=1e-15)


# ---- real gloo ranks -------------------------------------------------------------------------------------
def _worker(rank: int, queue) -> None:
    p2p = {topology: P2PCommunicator(get_topology(topology, N), rank) for topology in TOPOLOGIES}
    for topology, comm in p2p.items():
        for name, options in COMPRESSION:
            comm.stats.reset()
            x = values()[rank].clone()
            for step in range(STEPS):
                comm.mix_compressed([x], step, get_compressor(name, **options))
            queue.put((("mix", topology, name), rank, x, comm.stats.as_dict()))
    for name, options in [*COMPRESSION, ("none", {})]:
        p2p["ring"].stats.reset()
        x = values()[rank].clone()
        p2p["ring"].average_compressed([x], get_compressor(name, **options), 2)
        queue.put((("average", "p2p", name), rank, x, p2p["ring"].stats.as_dict()))
    residual, shard = torch.zeros(DIM, dtype=torch.float64), torch.zeros(DIM, dtype=torch.float64)
    for step in range(STEPS):  # error feedback in both stages (what ErrorFeedback.average does)
        x = values()[rank] * (step + 1) + residual
        p2p["ring"].average_compressed([x], get_compressor("topk", fraction=0.1), step, [residual], [shard])
    queue.put((("error_feedback", "p2p", "topk"), rank, x, {"residual": residual, "shard": shard}))
    for comm in p2p.values():
        comm.close()
    comm = AllReduceCommunicator(get_topology("ring", N))
    x, residual = values()[rank].clone(), torch.empty(DIM, dtype=torch.float64)
    comm.average_compressed([x], get_compressor("int8"), 2, residuals=[residual])
    queue.put((("average", "allreduce", "int8"), rank, x, {**comm.stats.as_dict(), "residual": residual}))
    comm.stats.reset()
    x = values()[rank].clone()
    comm.mix_compressed([x], 4, get_compressor("topk", fraction=0.1))
    queue.put((("mix", "allreduce", "topk"), rank, x, comm.stats.as_dict()))


@pytest.fixture(scope="module")
def gloo() -> dict:
    messages = N * (len(TOPOLOGIES) * len(COMPRESSION) + len(COMPRESSION) + 4)
    items = run_gloo_world(_worker, N, messages=messages, timeout=120)
    return {(case, rank): (x, stats) for case, rank, x, stats in items}


@pytest.mark.slow
@pytest.mark.parametrize("topology", TOPOLOGIES)
@pytest.mark.parametrize(("name", "options"), COMPRESSION)
def test_p2p_mix_compressed_equals_the_simulator_and_counts_payload_bytes(
    gloo: dict, topology: str, name: str, options: dict
) -> None:
    expected, simulated = simulated_mix(topology, name, options)
    payload = get_compressor(name, **options).payload_bytes(DIM, torch.float64)
    for rank in range(N):
        x, stats = gloo[(("mix", topology, name), rank)]
        torch.testing.assert_close(x, expected[rank], rtol=0, atol=1e-12)
        out_degree = len(get_topology(topology, N).out_neighbors(rank, 0))
        assert stats["bytes_sent"] == STEPS * out_degree * payload
    assert sum(gloo[(("mix", topology, name), r)][1]["bytes_sent"] for r in range(N)) == simulated.stats.bytes_sent


@pytest.mark.slow
@pytest.mark.parametrize(("name", "options"), [*COMPRESSION, ("none", {})])
def test_compressed_global_average_is_identical_on_every_rank_and_equals_the_simulator(
    gloo: dict, name: str, options: dict
) -> None:
    expected = simulated_average(name, options)
    results = [gloo[(("average", "p2p", name), rank)] for rank in range(N)]
    compressor = get_compressor(name, **options)
    shard_payload = compressor.payload_bytes(shard_length(DIM, N, compressor.alignment), torch.float64)
    for x, stats in results:
        assert torch.equal(x, results[0][0])
        assert stats["bytes_sent"] == 2 * (N - 1) * shard_payload
    torch.testing.assert_close(results[0][0], expected[0], rtol=0, atol=1e-14)


@pytest.mark.slow
def test_allreduce_communicator_compressed_average_and_exact_compressed_mix(gloo: dict) -> None:
    int8 = get_compressor("int8")
    averaged = [gloo[(("average", "allreduce", "int8"), rank)] for rank in range(N)]
    assert all(torch.equal(x, averaged[0][0]) for x, _ in averaged)
    assert (averaged[0][0] - values().mean(0)).abs().max() < 2 * values().abs().max() / 127
    length = shard_length(DIM, N, int8.alignment)
    for rank, (_, stats) in enumerate(averaged):  # residual: what the first stage did not send
        shards = torch.nn.functional.pad(values()[rank], (0, N * length - DIM)).view(N, length)
        sent = int8.roundtrip(shards, key=(2, 0, 0)).reshape(-1)[:DIM]
        torch.testing.assert_close(stats["residual"], values()[rank] - sent, rtol=0, atol=0)
    # The all-reduce communicator's mix is an exact average of what the ranks sent (an all-gather of payloads).
    topk = get_compressor("topk", fraction=0.1)
    expected = topk.roundtrip(values(), key=(4, 0)).mean(0)
    mixed = [gloo[(("mix", "allreduce", "topk"), rank)] for rank in range(N)]
    for x, stats in mixed:
        assert torch.equal(x, mixed[0][0])
        assert stats["bytes_sent"] == (N - 1) * topk.payload_bytes(DIM, torch.float64)
    torch.testing.assert_close(mixed[0][0], expected, rtol=0, atol=1e-15)


@pytest.mark.slow
def test_error_feedback_in_both_stages_equals_the_simulator(gloo: dict) -> None:
    bucket = Bucket(torch.zeros(N, DIM, dtype=torch.float64))
    allocate_residuals(bucket)
    comm = SimulatedCommunicator(get_topology("ring", N))
    for step in range(STEPS):
        x = values() * (step + 1)
        ErrorFeedback.of([bucket]).average(comm, [x], get_compressor("topk", fraction=0.1), step)
    for rank in range(N):
        real, state = gloo[(("error_feedback", "p2p", "topk"), rank)]
        torch.testing.assert_close(real, x[rank], rtol=0, atol=1e-13)
        torch.testing.assert_close(state["residual"], bucket.state[RESIDUAL][rank], rtol=0, atol=1e-13)
        torch.testing.assert_close(state["shard"], bucket.state[SHARD_RESIDUAL][rank], rtol=0, atol=1e-13)


def test_compressed_algorithms_on_a_communicator_without_payloads_are_refused_before_training() -> None:
    diloco_int8 = get_algorithm("diloco", H=4, compression="int8")
    for algorithm in (diloco_int8, get_algorithm("choco", compression="int8")):
        with pytest.raises(ValueError, match=r"HierarchicalCommunicator cannot .* use a flat topology"):
            refuse_compression_unsupported_by(algorithm, HierarchicalCommunicator)
        refuse_compression_unsupported_by(algorithm, P2PCommunicator)  # these send payloads
        refuse_compression_unsupported_by(algorithm, AllReduceCommunicator)
    refuse_compression_unsupported_by(get_algorithm("diloco", H=4), HierarchicalCommunicator)  # uncompressed
    refuse_compression_unsupported_by(get_algorithm("diloco", H=4, compression="none"), HierarchicalCommunicator)
