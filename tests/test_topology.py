"""Topology builders against their papers' weight definitions and worked examples, computed independently."""

from __future__ import annotations

from fractions import Fraction

import networkx as nx
import numpy as np
import pytest
import torch

from lightning_decent.topology import (
    TOPOLOGIES,
    Topology,
    alternating_exponential_ring,
    challenging_digraph,
    directed_graph,
    directed_ring,
    erdos_renyi,
    exponential,
    from_matrix,
    get_topology,
    grid,
    lazy,
    one_peer_exponential,
    period_product,
    ring,
    star,
    torus,
)
from lightning_decent.topology.graphs import check_topology_options

UNDIRECTED = ["complete", "ring", "star", "grid", "torus", "erdos_renyi", "alternating_exponential_ring"]
DIRECTED_DOUBLY = ["directed_ring", "exponential", "one_peer_exponential"]
SIZES = [4, 8, 12, 16]


def build(name: str, n: int) -> Topology:
    """The named topology; AER runs on 4 machines of n/4 ranks, Erdős–Rényi with p = 1/2."""
    options = {
        "erdos_renyi": {"p": 0.5},
        "alternating_exponential_ring": {"local_world_size": n // 4},
        "hierarchical": {"local_world_size": 2},
        "equidyn": {"period": 20},
    }
    return get_topology(name, n, **options.get(name, {}))


def is_primitive(top: Topology) -> bool:
    """Some power (<= n^2) of the period's product is strictly positive."""
    product = period_product(top)
    power = product.copy()
    for _ in range(top.n**2):
        if (power > 1e-14).all():
            return True
        power = product @ power
    return False


def ring_edges(n: int) -> list[tuple[int, int]]:
    return [(i, (i + 1) % n) for i in range(n)]


# ---- stochasticity, symmetry, primitivity ---------------------------------------------------------
@pytest.mark.parametrize("n", SIZES)
@pytest.mark.parametrize("name", UNDIRECTED)
def test_undirected_topologies_are_symmetric_doubly_stochastic_and_primitive(name: str, n: int) -> None:
    top = build(name, n)
    assert not top.directed
    assert top.doubly_stochastic
    assert all((top.matrix(k) >= 0).all() for k in range(top.period))
    assert is_primitive(top)


@pytest.mark.parametrize("n", [*SIZES, 5, 7])
@pytest.mark.parametrize("name", DIRECTED_DOUBLY)
def test_directed_doubly_stochastic_topologies(name: str, n: int) -> None:
    top = build(name, n)
    assert top.directed
    assert top.doubly_stochastic
    assert is_primitive(top)


@pytest.mark.parametrize("n", [3, 4, 8, 16])
def test_digraphs_are_column_but_not_row_stochastic(n: int) -> None:
    for top in (challenging_digraph(n), directed_graph(n, edges=[*ring_edges(n), (0, 2)])):
        assert top.column_stochastic and not top.row_stochastic
        assert is_primitive(top)


def test_every_registered_name_builds() -> None:
    for name in TOPOLOGIES:
        top = get_topology(name, 8, edges=ring_edges(8)) if name == "directed_graph" else build(name, 8)
        assert isinstance(top, Topology) and top.n == 8 and top.name == name


# ---- exact weights ----------------------------------------------------------------------------------
def test_small_rings() -> None:
    np.testing.assert_array_equal(ring(1).matrix(0), [[1.0]])
    np.testing.assert_array_equal(ring(2).matrix(0), np.full((2, 2), 0.5))
    w = ring(5).matrix(0)
    assert w[0, 0] == w[0, 1] == w[0, 4] == pytest.approx(1 / 3) and w[0, 2] == 0


def test_directed_ring_weights_and_neighbours() -> None:
    top = directed_ring(6)
    assert top.matrix(0)[3, 3] == top.matrix(0)[3, 2] == 0.5
    assert top.in_neighbors(0) == [(5, 0.5)]
    assert top.out_neighbors(0) == [(1, 0.5)]


def test_star_is_metropolis_hastings() -> None:
    w = star(5).matrix(0)
    assert w[0, 0] == pytest.approx(1 / 5)
    assert w[0, 3] == w[3, 0] == pytest.approx(1 / 5)
    assert w[3, 3] == pytest.approx(4 / 5) and w[1, 2] == 0


def test_grid_shape_degrees_and_mh_weights() -> None:
    w = grid(6).matrix(0)  # 2 x 3 mesh: 0 1 2 / 3 4 5
    degree = ((w > 0) & ~np.eye(6, dtype=bool)).sum(axis=1)
    np.testing.assert_array_equal(degree, [2, 3, 2, 2, 3, 2])
    assert w[0, 1] == pytest.approx(1 / 4)  # 1/(1 + max(2, 3))
    assert w[0, 3] == pytest.approx(1 / 3)  # 1/(1 + max(2, 2))
    assert w[0, 4] == 0 and w[2, 3] == 0  # no diagonal, no wrap
    np.testing.assert_array_equal(grid(6, rows=2).matrix(0), w)
    np.testing.assert_array_equal(grid(6, cols=3).matrix(0), w)


@pytest.mark.parametrize(("n", "degree"), [(16, 4), (8, 3), (6, 3), (4, 2)])
def test_torus_is_regular_with_weights_one_over_degree_plus_one(n: int, degree: int) -> None:
    w = torus(n).matrix(0)
    off = (w > 0) & ~np.eye(n, dtype=bool)
    assert (off.sum(axis=1) == degree).all()
    np.testing.assert_allclose(w[w > 0], 1 / (degree + 1))


def test_exponential_pulls_from_i_plus_powers_of_two() -> None:
    w = exponential(5).matrix(0)  # tau = 3: node i pulls from i+1, i+2, i+4
    np.testing.assert_allclose(w[0], [0.25, 0.25, 0.25, 0.0, 0.25])
    np.testing.assert_allclose(exponential(16).matrix(0)[3, [3, 4, 5, 7, 11]], 0.2)


def test_one_peer_exponential_neighbours_by_step() -> None:
    top = one_peer_exponential(8)
    assert top.period == 3
    for step in range(7):
        hop = 2 ** (step % 3)
        assert top.in_neighbors(0, step) == [(hop, 0.5)]
        assert top.out_neighbors(0, step) == [(8 - hop, 0.5)]
        assert top.self_weight(0, step) == 0.5


def test_challenging_digraph_n4_matrix() -> None:
    expected = [[0.5, 0.5, 0.5, 1.0], [0.5, 0, 0, 0], [0, 0.5, 0, 0], [0, 0, 0.5, 0]]
    np.testing.assert_array_equal(challenging_digraph(4).matrix(0), expected)


def test_directed_graph_weights_use_the_senders_out_degree() -> None:
    # The 6-node digraph example of Liang et al. (arXiv:2312.04928), repaired to be strongly connected; 1-based
    # edges src -> dst.
    edges = [(1, 3), (1, 4), (2, 1), (3, 5), (3, 6), (5, 2), (4, 2), (6, 5)]
    w = directed_graph(6, edges=[(s - 1, d - 1) for s, d in edges]).matrix(0)
    assert w[0, 0] == w[2, 0] == w[3, 0] == pytest.approx(1 / 3)  # node 1 sends to 3 and 4
    assert w[1, 3] == w[3, 3] == 0.5  # node 4 sends to 2
    np.testing.assert_allclose(w.sum(axis=0), 1.0)


# ---- 5-node consensus example of Liang et al. (arXiv:2312.04928), recomputed exactly ---------------
F = Fraction
RING_TABLE = {
    1: [F(5, 3), F(1), F(2), F(3), F(7, 3)],
    5: [F(475, 243), F(52, 27), F(2), F(56, 27), F(497, 243)],
    10: [F(39325, 19683), F(117899, 59049), F(2), F(118297, 59049), F(39407, 19683)],
}
EXP_TABLE = {
    1: [F(7, 4), F(3, 2), F(5, 2), F(9, 4), F(2)],
    5: [F(1025, 512), F(2049, 1024), F(2), F(2047, 1024), F(1023, 512)],
    10: [2 - F(1, 2**19), 2 - F(1, 2**20), F(2), 2 + F(1, 2**20), 2 + F(1, 2**19)],
}


@pytest.mark.parametrize(("top", "table"), [(ring(5), RING_TABLE), (exponential(5), EXP_TABLE)])
def test_seed_five_node_consensus_table(top: Topology, table: dict[int, list[Fraction]]) -> None:
    x0 = np.arange(5.0)
    for rounds, expected in table.items():
        x = np.linalg.matrix_power(top.matrix(0), rounds) @ x0
        np.testing.assert_allclose(x, [float(v) for v in expected], rtol=0, atol=1e-12)


# ---- time-varying graphs --------------------------------------------------------------------------
@pytest.mark.parametrize("n", [2, 4, 8, 16, 32])
def test_one_peer_exponential_averages_exactly_after_tau_rounds(n: int) -> None:
    top = one_peer_exponential(n)
    for start in range(top.period):
        np.testing.assert_allclose(period_product(top, start), np.full((n, n), 1 / n), rtol=0, atol=1e-12)


@pytest.mark.parametrize("n", [3, 6, 12])
def test_one_peer_exponential_is_not_exact_for_other_n(n: int) -> None:
    assert np.abs(period_product(one_peer_exponential(n)) - 1 / n).max() > 1e-3


def test_one_peer_exponential_n6_period_rows() -> None:
    np.testing.assert_allclose(period_product(one_peer_exponential(6))[0], np.array([2, 2, 1, 1, 1, 1]) / 8)


AER_N4_L2 = [
    [[0, 1], [2, 3], [4, 5, 6, 7]],
    [[0, 1, 2, 3], [4, 5], [6, 7]],
    [[0, 1], [4, 5], [2, 3, 6, 7]],
    [[0, 1, 4, 5], [2, 3], [6, 7]],
]


def group_matrix(groups: list[list[int]], n: int) -> np.ndarray:
    w = np.zeros((n, n))
    for g in groups:
        w[np.ix_(g, g)] = 1 / len(g)
    return w


def test_aer_phases_for_four_machines_of_two_ranks() -> None:
    top = alternating_exponential_ring(8, local_world_size=2)
    assert top.period == len(AER_N4_L2)
    for k, groups in enumerate(AER_N4_L2):
        np.testing.assert_array_equal(top.matrix(k), group_matrix(groups, 8))


@pytest.mark.parametrize(("machines", "local"), [(2, 2), (4, 2), (8, 2), (4, 4), (16, 4), (4, 1), (8, 1)])
def test_aer_averages_exactly_after_a_period_from_an_even_phase(machines: int, local: int) -> None:
    n = machines * local
    top = alternating_exponential_ring(n, local_world_size=local)
    assert top.period == 2 * (machines.bit_length() - 1)
    for start in range(0, top.period, 2):
        np.testing.assert_allclose(period_product(top, start), np.full((n, n), 1 / n), rtol=0, atol=1e-12)
    if machines >= 4:  # from an odd phase a full period is not enough (it takes one more phase)
        assert np.abs(period_product(top, 1) - 1 / n).max() > 1e-3
        one_more = top.matrix(top.period + 1) @ period_product(top, 1)
        np.testing.assert_allclose(one_more, np.full((n, n), 1 / n), rtol=0, atol=1e-12)


def test_aer_with_one_rank_per_machine_keeps_singletons() -> None:
    w = alternating_exponential_ring(4, local_world_size=1).matrix(0)
    np.testing.assert_array_equal(np.diag(w)[:2], [1.0, 1.0])  # machines 0 and 1 average within themselves


def test_aer_reads_local_world_size_from_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "2")
    assert alternating_exponential_ring(8).fingerprint() == alternating_exponential_ring(8, 2).fingerprint()
    monkeypatch.delenv("LOCAL_WORLD_SIZE")
    with pytest.raises(ValueError, match="local_world_size=L"):
        alternating_exponential_ring(8)


