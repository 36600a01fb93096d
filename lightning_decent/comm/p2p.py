"""Neighbour-only gossip over ``torch.distributed`` point-to-point operations."""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from datetime import timedelta

import numpy as np
import torch
import torch.distributed as dist
from torch.autograd.profiler import record_function

from lightning_decent.comm.base import (
    Communicator,
    PendingMix,
    count_all_reduce,
    nbytes,
    refuse_non_finite,
)
from lightning_decent.comm.collectives import BoundedCollectives, diagnosed
from lightning_decent.comm.compressed_collectives import start_two_stage_average, two_stage_average
from lightning_decent.comm.compression import Compressor, encode_and_decode
from lightning_decent.comm.headers import HEADER_TAG, RoundHeaders
from lightning_decent.comm.schedule import gossip_rounds
from lightning_decent.topology import Topology

#: This rank's header of a round and its posted header messages ``(work, peer, received header or None)``.
_Headers = tuple[torch.Tensor | None, list[tuple[dist.Work, int, torch.Tensor | None]]]


class PeerTimeoutError(RuntimeError):
    """A neighbour did not complete its part of a gossip round in time (it died or hangs)."""


class _Phase:
    """What this rank does in one phase of the topology, in the order of the link schedule.

    ``rounds`` lists, for every round of :func:`~lightning_decent.comm.schedule.gossip_rounds` this
    rank takes part in, the peer it sends to and the peer it receives from (``None``: idle).
    """

    def __init__(self, topology: Topology, rank: int, phase: int) -> None:
        matrix = topology.matrix(phase)
        self.self_weight = float(matrix[rank, rank])
        self.rounds: list[tuple[int | None, int | None]] = []
        for edges in gossip_rounds(matrix):
            send_to = next((v for u, v in edges if u == rank), None)
            receive_from = next((u for u, v in edges if v == rank), None)
            if send_to is not None or receive_from is not None:
                self.rounds.append((send_to, receive_from))
        self.out_peers = [peer for peer, _ in self.rounds if peer is not None]
        self.in_peers = [(peer, float(matrix[rank, peer])) for _, peer in self.rounds if peer is not None]

    @property
    def isolated(self) -> bool:
        return not self.rounds


