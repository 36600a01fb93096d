"""Spectral metrics against independently computed tables (float64 numpy) and the papers' closed forms."""

from __future__ import annotations

import math

import numpy as np
import pytest

from lightning_decent.topology import (
    challenging_digraph,
    consensus_error_curve,
    consensus_rate,
    consensus_rate_over_period,
    consensus_rate_per_round,
    directed_graph,
    equilibrium,
    equilibrium_skewness,
    erdos_renyi,
    exponential,
    generalized_consensus_rate,
    get_topology,
    grid,
    lambda_min,
    lazy,
    one_peer_exponential,
    period_product,
    ring,
    spectral_gap,
    torus,
    transient_iterations,
)

# ---- §3.1: rho = ||W - J||_2 --------------------------------------------------------------------
RHO_TABLE = {  # n: ring, directed ring, star, grid, torus, static exp, complete
    4: [0.3333333333, 0.7071067812, 0.7500000000, 0.3333333333, 0.3333333333, 0.3333333333, 0.0],
    6: [0.6666666667, 0.8660254038, 0.8333333333, 0.7500000000, 0.5000000000, 0.5000000000, 0.0],
    8: [0.8047378541, 0.9238795325, 0.8750000000, 0.8535533906, 0.5000000000, 0.5000000000, 0.0],
    16: [0.9492530217, 0.9807852804, 0.9375000000, 0.8686406183, 0.6000000000, 0.6000000000, 0.0],
    32: [0.9871901869, 0.9951847267, 0.9687500000, 0.9657783474, 0.8828427125, 0.6666666667, 0.0],
    64: [0.9967898178, 0.9987954562, 0.9843750000, 0.9677046369, 0.8828427125, 0.7142857143, 0.0],
}
TABLE_NAMES = ["ring", "directed_ring", "star", "grid", "torus", "exponential", "complete"]


@pytest.mark.parametrize("n", sorted(RHO_TABLE))
def test_rho_table(n: int) -> None:
    for name, expected in zip(TABLE_NAMES, RHO_TABLE[n]):
        assert consensus_rate(get_topology(name, n)) == pytest.approx(expected, abs=1e-9), name


def test_rho_table_prime_n5() -> None:
    expected = {"ring": 0.5393446629, "directed_ring": 0.8090169944, "star": 0.8, "exponential": 0.25}
    for name, value in expected.items():
        assert consensus_rate(get_topology(name, 5)) == pytest.approx(value, abs=1e-9), name
    # The table's n = 5 grid/torus are the 1 x 5 shapes, available only when asked for explicitly.
    assert consensus_rate(grid(5, rows=1)) == pytest.approx(0.8726779962, abs=1e-9)
    assert consensus_rate(torus(5, rows=1)) == pytest.approx(0.5393446629, abs=1e-9)


@pytest.mark.parametrize("n", range(2, 65))
def test_exponential_rho_is_one_minus_two_over_tau_plus_one_for_even_n(n: int) -> None:
    tau = math.ceil(math.log2(n))
    rho = consensus_rate(exponential(n))
    if n % 2 == 0:
        assert rho == pytest.approx(1 - 2 / (tau + 1), abs=1e-12)
    else:
        assert rho < 1 - 2 / (tau + 1) - 1e-6


ODD_EXPONENTIAL_RHO = {
    3: 0.0,
    5: 0.25,
    7: 0.3535533906,
    9: 0.4417866110,
    15: 0.4898979486,
    17: 0.5476209105,
    31: 0.5622608851,
    33: 0.6078000437,
    63: 0.6108694827,
}


@pytest.mark.parametrize("n", sorted(ODD_EXPONENTIAL_RHO))
def test_exponential_rho_for_odd_n(n: int) -> None:
    assert consensus_rate(exponential(n)) == pytest.approx(ODD_EXPONENTIAL_RHO[n], abs=1e-9)