# ---- Erdős–Rényi ----------------------------------------------------------------------------------
@pytest.mark.parametrize(("n", "edges"), [(16, 55), (32, 236), (64, 1036)])
def test_erdos_renyi_edge_counts(n: int, edges: int) -> None:
    w = erdos_renyi(n, p=0.5, seed=0).matrix(0)
    assert int(((w > 0) & ~np.eye(n, dtype=bool)).sum()) // 2 == edges


def test_erdos_renyi_redraws_a_disconnected_graph_with_the_next_seed() -> None:
    upper = np.triu(np.random.default_rng(0).random((16, 16)) < 0.15, k=1)
    assert not nx.is_connected(nx.from_numpy_array((upper | upper.T).astype(int)))
    assert erdos_renyi(16, p=0.15, seed=0).fingerprint() == erdos_renyi(16, p=0.15, seed=1).fingerprint()


# ---- lazy, from_matrix, registry --------------------------------------------------------------------
def test_lazy_halves_towards_the_identity() -> None:
    top = lazy(one_peer_exponential(8))
    assert top.name == "lazy_one_peer_exponential" and top.period == 3
    np.testing.assert_allclose(top.matrix(1), (one_peer_exponential(8).matrix(1) + np.eye(8)) / 2)
    np.testing.assert_array_equal(get_topology("lazy-ring", 6).matrix(0), lazy(ring(6)).matrix(0))


