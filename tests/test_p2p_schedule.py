"""The link schedule of a gossip round, and real gloo rounds that follow it.

Every topology of the library, for several sizes and every phase of a time-varying graph: the
rounds of :func:`~lightning_decent.comm.schedule.gossip_rounds` cover each edge of ``W(step)`` once,
no rank sends to or receives from more than one peer in a round, and there are exactly
``max(max out-degree, max in-degree)`` rounds (König). Then one spawned gloo world checks that
scheduled mixing, and the split ``start_mix``/``finish`` used by overlap, still equal ``W @ X``.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from mp_launch import run_gloo_world

from lightning_decent.comm import NonFiniteValueError, P2PCommunicator
from lightning_decent.comm.p2p import FUSED_SLICE, _add_correction, _Phase
from lightning_decent.comm.schedule import directed_edges, gossip_rounds
from lightning_decent.topology import TOPOLOGIES, Topology, get_topology

SIZES = (2, 3, 5, 6, 8, 12, 16)


def options(name: str, n: int) -> dict | None:
    """Builder options for ``name`` at size ``n``; ``None`` where the graph does not exist for ``n``."""
    if name == "erdos_renyi":
        return {"p": 0.5, "seed": 1}
    if name in ("grid", "torus") and n > 3 and all(n % d for d in range(2, n)):
        return {"rows": 1}  # a prime n has no 2-D shape; the 1 x n mesh is accepted when asked for
    if name == "directed_graph":
        return {"edges": [(i, (i + 1) % n) for i in range(n)] + [(i, (i + 3) % n) for i in range(n)]}
    if name == "hierarchical":
        return {"local_world_size": 2, "machines": "base"} if n % 2 == 0 and n > 2 else None
    if name == "equidyn":
        return {"period": 12}
    if name == "base":
        return {"k": 1 + n % 3}
    if name == "alternating_exponential_ring":
        machines = n // 2
        return {"local_world_size": 2} if n % 2 == 0 and machines >= 2 and machines & (machines - 1) == 0 else None
    return {}


def cases() -> list[tuple[str, int, dict]]:
    found = []
    for name in TOPOLOGIES:
        for n in SIZES:
            opts = options(name, n)
            if opts is not None:
                found.append((name, n, opts))
    return found


CASES = cases()


def test_every_topology_is_covered() -> None:
    assert {name for name, _, _ in CASES} == set(TOPOLOGIES)


@pytest.mark.parametrize(("name", "n", "opts"), CASES, ids=[f"{c[0]}-{c[1]}" for c in CASES])
def test_rounds_cover_every_edge_once_and_are_matchings(name: str, n: int, opts: dict) -> None:
    topology = get_topology(name, n, **opts)
    for phase in range(topology.period):
        matrix = topology.matrix(phase)
        rounds = gossip_rounds(matrix)
        edges = directed_edges(matrix)
        assert sorted(edge for r in rounds for edge in r) == edges
        for r in rounds:
            assert len({sender for sender, _ in r}) == len(r), f"a rank sends twice in a round of {name}({n})"
            assert len({receiver for _, receiver in r}) == len(r), f"a rank receives twice in a round of {name}({n})"
        off = (np.abs(matrix) > 1e-10) & ~np.eye(n, dtype=bool)
        degree = max(off.sum(axis=0).max(), off.sum(axis=1).max())
        assert len(rounds) == degree


def test_regular_graphs_get_permutation_rounds() -> None:
    """On a ring every round is a perfect matching: each rank sends one model and receives one."""
    for r in gossip_rounds(get_topology("ring", 8).matrix(0)):
        assert sorted(s for s, _ in r) == sorted(t for _, t in r) == list(range(8))


def test_random_digraphs() -> None:
    rng = np.random.default_rng(0)
    for _ in range(300):
        n = int(rng.integers(2, 24))
        matrix = (rng.random((n, n)) < rng.random()).astype(float)
        rounds = gossip_rounds(matrix)
        assert sorted(edge for r in rounds for edge in r) == directed_edges(matrix)
        assert all(len({s for s, _ in r}) == len({t for _, t in r}) == len(r) for r in rounds)


def test_schedule_is_deterministic() -> None:
    matrix = get_topology("erdos_renyi", 16, p=0.4, seed=3).matrix(0)
    assert gossip_rounds(matrix) == gossip_rounds(matrix.copy())


# ---- real gloo rounds ---------------------------------------------------------------------------
WORLD = 6
DIM = 11
STEPS = 4
GLOO_CASES = [
    ("ring", {}),
    ("exponential", {}),
    ("one_peer_exponential", {}),
    ("star", {}),
    ("directed_ring", {}),
    ("challenging_digraph", {}),
    ("complete", {}),
    ("base", {"k": 1}),
    ("base", {"k": 2}),
    ("equidyn", {"period": 6}),
    ("equidyn", {"period": 6, "directed": False}),
    ("equistatic", {"M": 2}),
    ("hierarchical", {"local_world_size": 2, "machines": "base"}),
]


def label(name: str, opts: dict) -> str:
    """A case's key in the results (a name may appear with several options)."""
    return f"{name}{sorted(opts.items())}"