@pytest.mark.parametrize("n", [16, 64])
def test_rho_ordering_ring_grid_torus_exponential(n: int) -> None:
    ring_, grid_, torus_, exp_ = (consensus_rate(get_topology(k, n)) for k in ("ring", "grid", "torus", "exponential"))
    assert ring_ > grid_ > torus_ >= exp_ - 1e-12  # torus and exponential tie at n = 16 (both 0.6)
    assert consensus_rate_over_period(one_peer_exponential(n)) < 1e-12


def test_closed_forms() -> None:
    for n in (10, 20, 50):
        assert consensus_rate(ring(n)) == pytest.approx((1 + 2 * math.cos(2 * math.pi / n)) / 3, abs=1e-12)
        assert consensus_rate(get_topology("directed_ring", n)) == pytest.approx(math.cos(math.pi / n), abs=1e-12)
        assert consensus_rate(get_topology("star", n)) == pytest.approx(1 - 1 / n, abs=1e-12)


# ---- §3.1b: lambda_min --------------------------------------------------------------------------
LAMBDA_MIN_TABLE = {  # n: ring, grid, torus, star
    4: [-1 / 3, -1 / 3, -1 / 3, 0.0],
    6: [-1 / 3, -0.3143334894, -0.25, 0.0],
    8: [-1 / 3, -0.3837959396, -0.5, 0.0],
    16: [-1 / 3, -0.4308429100, -0.6, 0.0],
    32: [-1 / 3, -0.4957814500, -0.6, 0.0],
    64: [-1 / 3, -0.5509152583, -0.6, 0.0],
}


@pytest.mark.parametrize("n", sorted(LAMBDA_MIN_TABLE))
def test_lambda_min_table(n: int) -> None:
    for name, expected in zip(["ring", "grid", "torus", "star"], LAMBDA_MIN_TABLE[n]):
        assert lambda_min(get_topology(name, n)) == pytest.approx(expected, abs=1e-9), name


def test_lambda_min_of_ring_n5_and_lazy_graphs() -> None:
    assert lambda_min(ring(5)) == pytest.approx(-0.2060113296, abs=1e-9)
    assert lambda_min(lazy(torus(64))) == pytest.approx(0.2, abs=1e-9)  # (1 + (-0.6)) / 2


def test_lambda_min_refuses_directed_graphs() -> None:
    with pytest.raises(ValueError, match="symmetric W"):
        lambda_min(exponential(8))


# ---- §1.2: Erdős–Rényi ---------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("n", "rho", "lam"),
    [(16, 0.6642305935, -0.1928368775), (32, 0.4911830866, -0.1840530374), (64, 0.3913536436, -0.1330067038)],
)
def test_erdos_renyi_rho_and_lambda_min(n: int, rho: float, lam: float) -> None:
    top = erdos_renyi(n, p=0.5, seed=0)
    assert consensus_rate(top) == pytest.approx(rho, abs=1e-9)
    assert lambda_min(top) == pytest.approx(lam, abs=1e-9)


# ---- §3.3: one-peer exponential over a period --------------------------------------------------------
@pytest.mark.parametrize(("n", "expected"), [(3, 0.25), (5, 0.2022542486), (6, 0.2165063509), (12, 0.2091290759)])
def test_one_peer_exponential_period_rho_for_n_not_a_power_of_two(n: int, expected: float) -> None:
    assert consensus_rate_over_period(one_peer_exponential(n)) == pytest.approx(expected, abs=1e-9)


def test_one_peer_exponential_longer_products_n6() -> None:
    product = period_product(one_peer_exponential(6))
    assert consensus_rate(product @ product) == pytest.approx(0.046875, abs=1e-12)


def test_one_peer_exponential_single_phases_do_not_mix_n16() -> None:
    # Phase 3 pairs i with i + 8 only, so that round alone leaves the graph disconnected: rho = 1.
    top = one_peer_exponential(16)
    assert consensus_rate(top, step=3) == pytest.approx(1.0, abs=1e-12)
    assert consensus_rate_per_round(top) == pytest.approx(1.0, abs=1e-12)
    assert consensus_rate_over_period(top) == pytest.approx(0.0, abs=1e-12)


