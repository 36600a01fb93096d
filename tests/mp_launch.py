"""Launch a ``tests/mp_scripts`` script as a real multi-process run and read what every rank wrote.

Lightning's popen launcher inside the script starts the other ranks; each rank writes
``rank<r>.json`` into the output directory.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SCRIPTS = ROOT / "tests" / "mp_scripts"


def launch(script: str, *args: str, cwd: Path, timeout: float = 900) -> subprocess.CompletedProcess:
    """Run ``tests/mp_scripts/<script>`` with the repository importable and one thread per rank."""
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    return subprocess.run(
        [sys.executable, str(SCRIPTS / script), *args],
        env=env,
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def launch_and_read_ranks(script: str, out: Path, ranks: int = 4) -> list[dict]:
    """Run ``script OUT --devices ranks``; fail with its output unless it succeeds; return every rank's JSON."""
    proc = launch(script, str(out), "--devices", str(ranks), cwd=out)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    return [json.loads((out / f"rank{r}.json").read_text()) for r in range(ranks)]
