"""Tables, JSON and plots of simulation results."""

from __future__ import annotations

import json
import math
import os
from collections.abc import Mapping
from typing import Any

import numpy as np

from lightning_decent._extras import require
from lightning_decent.sim.runner import BASELINE, SimResult

#: y-axis labels of the plotted series.
LABELS = {
    "excess_loss": "f(x̄) − f*",
    "loss": "f(x̄)",
    "grad_norm_sq": "‖∇f(x̄)‖²",
    "consensus": "(1/n) Σ‖x_i − x̄‖²",
    "accuracy": "test accuracy of x̄",
}


def _fmt(value: float | None) -> str:
    if value is None:
        return "-"
    return f"{value:.3e}" if value != 0 and (abs(value) < 1e-2 or abs(value) >= 1e4) else f"{value:.4f}"


def communication(result: SimResult) -> str:
    """``rounds x buffers`` per step, or per synchronisation with its period (``1 x 1 / 16 steps``)."""
    cost = f"{result.rounds_per_step} x {result.buffers_per_round}"
    return cost if result.sync_period == 1 else f"{cost} / {result.sync_period} steps"


def format_table(results: Mapping[str, SimResult]) -> str:
    """One row per run: cost per step, final metrics, transient step and wall time."""
    first = next(iter(results.values()))
    metrics = [m for m in ("loss", "excess_loss", "grad_norm_sq", "consensus", "accuracy") if m in first.series]
    header = ["algorithm", "rounds x bufs", "extra mem", *metrics, "transient", "seconds"]
    rows = [header]
    for label, r in results.items():
        transient = "baseline" if label == BASELINE else ("never" if r.transient is None else str(r.transient))
        rows.append(
            [
                label,
                communication(r),
                f"{r.extra_memory:g}",
                *(_fmt(r.final(m)) for m in metrics),
                transient,
                f"{r.seconds:.2f}",
            ]
        )
    widths = [max(len(row[c]) for row in rows) for c in range(len(header))]
    lines = [" | ".join(cell.ljust(w) for cell, w in zip(row, widths)) for row in rows]
    lines.insert(1, "-+-".join("-" * w for w in widths))
    return "\n".join(lines)


def results_json(results: Mapping[str, SimResult], settings: Mapping[str, Any]) -> dict[str, Any]:
    """``{"settings": ..., "results": {label: series and summary}}``."""
    return {"settings": dict(settings), "results": {label: r.as_dict() for label, r in results.items()}}


def write_json(results: Mapping[str, SimResult], settings: Mapping[str, Any], path: str | os.PathLike) -> None:
    with open(path, "w") as f:
        json.dump(results_json(results, settings), f, indent=1)


def plot(results: Mapping[str, SimResult], path: str | os.PathLike, title: str = "", factor: float = 2.0) -> None:
    """Curves against steps: the loss (excess loss when ``f*`` is known), the gradient norm, consensus,
    the loss relative to the P-SGD baseline (with the transient ``factor``) and, for classification,
    accuracy. The baseline is drawn dashed black (its consensus is zero and not drawn)."""
    require("matplotlib", "app", "the simulator's --plot")
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    first = next(iter(results.values()))
    primary = "excess_loss" if "excess_loss" in first.series else "loss"
    panels = [primary, "grad_norm_sq", "consensus", "ratio"] + (["accuracy"] if "accuracy" in first.series else [])
    cols = math.ceil(len(panels) / 2)
    fig, axes = plt.subplots(2, cols, figsize=(5.5 * cols, 7.6), squeeze=False)
    colors = plt.get_cmap("tab10")
    baseline = results.get(BASELINE)
    for ax, panel in zip(axes.flat, panels):
        runs = [label for label in results if label != BASELINE]
        for label, r in results.items():
            is_baseline = label == BASELINE
            if panel == "ratio":
                if baseline is None or is_baseline:
                    continue
                values = [a / b if b > 0 else math.nan for a, b in zip(r.series[primary], baseline.series[primary])]
            elif panel == "consensus" and is_baseline:
                continue
            else:
                values = r.series[panel]
            if panel != "accuracy":  # log axes: zeros (e.g. consensus at step 0) are left out
                values = [v if v > 0 else math.nan for v in values]
            if is_baseline:
                style = {"color": "k", "ls": "--", "lw": 2}
            else:
                index = runs.index(label)
                style = {"color": colors(index % 10), "ls": "-" if index < 10 else "-.", "lw": 1.6}
            ax.plot(r.steps, values, label="P-SGD (exact averaging)" if is_baseline else label, **style)
        if panel == "ratio":
            ax.axhline(factor, color="grey", ls=":", lw=1.2, label=f"transient factor {factor:g}")
            ax.set_ylabel(f"{LABELS[primary]} ÷ P-SGD's")
        else:
            ax.set_ylabel(LABELS[panel])
        if panel == "accuracy":  # zoom on the end, where the runs differ
            ax.set_ylim(max(0.0, min(r.final("accuracy") for r in results.values()) - 0.1), 1.0)
        else:
            ax.set_yscale("log")
        if panel in ("consensus", primary, "grad_norm_sq"):  # hide rounding-floor spikes (1e-30)
            top = max((np.nanmax(np.asarray(line.get_ydata(), dtype=float)) for line in ax.get_lines()), default=1.0)
            ax.set_ylim(bottom=max(ax.get_ylim()[0], 1e-12 * top))
        ax.set_xlabel("step")
        ax.grid(True, which="major", alpha=0.3)
    for ax in list(axes.flat)[len(panels) :]:
        ax.axis("off")
    handles, labels = axes.flat[0].get_legend_handles_labels()
    columns = min(len(labels), 3)
    fig.legend(handles, labels, loc="lower center", ncol=columns, frameon=False)
    if title:
        fig.suptitle(title)
    fig.tight_layout(rect=(0, 0.02 + 0.03 * math.ceil(len(labels) / columns), 1, 1))
    fig.savefig(path, dpi=110)
    plt.close(fig)
