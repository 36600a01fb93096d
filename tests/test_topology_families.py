"""Base-(k+1) graphs (Takezawa et al. 2023) and EquiTopo (Song et al. 2022) against their papers:
exact consensus after one period for every n (Base), the matrix-Bernstein bound of EquiStatic, the
exact expected contraction of EquiDyn and its independence of n, and reproducible random draws."""

from __future__ import annotations

import math

import numpy as np
import pytest

from lightning_decent.topology import (
    base,
    consensus_rate,
    equidyn,
    equistatic,
    equistatic_shifts,
    get_topology,
    hyper_hypercube,
    period_product,
    ring,
    simple_base,
)
from lightning_decent.topology.equitopo import basis
from lightning_decent.topology.finite_time import base_digits, hyper_hypercube_factors, smooth_part


def exact_average(n: int) -> np.ndarray:
    return np.full((n, n), 1.0 / n)


# ---- Base-(k+1) ------------------------------------------------------------------------------------
@pytest.mark.parametrize("k", [1, 2, 3])
def test_base_averages_exactly_after_one_period_for_every_n(k: int) -> None:
    for n in range(2, 65):
        top = base(n, k)
        np.testing.assert_allclose(period_product(top), exact_average(n), rtol=0, atol=1e-12, err_msg=f"n={n}")
        assert top.max_degree <= k, (n, top.max_degree)
        assert top.doubly_stochastic and not top.directed
        assert top.period <= 2 * math.log(n, k + 1) + 2  # the paper's O(log_{k+1} n) rounds


def test_the_period_stays_logarithmic_up_to_512_nodes() -> None:
    for k in (1, 3, 6):
        periods = [base(n, k).period for n in range(65, 513, 11)]
        bounds = [2 * math.log(n, k + 1) + 2 for n in range(65, 513, 11)]
        assert all(p <= b for p, b in zip(periods, bounds))


def test_powers_of_two_with_one_peer_are_the_hypercube() -> None:
    """k = 1, n = 2^r: round l pairs i with i XOR 2^l, weights 1/2 (r rounds)."""
    top = base(16, 1)
    assert top.period == 4
    for level in range(4):
        for i in range(16):
            assert top.in_neighbors(i, level) == [(i ^ (1 << level), 0.5)]


def test_hyper_hypercube_cliques_follow_the_mixed_radix_digits() -> None:
    assert hyper_hypercube_factors(12, 3) == [3, 4]  # 4 taken first, listed increasing
    top = hyper_hypercube(12, 3)
    assert [top.in_neighbors(0, k) for k in range(2)] == [
        [(1, 1 / 3), (2, 1 / 3)],
        [(3, 0.25), (6, 0.25), (9, 0.25)],
    ]
    with pytest.raises(ValueError, match="prime factor of n to be <= k\\+1"):
        hyper_hypercube(10, 2)


def test_simple_base_on_five_nodes_follows_the_hand_derivation() -> None:
    """5 = 4 + 1 in base 2: V_0 = {0..3} runs the 2-round hypercube, node 4 waits; round 2 bridges node 4
    with node 3 at weight |V_0|/n = 4/5 (nodes 0 and 1 average, 2 has no free partner); rounds 3-4 run
    V_0's hypercube again, which spreads node 3's share: 5 rounds, then every node holds the average."""
    top = simple_base(5, 1)
    assert top.period == 5 and base(5, 1).period == 5
    bridge = top.matrix(2)
    np.testing.assert_allclose(bridge[4], [0, 0, 0, 0.8, 0.2])
    np.testing.assert_allclose(bridge[3], [0, 0, 0, 0.2, 0.8])
    np.testing.assert_allclose(bridge[:3, :3], [[0.5, 0.5, 0], [0.5, 0.5, 0], [0, 0, 1]])
    np.testing.assert_array_equal(top.matrix(3), top.matrix(0))
    np.testing.assert_allclose(period_product(top), exact_average(5), rtol=0, atol=1e-15)