class P2PCommunicator(Communicator):
    """Gossip with ``isend``/``irecv``: only ranks with a non-zero weight exchange data.

    Every buffer is sent whole (one message per buffer and out-neighbour) into receive buffers that
    are allocated once and reused, then combined with row ``rank`` of ``W(step)``.

    Link schedule: the edges of a phase are split into rounds in which every rank sends to at most
    one peer and receives from at most one (:func:`~lightning_decent.comm.schedule.gossip_rounds`),
    so a rank with ``d`` peers moves ``d`` models through its link one after another instead of
    ``d`` streams fighting for it. A blocking :meth:`mix` posts every receive first (nothing flows
    until a sender sends, and directed or time-varying graphs cannot deadlock), then sends round by
    round, and combines each buffer as soon as its messages are in while later buffers still travel.
    The two directions between a pair of ranks travel on separate connections (a second process
    group), so a pair exchanging models at once uses both directions of its link at full speed; one
    gloo connection carrying bulk data both ways was measured at half the rate.

    :meth:`start_mix` posts the same messages (every round at once: nothing runs to pace the rounds
    while the caller computes) and returns; the transfer then runs in the background (used by D-SGD
    with ``overlap``).

    :meth:`mix_compressed` sends each buffer as one compressed payload on the same schedule (counted
    at the payload's size); :meth:`average_compressed` is the two-stage compressed global average of
    :mod:`~lightning_decent.comm.compressed_collectives`.

    Args:
        topology: the graph; node ``i`` is global rank ``i``.
        rank: this process's global rank.
        group: the process group (default: the world).
        timeout: how long to wait for a neighbour before raising :class:`PeerTimeoutError`.
        check_finite: raise :class:`NonFiniteValueError` instead of sending NaN/Inf (one sum per buffer).
        collectives: bounded world collectives for :meth:`global_average` (the strategy's); without them a
            plain all-reduce.

    ``headers`` (set by the strategy; ``None``: none) adds a small header message to every round, plain or
    compressed, see :mod:`~lightning_decent.comm.headers`.
    """

    sends_compressed = True

    def __init__(
        self,
        topology: Topology,
        rank: int,
        group: dist.ProcessGroup | None = None,
        timeout: timedelta = timedelta(seconds=60),
        check_finite: bool = True,
        collectives: BoundedCollectives | None = None,
    ) -> None:
        super().__init__(topology)
        self.rank = rank
        self.collectives = collectives if group is None else None
        self.headers: RoundHeaders | None = None
        self.group = group
        self.timeout = timeout
        self.check_finite = check_finite
        self._phases = [_Phase(topology, rank, k) for k in range(topology.period)]
        self._max_in = max(len(p.in_peers) for p in self._phases)
        self._recv: dict[tuple, list[torch.Tensor]] = {}
        self._pending_keys: set[tuple] = set()
        self._reverse = _reverse_channel(topology, group)

    @property
    def _collective_group(self) -> dist.ProcessGroup | None:
        """The group of world-wide collectives: the strategy's bounded one (``collective_timeout``) if given."""
        return self.collectives.group if self.collectives is not None else self.group

    # ---- transport ---------------------------------------------------------------------------------
    def _channel(self, src: int, dst: int) -> dist.ProcessGroup | None:
        """The process group carrying ``src -> dst``: the reverse one when ``src > dst`` (if any)."""
        return self._reverse if src > dst and self._reverse is not None else self.group

    def _post(self, send: bool, tensor: torch.Tensor, peer: int, step: int, tag: int = 0) -> dist.Work:
        """Post one message to (``send``) or from ``peer``. A neighbour whose connection closed before this rank
        posted (it died while this rank computed) is named as lost, as :meth:`_wait` names one lost later."""
        try:
            if send:
                return dist.isend(tensor, peer, self._channel(self.rank, peer), tag=tag)
            return dist.irecv(tensor, peer, self._channel(peer, self.rank), tag=tag)
        except RuntimeError as err:
            raise self._lost(peer, step, "its connection closed before this rank's message was posted", err) from err

    def _post_receives(
        self, phase: _Phase, received: list[list[torch.Tensor]], step: int
    ) -> list[list[tuple[dist.Work, int]]]:
        """Post every receive of the round: ``(work, peer)`` per buffer, in round order."""
        return [
            [(self._post(False, r, peer, step), peer) for (peer, _), r in zip(phase.in_peers, recv)]
            for recv in received
        ]

    def _post_sends(
        self, phase: _Phase, buffers: Sequence[torch.Tensor], step: int
    ) -> list[list[tuple[dist.Work, int]]]:
        """Post every send of the round at once: ``(work, peer)`` per buffer, in round order."""
        return [[(self._post(True, buf, peer, step), peer) for peer in phase.out_peers] for buf in buffers]

    def _receive_buffers(self, key: tuple, like: torch.Tensor) -> list[torch.Tensor]:
        full_key = (*key, like.shape, like.dtype, like.device)
        bufs = self._recv.get(full_key)
        if bufs is None:
            bufs = [torch.empty_like(like) for _ in range(self._max_in)]
            self._recv[full_key] = bufs
        return bufs

    # ---- blocking round ----------------------------------------------------------------------------
    @torch.no_grad()
    def mix(self, buffers: Sequence[torch.Tensor], step: int) -> None:
        phase = self._phases[step % len(self._phases)]
        if phase.isolated:
            _scale(buffers, phase.self_weight)
            return
        self._exchange(phase, buffers, step, lambda index, received: _combine(buffers[index], received, phase), True)

    def _exchange(
        self,
        phase: _Phase,
        wires: Sequence[torch.Tensor],
        step: int,
        combine: Callable[[int, list[torch.Tensor]], None],
        check_finite: bool = False,
    ) -> None:
        """Send every tensor of ``wires`` to the out-neighbours, round by round, and call
        ``combine(index, received)`` for each as soon as its messages from the in-neighbours are in."""
        received = [self._receive_buffers((index,), wire)[: len(phase.in_peers)] for index, wire in enumerate(wires)]
        with record_function("gossip.post_receives"):
            receives = self._post_receives(phase, received, step)
            headers = self._post_headers(phase, step)
        last_sends: list[tuple[dist.Work, int]] = []
        for position, peer in enumerate(phase.out_peers):  # one round after the other: one stream per link
            sends = []
            for index, wire in enumerate(wires):
                if position == 0 and check_finite and self.check_finite:  # checked while the previous one travels
                    self._refuse_non_finite(wire, index, step)
                with record_function("gossip.send"):
                    sends.append((self._post(True, wire, peer, step), peer))
            if position == len(phase.out_peers) - 1:
                last_sends = sends
                break
            with record_function("gossip.wait"):
                for work, _ in sends:
                    self._wait(work, peer, step)
        self._check_headers(headers, step)
        for index, recv in enumerate(received):  # combine while later buffers travel
            with record_function("gossip.wait"):
                for work, peer in receives[index] + last_sends[index : index + 1]:
                    self._wait(work, peer, step)
            with record_function("gossip.combine"):
                combine(index, recv)
        self._count(wires, phase)

    # ---- compressed messages -----------------------------------------------------------------------
    @torch.no_grad()
    def mix_compressed(
        self,
        buffers: Sequence[torch.Tensor],
        step: int,
        compressor: Compressor,
        residuals: Sequence[torch.Tensor] | None = None,
    ) -> None:
        """The blocking round of :meth:`mix` with payloads on the wire (see :meth:`Communicator.mix_compressed`):
        each buffer is encoded once into a reused payload, the payloads take the same link schedule, and
        every received payload is decoded into one reused buffer and folded into the combination."""
        phase = self._phases[step % len(self._phases)]
        if self.check_finite:
            for index, buf in enumerate(buffers):
                self._refuse_non_finite(buf, index, step)
        payloads = []
        for index, buf in enumerate(buffers):
            payload = self._payload((index,), compressor, buf)
            residual = None if residuals is None else residuals[index]
            with record_function("gossip.encode"):
                encode_and_decode(buf, compressor, payload, (step, index), residual)
            payloads.append(payload)
        if phase.isolated:
            _scale(buffers, phase.self_weight)
            return

        def combine(index: int, received: list[torch.Tensor]) -> None:
            decoded = self._scratch(("decoded",), buffers[index])
            _combine(buffers[index], (compressor.decode(r, decoded, (step, index)) for r in received), phase)

        self._exchange(phase, payloads, step, combine)

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
    def start_mix_compressed(
        self,
        buffers: Sequence[torch.Tensor],
        step: int,
        compressor: Compressor,
        residuals: Sequence[torch.Tensor] | None = None,
    ) -> PendingMix:
        """:meth:`mix_compressed` split as :meth:`start_mix`: the buffers are encoded now (each then holds
        its own ``C(x_i)``), the payloads' sends and receives are posted at once, and ``finish(index)``
        decodes buffer ``index``'s received payloads into the combination."""
        phase = self._phases[step % len(self._phases)]
        if self.check_finite:
            for index, buf in enumerate(buffers):
                self._refuse_non_finite(buf, index, step)
        payloads = []
        for index, buf in enumerate(buffers):
            payload = self._payload(("pending", index), compressor, buf)
            residual = None if residuals is None else residuals[index]
            with record_function("gossip.encode"):
                encode_and_decode(buf, compressor, payload, (step, index), residual)
            payloads.append(payload)

        def decoded(index: int, received: list[torch.Tensor]) -> Iterable[torch.Tensor]:
            scratch = self._scratch(("decoded",), buffers[index])
            return (compressor.decode(r, scratch, (step, index)) for r in received)

        return self._start_round(phase, buffers, payloads, step, decoded)

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

    # ---- split round -------------------------------------------------------------------------------
    @torch.no_grad()
    def start_mix(self, buffers: Sequence[torch.Tensor], step: int) -> PendingMix:
        """Post this round's receives and sends and return; see :class:`~lightning_decent.comm.PendingMix`.

        Each buffer gets its own receive buffers (keyed by its storage), so several buffers may have
        rounds in flight at once; the same buffer may not have two.
        """
        phase = self._phases[step % len(self._phases)]
        if self.check_finite and not phase.isolated:
            for index, buf in enumerate(buffers):
                self._refuse_non_finite(buf, index, step)
        return self._start_round(phase, buffers, buffers, step)

    def _start_round(
        self,
        phase: _Phase,
        buffers: Sequence[torch.Tensor],
        wires: Sequence[torch.Tensor],
        step: int,
        decoded: Callable[[int, list[torch.Tensor]], Iterable[torch.Tensor]] | None = None,
    ) -> PendingMix:
        """Post the receives and sends of ``wires`` (the buffers themselves, or their payloads) for
        ``buffers``' round; ``decoded`` turns a buffer's received payloads into values."""
        if phase.isolated:
            empty: list[list] = [[] for _ in buffers]
            return _P2PPendingMix(self, phase, buffers, step, empty, [[] for _ in buffers], [], decoded)
        keys = [("pending", wire.data_ptr()) for wire in wires]
        busy = [key for key in keys if key in self._pending_keys]
        if busy:
            raise RuntimeError(
                f"rank {self.rank}: a buffer already has a gossip round in flight; finish it before starting another."
            )
        self._pending_keys.update(keys)
        received = [self._receive_buffers(key, wire)[: len(phase.in_peers)] for key, wire in zip(keys, wires)]
        with record_function("gossip.start"):
            receives = self._post_receives(phase, received, step)
            headers = self._post_headers(phase, step)
            sends = self._post_sends(phase, wires, step)
        self._count(wires, phase)
        works = [r + s for r, s in zip(receives, sends)]
        return _P2PPendingMix(self, phase, buffers, step, received, works, keys, decoded, headers)

    # ---- round headers (see comm.headers) ----------------------------------------------------------
    def _post_headers(self, phase: _Phase, step: int) -> _Headers:
        """Post this round's header receives and sends; this rank's header and ``(work, peer, received)``."""
        if self.headers is None:
            return None, []
        mine = self.headers.outgoing(step)
        posted: list[tuple[dist.Work, int, torch.Tensor | None]] = []
        for peer, _ in phase.in_peers:
            theirs = torch.empty_like(mine)
            posted.append((self._post(False, theirs, peer, step, HEADER_TAG), peer, theirs))
        for peer in phase.out_peers:
            posted.append((self._post(True, mine, peer, step, HEADER_TAG), peer, None))
        return mine, posted

    def _check_headers(self, headers: _Headers, step: int) -> None:
        mine, posted = headers
        for work, peer, theirs in posted:
            self._wait(work, peer, step)
            if theirs is not None and mine is not None and self.headers is not None:
                self.headers.incoming(peer, step, theirs, mine)

    def is_silent(self, step: int) -> bool:
        phase = self._phases[step % len(self._phases)]
        return phase.isolated and phase.self_weight == 1.0

    # ---- checks and bookkeeping --------------------------------------------------------------------
    def _refuse_non_finite(self, buf: torch.Tensor, index: int, step: int) -> None:
        refuse_non_finite(buf, self.rank, f"buffer {index} about to be sent at {self.step_name(step)}")

    def _wait(self, work: dist.Work, peer: int, step: int) -> None:
        seconds = f"gossip_timeout={self.timeout.total_seconds():g}s"
        try:
            completed = work.wait(self.timeout)
        except RuntimeError as err:
            raise self._lost(peer, step, f"it died, hangs or its connection broke ({seconds})", err) from err
        if completed is False:
            raise self._lost(peer, step, f"no answer within {seconds} (it died or hangs)")

    def _lost(self, peer: int, step: int, why: str, err: RuntimeError | None = None) -> PeerTimeoutError:
        """The error for a neighbour lost at ``step``; with the strategy's collectives, what a roll call of
        every rank (bounded by ``gossip_timeout``) found: the neighbour may only be waiting on the rank
        that failed."""
        message = f"rank {self.rank}: lost rank {peer} at {self.step_name(step)}: {why}."
        if self.collectives is not None and self.collectives.explain_losses:
            found = self.collectives.explain(self.step_name(step), self.timeout, failure=message)
            message += f" Roll call of every rank: {found or 'every rank answered'}."
        if err is not None:
            message += f" Underlying error: {err}"
        return PeerTimeoutError(message)

    def _count(self, buffers: Sequence[torch.Tensor], phase: _Phase) -> None:
        size = sum(nbytes(b) for b in buffers)
        self.stats.messages_sent += len(buffers) * len(phase.out_peers)
        self.stats.bytes_sent += size * len(phase.out_peers)
        self.stats.messages_received += len(buffers) * len(phase.in_peers)
        self.stats.bytes_received += size * len(phase.in_peers)

    @torch.no_grad()
    def global_average(self, buffers: Sequence[torch.Tensor]) -> None:
        if self.collectives is not None:
            self.collectives.average(list(buffers), "global average", check_in=False)
        else:
            average_all_reduce(buffers, self.group)
        count_all_reduce(self.stats, sum(nbytes(b) for b in buffers), dist.get_world_size(self.group))

    @torch.no_grad()
    def start_global_average(self, buffers: Sequence[torch.Tensor]) -> PendingMix:
        """An asynchronous all-reduce per buffer (it runs while the caller computes)."""
        count_all_reduce(self.stats, sum(nbytes(b) for b in buffers), dist.get_world_size(self.group))
        return start_average_all_reduce(buffers, self.group, self.collectives)

    def close(self) -> None:
        """Destroy the reverse-direction process group. Left alive until interpreter exit, gloo
        sometimes aborted the process there ("terminate called without an active exception", about
        one torchrun run in four) after training had finished."""
        if self._reverse is not None:
            dist.destroy_process_group(self._reverse)
            self._reverse = None
        super().close()


