"""The algorithms, driven by the simulator, against independent reference simulations (plain float64 numpy).

Problem: 8 nodes on the 1/3-ring, ``f_i(x) = 1/2 (x - c_i)^T H_i (x - c_i)``, exact
gradients, ``x^0 = 0``, K = 300 steps, lr 0.1, float64. Columns: ``|xbar - x*|``, consensus
``(1/n) sum ||x_i - xbar||^2``, ``max_i ||x_i - x*||``. Rows above 1e-8 must match to 1e-8 relative;
rows at the rounding floor (1e-11 ... 1e-14) only need to be below 1e-9.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from lightning_decent.algorithms import GUT
from lightning_decent.sim import Quadratic, simulate
from lightning_decent.topology import get_topology, lazy

K, LR = 300, 0.1

# (row of §3.6, algorithm, options, local SGD momentum, (|xbar - x*|, consensus, max_i |x_i - x*|))
ROWS = [
    ("DSGD-ATC", "dsgd", {}, 0.0, (1.235937638084e-01, 4.860066164076e-01, 1.032875691006e00)),
    ("DmSGD-ATC", "dsgd", {}, 0.9, (2.875811825060e-01, 3.111125820453e00, 3.072524972836e00)),
    ("QG-DSGDm (epfml)", "qg_dsgdm", {}, 0.0, (1.235937638338e-01, 4.860066164112e-01, 1.032875691035e00)),
    ("ExactDiffusion (Wbar)", "exact_diffusion", {}, 0.0, (5.081515360478e-14, 2.069170984001e-32, 5.092457261620e-14)),
    ("GUT code (beta=0, mu=0.9)", "gut", {}, 0.0, (1.854048794456e-02, 1.789185211157e-02, 1.827843417733e-01)),
    (
        "QG-GUTm code (beta=0.9, mu=0.06)",
        "qg_gut",
        {},
        0.0,
        (1.149503349632e-01, 6.937866623300e-01, 1.171738719078e00),
    ),
    (
        "GUT code beta=0.9, mu=0",
        "gut",
        {"mu": 0.0, "beta": 0.9},
        0.0,
        (1.235937511969e-01, 8.069966867268e-01, 1.266186647675e00),
    ),
    ("GUT code beta=0, mu=0", "gut", {"mu": 0.0}, 0.0, (1.235937638084e-01, 8.069965980135e-01, 1.266186596473e00)),
    (
        "DSGD-PGA (H=4)",
        "dsgd",
        {"global_average_every": 4},
        0.0,
        (5.365888334875e-02, 3.081487911020e-33, 5.365888334875e-02),
    ),
]


def reference_metrics(x: np.ndarray, optimum: np.ndarray) -> tuple[float, float, float]:
    xbar = x.mean(0)
    return (
        float(np.linalg.norm(xbar - optimum)),
        float(((x - xbar) ** 2).sum(1).mean()),
        float(np.linalg.norm(x - optimum, axis=1).max()),
    )


def assert_matches_row(values: tuple[float, ...], expected: tuple[float, ...]) -> None:
    for value, ref in zip(values, expected):
        if ref > 1e-8:
            assert value == pytest.approx(ref, rel=1e-8, abs=0)
        else:
            assert abs(value) < 1e-9


@pytest.fixture(scope="module")
def problem() -> Quadratic:
    return Quadratic(n=8)


def test_problem_is_the_reference_problem(problem: Quadratic) -> None:
    assert problem.optimum.tolist() == pytest.approx([0.5, 0.047619047619], abs=1e-12)


@pytest.mark.parametrize(("row", "algorithm", "options", "momentum", "expected"), ROWS, ids=[r[0] for r in ROWS])
def test_reference_rows(problem: Quadratic, row, algorithm, options, momentum, expected) -> None:
    result = simulate(problem, algorithm, "ring", steps=K, lr=LR, momentum=momentum, eval_every=K, **options)
    assert_matches_row(reference_metrics(result.params.numpy(), problem.optimum.numpy()), expected)


def numpy_grad(problem: Quadratic):
    curvature, centers = problem.curvature.numpy(), problem.centers.numpy()
    return lambda x: curvature * (x - centers)


def test_gradient_tracking_is_the_one_round_atc_form(problem: Quadratic) -> None:
    # Our GT (Pu & Nedić form): x^{k+1} = W(x^k - lr y^k), y^{k+1} = W y^k + g^{k+1} - g^k, y^0 = g^0.
    # §3.6's "GT-ATC" (two rounds) and "GT-DIGing" (x^{k+1} = W x^k - lr y^k) are other forms with the
    # same fixed point; compare our form step by step with a numpy reference before the rounding floor.
    grad, w = numpy_grad(problem), get_topology("ring", 8).matrix(0)
    steps = 30
    x = np.zeros((8, 2))
    g = grad(x)
    y = g.copy()
    for _ in range(steps):
        x = w @ (x - LR * y)
        g_new = grad(x)
        y = w @ y + g_new - g
        g = g_new
    result = simulate(problem, "gradient_tracking", "ring", steps=steps, lr=LR, eval_every=steps)
    np.testing.assert_allclose(result.params.numpy(), x, rtol=1e-12, atol=1e-14)
    # ... and it reaches the exact optimum like both reference forms (rows at 9.8e-15 / 9.3e-13).
    converged = simulate(problem, "gradient_tracking", "ring", steps=K, lr=LR, eval_every=K)
    assert_matches_row(reference_metrics(converged.params.numpy(), problem.optimum.numpy()), (1e-14,) * 3)


def test_exact_diffusion_trajectory_matches_the_reference_recursion(problem: Quadratic) -> None:
    # Before the floor: the reference ED recursion, psi^{k+1} = x - lr g, x = Wbar(psi^{k+1} + x - psi^k).
    grad, w_bar = numpy_grad(problem), lazy(get_topology("ring", 8)).matrix(0)
    steps = 30
    x, psi = np.zeros((8, 2)), np.zeros((8, 2))
    for _ in range(steps):
        psi_new = x - LR * grad(x)
        x = w_bar @ (psi_new + x - psi)
        psi = psi_new
    result = simulate(problem, "exact_diffusion", "ring", steps=steps, lr=LR, eval_every=steps)
    np.testing.assert_allclose(result.params.numpy(), x, rtol=1e-12, atol=1e-14)


def test_gut_on_a_time_varying_graph_mixes_the_model_difference_with_this_steps_w(problem: Quadratic) -> None:
    # On a changing W the static neighbour sum would be wrong; GUT then sends x^t - x^{t-1} too and uses
    # a^t = W(t)(x^t - x^{t-1}) + b G^{t-1}, G^t = W(t) x^t - x^t (a numpy transcription of that rule).
    topology = get_topology("one_peer_exponential", 8)
    mu, beta, steps = 0.3, 0.3, 40
    grad = numpy_grad(problem)
    x, x_prev = np.zeros((8, 2)), np.zeros((8, 2))
    gossip_prev, update_prev, momentum = np.zeros((8, 2)), np.zeros((8, 2)), np.zeros((8, 2))
    for t in range(steps):
        w = topology.matrix(t)
        a = w @ (x - x_prev) + (1 + beta) * gossip_prev
        gossip = w @ x - x
        update = LR * grad(x + gossip) - gossip
        momentum = beta * momentum + update - mu * a - mu * update_prev
        x_prev, gossip_prev, update_prev = x, gossip, update
        x = x - momentum
    algorithm = GUT(mu=mu, beta=beta)
    result = simulate(problem, algorithm, topology, steps=steps, lr=LR, eval_every=steps)
    assert algorithm.buffers_per_round == 2
    np.testing.assert_allclose(result.params.numpy(), x, rtol=1e-12, atol=1e-14)


def test_gut_sends_one_buffer_on_a_static_graph_and_the_two_buffer_form_agrees(problem: Quadratic) -> None:
    static = simulate(problem, "gut", "ring", steps=K, lr=LR, eval_every=K)
    # A global-averaging period longer than the run switches GUT to its two-buffer form without averaging.
    both = simulate(problem, "gut", "ring", steps=K, lr=LR, eval_every=K, global_average_every=10 * K)
    assert (static.buffers_per_round, both.buffers_per_round) == (1, 2)
    assert static.bytes_sent_per_node_step * 2 == both.bytes_sent_per_node_step
    torch.testing.assert_close(static.params, both.params, rtol=1e-12, atol=1e-14)