def test_base_splits_off_the_smooth_part_when_it_saves_rounds() -> None:
    """n = 24, k = 1: 24 = 8 x 3. Blocks of 3 run simple Base-2 (3 rounds), then the 3 strided sets of 8
    run the 3-round hypercube: 6 rounds, fewer than simple Base-2 on 24 nodes."""
    assert (smooth_part(24, 1), base_digits(24, 2)) == (8, [(1, 4), (1, 3)])
    assert simple_base(24, 1).period > base(24, 1).period == 6
    last = base(24, 1).matrix(5)
    assert last[0, 12] == 0.5 and last[0, 0] == 0.5  # the strided set {0, 3, ..., 21}: hop 4 x 3


def test_base_is_registered_with_k() -> None:
    assert get_topology("base", 12, k=2).max_degree == 2
    with pytest.raises(ValueError, match="integer k >= 1"):
        base(12, 0)


# ---- EquiStatic ------------------------------------------------------------------------------------
@pytest.mark.parametrize("directed", [True, False])
def test_equistatic_meets_the_matrix_bernstein_bound(directed: bool) -> None:
    """Song et al.: M >= 8 ln(2n/delta) / (3 eps^2) shifts give ||W - 11^T/n|| <= eps with probability
    >= 1 - delta. Ten seeds at two sizes: at least (1 - delta) of them must be within eps."""
    eps, delta, seeds = 0.5, 0.2, 10
    for n in (24, 96):
        m = equistatic_shifts(n, eps, delta)
        assert m == math.ceil(8 * math.log(2 * n / delta) / (3 * eps**2))
        rates = [consensus_rate(equistatic(n, M=m, seed=s, directed=directed)) for s in range(seeds)]
        assert sum(r <= eps for r in rates) >= (1 - delta) * seeds, rates


def test_equistatic_with_order_ln_n_shifts_keeps_its_rate_while_the_ring_s_tends_to_one() -> None:
    sizes = (32, 96, 288)
    medians = [
        np.median([consensus_rate(equistatic(n, M=math.ceil(3 * math.log(n)), seed=s)) for s in range(4)])
        for n in sizes
    ]
    assert max(medians) < 0.55, medians
    assert [round(consensus_rate(ring(n)), 3) for n in sizes] == [0.987, 0.999, 1.0]


def test_equistatic_weights_and_degree() -> None:
    top = equistatic(32, M=3, seed=4, directed=True)
    shifts = np.random.default_rng(4).integers(1, 32, size=3)  # this draw is connected: gcd(32, shifts) = 1
    assert math.gcd(32, *map(int, shifts)) == 1
    expected = sum(basis(32, int(u)).toarray() for u in shifts) / 3
    np.testing.assert_allclose(top.matrix(0), expected, rtol=0, atol=1e-15)
    assert top.directed and top.max_degree <= 3
    undirected = equistatic(32, M=3, seed=4)
    np.testing.assert_allclose(undirected.matrix(0), (expected + expected.T) / 2, rtol=0, atol=1e-15)
    assert equistatic(64).max_degree <= 2 * 6  # default M = ceil(log2 n): symmetric degree <= 2M


def test_a_disconnected_equistatic_draw_is_redrawn_with_the_next_seed() -> None:
    """Two shifts sharing a factor with n = 16 (both even: no path from even to odd nodes) are redrawn."""

    def connected(seed: int) -> bool:
        return math.gcd(16, *map(int, np.random.default_rng(seed).integers(1, 16, size=2))) == 1

    seed = next(s for s in range(200) if not connected(s) and connected(s + 1))
    np.testing.assert_array_equal(
        equistatic(16, M=2, seed=seed).matrix(0), equistatic(16, M=2, seed=seed + 1).matrix(0)
    )
    assert consensus_rate(equistatic(16, M=2, seed=seed)) < 1


# ---- EquiDyn ---------------------------------------------------------------------------------------
def contraction(n: int, eta: float) -> float:
    """E ||W x - xbar||^2 / ||x - xbar||^2 for OD-EquiDyn with u uniform on {1..n-1}."""
    return 1 - 2 * eta + 2 * eta**2 * (n - 1) / n