class _P2PPendingMix(PendingMix):
    """A round posted by :meth:`P2PCommunicator.start_mix`; ``works[i]`` are buffer ``i``'s receives
    then sends (receives first: a hung neighbour shows up as the receive that never completes)."""

    def __init__(
        self,
        comm: P2PCommunicator,
        phase: _Phase,
        buffers: Sequence[torch.Tensor],
        step: int,
        received: list[list[torch.Tensor]],
        works: list[list[tuple[dist.Work, int]]],
        keys: list[tuple],
        decoded: Callable[[int, list[torch.Tensor]], Iterable[torch.Tensor]] | None = None,
        headers: _Headers = (None, []),
    ) -> None:
        super().__init__(buffers, step)
        self.comm = comm
        self.headers = headers
        self.phase = phase
        self.received = received
        self.works = works
        self.keys = keys
        self.decoded = decoded
        self.finished = [False] * len(self.buffers)

    def _wait_buffer(self, index: int) -> None:
        if self.headers[1]:
            headers, self.headers = self.headers, (None, [])
            self.comm._check_headers(headers, self.step)
        with record_function("gossip.wait"):
            for work, peer in self.works[index]:
                self.comm._wait(work, peer, self.step)
        self.works[index] = []

    def wait(self) -> None:
        for index in range(len(self.buffers)):
            self._wait_buffer(index)

    @torch.no_grad()
    def finish(self, index: int, into: torch.Tensor | None = None, refill: bool = False) -> None:
        if self.finished[index]:
            raise RuntimeError(f"buffer {index} of this gossip round was already finished.")
        if into is not None and self.decoded is not None:
            raise ValueError("a compressed round completes its own buffer; finish(index) takes no 'into'.")
        self._wait_buffer(index)
        buf, recv = self.buffers[index], self.received[index]
        with record_function("gossip.combine"):
            if self.decoded is not None:
                _combine(buf, self.decoded(index, recv), self.phase)
            elif into is None:
                _combine(buf, recv, self.phase)
            else:
                _add_correction(into, buf, recv, self.phase, refill)
        self.finished[index] = True
        if self.keys:
            self.comm._pending_keys.discard(self.keys[index])


