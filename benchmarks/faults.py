"""Time to exit and first error line for each fault case of docs/reliability.md (4 CPU gloo ranks, ring).

``python benchmarks/faults.py [--only kill-train,hang-end]`` runs ``tests/mp_scripts/failure.py`` and
``tests/mp_scripts/uneven.py`` (Lightning's launcher starts the ranks) and ``tests/mp_scripts/rank_faults.py``
(every rank its own process, as torchrun and SLURM start them) once per case and prints a Markdown table:
the seconds from the fault (the victim's signal, written by the victim just before it; for the data cases,
the launch) until every process has exited, and the first error line that names the victim (rank 2), or
the first error line; for the per-rank cases also the shared-memory segments left behind. Run it alone
(about 15 minutes).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SCRIPTS = ROOT / "tests" / "mp_scripts"
sys.path.insert(0, str(SCRIPTS))
from rank_faults import CASES as _CASES  # noqa: E402

#: name -> (script, arguments, what the time is measured from)
CASES: dict[str, tuple[str, tuple[str, ...], str]] = {
    "kill-train": ("failure.py", ("--mode", "kill", "--gossip-timeout", "60"), "kill"),
    "hang-train": ("failure.py", ("--mode", "hang", "--gossip-timeout", "5"), "SIGSTOP"),
    "kill-validation": ("failure.py", ("--mode", "kill", "--when", "validation", "--collective-timeout", "5"), "kill"),
    "hang-validation": (
        "failure.py",
        ("--mode", "hang", "--when", "validation", "--collective-timeout", "5"),
        "SIGSTOP",
    ),
    "kill-checkpoint": ("failure.py", ("--mode", "kill", "--when", "checkpoint", "--collective-timeout", "5"), "kill"),
    "hang-checkpoint": (
        "failure.py",
        ("--mode", "hang", "--when", "checkpoint", "--collective-timeout", "5"),
        "SIGSTOP",
    ),
    "hang-end": ("failure.py", ("--mode", "hang", "--when", "end", "--collective-timeout", "5"), "SIGSTOP"),
    "nan-p2p": (
        "failure.py",
        (
            "--mode",
            "nan",
        ),
        "NaN",
    ),
    "nan-allreduce": ("failure.py", ("--mode", "nan", "--communicator", "allreduce"), "NaN"),
    "uneven-iterable": ("uneven.py", ("--mode", "iterable"), "launch"),
    "skipped-step": ("uneven.py", ("--mode", "skip"), "launch"),
}

#: The cases of ``rank_faults.py`` (every rank its own process): name -> what the time is measured from.
RANK_CASES = {name: {"kill": "kill", "hang": "SIGSTOP", "nan": "NaN"}[mode] for name, (mode, _, _) in _CASES.items()}

_ERROR_LINE = re.compile(r"(\w+(?:Error|Exception)): (rank \d+:.*)$")
VICTIM = "rank 2"


def run_case(name: str) -> tuple[float, str]:
    script, argv, _ = CASES[name]
    with tempfile.TemporaryDirectory() as out:
        env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
        start = time.time()
        proc = subprocess.run(
            [sys.executable, str(SCRIPTS / script), out, *argv], env=env, cwd=out, capture_output=True, text=True
        )
        exited = time.time()
        victim = Path(out) / "victim_time"
        since = float(victim.read_text()) if victim.exists() else start
    if proc.returncode == 0:
        return exited - since, "(exit 0: no error)"
    errors = [f"{m.group(1)}: {m.group(2)}" for line in proc.stderr.splitlines() if (m := _ERROR_LINE.search(line))]
    naming_the_victim = [line for line in errors if VICTIM in line]  # rather than a rank that lost a neighbour later
    lines = naming_the_victim or errors or proc.stderr.strip().splitlines()[-1:]
    return exited - since, lines[0]


def run_rank_case(name: str) -> tuple[float, str, int]:
    """A ``rank_faults.py`` case: seconds from the fault until the last survivor exited (the deadline if one
    hung), the first error line naming the victim, and the number of shared-memory segments left."""
    with tempfile.TemporaryDirectory() as out:
        env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
        subprocess.run([sys.executable, str(SCRIPTS / "rank_faults.py"), out, "--case", name], env=env, check=True)
        report = json.loads((Path(out) / "ranks.json").read_text())
    survivors = [r for r in report["ranks"] if r["rank"] != 2 or r["returncode"] not in (-9, None)]
    seconds = max(float("inf") if r["seconds"] is None else r["seconds"] for r in survivors)
    lines = [
        f"{m.group(1)}: {m.group(2)}"
        for r in sorted(report["ranks"], key=lambda r: r["rank"] != 2)  # the victim's own error first (NaN)
        for line in r["stderr"].splitlines()
        if (m := _ERROR_LINE.search(line))
    ]
    naming_the_victim = [line for line in lines if VICTIM in line]
    first = (naming_the_victim or lines or ["(no error line)"])[0]
    return seconds, first, len(report["segments_left"])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", default=",".join([*CASES, *RANK_CASES]), help="comma-separated case names")
    args = parser.parse_args()
    print("| case | time from | seconds to exit | first error line |\n|---|---|---|---|")
    for name in args.only.split(","):
        if name in RANK_CASES:
            seconds, line, left = run_rank_case(name)
            segments = f" [segments left: {left}]" if name.startswith("hier") else ""
            print(f"| {name} | {RANK_CASES[name]} | {seconds:.1f} | {line[:260]}{segments} |", flush=True)
            continue
        seconds, line = run_case(name)
        print(f"| {name} | {CASES[name][2]} | {seconds:.1f} | {line[:220]} |", flush=True)


if __name__ == "__main__":
    main()
