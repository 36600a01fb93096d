"""Push-sum algorithms on directed graphs, driven by the simulator.

Reference data: the challenging digraph of Liang, Huang, Xin & Yuan (arXiv:2312.04928): pi, kappa_pi =
2^(n-1), beta_pi = 1/sqrt(2), push-sum ratios, recommended R; and an independent float64 numpy simulation
(challenging digraph n = 4, K = 300, lr = 0.05, x^0 = 0, the quadratic ``problem(4)``, exact gradients,
reporting ``z = x / v``).
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from lightning_decent.algorithms import (
    PUSH_SUM_ALGORITHMS,
    Bucket,
    PushDIGing,
    PushSum,
    get_algorithm,
    recommended_gossip_rounds,
)
from lightning_decent.comm import SimulatedCommunicator
from lightning_decent.sim import LeastSquares, Quadratic, simulate, stacked_average
from lightning_decent.topology import challenging_digraph, directed_ring, equilibrium, from_matrix, get_topology

K, LR = 300, 0.05

# (row of §3.6, algorithm, options, (|zbar - x*|, consensus of z, max_i |z_i - x*|))
DIGRAPH_ROWS = [
    ("SGP / push-sum SGD", "push_sum", {}, (6.632921732089e-03, 3.069571201834e-03, 7.215975696286e-02)),
    ("Push-DIGing", "push_diging", {}, (2.052985092501e-11, 1.912149193411e-27, 2.057932834816e-11)),
    (
        "MG-Push-DIGing R=3",
        "mg_push_diging",
        {"rounds": 3},
        (2.071252473337e-11, 7.602271417728e-30, 2.071451087332e-11),
    ),
]


def reference_metrics(z: np.ndarray, optimum: np.ndarray) -> tuple[float, float, float]:
    """The reference simulation's metrics on the de-biased models ``z``."""
    zbar = z.mean(0)
    return (
        float(np.linalg.norm(zbar - optimum)),
        float(((z - zbar) ** 2).sum(1).mean()),
        float(np.linalg.norm(z - optimum, axis=1).max()),
    )


def assert_matches_row(values: tuple[float, ...], expected: tuple[float, ...]) -> None:
    for value, ref in zip(values, expected):
        if ref > 1e-8:
            assert value == pytest.approx(ref, rel=1e-8, abs=0)
        else:
            assert abs(value) < 1e-9


# ---- §3.6 digraph rows -------------------------------------------------------------------------------


@pytest.mark.parametrize(("row", "algorithm", "options", "expected"), DIGRAPH_ROWS, ids=[r[0] for r in DIGRAPH_ROWS])
def test_digraph_reference_rows(row: str, algorithm: str, options: dict, expected: tuple[float, ...]) -> None:
    problem = Quadratic(n=4)
    assert problem.optimum.tolist() == pytest.approx([0.277777777778, 0.111111111111], abs=1e-12)
    result = simulate(problem, algorithm, "challenging_digraph", steps=K, lr=LR, eval_every=K, **options)
    assert_matches_row(reference_metrics(result.params.numpy(), problem.optimum.numpy()), expected)
    # the push-sum weights converge to n * pi (§3.4b: pi = (8, 4, 2, 1) / 15)
    np.testing.assert_allclose(result.push_weights.ravel().numpy(), 4 * np.array([8, 4, 2, 1]) / 15, rtol=1e-12)


def test_metrics_use_the_network_average_sum_v_z_over_n() -> None:
    # Column-stochastic W keeps sum_i x_i = sum_i v_i z_i, so after one step from x^0 = 0 the network
    # average is exactly -lr * mean_i grad f_i(0), while the plain mean of z is not.
    problem = Quadratic(n=4)
    result = simulate(problem, "push_sum", "challenging_digraph", steps=1, lr=LR, eval_every=1)
    expected = -LR * (problem.curvature * (0 - problem.centers)).mean(0)
    xbar = stacked_average(result.params, result.push_weights)
    torch.testing.assert_close(xbar, expected, rtol=1e-14, atol=1e-15)
    assert not torch.allclose(result.params.mean(0), expected)
    assert result.series["loss"][-1] == pytest.approx(problem.global_loss(expected).item(), rel=1e-14)
    consensus = (result.params - xbar).pow(2).sum(1).mean().item()
    assert result.series["consensus"][-1] == pytest.approx(consensus, rel=1e-14)


# ---- push-sum averaging ------------------------------------------------------------------------------


