"""The n-node simulator: problems, runner, CLI, and the literature's claims at small scale."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from lightning_decent.data import label_skew
from lightning_decent.sim import (
    BASELINE,
    AlgorithmSpec,
    Digits,
    LeastSquares,
    Logistic,
    SimResult,
    compare,
    get_problem,
    make_optimizer,
    simulate,
    transient_step,
)
from lightning_decent.sim.cli import main


# ---- problems ---------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "problem",
    [LeastSquares(n=6, dim=5, samples=4), Logistic(n=6, dim=5, samples=4), Digits(n=6, alpha=0.5, batch_size=0)],
    ids=["least_squares", "logistic", "digits"],
)
def test_batched_losses_equal_one_node_at_a_time(problem) -> None:
    # What real training computes on rank i is row i of the simulator's batched call.
    x = problem.initial_params() + 0.1 * torch.randn(6, problem.dim, generator=torch.Generator().manual_seed(0))
    batched = problem.local_losses(x)
    for i in range(6):
        single = problem.local_losses(x[i : i + 1], nodes=torch.tensor([i]))
        torch.testing.assert_close(single[0], batched[i], rtol=1e-13, atol=0)


@pytest.mark.parametrize("problem", [LeastSquares(n=8, dim=6), Logistic(n=8, dim=6)], ids=["least_squares", "logistic"])
def test_convex_problems_know_their_optimum(problem) -> None:
    grad = torch.func.grad(problem.global_loss)(problem.optimum)
    assert grad.norm() < 1e-12


def local_gradient_norm(kind: type, h: float) -> float:
    """``||(grad f_i(x*))_i||``: zero exactly when every node's optimum is the global one."""
    problem = kind(n=8, dim=6, heterogeneity=h)
    x = problem.optimum.expand(8, -1).clone().requires_grad_(True)
    problem.local_losses(x).sum().backward()
    return float(x.grad.norm())


def test_heterogeneity_moves_the_local_optima_away_from_the_global_one() -> None:
    assert local_gradient_norm(LeastSquares, 0.0) < 1e-12
    assert local_gradient_norm(LeastSquares, 2.0) > 2 * local_gradient_norm(LeastSquares, 0.5) > 0


def test_logistic_with_heterogeneity_zero_has_iid_nodes() -> None:
    assert local_gradient_norm(Logistic, 0.0) < 1e-12  # every node holds the same samples
    assert local_gradient_norm(Logistic, 0.5) > 0.1


def test_dsgd_on_iid_logistic_nodes_has_no_heterogeneity_floor() -> None:
    floors = {}
    for h in (0.0, 0.5):
        result = simulate(Logistic(n=8, dim=6, heterogeneity=h), "dsgd", "ring", steps=1000, lr=1.0, eval_every=500)
        floors[h] = result.final("excess_loss")
    assert floors[0.0] < 1e-12 < 1e-6 < floors[0.5]  # h = 0 converges exactly; h = 0.5 stalls at its bias


def test_digits_alpha_controls_the_label_skew_between_nodes() -> None:
    def skew(alpha: float) -> float:
        problem = Digits(n=8, alpha=alpha)
        histograms = torch.stack(
            [torch.bincount(problem.labels[i][problem.mask[i] > 0], minlength=10) for i in range(8)]
        )
        assert int(histograms.sum()) == 1797 - 360  # every training image on exactly one node
        return label_skew(histograms)

    assert skew(0.1) > 0.5 > 0.1 > skew(100.0)


def test_digits_minibatches_come_from_each_nodes_own_data() -> None:
    problem = Digits(n=8, alpha=0.1, batch_size=16)
    batch = problem.sample_batch(torch.Generator().manual_seed(0))
    assert batch.shape == (8, 16)
    assert bool((batch < problem.counts.unsqueeze(1)).all())
    assert 0.0 < problem.accuracy(problem.initial_params()) < 0.3


def test_get_problem_names() -> None:
    assert get_problem("least-squares", n=4, dim=3).name == "least_squares"
    with pytest.raises(ValueError, match=r"Unknown problem 'mnist'.*digits"):
        get_problem("mnist")


# ---- runner -----------------------------------------------------------------------------------------
def test_spec_parsing_splits_optimizer_and_algorithm_options() -> None:
    spec = AlgorithmSpec.parse("dsgd:momentum=0.9:global_average_every=4:adaptive_global_average=true")
    assert spec.name == "dsgd" and spec.optimizer == {"momentum": 0.9}
    assert spec.options == {"global_average_every": 4, "adaptive_global_average": True}
    with pytest.raises(ValueError, match="write name:key=value"):
        AlgorithmSpec.parse("dsgd:momentum")


