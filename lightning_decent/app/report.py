"""End-of-run report: a summary table (printed, ``summary.json``, ``summary.md``) and the runs' curves (PNG)."""

from __future__ import annotations

import csv
import json
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

from lightning_decent._extras import require

TRAIN_LOSS = "train/loss"
TRAIN_TIME = "train/time"  # ThroughputMonitor: training seconds (validation excluded) at each logged step
CONSENSUS = "gossip/consensus_distance"

Series = dict[str, tuple[list[float], list[float]]]
"""``{metric: (steps, values)}`` of one run."""


@dataclass
class RunResult:
    """What one ``trainer.fit`` produced.

    Args:
        name: a row label, e.g. ``"gossip one_peer_exponential/dsgd"`` or ``"DDP"``.
        metrics: final validation metrics of the (network-averaged) model.
        steps: optimizer steps taken.
        train_time_s: training time without validation, on rank 0, up to the last logged step.
        samples_per_s: global training throughput over that time.
        bytes_sent_per_step: gossip bytes sent per rank and optimizer step (mean over ranks), if known.
        metrics_csv: the run's ``metrics.csv`` (CSVLogger), the source of the curves.
    """

    name: str
    metrics: dict[str, float]
    steps: int
    train_time_s: float | None = None
    samples_per_s: float | None = None
    bytes_sent_per_step: float | None = None
    metrics_csv: str | None = None


def _cell(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.4g}" if abs(value) < 1e5 else f"{value:.3e}"
    return str(value)


def summary_markdown(runs: Sequence[RunResult], title: str) -> str:
    """One table row per run: the validation metrics, steps, time, throughput and bytes per step."""
    metric_names = sorted({name for run in runs for name in run.metrics})
    header = ["run", *metric_names, "steps", "train time (s)", "samples/s", "bytes sent/step"]
    lines = [f"## {title}", "", "| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for run in runs:
        cells = [run.name, *(run.metrics.get(m) for m in metric_names), run.steps, run.train_time_s]
        cells += [run.samples_per_s, run.bytes_sent_per_step]
        lines.append("| " + " | ".join(_cell(c) for c in cells) + " |")
    return "\n".join(lines) + "\n"


def write_summary(out_dir: Path, runs: Sequence[RunResult], title: str, info: dict[str, Any]) -> str:
    """Write ``summary.json`` (runs and ``info``) and ``summary.md`` into ``out_dir``; return the markdown."""
    markdown = summary_markdown(runs, title)
    (out_dir / "summary.md").write_text(markdown)
    payload = {**info, "runs": [asdict(run) for run in runs]}
    (out_dir / "summary.json").write_text(json.dumps(payload, indent=2, default=str))
    return markdown


def read_summary(run_dir: Path) -> tuple[dict[str, Any], list[RunResult]]:
    """``(info, runs)`` from a run directory's ``summary.json``."""
    payload = json.loads((run_dir / "summary.json").read_text())
    runs = [RunResult(**run) for run in payload.pop("runs")]
    return payload, runs


def read_metrics_csv(path: Path) -> Series:
    """``{metric: (steps, values)}`` from a Lightning ``CSVLogger`` ``metrics.csv`` (blank cells skipped)."""
    series: Series = defaultdict(lambda: ([], []))
    with path.open(newline="") as handle:
        for row in csv.DictReader(handle):
            step = row.get("step")
            if not step:
                continue
            for name, value in row.items():
                if name in ("step", "epoch") or value in ("", None):
                    continue
                steps, values = series[name]
                steps.append(float(step))
                values.append(float(value))
    return dict(series)


def _seconds_at(series: Series, steps: list[float]) -> np.ndarray | None:
    """Training seconds at ``steps``, interpolated from the logged ``train/time`` (None if not logged)."""
    if TRAIN_TIME not in series:
        return None
    time_steps, seconds = series[TRAIN_TIME]
    return np.interp(steps, time_steps, seconds)


def plotted(series: Series, name: str) -> tuple[list[float], list[float]]:
    """``(steps, values)`` of ``name`` that a plot can show: the consensus distance (log scale) only where it is
    positive; a local-steps run logs 0 right after each synchronisation and while every replica is equal."""
    steps, values = series.get(name, ([], []))
    if name != CONSENSUS:
        return steps, values
    kept = [(step, value) for step, value in zip(steps, values) if value > 0]
    return [step for step, _ in kept], [value for _, value in kept]


def plot_runs(runs: Sequence[tuple[str, Series]], monitor: str, out_png: Path) -> Path | None:
    """The validation metric ``monitor``, the training loss and (log scale) the consensus distance of every
    run on shared axes, against the optimizer step (left) and the training time in seconds (right).

    Args:
        runs: ``(label, series)`` per run, e.g. the gossip run and its DDP comparison.
        monitor: the validation metric to show (the recipe's, e.g. ``val/acc``).
        out_png: where to write the figure.

    Returns:
        ``out_png``, or ``None`` when no run logged any of these metrics (see :func:`plotted`).
    """
    rows = [name for name in (monitor, TRAIN_LOSS, CONSENSUS) if any(plotted(series, name)[0] for _, series in runs)]
    if not rows:
        return None
    require("matplotlib", "app", "the run's plot")
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(11, 3.2 * len(rows)), layout="constrained")
    FigureCanvasAgg(fig)
    axes = fig.subplots(len(rows), 2, squeeze=False)
    for row, name in zip(axes, rows):
        for index, (label, series) in enumerate(runs):
            steps, values = plotted(series, name)
            if not steps:
                continue
            style = {"color": f"C{index % 10}", "label": label, "marker": "o" if len(steps) < 30 else None}
            row[0].plot(steps, values, markersize=3, **style)
            seconds = _seconds_at(series, steps)
            if seconds is not None:
                row[1].plot(seconds, values, markersize=3, **style)
        for ax, xlabel in zip(row, ("optimizer step", "training time (s, validation excluded)")):
            ax.set_title(name, fontsize=10)
            ax.set_xlabel(xlabel)
            ax.grid(alpha=0.3)
            if name == CONSENSUS:
                ax.set_yscale("log")
    axes[0][0].legend(fontsize=8)
    fig.savefig(out_png, dpi=110)
    return out_png


def plot_results(results: Sequence[RunResult], monitor: str, out_png: Path) -> Path | None:
    """:func:`plot_runs` of the runs that have a ``metrics.csv``, labelled by their names."""
    runs = [(r.name, read_metrics_csv(Path(r.metrics_csv))) for r in results if r.metrics_csv]
    return plot_runs(runs, monitor, out_png)
