"""Elastic runs for the tests: every rank its own process, as torchrun or SLURM start them (no parent that
stops the others when one dies), and the membership store's process removed afterwards."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "tests" / "mp_scripts" / "elastic.py"


def free_port() -> int:
    """A port with the next one free too (the membership store listens on MASTER_PORT + 1)."""
    while True:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port + 1))
                return port
            except OSError:
                continue


def start_rank(out: Path, rank: int, world: int, port: int, *args: str, script: Path = SCRIPT) -> subprocess.Popen:
    """Rank ``rank`` of ``world`` as its own process running ``script`` (``rank`` only labels the output of a
    ``--join`` process)."""
    env = {
        **os.environ,
        "PYTHONPATH": str(ROOT),
        "OMP_NUM_THREADS": "1",
        "MASTER_ADDR": "127.0.0.1",
        "MASTER_PORT": str(port),
        "NODE_RANK": str(rank),
        "LOCAL_RANK": "0",
    }
    log = open(out / f"rank{rank}.log", "w")  # noqa: SIM115 (closed with the process)
    return subprocess.Popen(
        [sys.executable, str(script), str(out), "--rank", str(rank), "--world", str(world), *args],
        env=env,
        cwd=out,
        stdout=log,
        stderr=subprocess.STDOUT,
    )


def stop_store(port: int) -> None:
    """Stop the membership store that launch rank 0 started on ``port + 1`` (it would exit when idle)."""
    pattern = f"lightning_decent.membership serve --host 127.0.0.1 --port {port + 1}"
    subprocess.run(["pkill", "-f", pattern], check=False)


def finish(procs: dict[int, subprocess.Popen], timeout: float, stopped: tuple[int, ...] = ()) -> dict[int, int | None]:
    """Wait for every process but the ``stopped`` ones (killed once the others ended, or at the deadline);
    their exit codes (``None``: killed at the deadline)."""
    deadline = time.monotonic() + timeout
    codes: dict[int, int | None] = {}
    for rank, proc in sorted(procs.items(), key=lambda item: item[0] in stopped):
        try:
            if rank in stopped:
                raise subprocess.TimeoutExpired(proc.args, 0)
            codes[rank] = proc.wait(timeout=max(0.1, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            proc.send_signal(signal.SIGKILL)
            proc.wait()
            codes[rank] = None
    return codes


def results(out: Path, ranks: list[int]) -> dict[int, dict]:
    return {r: json.loads((out / f"rank{r}.json").read_text()) for r in ranks if (out / f"rank{r}.json").exists()}


def logs(out: Path) -> str:
    return "\n".join(f"--- {p.name}\n{p.read_text()[-3000:]}" for p in sorted(out.glob("rank*.log")))
