"""Algorithm benchmarks on the n-node simulator, at a larger scale than the tests (default n = 64).

Five comparisons, each written as a table on stdout and as JSON + PNG under ``--out``:

* ``heterogeneous``: L2-regularised logistic regression with heterogeneous nodes on a ring, exact
  gradients: every algorithm and modifier against parallel SGD (P-SGD, exact averaging), with
  final excess loss ``f(xbar) - f*``, consensus and the transient step (first step after which the
  excess loss stays within 2x of P-SGD's).
* ``topologies``: D-SGD on heterogeneous least squares over several graphs: steps to bring the
  excess loss to 1e-3 of its start, and the final (bias-floor) excess loss.
* ``digits``: a small MLP on scikit-learn's digits split by Dirichlet(alpha = 0.1) labels over the
  ring, mini-batches of 32: held-out accuracy of the average model, mean and spread over seeds.
* ``any_n``: n = 6, 12, 24 (not powers of two): gossip rounds to a consensus error of 1e-4 and 1e-8 and
  D-SGD's accuracy on digits (Dirichlet 0.1) for ring, exponential, one-peer exponential, Base-2,
  Base-3, EquiDyn and P-SGD.
* ``scale``: on one thread, one gossip round of 4,096 nodes (sparse against dense ``W @ X``), and the
  wall time of 4,096 nodes x logistic regression (d = 100, 8 samples per node) x 1,000 steps of D-SGD
  on the one-peer exponential graph plus the P-SGD baseline, in float32 (goal: under 30 s) and float64.

Usage::

    PYTHONPATH=. python benchmarks/algorithms.py --out benchmarks/results/   # or after pip install -e .
    PYTHONPATH=. python benchmarks/algorithms.py --n 32 --steps 1000 --seeds 2   # quicker
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import torch

from lightning_decent.comm import SimulatedCommunicator
from lightning_decent.sim import BASELINE, AlgorithmSpec, LeastSquares, Logistic, compare, simulate
from lightning_decent.sim.problems import Digits
from lightning_decent.sim.report import format_table, plot, results_json
from lightning_decent.topology import consensus_error_curve, get_topology

#: (label, spec) of every run; a spec is ``name:key=value...`` (see ``lightning_decent.sim.AlgorithmSpec``).
ALGORITHMS = [
    ("dsgd", "dsgd"),
    ("dmsgd (SGD momentum 0.9)", "dsgd:momentum=0.9"),
    ("qg_dsgdm", "qg_dsgdm"),
    ("exact_diffusion", "exact_diffusion"),
    ("gradient_tracking", "gradient_tracking"),
    ("gut", "gut"),
    ("qg_gut", "qg_gut"),
    ("dsgd + PGA (H=8)", "dsgd:global_average_every=8"),
    ("dsgd + AGA (H0=8)", "dsgd:global_average_every=8:adaptive_global_average=true"),
    ("dsgd, 2 gossip rounds", "dsgd:gossip_rounds=2"),
]
TOPOLOGIES = ["ring", "torus", "exponential", "one_peer_exponential", "complete"]
DIGITS_ALGORITHMS = ["dsgd", "qg_dsgdm", "gut", "qg_gut", "exact_diffusion", "gradient_tracking"]


def _spec(label: str, text: str) -> AlgorithmSpec:
    spec = AlgorithmSpec.parse(text)
    spec.label = label
    return spec


def heterogeneous(args: argparse.Namespace, out: Path) -> None:
    problem = Logistic(n=args.n, dim=100, samples=32, heterogeneity=1.0, seed=0)
    specs = [_spec(label, text) for label, text in ALGORITHMS]
    results = compare(problem, specs, "ring", steps=args.steps, lr=0.05, eval_every=max(1, args.steps // 200))
    title = f"logistic regression, n={args.n}, d=100, heterogeneity 1, ring, lr 0.05, exact gradients"
    print(f"\n## heterogeneous: {title}\n{format_table(results)}")
    (out / "heterogeneous.json").write_text(json.dumps(results_json(results, {"title": title}), indent=1))
    plot(results, out / "heterogeneous.png", title)


def topologies(args: argparse.Namespace, out: Path) -> None:
    problem = LeastSquares(n=args.n, dim=20, samples=32, heterogeneity=1.0, seed=0)
    targets = (1e-2, 1e-3, 1e-4)
    header = ("topology", *(f"steps to {t:g}" for t in targets), "final excess")
    rows, results = [header], {}
    for name in TOPOLOGIES:
        label = BASELINE if name == "complete" else name
        result = simulate(problem, "dsgd", name, steps=args.steps, lr=0.05, eval_every=5, label=label)
        results[label] = result
        excess = result.series["excess_loss"]
        reached = [next((str(s) for s, v in zip(result.steps, excess) if v <= t * excess[0]), "never") for t in targets]
        rows.append((name, *reached, f"{result.final('excess_loss'):.3e}"))
    title = f"D-SGD on least squares, n={args.n}, d=20, heterogeneity 1, lr 0.05 (excess loss relative to its start)"
    widths = [max(len(r[c]) for r in rows) for c in range(len(header))]
    print(f"\n## topologies: {title}\n" + "\n".join(" | ".join(c.ljust(w) for c, w in zip(r, widths)) for r in rows))
    (out / "topologies.json").write_text(json.dumps(results_json(results, {"title": title}), indent=1))
    plot(results, out / "topologies.png", title)


def digits(args: argparse.Namespace, out: Path) -> None:
    accuracy: dict[str, list[float]] = {}
    last = {}
    for seed in range(args.seeds):
        problem = Digits(n=args.n, alpha=0.1, batch_size=32, seed=seed)
        last = compare(problem, DIGITS_ALGORITHMS, "ring", steps=args.steps, lr=0.1, eval_every=20, seed=seed)
        for label, result in last.items():
            accuracy.setdefault(label, []).append(result.final("accuracy"))
    title = f"digits MLP, n={args.n}, Dirichlet alpha 0.1, ring, lr 0.1, batch 32, {args.seeds} seeds"
    lines = ["algorithm | accuracy mean | min | max", "-" * 44]
    for label, values in accuracy.items():
        lines.append(f"{label} | {np.mean(values):.4f} | {min(values):.4f} | {max(values):.4f}")
    print(f"\n## digits: {title}\n" + "\n".join(lines))
    summary = {label: {"mean": float(np.mean(v)), "per_seed": v} for label, v in accuracy.items()}
    (out / "digits.json").write_text(json.dumps({"title": title, "accuracy": summary}, indent=1))
    plot(last, out / "digits.png", title + f" (curves: seed {args.seeds - 1})")


def _mixing_seconds(comm: SimulatedCommunicator, rows: torch.Tensor, rounds: int) -> float:
    start = time.perf_counter()
    for k in range(rounds):
        comm.mix([rows], k)
    return (time.perf_counter() - start) / rounds


def scale(args: argparse.Namespace, out: Path) -> None:
    """Simulator speed at scale, on one thread: one gossip round of 4,096 nodes x d = 100 (sparse against the
    dense ``W @ X``), then 4,096 nodes x logistic regression (d = 100, 8 samples per node) x 1,000 steps,
    D-SGD on the one-peer exponential graph and the P-SGD baseline, metrics every 100 steps, in float32
    (the goal: under 30 s) and float64."""
    nodes, dim, samples = 4096, 100, 8
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    summary: dict[str, object] = {"nodes": nodes, "dim": dim, "samples": samples, "steps": 1000, "threads": 1}
    lines = [f"\n## scale: {nodes:,} nodes, one thread"]
    try:
        graph = get_topology("one_peer_exponential", nodes)
        rows = torch.randn(nodes, dim, dtype=torch.float64)
        sparse_round = _mixing_seconds(SimulatedCommunicator(graph), rows, 1000)
        dense = graph.weights(0)
        start = time.perf_counter()
        for _ in range(5):
            rows.copy_(dense @ rows)
        dense_round = (time.perf_counter() - start) / 5
        summary["round_ms"] = {"sparse": sparse_round * 1e3, "dense": dense_round * 1e3}
        lines.append(f"one gossip round on one_peer_exponential, d = {dim}, float64: {sparse_round * 1e3:.2f} ms "
                     f"sparse, {dense_round * 1e3:.0f} ms as the dense W @ X")  # fmt: skip
        for dtype in (torch.float32, torch.float64):
            start = time.perf_counter()
            problem = Logistic(n=nodes, dim=dim, samples=samples).to(dtype)
            results = compare(problem, ["dsgd"], "one_peer_exponential", steps=1000, lr=0.05, eval_every=100,
                              dtype=dtype)  # fmt: skip
            seconds = time.perf_counter() - start
            runs = {label: {"seconds": r.seconds, "excess_loss": [r.series["excess_loss"][0], r.final("excess_loss")]}
                    for label, r in results.items()}  # fmt: skip
            summary[str(dtype).removeprefix("torch.")] = {"seconds": seconds, "runs": runs}
            lines.append(
                f"logistic (d = {dim}, {samples} samples per node) x 1,000 steps, {dtype}, dsgd on "
                f"one_peer_exponential and P-SGD: {seconds:.1f} s in all (with the problem and its optimum); "
                + ", ".join(f"{label} {run['seconds']:.1f} s, excess loss {run['excess_loss'][0]:.3e} -> "
                            f"{run['excess_loss'][1]:.3e}" for label, run in runs.items())
            )  # fmt: skip
    finally:
        torch.set_num_threads(threads)
    print("\n".join(lines))
    (out / "scale.json").write_text(json.dumps(summary, indent=1))


#: The graphs of the any-n comparison: (label, registry name, options).
ANY_N_TOPOLOGIES = [
    ("ring", "ring", {}),
    ("exponential", "exponential", {}),
    ("one_peer_exponential", "one_peer_exponential", {}),
    ("base-2 (k=1)", "base", {"k": 1}),
    ("base-3 (k=2)", "base", {"k": 2}),
    ("equidyn", "equidyn", {}),
    ("complete (P-SGD)", "complete", {}),
]
ANY_N_SIZES = (6, 12, 24)


def _rounds_to(curve: np.ndarray, target: float) -> str:
    reached = np.flatnonzero(curve <= target)
    return str(int(reached[0])) if reached.size else f">{len(curve) - 1}"


def any_n(args: argparse.Namespace, out: Path) -> None:
    """Sizes that are not powers of two: gossip rounds to a consensus error, and D-SGD's accuracy on
    digits split by Dirichlet(0.1) labels (mean over seeds), for each graph of ANY_N_TOPOLOGIES."""
    steps, seeds, rounds = args.any_n_steps, args.seeds, 200
    rows = [("n", "topology", "max peers", "period", "rounds to 1e-4", "rounds to 1e-8", "accuracy mean", "min", "max")]
    summary: dict[str, dict[str, object]] = {}
    for n in ANY_N_SIZES:
        for label, name, options in ANY_N_TOPOLOGIES:
            graph = get_topology(name, n, **options)
            curve = consensus_error_curve(graph, rounds, seed=0)
            accuracy = [
                simulate(Digits(n=n, alpha=0.1, batch_size=32, seed=s), "dsgd", graph, steps=steps, lr=0.1,
                         eval_every=steps, seed=s).final("accuracy")
                for s in range(seeds)
            ]  # fmt: skip
            to_4, to_8 = _rounds_to(curve, 1e-4), _rounds_to(curve, 1e-8)
            rows.append((str(n), label, str(graph.max_degree), str(graph.period), to_4, to_8,
                         f"{np.mean(accuracy):.4f}", f"{min(accuracy):.4f}", f"{max(accuracy):.4f}"))  # fmt: skip
            summary[f"{n}/{label}"] = {"rounds_to_1e-4": to_4, "rounds_to_1e-8": to_8, "accuracy": accuracy}
    title = (
        f"gossip rounds to a relative consensus error (x0 ~ N(0, I), seed 0; '>{rounds}': not within {rounds}), "
        f"and D-SGD on digits, Dirichlet 0.1, MLP, lr 0.1, batch 32, {steps} steps, seeds 0-{seeds - 1}"
    )
    widths = [max(len(r[c]) for r in rows) for c in range(len(rows[0]))]
    print(f"\n## any_n: {title}\n" + "\n".join(" | ".join(c.ljust(w) for c, w in zip(r, widths)) for r in rows))
    (out / "any_n.json").write_text(json.dumps({"title": title, "runs": summary}, indent=1))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results")
    parser.add_argument("--n", type=int, default=64)
    parser.add_argument("--steps", type=int, default=3000)
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--only", choices=["heterogeneous", "topologies", "digits", "scale", "any_n"])
    parser.add_argument("--any-n-steps", type=int, default=1000, help="D-SGD steps of the any_n digits runs")
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    for section in (heterogeneous, topologies, digits, scale, any_n):
        if args.only in (None, section.__name__):
            section(args, args.out)
    print(f"\nwrote {args.out}/*.json, *.png in {time.perf_counter() - start:.0f} s")


if __name__ == "__main__":
    main()