def push_sum_averaging(topology_name: str, z0: torch.Tensor, rounds: int) -> list[torch.Tensor]:
    """Push-sum averaging through :class:`PushSum`'s own hooks with a zero local step: ``z`` after each round."""
    topology = get_topology(topology_name, len(z0))
    algorithm = PushSum()
    comm = SimulatedCommunicator(algorithm.prepare_topology(topology))
    bucket = Bucket(z0.clone())
    algorithm.init_state(bucket)
    history = []
    for k in range(rounds):
        algorithm.before_step([bucket], comm, k)
        algorithm.after_step([bucket], comm, k)  # no optimizer step in between: pure averaging
        history.append(bucket.params.clone())
    return history


def test_push_sum_ratios_on_the_challenging_digraph_match_the_reference() -> None:
    z0 = torch.arange(4.0, dtype=torch.float64).unsqueeze(1)
    history = push_sum_averaging("challenging_digraph", z0, 10)
    expected = {
        1: (1.8, 0.0, 1.0, 2.0),
        5: (1.521739130435, 1.454545454545, 1.470588235294, 1.555555555556),
        10: (1.500228832952, 1.501372369625, 1.497247706422, 1.498168498168),
    }
    for k, ratios in expected.items():
        np.testing.assert_allclose(history[k - 1].ravel().numpy(), ratios, rtol=0, atol=5e-13)


@pytest.mark.parametrize("name", ["challenging_digraph", "directed_ring"])
def test_push_sum_reaches_the_average_where_plain_gossip_reaches_pi_times_the_sum(name: str) -> None:
    n = 5 if name == "directed_ring" else 4
    z0 = torch.tensor([[0.0, 3.0], [1.0, -1.0], [2.0, 0.5], [3.0, 2.0], [7.0, 1.0]], dtype=torch.float64)[:n]
    topology = get_topology(name, n)
    rounds = 200
    z = push_sum_averaging(name, z0, rounds)[-1]
    torch.testing.assert_close(z, z0.mean(0).expand(n, -1), rtol=0, atol=1e-12)

    # plain gossip (comm.mix repeated) on a column-stochastic W: W^k -> pi 1^T, so x_i -> pi_i sum_j x_j
    plain = z0.clone()
    comm = SimulatedCommunicator(topology)
    for k in range(rounds):
        comm.mix([plain], k)
    pi = torch.from_numpy(equilibrium(topology.matrix(0))).unsqueeze(1)
    torch.testing.assert_close(plain, pi * z0.sum(0), rtol=0, atol=1e-12)
    if name == "challenging_digraph":  # not the average: node 0 holds 8/15 of the total
        assert (plain - z0.mean(0)).abs().max() > 0.5


def test_challenging_digraph_equilibrium_facts() -> None:
    from lightning_decent.topology import equilibrium_skewness, generalized_consensus_rate

    for n in (4, 8, 16):
        w = challenging_digraph(n).matrix(0)
        assert equilibrium_skewness(w) == pytest.approx(2 ** (n - 1), rel=1e-9)
        assert generalized_consensus_rate(w) == pytest.approx(1 / math.sqrt(2), rel=1e-9)


# ---- MG-Push-DIGing -----------------------------------------------------------------------------------


@pytest.mark.parametrize(("n", "exact"), [(4, 20.3606), (8, 35.0213), (16, 60.9306)])
def test_recommended_gossip_rounds_on_the_challenging_digraph(n: int, exact: float) -> None:
    topology = challenging_digraph(n)
    assert recommended_gossip_rounds(topology) == math.ceil(exact)
    algorithm = get_algorithm("mg_push_diging")
    algorithm.prepare_topology(topology)
    assert algorithm.rounds == math.ceil(exact) and algorithm.rounds_per_step == 2 * math.ceil(exact)


def test_recommended_gossip_rounds_come_from_the_whole_period_of_a_time_varying_graph() -> None:
    # One-peer exponential, n = 2^k: one period (k rounds) averages exactly, so R = k; phase 0 alone
    # (beta_pi = cos(pi/n)) would ask for 14 rounds at n = 8.
    for n, period in ((8, 3), (16, 4)):
        topology = get_topology("one_peer_exponential", n)
        assert topology.period == period
        assert recommended_gossip_rounds(topology) == period
    # n = 6: the period's product is not exact (beta_pi = 0.2165): ceil(1 / (1 - 0.2165)) = 2 periods.
    assert recommended_gossip_rounds(get_topology("one_peer_exponential", 6)) == 2 * 3


def test_mg_push_diging_default_rounds_exist_for_extremely_skewed_digraphs() -> None:
    # n = 64: kappa_pi = 2^63; R = (1 + sqrt(63 ln 2))^2 / (1 - 1/sqrt 2) = 197.6 (the least-squares
    # equilibrium failed with "SVD did not converge" from n = 56).
    exact = (1 + math.sqrt(63 * math.log(2))) ** 2 / (1 - 1 / math.sqrt(2))
    algorithm = get_algorithm("mg_push_diging")
    algorithm.prepare_topology(challenging_digraph(64))
    assert algorithm.rounds == math.ceil(exact) == 198