def values(seed: int) -> torch.Tensor:
    return torch.randn(WORLD, DIM, dtype=torch.float64, generator=torch.Generator().manual_seed(seed))


def _worker(rank: int, queue) -> None:
    for name, opts in GLOO_CASES:
        comm = P2PCommunicator(get_topology(name, WORLD, **opts), rank)
        mixed = values(1)[rank].clone()
        split, into, anchor = values(2)[rank].clone(), values(3)[rank].clone(), values(2)[rank].clone()
        for k in range(STEPS):
            comm.mix([mixed], k)
            # Two buffers in flight at once (as two buckets under overlap), finished both ways.
            first, second = comm.start_mix([split], k), comm.start_mix([anchor], k)
            first.finish(0)
            second.finish(0, into=into)
            anchor.copy_(split)
        queue.put((label(name, opts), rank, mixed, split, into, comm._reverse is not None))
    comm = P2PCommunicator(get_topology("ring", WORLD), rank)
    buf = torch.zeros(DIM, dtype=torch.float64)
    pending = comm.start_mix([buf], 0)
    try:
        comm.start_mix([buf], 1)
        refused = False
    except RuntimeError:
        refused = True
    pending.finish(0)
    try:
        comm.start_mix([torch.full((DIM,), float("nan"), dtype=torch.float64)], 1)
        named = False
    except NonFiniteValueError as err:
        named = f"rank {rank}: NaN or Inf" in str(err)
    queue.put(("double_start", rank, refused, named))


@pytest.fixture(scope="module")
def gloo_results() -> dict:
    items = run_gloo_world(_worker, WORLD, messages=WORLD * (len(GLOO_CASES) + 1))
    return {item[:2]: item[2:] for item in items}


def reference(topology: Topology, x: torch.Tensor, into: torch.Tensor | None = None) -> tuple[torch.Tensor, ...]:
    """Blocking and split rounds: ``x <- W x`` each step; ``into += W y - y`` with ``y`` the split values."""
    y = x.clone()
    for k in range(STEPS):
        x = topology.weights(k) @ x
        if into is not None:
            into = into + topology.weights(k) @ y - y
        y = topology.weights(k) @ y
    return x, y, into


@pytest.mark.parametrize(("name", "opts"), GLOO_CASES)
def test_scheduled_gloo_rounds_equal_the_matrix_product(gloo_results: dict, name: str, opts: dict) -> None:
    topology = get_topology(name, WORLD, **opts)
    mixed, _, _ = reference(topology, values(1))
    _, split, into = reference(topology, values(2), values(3))
    two_way = any(
        bool(((topology.matrix(k) != 0) & (topology.matrix(k).T != 0) & ~np.eye(WORLD, dtype=bool)).any())
        for k in range(topology.period)
    )
    for rank in range(WORLD):
        got_mixed, got_split, got_into, has_reverse = gloo_results[(label(name, opts), rank)]
        torch.testing.assert_close(got_mixed, mixed[rank], rtol=0, atol=1e-12)
        torch.testing.assert_close(got_split, split[rank], rtol=0, atol=1e-12)
        torch.testing.assert_close(got_into, into[rank], rtol=0, atol=1e-12)
        assert has_reverse == two_way  # a second channel only where two ranks send to each other


def test_a_buffer_cannot_have_two_rounds_in_flight(gloo_results: dict) -> None:
    assert all(gloo_results[("double_start", rank)][0] for rank in range(WORLD))


def test_non_finite_values_are_refused_before_sending(gloo_results: dict) -> None:
    assert all(gloo_results[("double_start", rank)][1] for rank in range(WORLD))


@pytest.mark.parametrize("name", ["one_peer_exponential", "exponential", "directed_ring"])
@pytest.mark.parametrize("refill", [False, True])
def test_fused_correction_equals_the_unfused_update_across_slices(name: str, refill: bool) -> None:
    """``into += (W x)_i - x_i`` done slice by slice (and the refill of the snapshot) equals the
    plain formula on a buffer of several slices plus a ragged tail."""
    phase = _Phase(get_topology(name, 8), rank=3, phase=0)
    size = 2 * FUSED_SLICE + FUSED_SLICE // 2 + 7
    gen = torch.Generator().manual_seed(0)
    own, into = (torch.randn(size, generator=gen, dtype=torch.float64) for _ in range(2))
    received = [torch.randn(size, generator=gen, dtype=torch.float64) for _ in phase.in_peers]
    expected = into + (phase.self_weight - 1.0) * own + sum(w * r for (_, w), r in zip(phase.in_peers, received))
    snapshot = own.clone()
    _add_correction(into, snapshot, received, phase, refill)
    torch.testing.assert_close(into, expected, rtol=0, atol=1e-14)
    assert torch.equal(snapshot, into if refill else own)