def _scale(buffers: Sequence[torch.Tensor], weight: float) -> None:
    if weight != 1.0:
        for buf in buffers:
            buf.mul_(weight)


def _combine(buf: torch.Tensor, received: Iterable[torch.Tensor], phase: _Phase) -> None:
    """``x_i <- a x_i + sum_j w_j x_j`` as a chain of fused ``lerp`` passes.

    With ``s_m = a + w_1 + ... + w_m``, ``y <- lerp(y, x_m, w_m / s_m)`` keeps ``y = (a x_i + sum_{l<=m}
    w_l x_l) / s_m``; a final scaling by ``s_d`` is needed only for rows that do not sum to one
    (column-stochastic push-sum graphs). One pass per in-neighbour instead of ``1 + d``.
    """
    total = phase.self_weight
    for (_, weight), r in zip(phase.in_peers, received):
        total += weight
        buf.lerp_(r, weight / total)
    if abs(total - 1.0) > 1e-12:
        buf.mul_(total)


#: Elements per slice of a fused pass: a slice of the parameters, of the snapshot and of one received
#: model (3 x 512 KiB in float32) stay in a core's L2 cache between the passes over them.
FUSED_SLICE = 1 << 17


def _add_correction(
    into: torch.Tensor, buf: torch.Tensor, received: Sequence[torch.Tensor], phase: _Phase, refill: bool
) -> None:
    """``into += (a - 1) x_i + sum_j w_j x_j``, i.e. ``into += (W x)_i - x_i``; then ``x_i <- into`` if ``refill``.

    Runs slice by slice (:data:`FUSED_SLICE` elements): each slice of ``into`` is read from memory once
    and stays in cache for the passes of every term and the refill copy, so the whole update streams
    ``into``, ``x_i`` and the received models once instead of once per pass (a third fewer bytes moved
    for one peer; the Python loop costs about 2 us per slice).
    """
    into, buf = into.view(-1), buf.view(-1)
    received = [r.view(-1) for r in received]
    for start in range(0, into.numel(), FUSED_SLICE):
        length = min(FUSED_SLICE, into.numel() - start)
        target, own = into.narrow(0, start, length), buf.narrow(0, start, length)
        if phase.self_weight != 1.0:
            target.add_(own, alpha=phase.self_weight - 1.0)
        for (_, weight), r in zip(phase.in_peers, received):
            target.add_(r.narrow(0, start, length), alpha=weight)
        if refill:
            own.copy_(target)


