"""An emulated cluster on one Linux machine: one network namespace per host, links of a given bandwidth.

Every host gets a network namespace with one interface (``eth0``) wired by a veth pair to a bridge
in a separate "switch" namespace, and ``tc qdisc ... tbf rate <bandwidth>`` shapes both ends of
every link (each direction of a host's link is limited, as on a real switched network). Processes
started with :meth:`EmulatedCluster.popen` run inside a host's namespace; with
``GLOO_SOCKET_IFNAME=eth0`` gloo traffic between hosts crosses the shaped links.

Needs root and iproute2. Everything created is removed on exit, also on errors and Ctrl-C.
"""

from __future__ import annotations

import atexit
import os
import secrets
import shutil
import subprocess
from collections.abc import Sequence
from dataclasses import dataclass
from types import TracebackType

PREFIX = "ldemu"
INTERFACE = "eth0"


@dataclass(frozen=True)
class Host:
    namespace: str
    address: str


def available() -> tuple[bool, str]:
    """Whether namespaces can be created here, and if not, why."""
    if os.geteuid() != 0:
        return False, "needs root (network namespaces)"
    if shutil.which("ip") is None or shutil.which("tc") is None:
        return False, "needs iproute2 (`ip` and `tc`)"
    return True, ""


def _ip(*args: str, namespace: str | None = None) -> None:
    cmd = ["ip", *args] if namespace is None else ["ip", "netns", "exec", namespace, "ip", *args]
    subprocess.run(cmd, check=True, capture_output=True, text=True)


def _shape(interface: str, bandwidth: str, namespace: str) -> None:
    subprocess.run(
        ["ip", "netns", "exec", namespace, "tc", "qdisc", "add", "dev", interface, "root", "tbf",
         "rate", bandwidth, "burst", "256kb", "latency", "100ms"],
        check=True,
        capture_output=True,
        text=True,
    )  # fmt: skip


class EmulatedCluster:
    """``hosts`` network namespaces on one bridge, each link shaped to ``bandwidth`` (e.g. ``"1gbit"``).

    Use as a context manager; ``bandwidth=None`` leaves the links unshaped.
    """

    def __init__(self, hosts: int, bandwidth: str | None = None, subnet: int = 77) -> None:
        if hosts < 1:
            raise ValueError(f"An emulated cluster needs at least one host, got {hosts}.")
        self.token = secrets.token_hex(3)
        self.bandwidth = bandwidth
        self.switch = f"{PREFIX}{self.token}sw"
        self.hosts = [Host(f"{PREFIX}{self.token}h{i}", f"10.{subnet}.{i // 250}.{i % 250 + 1}") for i in range(hosts)]
        self._created: list[str] = []

    def __enter__(self) -> EmulatedCluster:
        atexit.register(self.teardown)
        try:
            self._build()
        except BaseException:
            self.teardown()
            raise
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.teardown()

    def _build(self) -> None:
        _ip("netns", "add", self.switch)
        self._created.append(self.switch)
        _ip("link", "add", "br0", "type", "bridge", namespace=self.switch)
        _ip("link", "set", "br0", "up", namespace=self.switch)
        for index, host in enumerate(self.hosts):
            _ip("netns", "add", host.namespace)
            self._created.append(host.namespace)
            port = f"p{index}"
            _ip("link", "add", port, "type", "veth", "peer", "name", INTERFACE, "netns", host.namespace,
                namespace=self.switch)  # fmt: skip
            _ip("link", "set", port, "master", "br0", "up", namespace=self.switch)
            _ip("addr", "add", f"{host.address}/16", "dev", INTERFACE, namespace=host.namespace)
            _ip("link", "set", INTERFACE, "up", namespace=host.namespace)
            _ip("link", "set", "lo", "up", namespace=host.namespace)
            if self.bandwidth:
                _shape(port, self.bandwidth, self.switch)
                _shape(INTERFACE, self.bandwidth, host.namespace)

    def teardown(self) -> None:
        """Delete every namespace this cluster created (their veth pairs and the bridge go with them)."""
        while self._created:
            subprocess.run(["ip", "netns", "del", self._created.pop()], capture_output=True)
        atexit.unregister(self.teardown)

    def popen(self, host: int, argv: Sequence[str], env: dict[str, str] | None = None, **kwargs) -> subprocess.Popen:
        """Start ``argv`` inside host ``host``'s namespace (gloo bound to its shaped interface)."""
        env = {**(env if env is not None else os.environ), "GLOO_SOCKET_IFNAME": INTERFACE}
        return subprocess.Popen(["ip", "netns", "exec", self.hosts[host].namespace, *argv], env=env, **kwargs)
