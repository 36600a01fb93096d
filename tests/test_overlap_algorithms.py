"""The overlapped (one-step-delayed) forms of CHOCO-SGD, gradient tracking and Exact-Diffusion, in the simulator.

Each is checked against its recursion written out with stacked matrices here (float64, exact gradients,
SGD with momentum), for its invariant (public copies, the trackers' sum, the corrections' sum), for a
resume from the state a checkpoint keeps, and for its convergence against the blocking form. Real 4-process
runs of the same code: ``tests/test_sim_equivalence.py``.
"""

from __future__ import annotations

import copy

import pytest
import torch

from lightning_decent.algorithms import Algorithm, Bucket, Choco, get_algorithm
from lightning_decent.comm import SimulatedCommunicator, get_compressor
from lightning_decent.sim import delay_costs, format_delay_table, get_problem, simulate
from lightning_decent.topology import get_topology, lazy

N, STEPS, LR, MOMENTUM = 8, 25, 0.1, 0.5


@pytest.fixture(scope="module")
def problem():
    return get_problem("logistic", n=N, dim=12, samples=8, heterogeneity=1.0, seed=0)


def gradients(problem, x: torch.Tensor) -> torch.Tensor:
    x = x.detach().clone().requires_grad_(True)
    problem.local_losses(x).sum().backward()
    return x.grad


def run(problem, name: str | Algorithm, steps: int = STEPS, finish: bool = False, **options) -> torch.Tensor:
    result = simulate(
        problem, name, "ring", steps=steps, lr=LR, momentum=MOMENTUM, eval_every=steps, finish_in_flight=finish,
        **options,
    )  # fmt: skip
    return result.params


# ---- CHOCO-SGD ---------------------------------------------------------------------------------------------
def choco_reference(problem, compression: str, options: dict, gamma: float, finish: bool) -> torch.Tensor:
    """``x^{t+1} = x^t - lr m^{t+1} + gamma (W - I) x_hat^t``, ``x_hat^{t+1} = x_hat^t + C(x^{t+1} - x_hat^t)``."""
    compressor = get_compressor(compression, **options)
    w = get_topology("ring", N).weights(0)
    x = problem.initial_params().expand(N, -1).clone()
    x_hat, m = torch.zeros_like(x), torch.zeros_like(x)
    for t in range(STEPS):
        m = MOMENTUM * m + gradients(problem, x)
        x = x - LR * m + gamma * (w @ x_hat - x_hat)
        x_hat = x_hat + compressor.roundtrip(x - x_hat, key=(t, 0))
    return x + gamma * (w @ x_hat - x_hat) if finish else x


@pytest.mark.parametrize(
    ("compression", "options", "gamma"),
    [("int8", {"block": 4}, 1.0), ("topk", {"fraction": 0.25}, 0.5), ("randomk", {"fraction": 0.5}, 0.3)],
)
@pytest.mark.parametrize("finish", [False, True])
def test_overlapped_choco_is_the_delayed_recursion(problem, compression, options, gamma, finish) -> None:
    expected = choco_reference(problem, compression, options, gamma, finish)
    algorithm = Choco(compression, gamma, options, overlap=True)
    ours = run(problem, algorithm, finish=finish)
    torch.testing.assert_close(ours, expected, rtol=0, atol=1e-12)
    blocking = run(problem, "choco", compression=compression, compression_options=options, gamma=gamma)
    assert (ours - blocking).abs().max() > 1e-4  # not the blocking recursion


def test_overlapped_choco_with_the_identity_and_gamma_one_is_overlapped_dsgd(problem) -> None:
    for finish in (False, True):
        choco = run(problem, "choco", finish=finish, compression="none", gamma=1.0, overlap=True)
        torch.testing.assert_close(choco, run(problem, "dsgd", finish=finish, overlap=True), rtol=0, atol=1e-12)


def test_every_neighbour_sum_is_the_weighted_sum_of_the_senders_own_public_copies(problem) -> None:
    # A round's sum (the inbox, complete at once in the simulator) lands in s_i at the next step: between steps
    # s_i + inbox_i = sum_j w_ij x_hat_j with x_hat_j the copy sender j holds, and the copies are the reference's.
    algorithm = get_algorithm("choco", compression="int8", compression_options={"block": 4}, overlap=True)
    graph = get_topology("ring", N)
    comm = SimulatedCommunicator(graph)
    x = problem.initial_params().expand(N, -1).clone()
    bucket = Bucket(x)
    algorithm.init_state(bucket)
    w = graph.weights(0)
    for step in range(STEPS):
        x.sub_(LR * gradients(problem, x))
        algorithm.after_step([bucket], comm, step)
        arrived = bucket.state["neighbour_sum"] + bucket.state["inbox"]
        torch.testing.assert_close(arrived, w @ bucket.state["public"], rtol=0, atol=1e-12)
        assert int(bucket.state["in_flight"]) == step
    assert (bucket.state["public"] - x).abs().max() < 0.05  # the copies follow the models (int8 errors)


