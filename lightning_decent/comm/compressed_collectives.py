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

Byte counts report these ring volumes; gloo and NCCL may use other algorithms with the same order of traffic.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.distributed as dist
from torch.autograd.profiler import record_function

from lightning_decent.comm.base import CommStats, Communicator
from lightning_decent.comm.compression import Compressor, encode_and_decode

#: ``all_gather_single`` (torch >= 2.10) replaces ``all_gather_into_tensor``; both take a flat output.
_all_gather = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor


def shard_length(numel: int, parts: int, alignment: int) -> int:
    """Length of each of ``parts`` equal shards covering ``numel`` values (the last ones zero-padded),
    a multiple of ``alignment`` (a quantiser's block, so shards keep the whole-buffer blocks)."""
    return max(1, math.ceil(numel / (parts * alignment))) * alignment


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
    for index, buf in enumerate(buffers):
        key = (step, index)
        flat = buf.view(-1)
        payload = comm._payload(("gather", index), compressor, flat)
        encode_and_decode(flat, compressor, payload, key, None if residuals is None else residuals[index].view(-1))
        if world == 1:
            continue
        gathered = comm._workspace(("gathered", index), (world * payload.numel(),), torch.uint8, buf.device)
        with record_function("gossip.all_gather"):
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
    world, rank = dist.get_world_size(group), dist.get_rank(group)
    for index, buf in enumerate(buffers):
        flat, numel = buf.view(-1), buf.numel()
        length = shard_length(numel, world, compressor.alignment)
        shards = comm._workspace(("shards", index), (world, length), buf.dtype, buf.device)
        padded = shards.view(-1)
        padded[:numel].copy_(flat)
        padded[numel:].zero_()
        sent = comm._payload(("shards", index), compressor, shards)
        encode_and_decode(shards, compressor, sent, (step, index, 0))
        if residuals is not None:
            torch.sub(flat, padded[:numel], out=residuals[index].view(-1))
        if world > 1:
            received = comm._workspace(("shards_received", index), tuple(sent.shape), torch.uint8, buf.device)
            with record_function("gossip.all_to_all"):
                dist.all_to_all_single(received, sent, group=group)
            compressor.decode(received, shards, (step, index, 0))  # row j: rank j's copy of this rank's shard
        mine = shards.mean(dim=0, keepdim=True)
        residual = (
            None if shard_residuals is None else shard_residuals[index].view(-1)[shard_region(numel, length, rank)]
        )
        if residual is not None:  # error feedback of the second stage: this rank owns its shard's residual
            mine[0, : residual.numel()].add_(residual)
            residual.copy_(mine[0, : residual.numel()])
        own = comm._payload(("shard_average", index), compressor, mine)
        compressor.encode(mine, own, (step, index, 1))
        gathered = comm._workspace(("shard_averages", index), (world * own.numel(),), torch.uint8, buf.device)
        with record_function("gossip.all_gather"):
            _all_gather(gathered, own.view(-1), group=group)
        compressor.decode(gathered.view(world, -1), shards, (step, index, 1))
        if residual is not None:
            residual.sub_(shards[rank, : residual.numel()])
        flat.copy_(padded[:numel])
        _count(comm.stats, 2 * (world - 1) * own.numel(), 2)
