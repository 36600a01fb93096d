"""The communicators against the definition ``x_i <- sum_j W[i, j](k) x_j``.

The point-to-point communicator runs in real gloo processes (spawned once per topology family),
for every topology of the library, including directed and time-varying ones: no deadlock, exact
mixing, and the message/byte counts of the neighbour sets.
"""

from __future__ import annotations

import os
import time

import pytest
import torch
from mp_launch import run_gloo_world

from lightning_decent.comm import AllReduceCommunicator, P2PCommunicator, SimulatedCommunicator
from lightning_decent.comm.base import MeanPerStep
from lightning_decent.comm.p2p import PeerTimeoutError
from lightning_decent.evaluation import network_average
from lightning_decent.topology import get_topology

N = 4
STEPS = 5
DIM = 7
CASES = [
    ("complete", {}),
    ("ring", {}),
    ("directed_ring", {}),
    ("star", {}),
    ("grid", {}),
    ("torus", {}),
    ("erdos_renyi", {"p": 0.6, "seed": 1}),
    ("exponential", {}),
    ("one_peer_exponential", {}),
    ("alternating_exponential_ring", {"local_world_size": 2}),
    ("challenging_digraph", {}),
    ("base", {"k": 1}),
    ("equidyn", {"period": 5}),
    ("equistatic", {"directed": True}),
    ("hierarchical", {"local_world_size": 2}),
]


def initial_values(n: int) -> torch.Tensor:
    return torch.randn(n, DIM, dtype=torch.float64, generator=torch.Generator().manual_seed(3))


def expected_after(name: str, options: dict, steps: int) -> torch.Tensor:
    topology = get_topology(name, N, **options)
    x = initial_values(N)
    for k in range(steps):
        x = topology.weights(k) @ x
    return x


def _worker(rank: int, queue) -> None:
    for name, options in CASES:
        topology = get_topology(name, N, **options)
        comm = P2PCommunicator(topology, rank)
        x = initial_values(N)[rank].clone()
        scalar = torch.ones(1, dtype=torch.float64)
        for k in range(STEPS):
            comm.mix([x, scalar], k)
        queue.put((name, rank, x, scalar.item(), comm.stats.as_dict()))
    mean = initial_values(N)[rank].clone()
    AllReduceCommunicator(get_topology("ring", N)).mix([mean], 0)
    queue.put(("allreduce", rank, mean, 1.0, {}))
    # One float64 tensor alone in its dtype group, two float32 ones; weight_i = i + 1.
    inputs = [initial_values(N)[rank].clone(), torch.ones(3) * rank, torch.ones(2, 2) * rank]
    kept = [t.clone() for t in inputs]
    averaged = network_average(inputs, weight=rank + 1.0)
    unchanged = all(torch.equal(a, b) for a, b in zip(inputs, kept))
    queue.put(("network_average", rank, averaged, float(unchanged), {}))


@pytest.fixture(scope="module")
def p2p_results() -> dict:
    items = run_gloo_world(_worker, N, messages=N * (len(CASES) + 2), timeout=120)
    return {(name, rank): (x, scalar, stats) for name, rank, x, scalar, stats in items}


@pytest.mark.parametrize(("name", "options"), CASES)
def test_p2p_mix_equals_matrix_product(p2p_results: dict, name: str, options: dict) -> None:
    expected = expected_after(name, options, STEPS)
    topology = get_topology(name, N, **options)
    expected_scalar = torch.ones(N, 1, dtype=torch.float64)
    for k in range(STEPS):
        expected_scalar = topology.weights(k) @ expected_scalar
    for rank in range(N):
        x, scalar, stats = p2p_results[(name, rank)]
        torch.testing.assert_close(x, expected[rank], rtol=0, atol=1e-12)
        assert scalar == pytest.approx(expected_scalar[rank].item(), abs=1e-12)
        out_messages = sum(len(topology.out_neighbors(rank, k)) for k in range(STEPS))
        in_messages = sum(len(topology.in_neighbors(rank, k)) for k in range(STEPS))
        assert stats["messages_sent"] == 2 * out_messages  # two buffers per round
        assert stats["messages_received"] == 2 * in_messages
        assert stats["bytes_sent"] == out_messages * (DIM + 1) * 8