def rounds_to_target(result, target: float) -> int | None:
    """Communication rounds (rounds per step x steps) until ``excess_loss + consensus`` stays below ``target``."""
    error = [a + b for a, b in zip(result.series["excess_loss"], result.series["consensus"])]
    if error[-1] > target:
        return None
    first = len(error) - 1
    while first > 0 and error[first - 1] <= target:
        first -= 1
    return result.steps[first] * result.rounds_per_step


def test_mg_push_diging_needs_fewer_communication_rounds_than_push_diging_on_a_skewed_digraph() -> None:
    # Challenging digraph n = 16 (kappa_pi = 2^15): one-round Push-DIGing is stable only for tiny steps and
    # crawls; with its recommended R = 61 rounds per exchange, MG-Push-DIGing's mixing is nearly exact and a
    # large step works. Target: excess loss + consensus <= 1e-6 f(x*) on a heterogeneous least-squares
    # problem (exact gradients). Push-DIGing gets half MG's round budget at every step size of a grid that
    # brackets its stability limit (lr 0.005 diverges) and must miss the target at all of them.
    problem = LeastSquares(n=16, dim=10, samples=20, heterogeneity=1.0, seed=0)
    target = 1e-6 * problem.optimum_loss()
    multi = simulate(problem, "mg_push_diging", "challenging_digraph", steps=40, lr=0.5, eval_every=1)
    assert multi.rounds_per_step == 2 * 61
    rounds_multi = rounds_to_target(multi, target)
    assert rounds_multi is not None
    budget_steps = rounds_multi // 2 // 2  # Push-DIGing: 2 rounds per step
    for lr in (0.0005, 0.001, 0.002, 0.003, 0.005):
        single = simulate(problem, "push_diging", "challenging_digraph", steps=budget_steps, lr=lr, eval_every=10)
        assert single.rounds_per_step == 2
        assert rounds_to_target(single, target) is None, lr


# ---- refusals, composition, special cases --------------------------------------------------------------


DIRECTED = {
    "challenging_digraph": lambda: challenging_digraph(4),
    # a strongly connected digraph with unequal out-degrees: column- but not doubly stochastic
    "directed_graph": lambda: get_topology("directed_graph", 4, edges=[[0, 1], [1, 2], [2, 3], [3, 0], [0, 2]]),
}


@pytest.mark.parametrize("algorithm", ["dsgd", "exact_diffusion", "gradient_tracking"])
@pytest.mark.parametrize("topology", list(DIRECTED))
def test_directed_graphs_are_refused_by_doubly_stochastic_algorithms_naming_push_sum(
    algorithm: str, topology: str
) -> None:
    graph = DIRECTED[topology]()
    assert graph.column_stochastic and not graph.doubly_stochastic
    with pytest.raises(ValueError, match="column-stochastic") as info:
        simulate(Quadratic(n=4), algorithm, graph, steps=1, lr=LR)
    message = str(info.value)
    assert all(name in message for name in PUSH_SUM_ALGORITHMS), message


def test_push_diging_refuses_momentum_and_weight_decay_but_push_sum_takes_any_optimizer() -> None:
    for kwargs in ({"momentum": 0.9}, {"weight_decay": 1e-4}, {"optimizer": "adam", "lr": 1e-3}):
        with pytest.raises(ValueError, match=r"torch\.optim\.SGD without momentum"):
            simulate(Quadratic(n=4), "push_diging", "challenging_digraph", steps=1, **{"lr": LR, **kwargs})
    result = simulate(Quadratic(n=4), "push_sum", "challenging_digraph", steps=5, lr=LR, momentum=0.9)
    assert np.isfinite(result.final("loss"))


def test_push_diging_takes_rounds_not_gossip_rounds() -> None:
    with pytest.raises(ValueError, match="rounds=R"):
        get_algorithm("push_diging", gossip_rounds=2)
    with pytest.raises(ValueError, match="rounds=R"):
        get_algorithm(PushDIGing(rounds=2), gossip_rounds=3)
    with pytest.raises(ValueError, match="rounds >= 1"):
        get_algorithm("push_diging", rounds=0)