@pytest.mark.parametrize("n", [5, 12, 64, 257])
@pytest.mark.parametrize("eta", [None, 0.3, 1.0])
def test_equidyn_expected_contraction_is_exact_over_all_shifts(n: int, eta: float | None) -> None:
    """Averaged over every shift u (the exact expectation, no sampling): for any mean-zero x,
    E||W_u x||^2 = (1 - 2 eta + 2 eta^2 (n-1)/n) ||x||^2 <= 1 - 2 eta (1 - eta) (n-independent)."""
    eta_value = n / (2 * (n - 1)) if eta is None else eta
    x = np.random.default_rng(n).standard_normal(n)
    x -= x.mean()
    ratios = [np.sum(((1 - eta_value) * x + eta_value * (basis(n, u) @ x)) ** 2) / (x @ x) for u in range(1, n)]
    mean_ratio = float(np.mean(ratios))
    assert mean_ratio == pytest.approx(contraction(n, eta_value), rel=1e-12)
    assert mean_ratio <= 1 - 2 * eta_value * (1 - eta_value) + 1e-12
    if eta is None:
        assert mean_ratio < 0.5  # the default eta = n / (2(n-1)) minimises it: (n-2) / (2(n-1))


@pytest.mark.parametrize("directed", [True, False])
def test_equidyn_drawn_sequence_contracts_at_an_n_independent_rate(directed: bool) -> None:
    """The mean of ||W(k) x_k||^2 / ||x_k||^2 over one drawn period (fresh mean-zero x_k each round)
    estimates the expected contraction: the formula for OD-EquiDyn, and the same n-independent value
    for both sizes for OU-EquiDyn (which leaves a few nodes unmatched per round)."""
    measured = {}
    for n in (16, 1024):
        top = equidyn(n, seed=1, directed=directed, period=600)
        rng = np.random.default_rng(2)
        ratios = []
        for k in range(top.period):
            x = rng.standard_normal(n)
            x -= x.mean()
            y = top.sparse(k) @ x
            ratios.append((y @ y) / (x @ x))
        measured[n] = float(np.mean(ratios))
        if directed:
            assert measured[n] == pytest.approx(contraction(n, n / (2 * (n - 1))), abs=0.03), measured
    assert abs(measured[16] - measured[1024]) < 0.06 and max(measured.values()) < 0.6, measured


def test_equidyn_is_one_peer_doubly_stochastic_and_reproducible() -> None:
    top = equidyn(12, seed=3, period=50)
    assert top.period == 50 and top.max_degree == 1 and top.doubly_stochastic
    assert top.fingerprint() == equidyn(12, seed=3, period=50).fingerprint()  # every rank draws the same
    assert top.fingerprint() != equidyn(12, seed=4, period=50).fingerprint()
    shifts = np.random.default_rng(3).integers(1, 12, size=50)
    for k in (0, 17, 49):
        assert top.in_neighbors(0, k) == [(int(shifts[k]), pytest.approx(0.5))]  # eta (n-1)/n, eta = 12/22
    undirected = equidyn(12, seed=3, period=50, directed=False)
    assert not undirected.directed and undirected.max_degree == 1 and undirected.doubly_stochastic


def test_equidyn_from_an_equistatic_basis_samples_only_its_shifts() -> None:
    top = equidyn(64, M=4, seed=7, period=200)
    basis_shifts = set(map(int, np.random.default_rng(7).integers(1, 64, size=4)))
    used = {top.in_neighbors(0, k)[0][0] for k in range(top.period)}
    assert used <= basis_shifts and len(used) > 1


def test_equidyn_errors_name_the_fix() -> None:
    with pytest.raises(ValueError, match="0 < eta <= 1"):
        equidyn(8, eta=1.5)
    with pytest.raises(ValueError, match="n >= 2"):
        equidyn(1)
    with pytest.raises(ValueError, match="positive integer period"):
        equidyn(8, period=0)
