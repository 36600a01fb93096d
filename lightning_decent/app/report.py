"""End-of-run report: a summary table (printed, ``summary.json``, ``summary.md``) and training curves (PNG)."""

from __future__ import annotations

import csv
import json
import math
from collections import defaultdict
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any


@dataclass
class RunResult:
    """What one ``trainer.fit`` produced.

    Args:
        name: a row label, e.g. ``"gossip one_peer_exponential/dsgd"`` or ``"DDP"``.
        metrics: final validation metrics of the (network-averaged) model.
        steps: optimizer steps taken.
        train_time_s: training time without validation, on rank 0.
        samples_per_s: global training throughput.
        bytes_sent_per_step: gossip bytes sent per rank and optimizer step (mean over ranks), if known.
    """

    name: str
    metrics: dict[str, float]
    steps: int
    train_time_s: float | None = None
    samples_per_s: float | None = None
    bytes_sent_per_step: float | None = None


def _cell(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.4g}" if abs(value) < 1e5 else f"{value:.3e}"
    return str(value)


def summary_markdown(runs: list[RunResult], title: str) -> str:
    """One table row per run: the validation metrics, steps, time, throughput and bytes per step."""
    metric_names = sorted({name for run in runs for name in run.metrics})
    header = ["run", *metric_names, "steps", "train time (s)", "samples/s", "bytes sent/step"]
    lines = [f"## {title}", "", "| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for run in runs:
        cells = [run.name, *(run.metrics.get(m) for m in metric_names), run.steps, run.train_time_s]
        cells += [run.samples_per_s, run.bytes_sent_per_step]
        lines.append("| " + " | ".join(_cell(c) for c in cells) + " |")
    return "\n".join(lines) + "\n"


def write_summary(out_dir: Path, runs: list[RunResult], title: str, info: dict[str, Any]) -> str:
    """Write ``summary.json`` (runs and ``info``) and ``summary.md`` into ``out_dir``; return the markdown."""
    markdown = summary_markdown(runs, title)
    (out_dir / "summary.md").write_text(markdown)
    payload = {**info, "runs": [asdict(run) for run in runs]}
    (out_dir / "summary.json").write_text(json.dumps(payload, indent=2, default=str))
    return markdown


def read_metrics_csv(path: Path) -> dict[str, tuple[list[float], list[float]]]:
    """``{metric: (steps, values)}`` from a Lightning ``CSVLogger`` ``metrics.csv`` (blank cells skipped)."""
    series: dict[str, tuple[list[float], list[float]]] = defaultdict(lambda: ([], []))
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


def plot_training_curves(metrics_csv: Path, out_png: Path) -> Path | None:
    """One panel per logged metric against the optimizer step; ``None`` when there is nothing to plot."""
    if not metrics_csv.is_file():
        return None
    series = read_metrics_csv(metrics_csv)
    if not series:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = sorted(series, key=lambda n: (not n.startswith("train/loss"), not n.startswith("val/"), n))
    cols = min(3, len(names))
    rows = math.ceil(len(names) / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(4.2 * cols, 3.0 * rows), squeeze=False)
    for ax, name in zip(axes.flat, names):
        steps, values = series[name]
        ax.plot(steps, values, marker="o" if len(steps) < 30 else None, markersize=3)
        ax.set_title(name, fontsize=10)
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
    for ax in list(axes.flat)[len(names) :]:
        ax.set_visible(False)
    fig.tight_layout()
    fig.savefig(out_png, dpi=110)
    plt.close(fig)
    return out_png
