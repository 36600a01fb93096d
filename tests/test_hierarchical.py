"""Hierarchical gossip: ``W(k) = W_M(k) (x) 11^T/L`` as a topology, and the communicator that realises it
(intra-machine reduce-scatter, sharded gossip between machines, intra-machine all-gather) in real
gloo processes, blocking and split (``start_mix``/``finish``), against the matrix product."""

from __future__ import annotations

import itertools
from pathlib import Path

import numpy as np
import pytest
import torch
from mp_launch import run_gloo_world

from lightning_decent.comm import HierarchicalCommunicator, SimulatedCommunicator
from lightning_decent.topology import HierarchicalTopology, get_topology, hierarchical, period_product

WORLD = 6
STEPS = 4
CASES = [  # (local_world_size, machine topology, its options): M = WORLD / L machines
    (2, "base", {"k": 1}),  # 3 machines: weights 1/3, 2/3 in the bridge round
    (3, "one_peer_exponential", {}),  # 2 machines, shards of a 7-element buffer need padding
    (1, "ring", {}),  # one rank per machine: flat gossip
    (6, "ring", {}),  # one machine: the exact average
]
SIZES = (7, 12)  # one buffer that L does not divide, one it does


def build(local: int, machines: str, options: dict) -> HierarchicalTopology:
    return hierarchical(WORLD, local_world_size=local, machines=machines, machine_options=options)


def values(seed: int, size: int) -> torch.Tensor:
    return torch.randn(WORLD, size, dtype=torch.float64, generator=torch.Generator().manual_seed(seed))


INTRA_MACHINE = ("shared_memory", "process_group")


def _worker(rank: int, queue) -> None:
    for case, intra in itertools.product(range(len(CASES)), INTRA_MACHINE):
        local, machines, options = CASES[case]
        comm = HierarchicalCommunicator(build(local, machines, options), rank, intra_machine=intra)
        blocking = [values(1, size)[rank].clone() for size in SIZES]
        split, anchor = values(2, SIZES[0])[rank].clone(), values(2, SIZES[0])[rank].clone()
        into = values(3, SIZES[0])[rank].clone()
        for k in range(STEPS):
            comm.mix(blocking, k)
            first, second = comm.start_mix([split], k), comm.start_mix([anchor], k)
            first.finish(0)
            second.finish(0, into=into, refill=True)
        between = comm.between_machines.as_dict()
        machine = [values(4, size)[rank].clone() for size in SIZES]
        comm.machine_average(machine)
        comm.close()
        queue.put(((case, intra), rank, blocking, split, into, anchor, between, machine))


@pytest.fixture(scope="module")
def results() -> dict:  # a spawned gloo world: only the slow tests use it
    items = run_gloo_world(_worker, WORLD, messages=WORLD * len(CASES) * len(INTRA_MACHINE))
    return {item[:2]: item[2:] for item in items}


def test_the_combined_matrix_is_the_kronecker_product_and_doubly_stochastic() -> None:
    top = hierarchical(12, local_world_size=3, machines="base", machine_options={"k": 1})
    assert top.num_machines == 4 and top.local_world_size == 3 and top.period == 2
    for k in range(top.period):
        expected = np.kron(top.machines.matrix(k), np.full((3, 3), 1 / 3))
        np.testing.assert_allclose(top.matrix(k), expected, rtol=0, atol=1e-15)
    assert top.doubly_stochastic and not top.directed
    np.testing.assert_allclose(period_product(top), np.full((12, 12), 1 / 12), rtol=0, atol=1e-12)


def test_machine_topology_options_and_errors_name_the_fix(monkeypatch: pytest.MonkeyPatch) -> None:
    assert get_topology("hierarchical", 8, local_world_size=8).machines.n == 1  # one machine: 11^T/n
    np.testing.assert_allclose(get_topology("hierarchical", 8, local_world_size=8).matrix(0), 1 / 8)
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "4")
    assert get_topology("hierarchical", 8).local_world_size == 4
    with pytest.raises(ValueError, match="a divisor of n"):
        hierarchical(8, local_world_size=3)
    with pytest.raises(ValueError, match="cannot nest itself"):
        hierarchical(8, local_world_size=2, machines="hierarchical")
    monkeypatch.delenv("LOCAL_WORLD_SIZE")
    with pytest.raises(ValueError, match="pass local_world_size=L"):
        hierarchical(8)


def test_the_simulator_mixes_with_the_combined_matrix() -> None:
    top = build(2, "base", {"k": 1})
    x, comm = values(1, 5), SimulatedCommunicator(top)
    for k in range(STEPS):
        comm.mix([x], k)
    expected = values(1, 5)
    for k in range(STEPS):
        expected = top.weights(k) @ expected
    torch.testing.assert_close(x, expected, rtol=0, atol=1e-12)


@pytest.mark.slow
@pytest.mark.parametrize("intra", INTRA_MACHINE)
@pytest.mark.parametrize("case", range(len(CASES)), ids=[f"L{c[0]}-{c[1]}" for c in CASES])
def test_real_rounds_equal_the_combined_matrix(results: dict, case: int, intra: str) -> None:
    top = build(*CASES[case])
    expected = [values(1, size) for size in SIZES]
    split, into, y = values(2, SIZES[0]), values(3, SIZES[0]), values(2, SIZES[0])
    for k in range(STEPS):
        w = top.weights(k)
        expected = [w @ e for e in expected]
        split = w @ split
        into = into + w @ y - y  # finish(into=..., refill=True): the buffer then takes into's value
        y = into.clone()
    for rank in range(WORLD):
        blocking, got_split, got_into, got_anchor, _, _ = results[((case, intra), rank)]
        for got, want in zip(blocking, expected):
            torch.testing.assert_close(got, want[rank], rtol=0, atol=1e-12)
        torch.testing.assert_close(got_split, split[rank], rtol=0, atol=1e-12)
        torch.testing.assert_close(got_into, into[rank], rtol=0, atol=1e-12)
        torch.testing.assert_close(got_anchor, into[rank], rtol=0, atol=1e-12)