def test_a_resume_from_the_state_a_checkpoint_keeps_continues_exactly(problem) -> None:
    # The checkpoint is taken after wait_pending, with the round in flight completed into the inbox; a fresh
    # algorithm (nothing pending) loads that state and applies the round at the next step.
    for name, options in [
        ("choco", {"compression": "int8", "compression_options": {"block": 4}}),
        ("gradient_tracking", {}),
        ("exact_diffusion", {}),
    ]:
        uninterrupted = run(problem, name, steps=2 * STEPS, overlap=True, **options)
        resumed = resume_halfway(problem, name, options)
        assert torch.equal(resumed, uninterrupted), name


def resume_halfway(problem, name: str, options: dict) -> torch.Tensor:
    """Run the strategy's hook order by hand, checkpoint after ``STEPS`` steps and resume in a new algorithm."""
    graph = get_topology("ring", N)
    x = torch.nn.Parameter(problem.initial_params().expand(N, -1).clone())
    optimizer = torch.optim.SGD([x], lr=LR, momentum=MOMENTUM)
    x.grad = torch.zeros_like(x)
    algorithm = get_algorithm(name, overlap=True, **options)
    comm = SimulatedCommunicator(algorithm.prepare_topology(graph))
    bucket = Bucket(x.data, x.grad if algorithm.transforms_gradients else None)
    algorithm.init_state(bucket)
    for step in range(2 * STEPS):
        if step == STEPS:  # save, then load into a new algorithm
            algorithm.wait_pending()
            saved = copy.deepcopy(algorithm.bucket_state_dict(bucket))
            algorithm = get_algorithm(name, overlap=True, **options)
            bucket = Bucket(x.data, x.grad if algorithm.transforms_gradients else None)
            algorithm.init_state(bucket)
            algorithm.load_bucket_state_dict(bucket, saved)
        algorithm.before_step([bucket], comm, step)
        optimizer.zero_grad(set_to_none=False)
        problem.local_losses(x).sum().backward()
        if algorithm.transforms_gradients:
            algorithm.transform_gradients([bucket], comm, step)
        optimizer.step()
        algorithm.after_step([bucket], comm, step)
    return x.detach()


# ---- gradient tracking -------------------------------------------------------------------------------------
def diging_reference(problem, finish: bool) -> torch.Tensor:
    """DIGing: ``y^k = W y^{k-1} + g^k - g^{k-1}``, ``x^{k+1} = W x^k - lr m^{k+1}`` (``m``: SGD momentum of ``y``)."""
    w = get_topology("ring", N).weights(0)
    x = problem.initial_params().expand(N, -1).clone()
    y, previous, m = torch.zeros_like(x), torch.zeros_like(x), torch.zeros_like(x)
    for _ in range(STEPS):
        g = gradients(problem, x)
        y = w @ y + g - previous
        previous = g
        m = MOMENTUM * m + y
        x = w @ x - LR * m
    return w @ x if finish else x


@pytest.mark.parametrize("finish", [False, True])
def test_overlapped_gradient_tracking_is_diging(problem, finish) -> None:
    ours = run(problem, "gradient_tracking", finish=finish, overlap=True)
    torch.testing.assert_close(ours, diging_reference(problem, finish), rtol=0, atol=1e-12)
    assert (ours - run(problem, "gradient_tracking")).abs().max() > 1e-4


def test_overlapped_trackers_sum_to_the_gradients_sum_at_every_step(problem) -> None:
    algorithm = get_algorithm("gradient_tracking", overlap=True)
    gaps: list[float] = []
    original = algorithm.transform_gradients

    def recorded(buckets, comm, step) -> None:
        original(buckets, comm, step)
        b = buckets[0]
        gaps.append((b.state["tracker"].sum(0) - b.state["previous_grad"].sum(0)).abs().max().item())

    algorithm.transform_gradients = recorded  # type: ignore[method-assign]
    simulate(problem, algorithm, "ring", steps=STEPS, lr=LR, eval_every=STEPS)
    assert len(gaps) == STEPS and max(gaps) < 1e-12