# ---- §3.4: column-stochastic digraphs ----------------------------------------------------------------
@pytest.mark.parametrize("n", [3, 4, 8, 16])
def test_challenging_digraph_metrics(n: int) -> None:
    top = challenging_digraph(n)
    powers = 2.0 ** np.arange(n - 1, -1, -1)
    np.testing.assert_allclose(equilibrium(top), powers / powers.sum(), rtol=1e-9)
    assert equilibrium_skewness(top) == pytest.approx(2.0 ** (n - 1), rel=1e-9)
    assert generalized_consensus_rate(top) == pytest.approx(1 / math.sqrt(2), abs=1e-9)
    assert consensus_rate(top) == pytest.approx(math.sqrt(n) / 2, abs=1e-9)


@pytest.mark.parametrize("n", [48, 56, 64, 128])
def test_directed_metrics_keep_full_accuracy_at_extreme_skew(n: int) -> None:
    # pi spans 2^(n-1) (1e38 at n = 128): a least-squares solve gave kappa_pi 1.275e14 instead of
    # 1.407e14 at n = 48 and "SVD did not converge" from n = 56.
    top = challenging_digraph(n)
    pi = equilibrium(top)
    powers = 2.0 ** np.arange(n - 1, -1, -1)
    np.testing.assert_allclose(pi, powers / powers.sum(), rtol=1e-9)
    assert equilibrium_skewness(top) == pytest.approx(2.0 ** (n - 1), rel=1e-9)
    assert generalized_consensus_rate(top) == pytest.approx(1 / math.sqrt(2), rel=1e-9)


def test_challenging_digraph_n2_beta_is_one_half() -> None:
    assert generalized_consensus_rate(challenging_digraph(2)) == pytest.approx(0.5, abs=1e-12)


def test_challenging_digraph_push_sum_ratios_n4() -> None:
    w = challenging_digraph(4).matrix(0)
    z, v = np.arange(4.0), np.ones(4)
    expected = {
        1: [1.8, 0.0, 1.0, 2.0],
        5: [1.521739130435, 1.454545454545, 1.470588235294, 1.555555555556],
        10: [1.500228832952, 1.501372369625, 1.497247706422, 1.498168498168],
    }
    for k in range(1, 11):
        z, v = w @ z, w @ v
        if k in expected:
            np.testing.assert_allclose(z / v, expected[k], atol=1e-11)


def test_repaired_seed_digraph_metrics() -> None:
    edges = [(1, 3), (1, 4), (2, 1), (3, 5), (3, 6), (5, 2), (4, 2), (6, 5)]
    top = directed_graph(6, edges=[(s - 1, d - 1) for s, d in edges])
    np.testing.assert_allclose(equilibrium(top), np.array([6, 8, 3, 4, 4, 2]) / 27, atol=1e-12)
    assert equilibrium_skewness(top) == pytest.approx(4.0, rel=1e-12)
    assert generalized_consensus_rate(top) == pytest.approx(0.8421456335, abs=1e-9)
    assert consensus_rate(top) == pytest.approx(0.8827122036, abs=1e-9)


def test_equilibrium_of_a_digraph_with_absorbing_nodes_is_undefined() -> None:
    third = 1 / 3
    printed = np.array(  # Liang et al. (arXiv:2312.04928), as printed: nodes 4 and 6 are absorbing
        [
            [third, 0.5, 0, 0, 0, 0],
            [0, 0.5, 0, 0, 0.5, 0],
            [third, 0, third, 0, 0, 0],
            [third, 0, 0, 1, 0, 0],
            [0, 0, third, 0, 0.5, 0],
            [0, 0, third, 0, 0, 1],
        ]
    )
    with pytest.raises(ValueError, match="not strongly connected"):
        equilibrium(printed)


def test_equilibrium_needs_a_column_stochastic_matrix() -> None:
    with pytest.raises(ValueError, match="column-stochastic"):
        equilibrium(challenging_digraph(4).matrix(0).T)


