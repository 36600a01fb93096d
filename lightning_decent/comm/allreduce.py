"""Exact global averaging with one all-reduce per buffer: the P-SGD baseline."""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.distributed as dist

from lightning_decent.comm.base import Communicator, PendingMix, count_all_reduce, nbytes
from lightning_decent.comm.p2p import average_all_reduce, start_average_all_reduce
from lightning_decent.topology import Topology


class AllReduceCommunicator(Communicator):
    """``mix`` ignores the graph and averages over all ranks, i.e. ``W = 11^T / n`` every step.

    Byte counts report the payload of a ring all-reduce, ``2 (n - 1) / n`` times the buffer size sent
    and received per rank; the backend may use another algorithm with the same order of traffic.
    """

    def __init__(self, topology: Topology, group: dist.ProcessGroup | None = None) -> None:
        super().__init__(topology)
        self.group = group

    @torch.no_grad()
    def mix(self, buffers: Sequence[torch.Tensor], step: int) -> None:
        self.global_average(buffers)

    @torch.no_grad()
    def global_average(self, buffers: Sequence[torch.Tensor]) -> None:
        if dist.get_world_size(self.group) == 1:
            return
        average_all_reduce(buffers, self.group)
        self._count(buffers)

    @torch.no_grad()
    def start_global_average(self, buffers: Sequence[torch.Tensor]) -> PendingMix:
        """An asynchronous all-reduce per buffer (it runs while the caller computes)."""
        self._count(buffers)
        return start_average_all_reduce(buffers, self.group)

    def _count(self, buffers: Sequence[torch.Tensor]) -> None:
        n = dist.get_world_size(self.group)
        if n == 1:
            return
        self.stats.messages_sent += len(buffers)
        self.stats.messages_received += len(buffers)
        count_all_reduce(self.stats, sum(nbytes(b) for b in buffers), n)