def _reverse_channel(topology: Topology, group: dist.ProcessGroup | None) -> dist.ProcessGroup | None:
    """A second process group for the ``higher -> lower`` rank direction, created only when some phase
    has a pair of ranks sending to each other (every rank decides the same from the topology)."""
    if not any(_has_two_way_pair(topology.matrix(k)) for k in range(topology.period)):
        return None
    if group is None:
        return dist.new_group()
    return dist.new_group(dist.get_process_group_ranks(group), use_local_synchronization=True)


def _has_two_way_pair(matrix: np.ndarray) -> bool:
    linked = matrix != 0
    np.fill_diagonal(linked, False)
    return bool((linked & linked.T).any())


def average_all_reduce(buffers: Sequence[torch.Tensor], group: dist.ProcessGroup | None = None) -> None:
    """``x <- mean over ranks of x`` for every buffer: one all-reduce per buffer."""
    world = dist.get_world_size(group)
    with record_function("gossip.all_reduce"):
        for buf in buffers:
            dist.all_reduce(buf, op=dist.ReduceOp.SUM, group=group)
            buf.div_(world)


class _AsyncAverage(PendingMix):
    """All-reduces started with ``async_op=True``; ``finish(index)`` waits for buffer ``index`` and divides.
    With ``collectives`` (the strategy's bounded ones, whose group ``group`` is), a failed wait holds their
    roll call and raises :class:`~lightning_decent.comm.collectives.CollectiveTimeoutError` naming who is missing."""

    def __init__(
        self, buffers: Sequence[torch.Tensor], group: dist.ProcessGroup | None, collectives: BoundedCollectives | None
    ) -> None:
        super().__init__(buffers, step=-1)
        self.world = dist.get_world_size(group)
        self.collectives = collectives
        if collectives is not None:
            collectives.start(_ASYNC_AVERAGE)
        with record_function("gossip.all_reduce_start"), diagnosed(collectives, _ASYNC_AVERAGE):
            self.works: list[dist.Work | None] = [
                dist.all_reduce(buf, op=dist.ReduceOp.SUM, group=group, async_op=True) for buf in buffers
            ]

    def _wait(self, index: int) -> None:
        work = self.works[index]
        if work is not None:
            with record_function("gossip.wait"), diagnosed(self.collectives, _ASYNC_AVERAGE):
                work.wait()
            self.works[index] = None

    def wait(self) -> None:
        for index in range(len(self.buffers)):
            self._wait(index)

    @torch.no_grad()
    def finish(self, index: int, into: torch.Tensor | None = None, refill: bool = False) -> None:
        if into is not None:
            raise ValueError("a global average completes its own buffer; finish(index) takes no 'into'.")
        self._wait(index)
        self.buffers[index].div_(self.world)


_ASYNC_AVERAGE = "global average (in the background)"


def start_average_all_reduce(
    buffers: Sequence[torch.Tensor],
    group: dist.ProcessGroup | None = None,
    collectives: BoundedCollectives | None = None,
) -> PendingMix:
    """Start ``x <- mean over ranks of x`` for every buffer (one asynchronous all-reduce each); with
    ``collectives``, on their bounded group and diagnosed by their roll call when it fails."""
    return _AsyncAverage(buffers, group if collectives is None else collectives.group, collectives)
