"""The events every process of a failure-schedule run appends to one shared file (one JSON object a line).

Kinds: ``start`` (the process began, with its interface's received bytes), ``step`` (a training step ended),
``first_step`` (this process's first step: the bytes it received before it, the state it was handed),
``eval`` (a validation accuracy of the trained model). Every event carries ``t`` (``time.time()``) and ``m``
(the machine, i.e. the namespace index). Small appends with ``O_APPEND`` do not interleave.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import Any

INTERFACE = "eth0"


def rx_bytes(interface: str = INTERFACE) -> int:
    """Bytes the interface has received so far (0 where it does not exist)."""
    path = Path(f"/sys/class/net/{interface}/statistics/rx_bytes")
    return int(path.read_text()) if path.exists() else 0


class EventLog:
    """Appends events of machine ``machine`` to ``path``."""

    def __init__(self, path: Path, machine: int) -> None:
        self.path = path
        self.machine = machine
        self.started_rx = rx_bytes()
        self.first_step_done = False

    def write(self, kind: str, **fields: Any) -> None:
        line = json.dumps({"t": time.time(), "m": self.machine, "kind": kind, **fields}) + "\n"
        fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        try:
            os.write(fd, line.encode())
        finally:
            os.close(fd)

    def step(self, step: int, world: int, **fields: Any) -> None:
        """A step ended; the first one also records what this process received before it."""
        if not self.first_step_done:
            self.first_step_done = True
            self.write("first_step", step=step, world=world, rx_bytes=rx_bytes() - self.started_rx, **fields)
        self.write("step", step=step, world=world)
