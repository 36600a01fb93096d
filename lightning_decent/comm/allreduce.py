"""Exact global averaging with one all-reduce per buffer: the P-SGD baseline's transport."""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.distributed as dist

from lightning_decent.comm.base import Communicator, PendingMix, count_all_reduce, nbytes, refuse_non_finite
from lightning_decent.comm.collectives import BoundedCollectives
from lightning_decent.comm.compressed_collectives import all_gather_average, start_two_stage_average, two_stage_average
from lightning_decent.comm.compression import Compressor
from lightning_decent.comm.p2p import average_all_reduce, start_average_all_reduce
from lightning_decent.topology import Topology


class AllReduceCommunicator(Communicator):
    """``mix`` ignores the graph and averages over all ranks, i.e. ``W = 11^T / n`` every step.

    Byte counts report the payload of a ring all-reduce, ``2 (n - 1) / n`` times the buffer size sent
    and received per rank; the backend may use another algorithm with the same order of traffic.

    Compressed: :meth:`mix_compressed` is the exact average of the decoded payloads (an all-gather of
    payloads, ``(n - 1)`` payloads per rank: CHOCO-SGD needs its mixing exact), and
    :meth:`average_compressed` the cheaper two-stage average (``~2 (n - 1) / n`` payloads per rank);
    see :mod:`~lightning_decent.comm.compressed_collectives`.

    Args:
        topology: the graph (only its size matters).
        group: the process group (default: the world).
        rank: this process's global rank (named in errors).
        check_finite: ``mix`` raises :class:`~lightning_decent.comm.base.NonFiniteValueError` instead of
            averaging NaN/Inf into every replica (one sum per buffer).
        collectives: bounded world collectives (the strategy's); without them a plain all-reduce.
    """

    sends_compressed = True

    def __init__(
        self,
        topology: Topology,
        group: dist.ProcessGroup | None = None,
        *,
        rank: int = 0,
        check_finite: bool = False,
        collectives: BoundedCollectives | None = None,
    ) -> None:
        super().__init__(topology)
        self.group = group
        self.rank = rank
        self.check_finite = check_finite
        self.collectives = collectives if group is None else None

    @property
    def _collective_group(self) -> dist.ProcessGroup | None:
        """The group of world-wide collectives: the strategy's bounded one (``collective_timeout``) if given."""
        return self.collectives.group if self.collectives is not None else self.group

    @torch.no_grad()
    def mix(self, buffers: Sequence[torch.Tensor], step: int) -> None:
        if self.check_finite:
            for index, buf in enumerate(buffers):
                refuse_non_finite(buf, self.rank, f"buffer {index} about to be averaged at step {step}")
        self.global_average(buffers)

    @torch.no_grad()
    def global_average(self, buffers: Sequence[torch.Tensor]) -> None:
        if dist.get_world_size(self.group) == 1:
            return
        if self.collectives is not None:
            self.collectives.average(list(buffers), "all-reduce communicator's average", check_in=False)
        else:
            average_all_reduce(buffers, self.group)
        self._count(buffers)

    @torch.no_grad()
    def start_global_average(self, buffers: Sequence[torch.Tensor]) -> PendingMix:
        """An asynchronous all-reduce per buffer (it runs while the caller computes)."""
        self._count(buffers)
        return start_average_all_reduce(buffers, self.group, self.collectives)

    def _count(self, buffers: Sequence[torch.Tensor]) -> None:
        n = dist.get_world_size(self.group)
        if n == 1:
            return
        self.stats.messages_sent += len(buffers)
        self.stats.messages_received += len(buffers)
        count_all_reduce(self.stats, sum(nbytes(b) for b in buffers), n)

    @torch.no_grad()
    def mix_compressed(
        self,
        buffers: Sequence[torch.Tensor],
        step: int,
        compressor: Compressor,
        residuals: Sequence[torch.Tensor] | None = None,
    ) -> None:
        all_gather_average(self, buffers, compressor, step, self._collective_group, residuals)

    @torch.no_grad()
    def average_compressed(
        self,
        buffers: Sequence[torch.Tensor],
        compressor: Compressor,
        step: int,
        residuals: Sequence[torch.Tensor] | None = None,
        shard_residuals: Sequence[torch.Tensor] | None = None,
    ) -> None:
        two_stage_average(self, buffers, compressor, step, self._collective_group, residuals, shard_residuals)

    @torch.no_grad()
    def start_average_compressed(
        self,
        buffers: Sequence[torch.Tensor],
        compressor: Compressor,
        step: int,
        residuals: Sequence[torch.Tensor] | None = None,
        shard_residuals: Sequence[torch.Tensor] | None = None,
    ) -> PendingMix:
        return start_two_stage_average(
            self, buffers, compressor, step, self._collective_group, residuals, shard_residuals
        )