# ---- Exact-Diffusion ---------------------------------------------------------------------------------------
def extra_reference(problem, finish: bool) -> torch.Tensor:
    """EXTRA with ``W~ = (I + W)/2``: ``x^{k+1} = (I + W) x^k - W~ x^{k-1} - lr (m^{k+1} - m^k)``."""
    w = get_topology("ring", N).weights(0)
    tilde = (torch.eye(N, dtype=w.dtype) + w) / 2
    x = problem.initial_params().expand(N, -1).clone()
    previous, m, m_previous = x.clone(), torch.zeros_like(x), torch.zeros_like(x)
    for _ in range(STEPS):
        m = MOMENTUM * m + gradients(problem, x)
        x, previous = x + w @ x - tilde @ previous - LR * (m - m_previous), x
        m_previous = m.clone()
    if finish:  # the round in flight applied: a step of the recursion whose local step d^K is zero
        x = x + w @ x - tilde @ previous + LR * m_previous
    return x


@pytest.mark.parametrize("finish", [False, True])
def test_overlapped_exact_diffusion_is_extra(problem, finish) -> None:
    ours = run(problem, "exact_diffusion", finish=finish, overlap=True)
    torch.testing.assert_close(ours, extra_reference(problem, finish), rtol=0, atol=1e-12)
    assert (ours - run(problem, "exact_diffusion")).abs().max() > 1e-4


def test_overlapped_exact_diffusion_keeps_corrections_summing_to_zero(problem) -> None:
    algorithm = get_algorithm("exact_diffusion", overlap=True)
    sums: list[float] = []
    original = algorithm.after_step

    def recorded(buckets, comm, step) -> None:
        original(buckets, comm, step)
        sums.append(buckets[0].state["correction"].sum(0).abs().max().item())

    algorithm.after_step = recorded  # type: ignore[method-assign]
    simulate(problem, algorithm, "ring", steps=STEPS, lr=LR, eval_every=STEPS)
    assert len(sums) == STEPS and max(sums) < 1e-12


def test_non_lazy_overlapped_exact_diffusion_needs_a_positive_definite_w() -> None:
    ring = get_topology("ring", 8)  # lambda_min = -1/3 < 0
    with pytest.raises(ValueError, match=r"lambda_min\(W\) > 0 with overlap=True"):
        get_algorithm("exact_diffusion", lazy_mixing=False, overlap=True).prepare_topology(ring)
    get_algorithm("exact_diffusion", lazy_mixing=False, overlap=True).prepare_topology(lazy(ring))


# ---- what the delay costs ----------------------------------------------------------------------------------
def heterogeneous(seed: int):
    return get_problem("logistic", n=16, dim=20, samples=16, heterogeneity=1.0, seed=seed)


def test_the_delay_costs_choco_little_on_heterogeneous_data() -> None:
    # Ring of 16, lr 0.2, exact gradients, 3 seeds: D-SGD's and CHOCO's heterogeneity bias. Measured ratios of
    # the final excess loss, overlapped / blocking: dsgd 1.12, int8 1.12, top-k 10 % 1.03.
    specs = ["dsgd", "choco:compression=int8", "choco:compression=topk:fraction=0.1"]
    costs = delay_costs(heterogeneous, specs, "ring", [0, 1, 2], steps=600, lr=0.2)
    ratios = {cost.label: cost.ratio() for cost in costs}
    assert all(1.0 < ratio < 1.5 for ratio in ratios.values()), ratios
    assert "| choco:compression=int8 |" in format_delay_table(costs)


@pytest.mark.parametrize("name", ["gradient_tracking", "exact_diffusion"])
def test_overlapped_exact_methods_converge_to_the_exact_optimum_as_fast_as_the_blocking_ones(name: str) -> None:
    # lr 0.2, 1000 steps: the blocking forms reach 1e-11, 2e-8 and 1e-14 on the three seeds, the delayed ones
    # at most as high (measured ratios 0.86 to 1.00).
    for seed in range(3):
        blocking, overlapped = (
            simulate(heterogeneous(seed), name, "ring", steps=1000, lr=0.2, eval_every=1000, overlap=overlap)
            for overlap in (False, True)
        )
        assert overlapped.final("excess_loss") < 1.05 * blocking.final("excess_loss") + 1e-13
        assert overlapped.final("excess_loss") < 1e-7
