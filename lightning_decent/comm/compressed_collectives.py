"""Global averages of compressed buffers over ``torch.distributed`` collectives.

Two forms, both giving the same bits on every rank (each rank decodes the same payloads in the same order):

* :func:`all_gather_average`: every rank's whole payload goes to every rank, which averages the ``n``
  decoded buffers exactly: ``x <- (1/n) sum_j C(x_j)``. Sends ``(n - 1) P`` per rank (ring all-gather).
  Exact, so CHOCO-SGD can use it as its mixing on ``W = 11^T/n``; no cheaper than a float32 ring
  all-reduce (``2 (n - 1)/n * 4m`` bytes) once ``P >= 2 * 4m / n``, e.g. int8 (``P ~ m``) at 8 ranks.
* :func:`two_stage_average`: a compressed reduce-scatter (``all_to_all`` of shard payloads) and a
  compressed all-gather of the shard averages: ``x <- C_s((1/n) sum_j C_s(x_j))`` shard by shard.
  Sends ``2 (n - 1)`` shard payloads of ``~P/n``: ``~2 (n - 1)/n P`` per rank, the all-reduce's volume
  at the payload's size (int8: ``0.254 x`` float32's at any ``n``). The average is compressed twice.

With the strategy's bounded collectives (``comm.collectives``) a failed exchange holds their roll call and
names the rank that is missing (:class:`~lightning_decent.comm.collectives.CollectiveTimeoutError`).

Byte counts report these ring volumes; gloo and NCCL may use other algorithms with the same order of traffic.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.distributed as dist
from torch.autograd.profiler import record_function

from lightning_decent.comm.base import CommStats, Communicator, PendingMix, refuse_non_finite
from lightning_decent.comm.collectives import diagnosed
from lightning_decent.comm.compression import Compressor, encode_and_decode

#: ``all_gather_single`` (torch >= 2.10) replaces ``all_gather_into_tensor``; both take a flat output.
_all_gather = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor


def shard_length(numel: int, parts: int, alignment: int) -> int:
    """Length of each of ``parts`` equal shards covering ``numel`` values (the last ones zero-padded),
    a multiple of ``alignment`` (a quantiser's block, so shards keep the whole-buffer blocks)."""
    return max(1, math.ceil(numel / (parts * alignment))) * alignment


_GATHER = "compressed average (all-gather)"
_TWO_STAGE = "compressed two-stage average"


def _start(comm: Communicator, what: str) -> None:
    """Count a collective of the communicator's bounded ones (their roll call compares the counts)."""
    if comm.collectives is not None:
        comm.collectives.start(what)


def _refuse_non_finite(comm: Communicator, buffers: Sequence[torch.Tensor], step: int) -> None:
    """With the communicator's ``check_finite``: no NaN/Inf goes into a compressed average (one sum per buffer)."""
    if comm.check_finite:
        for index, buf in enumerate(buffers):
            refuse_non_finite(buf, comm.rank, f"buffer {index} about to be averaged (compressed) at step {step}")


def _count(stats: CommStats, payload_bytes: int, messages: int) -> None:
    stats.messages_sent += messages
    stats.messages_received += messages
    stats.bytes_sent += payload_bytes
    stats.bytes_received += payload_bytes


@torch.no_grad()
def all_gather_average(
    comm: Communicator,
    buffers: Sequence[torch.Tensor],
    compressor: Compressor,
    step: int,
    group: dist.ProcessGroup | None = None,
    residuals: Sequence[torch.Tensor] | None = None,
) -> None:
    """``x <- (1/n) sum_j C(x_j)`` exactly (sum in rank order), the payloads gathered by every rank."""
    world, rank = dist.get_world_size(group), dist.get_rank(group)
    _refuse_non_finite(comm, buffers, step)
    for index, buf in enumerate(buffers):
        key = (step, index)
        flat = buf.view(-1)
        payload = comm._payload(("gather", index), compressor, flat)
        encode_and_decode(flat, compressor, payload, key, None if residuals is None else residuals[index].view(-1))
        if world == 1:
            continue
        gathered = comm._workspace(("gathered", index), (world * payload.numel(),), torch.uint8, buf.device)
        _start(comm, _GATHER)
        with record_function("gossip.all_gather"), diagnosed(comm.collectives, _GATHER):
            _all_gather(gathered, payload, group=group)
        decoded = comm._scratch(("gather_decoded",), flat)
        total = comm._scratch(("gather_total",), flat).zero_()
        for j, row in enumerate(gathered.view(world, -1)):
            total.add_(flat if j == rank else compressor.decode(row, decoded, key))
        flat.copy_(total).div_(world)
        _count(comm.stats, (world - 1) * payload.numel(), 1)


def shard_region(numel: int, length: int, shard: int) -> slice:
    """The positions of a ``numel``-value buffer that shard ``shard`` (of ``length``) covers (padding excluded)."""
    return slice(min(shard * length, numel), min((shard + 1) * length, numel))


class _TwoStageShards:
    """One buffer's two-stage average (see :func:`two_stage_average`), split where the network is used:
    :meth:`send` compresses the buffer's shards and starts their exchange (stage 1), :meth:`complete`
    averages this rank's shard and all-gathers the compressed averages (stage 2)."""

    def __init__(
        self,
        comm: Communicator,
        buffer: torch.Tensor,
        index: int,
        compressor: Compressor,
        step: int,
        group: dist.ProcessGroup | None,
    ) -> None:
        self.comm, self.buffer, self.index, self.compressor, self.step, self.group = (
            comm,
            buffer,
            index,
            compressor,
            step,
            group,
        )
        self.world, self.rank = dist.get_world_size(group), dist.get_rank(group)
        self.numel = buffer.numel()
        self.length = shard_length(self.numel, self.world, compressor.alignment)
        self.shards = comm._workspace(("shards", index), (self.world, self.length), buffer.dtype, buffer.device)
        self.work: dist.Work | None = None

    @torch.no_grad()
    def send(self, residual: torch.Tensor | None) -> None:
        flat, padded = self.buffer.view(-1), self.shards.view(-1)
        padded[: self.numel].copy_(flat)
        padded[self.numel :].zero_()
        sent = self.comm._payload(("shards", self.index), self.compressor, self.shards)
        encode_and_decode(self.shards, self.compressor, sent, (self.step, self.index, 0))
        if residual is not None:
            torch.sub(flat, padded[: self.numel], out=residual.view(-1))
        if self.world == 1:
            return
        self.received = self.comm._workspace(
            ("shards_received", self.index), tuple(sent.shape), torch.uint8, self.buffer.device
        )
        _start(self.comm, _TWO_STAGE)
        with record_function("gossip.all_to_all"), diagnosed(self.comm.collectives, _TWO_STAGE):
            self.work = dist.all_to_all_single(self.received, sent, group=self.group, async_op=True)

    def wait(self) -> None:
        if self.work is not None:
            with record_function("gossip.wait"), diagnosed(self.comm.collectives, _TWO_STAGE):
                self.work.wait()
            self.work = None
            self.compressor.decode(self.received, self.shards, (self.step, self.index, 0))  # row j: rank j's copy

    @torch.no_grad()
    def complete(self, shard_residual: torch.Tensor | None) -> None:
        self.wait()
        shards, world, key = self.shards, self.world, (self.step, self.index, 1)
        mine = shards.mean(dim=0, keepdim=True)
        residual = (
            None
            if shard_residual is None
            else shard_residual.view(-1)[shard_region(self.numel, self.length, self.rank)]
        )
        if residual is not None:  # error feedback of the second stage: this rank owns its shard's residual
            mine[0, : residual.numel()].add_(residual)
            residual.copy_(mine[0, : residual.numel()])
        own = self.comm._payload(("shard_average", self.index), self.compressor, mine)
        self.compressor.encode(mine, own, key)
        gathered = self.comm._workspace(
            ("shard_averages", self.index), (world * own.numel(),), torch.uint8, self.buffer.device
        )
        _start(self.comm, _TWO_STAGE)
        with record_function("gossip.all_gather"), diagnosed(self.comm.collectives, _TWO_STAGE):
            _all_gather(gathered, own.view(-1), group=self.group)
        self.compressor.decode(gathered.view(world, -1), shards, key)
        if residual is not None:
            residual.sub_(shards[self.rank, : residual.numel()])
        self.buffer.view(-1).copy_(shards.view(-1)[: self.numel])
        _count(self.comm.stats, 2 * (world - 1) * own.numel(), 2)


def _residual(residuals: Sequence[torch.Tensor] | None, index: int) -> torch.Tensor | None:
    return None if residuals is None else residuals[index]


@torch.no_grad()
def two_stage_average(
    comm: Communicator,
    buffers: Sequence[torch.Tensor],
    compressor: Compressor,
    step: int,
    group: dist.ProcessGroup | None = None,
    residuals: Sequence[torch.Tensor] | None = None,
    shard_residuals: Sequence[torch.Tensor] | None = None,
) -> None:
    """``x <- C_s((1/n) sum_j C_s(x_j))`` per shard ``s`` (see :meth:`Communicator.average_compressed`)."""
    pending = start_two_stage_average(comm, buffers, compressor, step, group, residuals, shard_residuals)
    for index in range(len(buffers)):
        pending.finish(index)


class _PendingTwoStage(PendingMix):
    """Two-stage averages whose first stage (every buffer's compressed reduce-scatter, ``(n - 1)/n`` of the
    traffic) runs in the background; ``finish(index)`` waits for it and runs buffer ``index``'s second
    stage (the all-gather of the compressed shard averages, the other half) before returning."""

    def __init__(self, stages: list[_TwoStageShards], shard_residuals: Sequence[torch.Tensor] | None) -> None:
        super().__init__([stage.buffer for stage in stages], stages[0].step if stages else -1)
        self.stages = stages
        self.shard_residuals = shard_residuals
        self.finished = [False] * len(stages)

    def wait(self) -> None:
        for stage in self.stages:
            stage.wait()

    def finish(self, index: int, into: torch.Tensor | None = None, refill: bool = False) -> None:
        if into is not None:
            raise ValueError("a global average completes its own buffer; finish(index) takes no 'into'.")
        if self.finished[index]:
            raise RuntimeError(f"buffer {index} of this average was already finished.")
        self.stages[index].complete(_residual(self.shard_residuals, index))
        self.finished[index] = True


@torch.no_grad()
def start_two_stage_average(
    comm: Communicator,
    buffers: Sequence[torch.Tensor],
    compressor: Compressor,
    step: int,
    group: dist.ProcessGroup | None = None,
    residuals: Sequence[torch.Tensor] | None = None,
    shard_residuals: Sequence[torch.Tensor] | None = None,
) -> PendingMix:
    """:func:`two_stage_average` with its first stage started in the background for every buffer (see
    :class:`_PendingTwoStage`); the buffers are encoded and ``residuals`` written before it returns."""
    _refuse_non_finite(comm, buffers, step)
    stages = [_TwoStageShards(comm, buf, index, compressor, step, group) for index, buf in enumerate(buffers)]
    for index, stage in enumerate(stages):
        stage.send(_residual(residuals, index))
    return _PendingTwoStage(stages, shard_residuals)
