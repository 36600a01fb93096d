"""The end of a sweep (``-m``): one summary table and one plot over every job's runs."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import yaml
from hydra.experimental.callback import Callback
from lightning.pytorch.utilities import rank_zero_only
from omegaconf import DictConfig

from lightning_decent.app.report import RunResult, plot_results, read_summary, write_summary

log = logging.getLogger(__name__)


def _job_overrides(job_dir: Path) -> list[str]:
    """The command-line overrides of one job (Hydra's ``.hydra/overrides.yaml``)."""
    path = job_dir / ".hydra" / "overrides.yaml"
    return list(yaml.safe_load(path.read_text()) or []) if path.is_file() else []


def summarize_sweep(sweep_dir: Path) -> str | None:
    """Write ``summary.md``, ``summary.json`` and ``training_curves.png`` into ``sweep_dir`` from the
    ``summary.json`` of every job directory below it; return the markdown (None without any job).

    A row is named ``<job>: <the overrides that differ between jobs> / <run>``.
    """
    job_dirs = sorted((p.parent for p in sweep_dir.glob("*/summary.json")), key=lambda p: (len(p.name), p.name))
    if not job_dirs:
        return None
    overrides = {job: _job_overrides(job) for job in job_dirs}
    common = set.intersection(*(set(o) for o in overrides.values()))
    rows: list[RunResult] = []
    jobs: list[dict[str, Any]] = []
    monitor = None
    for job in job_dirs:
        info, runs = read_summary(job)
        monitor = monitor or info.get("monitor")
        varying = " ".join(o for o in overrides[job] if o not in common) or "(no overrides)"
        for run in runs:
            run.name = f"{job.name}: {varying} / {run.name}"
            rows.append(run)
        jobs.append({"job": job.name, "overrides": overrides[job], "output_dir": str(job)})
    curves = plot_results(rows, monitor, sweep_dir / "training_curves.png") if monitor else None
    info = {"sweep_dir": str(sweep_dir), "jobs": jobs, "training_curves": str(curves) if curves else None}
    return write_summary(sweep_dir, rows, f"sweep of {len(job_dirs)} jobs", info)


class SweepSummary(Callback):
    """Hydra callback: :func:`summarize_sweep` of the sweep directory when a multirun ends (global rank 0)."""

    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        if rank_zero_only.rank != 0:  # every rank of a popen-launched run walks the sweep
            return
        sweep_dir = Path(config.hydra.sweep.dir)
        markdown = summarize_sweep(sweep_dir)
        if markdown is not None:
            log.info(f"\n{markdown}\nSweep directory: {sweep_dir}")