@pytest.mark.slow
@pytest.mark.parametrize("intra", INTRA_MACHINE)
@pytest.mark.parametrize("case", range(len(CASES)), ids=[f"L{c[0]}-{c[1]}" for c in CASES])
def test_machine_average_is_the_exact_mean_of_the_machines_ranks(results: dict, case: int, intra: str) -> None:
    local = CASES[case][0]
    for rank in range(WORLD):
        machine = slice(rank // local * local, (rank // local + 1) * local)
        got = results[((case, intra), rank)][5]
        for buffer, size in zip(got, SIZES):
            torch.testing.assert_close(buffer, values(4, size)[machine].mean(0), rtol=0, atol=1e-12)


@pytest.mark.slow
def test_shared_memory_segments_are_gone_when_the_ranks_are(results: dict) -> None:
    assert not list(Path("/dev/shm").glob("lightning_decent_*"))


@pytest.mark.slow
@pytest.mark.parametrize("case", range(len(CASES)), ids=[f"L{c[0]}-{c[1]}" for c in CASES])
def test_each_rank_sends_one_shard_per_peer_machine(results: dict, case: int) -> None:
    """Across machines a rank sends 1/L of every buffer to each machine it gossips with: its machine's
    link carries one model per peer machine, not L."""
    local, machines, options = CASES[case]
    top = build(local, machines, options)
    shard_bytes = [-(-size // local) * 8 for size in SIZES]
    for rank in range(WORLD):
        machine = rank // local
        peers = sum(len(top.machines.out_neighbors(machine, k)) for k in range(STEPS))
        between = results[((case, "shared_memory"), rank)][4]
        # per step: the blocking round (both buffers) and two split rounds of the first buffer
        assert between["bytes_sent"] == peers * (sum(shard_bytes) + 2 * shard_bytes[0])
        assert between["messages_sent"] == peers * (len(SIZES) + 2)


def test_the_strategy_takes_the_ranks_per_machine_from_its_devices() -> None:
    """``topology="hierarchical"`` without ``local_world_size``: Lightning's devices per node are the
    machine's ranks (Lightning does not set ``LOCAL_WORLD_SIZE``)."""
    from lightning_decent import DecentralizedStrategy

    strategy = DecentralizedStrategy(topology="hierarchical", parallel_devices=[torch.device("cpu")] * 3)
    strategy.num_nodes = 2
    topology = strategy._build_topology(6)
    assert isinstance(topology, HierarchicalTopology)
    assert (topology.local_world_size, topology.num_machines) == (3, 2)
    explicit = DecentralizedStrategy(topology="hierarchical", topology_options={"local_world_size": 2})
    explicit.parallel_devices = [torch.device("cpu")] * 3
    assert explicit._build_topology(6).local_world_size == 2


@pytest.mark.parametrize(
    ("spec", "options", "flat"),
    [
        ("hierarchical", {"machines": "ring"}, "ring"),
        ("hierarchical", {}, "one_peer_exponential"),
        ("alternating_exponential_ring", {}, "one_peer_exponential"),
    ],
)
def test_an_elastic_two_level_topology_gossips_flat_while_its_members_do_not_fill_whole_machines(
    spec: str, options: dict, flat: str
) -> None:
    """Machines of 2 ranks. Whole machines (a lost machine, or the replacement started on the machine that lost
    a rank) keep the two-level graph; a machine that lost one of its ranks, or a joiner on another machine, makes
    the members gossip on the family's flat form over the ranks (doubly stochastic: the average is kept). Without
    the members' machines (not elastic) a mismatch stays an error naming the fix."""
    from lightning_decent.algorithms import get_algorithm
    from lightning_decent.assembly import build_topology

    options = {**options, "local_world_size": 2}
    dsgd = get_algorithm("dsgd")
    lost_a_rank = build_topology(spec, 7, options, dsgd, 1, machines=list("AABBCCD"))
    assert not isinstance(lost_a_rank, HierarchicalTopology) and lost_a_rank.name == get_topology(flat, 7).name
    assert lost_a_rank.doubly_stochastic and lost_a_rank.n == 7
    joined_elsewhere = build_topology(spec, 8, options, dsgd, 1, machines=list("AABBCCDA"))
    assert joined_elsewhere.name == get_topology(flat, 8).name
    whole = build_topology(spec, 8, options, dsgd, 1, machines=list("AABBCCDD"))
    assert whole.name == get_topology(spec, 8, **options).name != joined_elsewhere.name
    if spec == "hierarchical":
        assert (
            isinstance(whole, HierarchicalTopology) and whole.layout_checked
        )  # a lost machine: 3 machines (the alternating ring needs a power of two of them)
        assert isinstance(build_topology(spec, 6, options, dsgd, 1, machines=list("AACCDD")), HierarchicalTopology)
    with pytest.raises(ValueError, match="local_world_size"):
        build_topology(spec, 7, options, dsgd, 1)