def test_network_average_is_weighted_and_leaves_the_inputs_alone(p2p_results: dict) -> None:
    """``(1/n) sum_i w_i t_i`` (push-sum's evaluation model), on copies: a tensor alone in its dtype
    group once came back as a view of the input, and the all-reduce averaged the live parameter."""
    weights = torch.arange(1, N + 1, dtype=torch.float64)
    expected = (weights[:, None] * initial_values(N)).sum(0) / N
    scalar_expected = float((weights * torch.arange(N)).sum() / N)
    for rank in range(N):
        averaged, unchanged, _ = p2p_results[("network_average", rank)]
        assert unchanged == 1.0
        torch.testing.assert_close(averaged[0], expected, rtol=1e-12, atol=1e-12)
        assert torch.allclose(averaged[1], torch.full((3,), scalar_expected))
        assert torch.allclose(averaged[2], torch.full((2, 2), scalar_expected))


def test_allreduce_communicator_gives_the_exact_mean(p2p_results: dict) -> None:
    mean = initial_values(N).mean(dim=0)
    for rank in range(N):
        torch.testing.assert_close(p2p_results[("allreduce", rank)][0], mean, rtol=0, atol=1e-12)


@pytest.mark.parametrize(("name", "options"), CASES)
def test_simulated_communicator_equals_matrix_product(name: str, options: dict) -> None:
    topology = get_topology(name, N, **options)
    comm = SimulatedCommunicator(topology)
    x = initial_values(N)
    for k in range(STEPS):
        comm.mix([x], k)
    torch.testing.assert_close(x, expected_after(name, options, STEPS), rtol=0, atol=1e-12)
    edges = sum(len(topology.out_neighbors(r, k)) for r in range(N) for k in range(STEPS))
    assert comm.stats.messages_sent == edges
    assert comm.stats.bytes_sent == edges * DIM * 8


def test_simulated_global_average() -> None:
    x = initial_values(N)
    SimulatedCommunicator(get_topology("ring", N)).global_average([x])
    torch.testing.assert_close(x, initial_values(N).mean(0, keepdim=True).expand(N, DIM))


def test_simulated_communicator_rejects_unstacked_buffers() -> None:
    comm = SimulatedCommunicator(get_topology("ring", N))
    with pytest.raises(ValueError, match="stacked"):
        comm.mix([torch.zeros(N + 1, 3)], 0)


def test_mean_per_step_is_the_increase_since_the_previous_report() -> None:
    mean = MeanPerStep(step=4, counter=100)  # e.g. resumed at step 4 with 100 bytes already counted
    assert mean.report(6, 100) == 0.0  # no sync in steps 5-6
    assert mean.report(8, 500) == 200.0  # one 400-byte sync in steps 7-8
    assert mean.report(8, 500) == 0.0  # the same step again: nothing new, no division by zero


def _neighbour_gone_before_the_round(rank: int, queue) -> None:
    """Rank 1 dies after one round; rank 0 posts the next round's messages once its connection has closed."""
    comm = P2PCommunicator(get_topology("ring", 2), rank)
    x = torch.ones(3)
    comm.mix([x], 0)
    if rank == 1:
        os._exit(0)
    time.sleep(2)  # rank 0 was computing while its neighbour died
    try:
        comm.mix([x], 1)
    except Exception as err:  # the test reports what was raised
        queue.put((type(err).__name__, str(err)))
    else:
        queue.put(("nothing", ""))


def test_a_neighbour_that_died_before_a_round_is_posted_is_named() -> None:
    # Before: gloo's own RuntimeError from irecv ("Connection closed by peer [127.0.0.1]:60315"), naming neither
    # the rank nor the step; a restarted torchrun job showed only that.
    [(kind, message)] = run_gloo_world(_neighbour_gone_before_the_round, 2, messages=1, timeout=60)
    assert kind == PeerTimeoutError.__name__, message
    assert "rank 0: lost rank 1 at gossip step 1: its connection closed before" in message
