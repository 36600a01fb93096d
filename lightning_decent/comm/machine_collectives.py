"""The two collectives hierarchical gossip runs inside a machine: reduce-scatter and all-gather.

Two implementations of one small interface (:class:`MachineCollectives`):

* :class:`ProcessGroupMachine`: the machine's process group (NCCL on GPUs, which runs over NVLink;
  gloo on CPU, which runs over loopback TCP);
* :class:`SharedMemoryMachine`: for CPU tensors, one shared-memory segment per buffer, mapped by the
  machine's ``L`` ranks. Rank ``l`` writes its buffer into its row of an ``L x n`` table, and after a
  barrier sums column block ``l`` (its shard of the machine's sum); for the all-gather it writes its
  shard into block ``l`` of a shared vector and, after a barrier, copies the vector. The two barriers
  of a round (tiny messages on the process group) order every read before the next write (a rank
  writes the table of round ``k + 1`` after the all-gather barrier of round ``k``, which every rank
  reaches after reading the table, and the vector after round ``k + 1``'s table barrier); the bytes move
  as memory copies instead of through the TCP stack, which on a CPU-bound machine is what the
  loopback path costs (measured in ``docs/performance.md``, two-level clusters).

Segments live in ``/dev/shm``: the machine's first rank creates the file with its full size reserved
(``posix_fallocate``, so a full ``/dev/shm`` is an error at set-up, not a crash on first touch), every
rank maps it, and it is unlinked as soon as all have mapped it. Every rank of the machine knows each
segment's name in advance (a prefix agreed when the collectives are built, and a count), so whichever
rank's step of the set-up fails (a mate died, stopped or timed out) unlinks it: nothing is left behind
unless every rank of the machine is killed at once. If ``/dev/shm`` cannot hold a segment, every rank of
the machine falls back to the process group for that buffer, with one warning that says how much space
was needed. The process group's operations (the barriers, the set-up broadcast) are bounded by its
timeout.
"""

from __future__ import annotations

import contextlib
import itertools
import os
import uuid
import warnings
from typing import Protocol

import torch
import torch.distributed as dist

# The current torch names (the older ones are deprecated there); same semantics.
_reduce_scatter_single = getattr(dist, "reduce_scatter_single", dist.reduce_scatter_tensor)
_all_gather_single = getattr(dist, "all_gather_single", dist.all_gather_into_tensor)

SHM_DIR = "/dev/shm"


class MachineCollectives(Protocol):
    """Reduce-scatter and all-gather among the ``L`` ranks of one machine, on flat tensors of ``L`` equal shards."""

    def reduce_scatter(self, key: tuple, shard: torch.Tensor, source: torch.Tensor) -> None:
        """``shard <- sum_l' source_l'[block l]`` for this rank's local rank ``l`` (``source``: ``L`` shards)."""

    def all_gather(self, key: tuple, target: torch.Tensor, shard: torch.Tensor) -> None:
        """``target[block l'] <- shard_l'`` for every local rank ``l'``."""

    def close(self) -> None:
        """Release what the collectives hold (segments, nothing of the process group)."""


class ProcessGroupMachine:
    """The machine's process group: ``reduce_scatter_tensor`` and ``all_gather_into_tensor``."""

    def __init__(self, group: dist.ProcessGroup) -> None:
        self.group = group

    def reduce_scatter(self, key: tuple, shard: torch.Tensor, source: torch.Tensor) -> None:
        _reduce_scatter_single(shard, source, group=self.group)

    def all_gather(self, key: tuple, target: torch.Tensor, shard: torch.Tensor) -> None:
        _all_gather_single(target, shard, group=self.group)

    def close(self) -> None:
        pass