def test_parallel_sgd_baseline_keeps_exact_consensus_and_noise_is_seeded() -> None:
    problem = LeastSquares(n=8, dim=5)
    runs = [
        simulate(problem, "dsgd", "complete", steps=20, lr=0.05, noise=0.1, seed=s, eval_every=10) for s in (1, 1, 2)
    ]
    assert max(runs[0].series["consensus"]) < 1e-28
    assert torch.equal(runs[0].params, runs[1].params)
    assert not torch.equal(runs[0].params, runs[2].params)


def _result(values: list[float]) -> SimResult:
    return SimResult(
        "x", "x", "ring", list(range(0, 10 * len(values), 10)), {"loss": values}, torch.zeros(1), 0, 1, 1, 0, 0
    )


def test_transient_step_is_where_the_curve_stays_within_the_factor() -> None:
    baseline = _result([1.0, 0.5, 0.25, 0.125, 0.0625])
    assert transient_step(_result([1.0, 1.5, 0.4, 0.2, 0.1]), baseline, "loss") == 20
    assert transient_step(_result([1.0, 0.9, 0.45, 0.24, 0.13]), baseline, "loss") is None
    assert transient_step(_result([1.0, 0.5, 0.25, 0.125, 0.0625]), baseline, "loss") == 0


def test_cli_writes_json_and_plot(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out_json, out_png = tmp_path / "out.json", tmp_path / "out.png"
    argv = "--problem logistic --n 8 --dim 5 --topology ring --algorithms dsgd,gradient_tracking,exact_diffusion"
    argv += f" --steps 60 --lr 0.1 --heterogeneity 1.0 --noise 0 --seed 0 --json {out_json} --plot {out_png}"
    assert main(argv.split()) == 0
    table = capsys.readouterr().out
    for name in (BASELINE, "dsgd", "gradient_tracking", "exact_diffusion"):
        assert f"\n{name} " in table
    data = json.loads(out_json.read_text())
    assert data["settings"]["problem"] == "logistic"
    for name, series in data["results"].items():
        assert len(series["loss"]) == len(series["steps"]) == len(series["consensus"]) == len(series["grad_norm_sq"])
        assert series["steps"][-1] == 60
        assert ("transient_step" in series) and (name != BASELINE or series["consensus"][-1] < 1e-28)
    assert out_png.read_bytes()[:4] == b"\x89PNG"


def test_cli_runs_in_float32(capsys: pytest.CaptureFixture[str]) -> None:
    argv = "--problem least_squares --n 4 --dim 3 --algorithms dsgd,exact_diffusion --steps 5 --dtype float32"
    assert main(argv.split()) == 0
    assert "exact_diffusion" in capsys.readouterr().out


def test_the_communication_column_gives_local_steps_their_period(capsys: pytest.CaptureFixture[str]) -> None:
    argv = "--problem least_squares --n 4 --dim 3 --algorithms dsgd,local_sgd:H=8,diloco:H=4 --steps 8"
    assert main(argv.split()) == 0
    lines = [line.split("|") for line in capsys.readouterr().out.splitlines() if "|" in line]
    rows = {cells[0].strip(): cells[1].strip() for cells in lines}
    assert rows["dsgd"] == "1 x 1"
    assert rows["local_sgd:H=8"] == "1 x 1 / 8 steps" and rows["diloco:H=4"] == "1 x 1 / 4 steps"


def test_cli_digits_reports_accuracy(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out_json = tmp_path / "digits.json"
    argv = f"--problem digits --alpha 0.1 --n 4 --algorithms gut --steps 20 --lr 0.1 --json {out_json}"
    assert main(argv.split()) == 0
    assert "accuracy" in capsys.readouterr().out
    assert len(json.loads(out_json.read_text())["results"]["gut"]["accuracy"]) == 21


# ---- claims of the literature at small scale ----------------------------------------------------------
def _final_excess(problem, algorithm: str, topology: str = "ring", steps: int = 1500, **options) -> float:
    return simulate(problem, algorithm, topology, steps=steps, lr=0.05, eval_every=steps, **options).final(
        "excess_loss"
    )


def test_dsgd_stalls_at_a_heterogeneity_floor_that_exact_methods_remove() -> None:
    floors = {}
    for h in (0.0, 0.5, 2.0):
        problem = LeastSquares(n=16, dim=10, samples=16, heterogeneity=h)
        floors[h] = _final_excess(problem, "dsgd")
        for exact in ("exact_diffusion", "gradient_tracking"):
            assert _final_excess(problem, exact) <= max(floors[h], 1e-20) / 100
    assert floors[0.0] < 1e-20  # same optimum everywhere: no floor
    assert floors[2.0] > 4 * floors[0.5] > 1e-6  # the floor grows with the heterogeneity


def _steps_to(result: SimResult, fraction: float) -> float:
    values = result.series["excess_loss"]
    return next((s for s, v in zip(result.steps, values) if v <= fraction * values[0]), float("inf"))


def test_exponential_graphs_reach_a_target_loss_sooner_than_the_ring() -> None:
    problem = LeastSquares(n=32, dim=10, samples=16, heterogeneity=1.0)
    steps = {
        t: _steps_to(simulate(problem, "dsgd", t, steps=400, lr=0.05, eval_every=5), 3e-3)
        for t in ("ring", "exponential", "one_peer_exponential")
    }
    assert steps["exponential"] < steps["ring"]
    assert steps["one_peer_exponential"] < steps["ring"]
    assert steps["one_peer_exponential"] <= 1.5 * steps["exponential"]


def test_periodic_global_averaging_closes_most_of_the_gap_to_parallel_sgd() -> None:
    problem = LeastSquares(n=32, dim=10, samples=16, heterogeneity=1.0)
    ring = _final_excess(problem, "dsgd", steps=1000)
    parallel = _final_excess(problem, "dsgd", "complete", steps=1000)
    pga = _final_excess(problem, "dsgd", steps=1000, global_average_every=4)
    assert (ring - pga) / (ring - parallel) > 0.9


def test_gut_and_qg_gut_beat_dsgd_and_qg_dsgdm_on_non_iid_digits() -> None:
    # Dirichlet(0.1) split over 16 nodes on a ring, mini-batches of 32, 500 steps at lr 0.1, 3 seeds.
    accuracy: dict[str, list[float]] = {}
    for seed in range(3):
        problem = Digits(n=16, alpha=0.1, batch_size=32, seed=seed)
        for name in ("dsgd", "qg_dsgdm", "gut", "qg_gut"):
            result = simulate(problem, name, "ring", steps=500, lr=0.1, eval_every=500, seed=seed)
            accuracy.setdefault(name, []).append(result.final("accuracy"))
    mean = {name: float(np.mean(values)) for name, values in accuracy.items()}
    assert mean["gut"] > mean["dsgd"] + 0.01
    assert mean["qg_gut"] > mean["qg_dsgdm"] + 0.005


@pytest.mark.parametrize("optimizer", ["adam", "accum_adam", "sgd"])
def test_parallel_sgd_baseline_is_one_optimizer_on_the_averaged_gradient(optimizer: str) -> None:
    # DDP's update: one optimizer on x with the gradient of f = (1/n) sum_i f_i. Averaging the parameters after
    # each node's own Adam step (the old baseline) is not that for adaptive optimizers.
    problem = LeastSquares(n=8, dim=5, samples=6, heterogeneity=1.0)
    steps, settings = 30, {"lr": 0.05, "momentum": 0.9} if optimizer == "sgd" else {"lr": 0.05}
    x = torch.nn.Parameter(problem.initial_params().clone())
    single = make_optimizer(x, optimizer, **settings)
    for _ in range(steps):
        single.zero_grad()
        problem.global_loss(x).backward()
        single.step()
    baseline = compare(problem, [], "ring", steps=steps, optimizer=optimizer, eval_every=steps, **settings)[BASELINE]
    torch.testing.assert_close(baseline.params, x.detach().expand(8, -1), rtol=1e-12, atol=1e-12)
    parameter_averaging = simulate(problem, "dsgd", "complete", steps=steps, optimizer=optimizer, **settings)
    gap = (parameter_averaging.params - x.detach()).abs().max().item()
    assert gap > 1e-3 if optimizer != "sgd" else gap < 1e-12  # equal only for an optimizer linear in g


def test_compare_fills_transients_against_parallel_sgd() -> None:
    problem = LeastSquares(n=16, dim=10, samples=16, heterogeneity=1.0)
    results = compare(problem, ["dsgd", "exact_diffusion"], "ring", steps=600, lr=0.05, eval_every=10)
    assert list(results) == [BASELINE, "dsgd", "exact_diffusion"]
    assert results["dsgd"].transient is None  # stalls at its bias, never within 2x of P-SGD
    assert results["exact_diffusion"].transient is not None


@pytest.mark.slow
def test_1024_nodes_logistic_1000_steps_converge() -> None:
    """The scale of the simulator's speed benchmark (``benchmarks/algorithms.py --only scale``) runs and
    converges; its time is measured there, not here."""
    result = simulate(Logistic(n=1024, dim=100), "dsgd", "ring", steps=1000, lr=0.05, eval_every=100)
    assert result.final("excess_loss") < 0.01 * result.series["excess_loss"][0]