def test_from_matrix_static_and_time_varying() -> None:
    top = from_matrix(ring(5).weights(), name="mine")
    assert top.name == "mine" and top.period == 1 and top.doubly_stochastic
    assert from_matrix(torch.full((4, 4), 0.25)).fingerprint() == from_matrix(np.full((4, 4), 0.25)).fingerprint()
    phases = [one_peer_exponential(4).matrix(k) for k in range(2)]
    assert from_matrix(phases).period == 2
    assert from_matrix(np.stack(phases)).period == 2
    assert from_matrix(challenging_digraph(4).matrix(0), require="column").column_stochastic


def test_get_topology_accepts_dashes_options_and_built_topologies() -> None:
    assert get_topology("one-peer-exponential", 8).period == 3
    top = get_topology("erdos_renyi", 16, p=0.5, seed=0)
    assert get_topology(top, 16) is top


# ---- errors name the fix ----------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("make", "fragments"),
    [
        (lambda: grid(7), ["prime", "ring", "composite n", "rows=1"]),
        (lambda: torus(13), ["prime", "ring", "composite n"]),
        (lambda: grid(6, rows=4), ["rows * cols == n"]),
        (lambda: torus(6, cols=0), ["positive integer cols="]),
        (lambda: erdos_renyi(16), ["p="]),
        (lambda: erdos_renyi(64, p=0.001), ["larger p"]),
        (lambda: one_peer_exponential(1), ["n >= 2"]),
        (lambda: ring(0), ["n >= 1"]),
        (lambda: star(4, center=4), ["0 <= center < n"]),
        (lambda: alternating_exponential_ring(12, local_world_size=2), ["power-of-two", "local_world_size"]),
        (lambda: alternating_exponential_ring(4, local_world_size=4), ["N = 2, 4, 8"]),
        (lambda: directed_graph(4), ["edges="]),
        (lambda: directed_graph(4, edges=[(0, 4)]), ["(src, dst) pairs", "[0, 4)"]),
        (lambda: directed_graph(4, edges=[(0, 1), (1, 2), (2, 3)]), ["nodes [1, 2, 3] cannot reach node 0"]),
        (lambda: get_topology("hypercube", 8), ["valid names", "one_peer_exponential"]),
        (lambda: get_topology("ring", 8, p=0.5), ["does not take", "options are: none"]),
        (lambda: get_topology(ring(8), 16), ["n=8", "n=16"]),
        (lambda: get_topology(ring(8), 8, p=0.5), ["given by name"]),
    ],
)
def test_builder_errors_name_the_fix(make, fragments: list[str]) -> None:
    with pytest.raises(ValueError) as info:
        make()
    for fragment in fragments:
        assert fragment in str(info.value)


