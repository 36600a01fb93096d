"""What the one-step delay of an overlapped algorithm costs in convergence, over several seeds.

Every spec runs as given (its blocking form) and with ``overlap=true`` on the same problems (one per seed:
the problem's data and the simulation's noise and mini-batches take the seed), and the table shows the
final metrics' mean over the seeds side by side with the ratio overlapped / blocking of the final loss
(the excess loss when the optimum is known). ``python -m lightning_decent.sim --overlap-cost --seeds 3``
prints it for the command line's specs.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from lightning_decent.sim.problems import Problem
from lightning_decent.sim.runner import AlgorithmSpec, simulate

#: Final metrics the table reports, in this order, when the runs record them.
METRICS = ("excess_loss", "loss", "consensus", "accuracy")


@dataclass
class DelayCost:
    """One spec's final metrics per seed, blocking and overlapped (``metrics[form][metric]``, one value per
    seed; ``form`` is ``"blocking"`` or ``"overlapped"``)."""

    label: str
    seeds: list[int]
    metrics: dict[str, dict[str, list[float]]] = field(default_factory=dict)

    def mean(self, form: str, metric: str) -> float:
        values = self.metrics[form][metric]
        return sum(values) / len(values)

    @property
    def primary(self) -> str:
        """The loss the ratio compares: ``excess_loss`` when the optimum is known, else ``loss``."""
        return "excess_loss" if "excess_loss" in self.metrics["blocking"] else "loss"

    def ratio(self) -> float:
        """Mean over the seeds of the overlapped form's final loss divided by the blocking form's."""
        pairs = zip(self.metrics["overlapped"][self.primary], self.metrics["blocking"][self.primary])
        ratios = [a / b if b > 0 else (1.0 if a == b else math.inf) for a, b in pairs]
        return sum(ratios) / len(ratios)


def delay_costs(
    build_problem: Callable[[int], Problem],
    specs: Sequence[str | AlgorithmSpec],
    topology: str,
    seeds: Sequence[int],
    *,
    steps: int,
    lr: float,
    **run_options: Any,
) -> list[DelayCost]:
    """Simulate every spec blocking and overlapped on ``build_problem(seed)`` for every seed.

    ``run_options`` go to every :func:`~lightning_decent.sim.simulate` call (a spec's own optimizer keys
    override them). The overlapped runs report their iterate after the round in flight is applied, as
    the strategy's end of training does."""
    costs = []
    for spec in specs:
        spec = spec if isinstance(spec, AlgorithmSpec) else AlgorithmSpec.parse(spec)
        cost = DelayCost(spec.label, list(seeds), {"blocking": {}, "overlapped": {}})
        for seed in seeds:
            problem = build_problem(seed)
            settings = {"lr": lr, **run_options, **spec.optimizer, "seed": seed, "eval_every": steps}
            for form, overlap in (("blocking", False), ("overlapped", True)):
                options = {**spec.options, "overlap": overlap}
                result = simulate(problem, spec.name, topology, steps=steps, **settings, **options)
                for metric in METRICS:
                    if metric in result.series:
                        cost.metrics[form].setdefault(metric, []).append(result.final(metric))
        costs.append(cost)
    return costs


def format_delay_table(costs: Sequence[DelayCost]) -> str:
    """A Markdown table: per spec, the blocking and overlapped means of each final metric and the ratio."""
    first = costs[0]
    metrics = [first.primary, "consensus", *(["accuracy"] if "accuracy" in first.metrics["blocking"] else [])]
    header = ["algorithm"]
    for metric in metrics:
        header += [f"{metric} blocking", f"{metric} overlapped"]
    header.append(f"{first.primary} ratio")
    rows = [header, ["---"] * len(header)]
    for cost in costs:
        row = [cost.label]
        for metric in metrics:
            row += [_fmt(cost.mean("blocking", metric)), _fmt(cost.mean("overlapped", metric))]
        row.append(f"{cost.ratio():.3g}")
        rows.append(row)
    return "\n".join("| " + " | ".join(row) + " |" for row in rows)


def _fmt(value: float) -> str:
    if not math.isfinite(value):
        return "diverged"
    return f"{value:.3e}" if value != 0 and (abs(value) < 1e-2 or abs(value) >= 1e4) else f"{value:.4f}"
