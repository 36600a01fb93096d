"""The membership store: a ``torch.distributed.TCPStore`` that outlives every training process.

Elastic runs keep their member set in torch's dynamic rendezvous (:mod:`.rendezvous`), whose state lives in a
key-value store. The store must survive the loss of any training rank, so it is served by its own process:

* started by hand on a machine that stays up (``python -m lightning_decent.membership serve --port 29400``) and
  named with ``ElasticOptions(store="host:29400")``; or
* started by the rank launched as rank 0, as a detached process (its own session: killing rank 0, even with
  SIGKILL, leaves it running) listening on ``MASTER_ADDR:MASTER_PORT + 1``.

A served store exits by itself once no member has sent a heartbeat for ``idle_seconds`` (the run is over).
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from datetime import timedelta

import torch.distributed as dist

#: Exit status of ``serve`` when the port is taken (another run's store, or one already started for this run).
PORT_TAKEN = 3


class MembershipStoreError(RuntimeError):
    """The membership store cannot be reached (it was never started, or its process or machine is gone)."""


def parse_address(address: str) -> tuple[str, int]:
    host, sep, port = address.rpartition(":")
    if not sep or not host or not port.isdigit():
        raise ValueError(f"store={address!r} is not 'host:port' (e.g. store='10.0.0.1:29400').")
    return host, int(port)


def default_address() -> tuple[str, int]:
    """``MASTER_ADDR:MASTER_PORT + 1``: beside the process group's own rendezvous."""
    return os.environ.get("MASTER_ADDR", "127.0.0.1"), int(os.environ.get("MASTER_PORT", "29500")) + 1


def start_detached(host: str, port: int, run_id: str, idle_seconds: float) -> None:
    """Start ``serve`` in its own session (it survives this process); an already running store is kept."""
    command = [sys.executable, "-m", "lightning_decent.membership", "serve", "--host", host, "--port", str(port)]
    command += ["--run-id", run_id, "--idle-seconds", str(idle_seconds)]
    subprocess.Popen(
        command,
        start_new_session=True,
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        close_fds=True,
    )


def connect(host: str, port: int, timeout: timedelta) -> dist.TCPStore:
    """A client of the store at ``host:port``, waiting up to ``timeout`` for it to come up."""
    try:
        return dist.TCPStore(host, port, is_master=False, timeout=timeout, wait_for_workers=False)
    except (RuntimeError, TimeoutError) as err:
        raise MembershipStoreError(
            f"cannot reach the membership store at {host}:{port} within {timeout.total_seconds():g}s ({err}). "
            f"Start it with 'python -m lightning_decent.membership serve --port {port}' on a machine that stays up "
            f"and pass strategy.elastic.store={host}:{port}, or let the rank launched as rank 0 start it."
        ) from err


def serve(host: str, port: int, run_id: str, idle_seconds: float, poll_seconds: float = 2.0) -> int:
    """Serve the store until no member of ``run_id`` has sent a heartbeat for ``idle_seconds``."""
    from lightning_decent.membership.rendezvous import last_heartbeat

    try:
        store = dist.TCPStore(host, port, is_master=True, wait_for_workers=False, timeout=timedelta(seconds=30))
    except RuntimeError:
        return PORT_TAKEN
    started = time.time()
    while True:
        time.sleep(poll_seconds)
        beat = last_heartbeat(store, run_id)
        if time.time() - (beat or started) > idle_seconds:
            return 0
