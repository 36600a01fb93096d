"""Real multi-process runs for the tests.

* :func:`launch_and_read_ranks`: a ``tests/mp_scripts`` script whose Lightning popen launcher starts
  the other ranks; each rank writes ``rank<r>.json`` into the output directory.
* :func:`run_gloo_world`: a function run on every rank of a spawned gloo world; the ranks send
  their results through a queue.
* :func:`torchrun_on_two_machines`: a script under torchrun on 2 emulated machines x 2 processes, one
  network namespace per machine (root); returns the bytes each machine's interface sent.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from collections.abc import Callable
from datetime import timedelta
from pathlib import Path
from typing import Any

import torch.distributed as dist
import torch.multiprocessing as mp

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


def torchrun_on_two_machines(script: Path, out: Path, *args: str, port: int, timeout: float = 600) -> list[int]:
    """Run ``script OUT ARGS`` under torchrun on 2 machines x 2 processes, each machine a network namespace
    (:class:`~lightning_decent.emulation.EmulatedCluster`, removed afterwards); fail with both machines'
    output unless both succeed; return the bytes each machine's ``eth0`` sent."""
    from lightning_decent.emulation import EmulatedCluster

    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    with EmulatedCluster(2) as cluster:
        torchrun = [sys.executable, "-m", "torch.distributed.run", "--nnodes", "2", "--nproc-per-node", "2"]
        rendezvous = ["--master-addr", cluster.hosts[0].address, "--master-port", str(port)]
        machines = [
            cluster.popen(
                node,
                [*torchrun, "--node-rank", str(node), *rendezvous, str(script), str(out), *args],
                env=env,
                cwd=out,
                stdout=subprocess.PIPE,
                stderr=subprocess.STDOUT,
                text=True,
            )
            for node in (0, 1)
        ]
        outputs = [p.communicate(timeout=timeout)[0] for p in machines]
        assert [p.returncode for p in machines] == [0, 0], outputs[0][-3000:] + outputs[1][-3000:]
        return [_tx_bytes(cluster.hosts[node].namespace) for node in (0, 1)]


def _tx_bytes(namespace: str) -> int:
    cmd = ["ip", "netns", "exec", namespace, "cat", "/sys/class/net/eth0/statistics/tx_bytes"]
    return int(subprocess.run(cmd, capture_output=True, text=True, check=True).stdout)


def launch_and_read_ranks(script: str, out: Path, ranks: int = 4) -> list[dict]:
    """Run ``script OUT --devices ranks``; fail with its output unless it succeeds; return every rank's JSON."""
    proc = launch(script, str(out), "--devices", str(ranks), cwd=out)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    return [json.loads((out / f"rank{r}.json").read_text()) for r in range(ranks)]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _gloo_rank(body: Callable[[int, Any], None], rank: int, world: int, port: int, queue: Any) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world, timeout=timedelta(seconds=60))
    try:
        body(rank, queue)
    finally:
        dist.destroy_process_group()


def run_gloo_world(body: Callable[[int, Any], None], world: int, messages: int, timeout: float = 180) -> list[Any]:
    """Spawn ``world`` gloo ranks running ``body(rank, queue)`` (a module-level function); return the
    ``messages`` items they put on the queue, and fail unless every rank exits cleanly."""
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    port = free_port()
    processes = [ctx.Process(target=_gloo_rank, args=(body, r, world, port, queue)) for r in range(world)]
    for p in processes:
        p.start()
    items = [queue.get(timeout=timeout) for _ in range(messages)]
    for p in processes:
        p.join(timeout=30)
        assert p.exitcode == 0
    return items