def test_push_sum_with_gossip_rounds_is_push_sum_on_w_to_the_r() -> None:
    problem = Quadratic(n=4)
    w = challenging_digraph(4).matrix(0)
    ours = simulate(problem, "push_sum", "challenging_digraph", steps=20, lr=LR, eval_every=20, gossip_rounds=2)
    assert ours.rounds_per_step == 2
    x, v = np.zeros((4, 2)), np.ones((4, 1))
    w2 = w @ w
    curvature, centers = problem.curvature.numpy(), problem.centers.numpy()
    for _ in range(20):
        x = w2 @ (x - LR * curvature * (x / v - centers))
        v = w2 @ v
    np.testing.assert_allclose(ours.params.numpy(), x / v, rtol=1e-12, atol=1e-14)


@pytest.mark.parametrize("algorithm", PUSH_SUM_ALGORITHMS)
def test_global_averaging_composes_with_push_sum(algorithm: str) -> None:
    # Averaging x and v together sets v = 1 and every z to the exact network average.
    options = {"rounds": 2} if algorithm == "mg_push_diging" else {}
    result = simulate(
        Quadratic(n=4),
        algorithm,
        "challenging_digraph",
        steps=8,
        lr=LR,
        eval_every=8,
        global_average_every=4,
        **options,
    )
    torch.testing.assert_close(result.push_weights, torch.ones(4, 1, dtype=torch.float64), rtol=0, atol=1e-15)
    assert result.final("consensus") < 1e-28


def test_push_sum_on_a_doubly_stochastic_graph_is_dsgd_exactly() -> None:
    problem = LeastSquares(n=8, dim=6, samples=8, heterogeneity=1.0, seed=0)
    for topology in ("ring", "one_peer_exponential"):
        ours = simulate(problem, "push_sum", topology, steps=30, lr=0.1, momentum=0.9, eval_every=30)
        dsgd = simulate(problem, "dsgd", topology, steps=30, lr=0.1, momentum=0.9, eval_every=30)
        assert torch.equal(ours.push_weights, torch.ones(8, 1, dtype=torch.float64)), topology
        assert torch.equal(ours.params, dsgd.params), topology


def test_push_sum_works_on_a_time_varying_directed_graph() -> None:
    # directed one-peer: node i sends half to (i + 2^(k mod tau)); column-stochastic in every phase.
    n = 8
    phases = []
    for hop in (1, 2, 4):
        w = np.zeros((n, n))
        for i in range(n):
            w[i, i] += 0.5
            w[(i + hop) % n, i] += 0.5
        phases.append(w)
    skewed = [p.copy() for p in phases]
    skewed[0][:, 0] = 0
    skewed[0][0, 0], skewed[0][1, 0], skewed[0][3, 0] = 1 / 3, 1 / 3, 1 / 3  # not doubly stochastic any more
    topology = from_matrix(skewed, require="column", name="skewed_one_peer")
    assert not topology.doubly_stochastic
    result = simulate(LeastSquares(n=n, dim=6, samples=8, seed=1), "push_diging", topology, steps=600, lr=0.1)
    assert result.final("excess_loss") < 1e-12 and result.final("consensus") < 1e-12


def test_directed_ring_is_accepted_by_every_push_sum_algorithm() -> None:
    # (directed_ring is a circulant: doubly stochastic, so D-SGD accepts it too and push-sum keeps v = 1)
    for name in PUSH_SUM_ALGORITHMS:
        algorithm = get_algorithm(name)
        assert algorithm.prepare_topology(directed_ring(4)).n == 4
    for name, graph in DIRECTED.items():
        result = simulate(Quadratic(n=4), "push_diging", graph(), steps=400, lr=LR, eval_every=400)
        assert result.final("excess_loss") < 1e-12 and result.final("consensus") < 1e-20, name


@pytest.mark.parametrize(("name", "options", "rounds"), [("push_sum", {}, 1), ("push_diging", {"rounds": 3}, 6)])
def test_bytes_sent_per_step_count_the_model_and_the_push_sum_scalar(name: str, options: dict, rounds: int) -> None:
    # Edges counted from W; per round x carries the model plus the scalar v, the tracker y only the model
    # (Push-DIGing's tracker is first exchanged at step 1, so 4 of 5 steps send it).
    problem = Quadratic(n=4)
    w = challenging_digraph(4).matrix(0)
    edges = int((w != 0).sum() - (w.diagonal() != 0).sum())
    result = simulate(problem, name, "challenging_digraph", steps=5, lr=LR, eval_every=5, **options)
    assert result.rounds_per_step == rounds
    model, scalar = problem.dim * 8, 8
    x_rounds = 1 if name == "push_sum" else rounds // 2
    y_rounds = 0 if name == "push_sum" else rounds // 2 * 4 / 5  # no tracker exchange at step 0
    expected = edges * (x_rounds * (model + scalar) + y_rounds * model) / problem.n
    assert result.bytes_sent_per_node_step == pytest.approx(expected)