def test_options_are_checked_before_building_also_behind_the_lazy_prefix() -> None:
    check_topology_options("Lazy-Erdos-Renyi", {"p": 0.5, "seed": 3})  # accepted: the builder's parameters
    with pytest.raises(ValueError) as info:
        check_topology_options("lazy_ring", {"p": 0.5})
    assert str(info.value) == "topology 'ring' does not take option(s) ['p']; its options are: none."
    with pytest.raises(ValueError, match=r"Unknown topology 'hypercube'; valid names: complete, ring, .*'lazy_'"):
        check_topology_options("hypercube", {})


def test_a_digraph_with_absorbing_nodes_is_refused_with_them_named() -> None:
    # The 6-node example as printed by Liang et al. (arXiv:2312.04928) has absorbing nodes 4 and 6 (1-based).
    edges = [(1, 3), (1, 4), (2, 1), (3, 5), (3, 6), (5, 2)]
    with pytest.raises(ValueError, match=r"nodes \[3, 5\] cannot reach node 0"):
        directed_graph(6, edges=[(s - 1, d - 1) for s, d in edges])


@pytest.mark.parametrize(
    ("w", "require", "fragments"),
    [
        (np.diag([1.0, 1.0, 1.0, 0.8]), "doubly", ["rows of W must sum to 1", "row 3 sums to 0.8", "require="]),
        (challenging_digraph(4).matrix(0), "doubly", ["rows of W must sum to 1", "row 0 sums to 2.5"]),
        (challenging_digraph(4).matrix(0).T, "column", ["columns of W must sum to 1", "column 0 sums to 2.5"]),
        ([[1.5, -0.5], [-0.5, 1.5]], None, ["W[0, 1] = -0.5 is negative"]),
        (np.ones((2, 3)) / 3, "row", ["square"]),
        ([[1.0, np.nan], [0.0, 1.0]], None, ["non-finite"]),
        (np.eye(3), "doubly", ["not strongly connected", "add edges"]),
        (np.eye(2), "rows", ["require must be"]),
    ],
)
def test_from_matrix_errors_name_the_violation(w, require: str | None, fragments: list[str]) -> None:
    with pytest.raises(ValueError) as info:
        from_matrix(w, require=require)
    for fragment in fragments:
        assert fragment in str(info.value)


def test_from_matrix_names_the_bad_phase() -> None:
    good = one_peer_exponential(4).matrix(0)
    with pytest.raises(ValueError, match=r"rows of W\(1\) must sum to 1"):
        from_matrix([good, np.diag([1.0, 1.0, 1.0, 0.5])])


@pytest.mark.parametrize(
    ("name", "n", "recorded"),
    [
        ("ring", 8, "449202b6291fd242"),
        ("one_peer_exponential", 16, "c0a6017631a01ea1"),
        ("challenging_digraph", 12, "a38e8d3cb54449a3"),
    ],
)
def test_fingerprints_match_those_recorded_in_earlier_checkpoints(name: str, n: int, recorded: str) -> None:
    """Values written into checkpoints by release 0.1 (dense matrices): a checkpoint resumes only if they match."""
    assert get_topology(name, n).fingerprint() == recorded
