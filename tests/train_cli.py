"""Runs ``python -m lightning_decent.train`` in a fresh process, as a user would, inside a test's directory."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def run_train(cwd: Path, *overrides: str, timeout: float = 300) -> subprocess.CompletedProcess:
    """Launch the app with ``overrides`` in ``cwd`` (its ``outputs/`` lands there); ranks are CPU processes."""
    env = {k: v for k, v in os.environ.items() if k not in ("LIGHTNING_DECENT_RUN_ID", "LOCAL_RANK", "WORLD_SIZE")}
    env.update(PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1")
    return subprocess.run(
        [sys.executable, "-m", "lightning_decent.train", *overrides],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def failure_message(proc: subprocess.CompletedProcess) -> str:
    return f"exit {proc.returncode}\n--- stdout\n{proc.stdout[-3000:]}\n--- stderr\n{proc.stderr[-6000:]}"


def run_dirs(cwd: Path) -> list[Path]:
    """Every run directory (one holding Hydra's ``.hydra/``) under ``cwd/outputs``."""
    return sorted(p.parent for p in (cwd / "outputs").rglob(".hydra"))


def summary(run_dir: Path) -> dict:
    return json.loads((run_dir / "summary.json").read_text())