def test_push_sum_metrics_reduce_to_rho_for_doubly_stochastic_graphs() -> None:
    top = ring(8)
    np.testing.assert_allclose(equilibrium(top), np.full(8, 1 / 8), atol=1e-12)
    assert equilibrium_skewness(top) == pytest.approx(1.0)
    assert generalized_consensus_rate(top) == pytest.approx(consensus_rate(top), abs=1e-12)


# ---- input forms ------------------------------------------------------------------------------------
def test_metrics_accept_topologies_tensors_and_arrays() -> None:
    top = one_peer_exponential(8)
    rho = consensus_rate(top, step=1)
    assert consensus_rate(top.weights(1)) == rho
    assert consensus_rate(np.array(top.matrix(1))) == rho
    assert spectral_gap(top, step=1) == pytest.approx(1 - rho)
    with pytest.raises(ValueError, match="square"):
        consensus_rate(np.ones((2, 3)))


# ---- consensus error curve ----------------------------------------------------------------------------
def test_consensus_error_curve_is_bounded_by_rho_powers() -> None:
    top = ring(16)
    curve = consensus_error_curve(top, rounds=30, seed=3)
    assert curve[0] == 1.0
    assert (curve <= consensus_rate(top) ** np.arange(31) + 1e-12).all()


def test_consensus_error_curve_exact_and_push_sum() -> None:
    assert consensus_error_curve(one_peer_exponential(16), rounds=4)[4] < 1e-14
    assert consensus_error_curve(challenging_digraph(8), rounds=60)[-1] < 1e-6  # push-sum reaches the average


# ---- §3.5: transient iterations ---------------------------------------------------------------------
TRANSIENT_TABLE = [  # n, topology, rho^4 n^3/(1-rho)^2, rho^4 n^3/(1-rho)^4, rho^2 n/(1-rho)^2
    (16, "ring", 1.2914e6, 5.0147e8, 5598.4),
    (16, "star", 8.1000e5, 2.0736e8, 3600.0),
    (16, "grid", 1.3514e5, 7.8321e6, 699.65),
    (16, "torus", 3317.76, 20736, 36.00),
    (16, "exponential", 3317.76, 20736, 36.00),
    (64, "ring", 2.5113e10, 2.4369e15, 6.1706e6),
    (64, "star", 1.0082e9, 4.1295e12, 2.5402e5),
    (64, "grid", 2.2041e8, 2.1132e11, 57463),
    (64, "torus", 1.1602e7, 8.4527e8, 3634.2),
    (64, "exponential", 8.3592e5, 1.0240e7, 400.00),
]


@pytest.mark.parametrize(("n", "name", "iid", "non_iid", "sc"), TRANSIENT_TABLE)
def test_transient_iterations_table(n: int, name: str, iid: float, non_iid: float, sc: float) -> None:
    rho = consensus_rate(get_topology(name, n))
    assert transient_iterations(rho, n, "iid") == pytest.approx(iid, rel=1e-4)
    assert transient_iterations(rho, n, "non_iid") == pytest.approx(non_iid, rel=1e-4)
    assert transient_iterations(rho, n, "strongly_convex_non_iid") == pytest.approx(sc, rel=1e-4)


@pytest.mark.parametrize(("n", "iid", "non_iid"), [(16, 7072.2, 62729), (64, 16599, 44808)])
def test_transient_iterations_erdos_renyi(n: int, iid: float, non_iid: float) -> None:
    rho = consensus_rate(erdos_renyi(n, p=0.5, seed=0))
    assert transient_iterations(rho, n) == pytest.approx(iid, rel=1e-4)
    assert transient_iterations(rho, n, "non_iid") == pytest.approx(non_iid, rel=1e-4)


def test_transient_iterations_limits_and_errors() -> None:
    assert transient_iterations(1.0, 16) == math.inf
    assert transient_iterations(1.0 + 1e-15, 16, "non_iid") == math.inf
    assert transient_iterations(0.0, 16) == 0.0
    with pytest.raises(ValueError, match="iid, non_iid"):
        transient_iterations(0.5, 16, "convex")