class SharedMemoryMachine:
    """Reduce-scatter and all-gather of CPU tensors through shared memory (see the module docstring).

    Args:
        group: the machine's process group (its barriers, the segment names, and the fallback).
        local_rank: this rank's index in the machine, ``0 .. L - 1``.
        local_world_size: ``L``.
    """

    def __init__(self, group: dist.ProcessGroup, local_rank: int, local_world_size: int) -> None:
        self.group = group
        self.local_rank = local_rank
        self.local_world_size = local_world_size
        self._fallback = ProcessGroupMachine(group)
        self._segments: dict[tuple, tuple[torch.Tensor, torch.Tensor] | None] = {}
        self._names = itertools.count()
        prefix = [f"{os.getpid()}_{uuid.uuid4().hex[:8]}" if local_rank == 0 else None]
        dist.broadcast_object_list(prefix, src=dist.get_global_rank(group, 0), group=group)
        self._prefix: str = prefix[0]

    def reduce_scatter(self, key: tuple, shard: torch.Tensor, source: torch.Tensor) -> None:
        if (segment := self._segment(key, shard)) is None:
            self._fallback.reduce_scatter(key, shard, source)
            return
        table, _ = segment
        table[self.local_rank].copy_(source)
        dist.barrier(group=self.group)  # every row written
        torch.sum(table[:, self._block(shard)], dim=0, out=shard)

    def all_gather(self, key: tuple, target: torch.Tensor, shard: torch.Tensor) -> None:
        if (segment := self._segment(key, shard)) is None:
            self._fallback.all_gather(key, target, shard)
            return
        _, gathered = segment
        gathered[self._block(shard)].copy_(shard)
        dist.barrier(group=self.group)  # every block written (and every rank's table read: it reduced first)
        target.copy_(gathered)

    def _block(self, shard: torch.Tensor) -> slice:
        """This rank's block of a flat buffer of ``L`` shards like ``shard``."""
        return slice(self.local_rank * shard.numel(), (self.local_rank + 1) * shard.numel())

    def close(self) -> None:
        self._segments.clear()  # the mappings go with the tensors; the files were unlinked at set-up

    # ---- segments -----------------------------------------------------------------------------------
    def _segment(self, key: tuple, shard: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor] | None:
        """The ``L x n`` table and the ``n`` vector of ``key`` (``n = L x shard``), mapped once; ``None``:
        not a CPU tensor, or ``/dev/shm`` could not hold them, so this buffer uses the process group."""
        if shard.device.type != "cpu":
            return None
        full_key = (*key, shard.numel(), shard.dtype)
        if full_key not in self._segments:
            self._segments[full_key] = self._map(shard.numel() * self.local_world_size, shard.dtype)
        return self._segments[full_key]

    def _map(self, length: int, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor] | None:
        numel = length * (self.local_world_size + 1)
        nbytes = numel * torch.empty((), dtype=dtype).element_size()
        path = os.path.join(SHM_DIR, f"lightning_decent_{self._prefix}_{next(self._names)}")
        try:
            message = [self._create(path, nbytes) if self.local_rank == 0 else None]
            dist.broadcast_object_list(message, src=dist.get_global_rank(self.group, 0), group=self.group)
            error = message[0]
            if error:
                if self.local_rank == 0:
                    warnings.warn(
                        f"Hierarchical gossip: {SHM_DIR} cannot hold a {nbytes / 2**20:.0f} MiB segment ({error}); "
                        "this buffer is averaged inside the machine through the process group (slower on CPU). Give "
                        f"{SHM_DIR} more space (e.g. docker --shm-size) to average through shared memory.",
                        stacklevel=4,
                    )
                return None
            flat = torch.from_file(path, shared=True, size=numel, dtype=dtype)
            dist.barrier(group=self.group)  # everyone has mapped it
        finally:  # after the barrier, or when a step failed: every rank removes the name (the mappings stay)
            _unlink(path)
        table = flat[: length * self.local_world_size].view(self.local_world_size, length)
        return table, flat[length * self.local_world_size :]

    @staticmethod
    def _create(path: str, nbytes: int) -> str:
        """Create the segment file ``path`` of ``nbytes`` with its space reserved: ``""``, or why it failed."""
        try:
            fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_RDWR, 0o600)
        except OSError as error:
            return str(error)
        try:
            os.posix_fallocate(fd, 0, nbytes)
        except OSError as error:
            _unlink(path)
            return str(error)
        finally:
            os.close(fd)
        return ""


def _unlink(path: str) -> None:
    """Remove ``path`` if it is there (another rank of the machine may have removed it first)."""
    with contextlib.suppress(FileNotFoundError):
        os.unlink(path)
