"""Neighbour-only gossip over ``torch.distributed`` point-to-point operations."""

from __future__ import annotations

from collections.abc import Sequence
from datetime import timedelta

import torch
import torch.distributed as dist
from torch.autograd.profiler import record_function

from lightning_decent.comm.base import Communicator, nbytes
from lightning_decent.topology import Topology


class PeerTimeoutError(RuntimeError):
    """A neighbour did not complete its part of a gossip round in time (it died or hangs)."""


class NonFiniteValueError(FloatingPointError):
    """This rank is about to send NaN or Inf to its neighbours."""


class _Phase:
    """Who this rank talks to in one phase of the topology, and with what weights."""

    def __init__(self, topology: Topology, rank: int, phase: int) -> None:
        self.self_weight = topology.self_weight(rank, phase)
        self.in_peers = topology.in_neighbors(rank, phase)
        self.out_peers = [peer for peer, _ in topology.out_neighbors(rank, phase)]


class P2PCommunicator(Communicator):
    """Gossip with ``isend``/``irecv``: only ranks with a non-zero weight exchange data.

    Every buffer is sent whole (one message per buffer and out-neighbour) and received into a
    receive buffer that is allocated once and reused, then combined with the weights of row
    ``rank`` of ``W(step)``. Sends and receives of one round are issued together, so directed and
    time-varying graphs, where the send and receive sets differ, cannot deadlock.

    Args:
        topology: the graph; node ``i`` is global rank ``i``.
        rank: this process's global rank.
        group: the process group (default: the world).
        timeout: how long to wait for a neighbour before raising :class:`PeerTimeoutError`.
        check_finite: raise :class:`NonFiniteValueError` instead of sending NaN/Inf (one sum per buffer).
    """

    def __init__(
        self,
        topology: Topology,
        rank: int,
        group: dist.ProcessGroup | None = None,
        timeout: timedelta = timedelta(seconds=60),
        check_finite: bool = True,
    ) -> None:
        super().__init__(topology)
        self.rank = rank
        self.group = group
        self.timeout = timeout
        self.check_finite = check_finite
        self._phases = [_Phase(topology, rank, k) for k in range(topology.period)]
        self._max_in = max(len(p.in_peers) for p in self._phases)
        self._recv: dict[tuple[int, torch.Size, torch.dtype, torch.device], list[torch.Tensor]] = {}

    def _receive_buffers(self, index: int, like: torch.Tensor) -> list[torch.Tensor]:
        key = (index, like.shape, like.dtype, like.device)
        bufs = self._recv.get(key)
        if bufs is None:
            bufs = [torch.empty_like(like) for _ in range(self._max_in)]
            self._recv[key] = bufs
        return bufs

    @torch.no_grad()
    def mix(self, buffers: Sequence[torch.Tensor], step: int) -> None:
        phase = self._phases[step % len(self._phases)]
        if not phase.in_peers and not phase.out_peers:
            if phase.self_weight != 1.0:
                for buf in buffers:
                    buf.mul_(phase.self_weight)
            return
        if self.check_finite:
            self._refuse_non_finite(buffers, step)
        ops: list[dist.P2POp] = []
        receives: list[tuple[int, int]] = []  # (index into ops, peer)
        sends: list[tuple[int, int]] = []
        received: list[list[torch.Tensor]] = []
        with record_function("gossip.send_recv"):
            for index, buf in enumerate(buffers):
                for peer in phase.out_peers:
                    sends.append((len(ops), peer))
                    ops.append(dist.P2POp(dist.isend, buf, peer, self.group))
                recv = self._receive_buffers(index, buf)[: len(phase.in_peers)]
                for (peer, _), r in zip(phase.in_peers, recv):
                    receives.append((len(ops), peer))
                    ops.append(dist.P2POp(dist.irecv, r, peer, self.group))
                received.append(recv)
            works = dist.batch_isend_irecv(ops)
        with record_function("gossip.wait"):
            # Receives first: a hung neighbour shows up as the receive that never completes, where a
            # send may also stall on a healthy peer that is itself stuck behind the hung one.
            for position, peer in receives + sends:
                self._wait(works[position], peer, step)
        with record_function("gossip.combine"):
            for buf, recv in zip(buffers, received):
                buf.mul_(phase.self_weight)
                for (_, weight), r in zip(phase.in_peers, recv):
                    buf.add_(r, alpha=weight)
        self._count(buffers, phase)

    def _refuse_non_finite(self, buffers: Sequence[torch.Tensor], step: int) -> None:
        for index, buf in enumerate(buffers):
            total = buf.sum(dtype=torch.float32) if buf.dtype == torch.float16 else buf.sum()
            if not torch.isfinite(total):
                raise NonFiniteValueError(
                    f"rank {self.rank}: NaN or Inf in buffer {index} about to be sent at gossip step {step}; "
                    f"stopping instead of spreading it to the neighbours. Lower the learning rate or clip "
                    f"gradients (check_finite=False disables this check)."
                )

    def _wait(self, work: dist.Work, peer: int, step: int) -> None:
        try:
            completed = work.wait(self.timeout)
        except RuntimeError as err:
            raise PeerTimeoutError(
                f"rank {self.rank}: lost rank {peer} at gossip step {step}: it died, hangs or its connection "
                f"broke (gossip_timeout={self.timeout.total_seconds():g}s). Underlying error: {err}"
            ) from err
        if completed is False:
            raise PeerTimeoutError(
                f"rank {self.rank}: lost rank {peer} at gossip step {step}: no answer within "
                f"gossip_timeout={self.timeout.total_seconds():g}s (it died or hangs)."
            )

    def _count(self, buffers: Sequence[torch.Tensor], phase: _Phase) -> None:
        size = sum(nbytes(b) for b in buffers)
        self.stats.messages_sent += len(buffers) * len(phase.out_peers)
        self.stats.bytes_sent += size * len(phase.out_peers)
        self.stats.messages_received += len(buffers) * len(phase.in_peers)
        self.stats.bytes_received += size * len(phase.in_peers)

    @torch.no_grad()
    def global_average(self, buffers: Sequence[torch.Tensor]) -> None:
        average_all_reduce(buffers, self.group)


def average_all_reduce(buffers: Sequence[torch.Tensor], group: dist.ProcessGroup | None = None) -> None:
    """``x <- mean over ranks of x`` for every buffer: one all-reduce per buffer."""
    world = dist.get_world_size(group)
    with record_function("gossip.all_reduce"):
        for buf in buffers:
            dist.all_reduce(buf, op=dist.ReduceOp.SUM, group=group)
            buf.div_(world)
