"""Hierarchical gossip: exact averaging inside a machine, sharded gossip between machines.

Realises one round of :class:`~lightning_decent.topology.HierarchicalTopology`,
``W(k) = W_M(k) (x) 11^T/L``, on ``M`` machines of ``L`` ranks (machine ``m`` holds ranks
``mL .. mL + L - 1``), as hierarchical all-reduce does for the exact average:

1. intra-machine reduce-scatter: local rank ``l`` gets shard ``l`` (``1/L`` of the buffer) of its
   machine's average, ``s_(m,l) = (1/L) sum_l' x_(m,l')[shard l]``;
2. inter-machine gossip of the shards between corresponding local ranks, over ``W_M``:
   ``s_(m,l) <- sum_m' W_M(k)[m, m'] s_(m',l)`` (point-to-point, the link schedule of
   :class:`~lightning_decent.comm.P2PCommunicator` on ``W_M (x) I_L``);
3. intra-machine all-gather of the mixed shards: every rank ends with
   ``x_(m,l) <- sum_m' W_M(k)[m, m'] (1/L) sum_l' x_(m',l')``.

Per round, a machine's link carries ``L`` shards of ``1/L`` of the model to each peer machine, i.e.
one model (``M/B`` on a link of bandwidth ``B``) instead of ``L`` models for flat gossip between
the same machines. The reduce-scatter and all-gather stay inside the machine (NVLink, shared
memory, loopback). :meth:`HierarchicalCommunicator.start_mix` runs step 1 at once, leaves step 2
(the slow link) in flight while the caller computes, and runs step 3 in ``finish``.
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from datetime import timedelta
from typing import TypeVar

import scipy.sparse as sp
import torch
import torch.distributed as dist

from lightning_decent.comm.base import CommStats, Communicator, PendingMix, nbytes
from lightning_decent.comm.collectives import BoundedCollectives
from lightning_decent.comm.machine_collectives import MachineCollectives, ProcessGroupMachine, SharedMemoryMachine
from lightning_decent.comm.p2p import P2PCommunicator, PeerTimeoutError
from lightning_decent.topology import HierarchicalTopology, Topology

T = TypeVar("T")
INTRA_MACHINE = ("shared_memory", "process_group")


def machine_gossip_topology(topology: HierarchicalTopology) -> Topology:
    """``W_M(k) (x) I_L``: rank ``(m, l)`` mixes its shard with the ranks ``(m', l)`` of the other machines."""
    local = sp.eye_array(topology.local_world_size, format="csr")
    phases = [sp.kron(topology.machines.sparse(k), local, format="csr") for k in range(topology.period)]
    return Topology(phases, name=f"{topology.machines.name}_between_machines")


class HierarchicalCommunicator(Communicator):
    """Mixes with ``W(k) = W_M(k) (x) 11^T/L`` through an intra-machine process group and sharded
    point-to-point gossip between machines (see the module docstring).

    Statistics count every payload byte this rank sends and receives (inside and across machines);
    :attr:`between_machines` counts only the shards on the inter-machine link.

    Args:
        topology: the two-level topology (its machine topology and ``local_world_size``).
        rank: this process's global rank (machine ``rank // L``, local rank ``rank % L``).
        timeout, check_finite: as for :class:`~lightning_decent.comm.P2PCommunicator` (the finite check
            runs on the machine-averaged shard before it leaves the machine); ``timeout`` also bounds every
            operation of the machine's process group (its reduce-scatter, all-gather and barriers).
        intra_machine: how steps 1 and 3 run (:mod:`~lightning_decent.comm.machine_collectives`):
            ``"shared_memory"`` (the default: CPU tensors through ``/dev/shm``, others through the process
            group) or ``"process_group"`` (the machine's NCCL or gloo group).
        collectives: the strategy's bounded world collectives: global averages run on them, and a failed
            wait inside the machine or between machines holds their roll call, so the error names the rank
            that stopped or died rather than a healthy one that waited for it.
    """

    def __init__(
        self,
        topology: HierarchicalTopology,
        rank: int,
        timeout: timedelta = timedelta(seconds=60),
        check_finite: bool = True,
        intra_machine: str = "shared_memory",
        collectives: BoundedCollectives | None = None,
    ) -> None:
        if intra_machine not in INTRA_MACHINE:
            raise ValueError(f"intra_machine must be one of {', '.join(INTRA_MACHINE)}; got {intra_machine!r}.")
        super().__init__(topology)
        self.local_world_size = local = topology.local_world_size
        self.rank = rank
        self.check_finite = check_finite
        self.timeout = timeout
        self.collectives = collectives
        if not topology.layout_checked:
            _check_layout(rank, local, dist.get_world_size())
        machines = [list(range(m * local, (m + 1) * local)) for m in range(topology.num_machines)]
        self.machine_ranks = machines[rank // local]
        self.machine_group, _ = dist.new_subgroups_by_enumeration(machines, timeout=timeout)
        self._machine: MachineCollectives = (
            ProcessGroupMachine(self.machine_group)
            if intra_machine == "process_group"
            else SharedMemoryMachine(self.machine_group, rank % local, local)
        )
        between = machine_gossip_topology(topology)
        self._gossip = P2PCommunicator(
            between, rank, timeout=timeout, check_finite=check_finite, collectives=collectives
        )

    @property  # type: ignore[override]
    def reported_step(self) -> int | None:
        """The point-to-point communicator's (:attr:`Communicator.reported_step`): its errors name the step."""
        return self._gossip.reported_step

    @reported_step.setter
    def reported_step(self, step: int | None) -> None:
        self._gossip.reported_step = step

    @property
    def between_machines(self) -> CommStats:
        """Messages and bytes of the shards this rank sent and received across machines."""
        return self._gossip.stats

    # ---- the three steps ---------------------------------------------------------------------------
    def _shard_length(self, buffer: torch.Tensor) -> int:
        return math.ceil(buffer.numel() / self.local_world_size)

    def _flat_scratch(self, key: tuple, length: int, like: torch.Tensor) -> torch.Tensor:
        """A flat tensor of ``length`` elements of ``like``'s dtype and device, allocated once per key."""
        full_key = (*key, length, like.dtype, like.device)
        if full_key not in self._scratch_buffers:
            self._scratch_buffers[full_key] = like.new_empty(length)
        return self._scratch_buffers[full_key]

    def _reduce_scatter(self, key: tuple, buffer: torch.Tensor) -> torch.Tensor:
        """Step 1: this rank's shard of its machine's average (a scratch tensor reused per ``key``)."""
        flat = buffer.view(-1)
        shard = self._flat_scratch(("shard", *key), self._shard_length(buffer), flat)
        if self.local_world_size == 1:
            shard.copy_(flat)
            return shard
        padded_length = shard.numel() * self.local_world_size
        source = flat
        if padded_length != flat.numel():  # L equal shards: pad with zeros
            source = self._flat_scratch(("padded", *key), padded_length, flat)
            source[: flat.numel()].copy_(flat)
            source[flat.numel() :].zero_()
        with self._inside_machine("reduce-scatter"):
            self._machine.reduce_scatter(key, shard, source)
        shard.div_(self.local_world_size)
        self._count_intra(shard)
        return shard

    def _all_gather(self, key: tuple, shard: torch.Tensor, buffer: torch.Tensor, in_place: bool) -> torch.Tensor:
        """Step 3: the mixed buffer gathered from the machine's shards, flat: written into ``buffer`` when
        ``in_place`` (and no padding is needed), else into a scratch tensor."""
        flat = buffer.view(-1)
        if self.local_world_size == 1:
            return shard
        padded_length = shard.numel() * self.local_world_size
        target = flat
        if not in_place or padded_length != flat.numel():
            target = self._flat_scratch(("gathered", *key), padded_length, flat)
        with self._inside_machine("all-gather"):
            self._machine.all_gather(key, target, shard)
        self._count_intra(shard)
        return target[: flat.numel()]

    def _all_gather_into(self, key: tuple, shard: torch.Tensor, buffer: torch.Tensor) -> None:
        """Step 3 with the result in ``buffer`` (gathered in place where no padding is needed)."""
        gathered = self._all_gather(key, shard, buffer, in_place=True)
        if gathered.data_ptr() != buffer.data_ptr():
            buffer.view(-1).copy_(gathered)

    @contextmanager
    def _inside_machine(self, what: str) -> Iterator[None]:
        """Turn a failed operation of the machine's group into a :class:`PeerTimeoutError` naming the machine's
        ranks, the bound, and (with the strategy's collectives) who a roll call of every rank found missing."""
        try:
            yield
        except RuntimeError as err:
            if isinstance(err, PeerTimeoutError):
                raise
            name = f"machine {what} (ranks {self.machine_ranks})"
            message = (
                f"rank {self.rank}: the {name} failed: a rank of this machine died, hangs or its connection broke "
                f"(gossip_timeout={self.timeout.total_seconds():g}s)."
            )
            if self.collectives is not None and self.collectives.explain_losses:
                found = self.collectives.explain(name, self.timeout, failure=message)
                message += f" Roll call of every rank: {found or 'every rank answered'}."
            raise PeerTimeoutError(f"{message} Underlying error: {err}") from err

    def _count_intra(self, shard: torch.Tensor) -> None:
        peers = self.local_world_size - 1
        self.stats.messages_sent += peers
        self.stats.messages_received += peers
        self.stats.bytes_sent += peers * nbytes(shard)
        self.stats.bytes_received += peers * nbytes(shard)

    def _counted(self, gossip_round: Callable[[], T]) -> T:
        """Run an inter-machine round and add what the point-to-point communicator counted to :attr:`stats`."""
        before = self._gossip.stats.as_dict()
        result = gossip_round()
        for field, value in self._gossip.stats.as_dict().items():
            setattr(self.stats, field, getattr(self.stats, field) + value - before[field])
        return result

    # ---- rounds ---------------------------------------------------------------------------------------
    @torch.no_grad()
    def mix(self, buffers: Sequence[torch.Tensor], step: int) -> None:
        keys = [("blocking", index) for index in range(len(buffers))]
        shards = [self._reduce_scatter(key, buf) for key, buf in zip(keys, buffers)]
        self._counted(lambda: self._gossip.mix(shards, step))
        for key, shard, buf in zip(keys, shards, buffers):
            self._all_gather_into(key, shard, buf)

    @torch.no_grad()
    def start_mix(self, buffers: Sequence[torch.Tensor], step: int) -> PendingMix:
        keys = [("pending", buf.data_ptr()) for buf in buffers]
        shards = [self._reduce_scatter(key, buf) for key, buf in zip(keys, buffers)]
        pending = self._counted(lambda: self._gossip.start_mix(shards, step))
        return _HierarchicalPendingMix(self, buffers, step, keys, shards, pending)

    @torch.no_grad()
    def global_average(self, buffers: Sequence[torch.Tensor]) -> None:
        self._gossip.global_average(buffers)

    @torch.no_grad()
    def machine_average(self, buffers: Sequence[torch.Tensor]) -> None:
        """Every buffer becomes its exact average over this machine's ranks: steps 1 and 3 alone, no
        traffic between machines (collective over the machine: all its ranks call it). Blocking, so it
        shares :meth:`mix`'s scratch buffers."""
        for index, buf in enumerate(buffers):
            key = ("blocking", index)
            self._all_gather_into(key, self._reduce_scatter(key, buf), buf)

    def close(self) -> None:
        """Release the inter-machine channels and this machine's process group."""
        self._gossip.close()
        self._machine.close()
        if self.local_world_size > 1 and self.machine_group is not None:
            dist.destroy_process_group(self.machine_group)
            self.machine_group = None
        super().close()


class _HierarchicalPendingMix(PendingMix):
    """Steps 1 done, step 2 in flight (the shards' point-to-point round); ``finish`` runs step 3."""

    def __init__(
        self,
        comm: HierarchicalCommunicator,
        buffers: Sequence[torch.Tensor],
        step: int,
        keys: list[tuple],
        shards: list[torch.Tensor],
        gossip: PendingMix,
    ) -> None:
        super().__init__(buffers, step)
        self.comm = comm
        self.keys = keys
        self.shards = shards
        self.gossip = gossip

    def wait(self) -> None:
        self.gossip.wait()

    @torch.no_grad()
    def finish(self, index: int, into: torch.Tensor | None = None, refill: bool = False) -> None:
        self.gossip.finish(index)
        buffer = self.buffers[index]
        if into is None:
            self.comm._all_gather_into(self.keys[index], self.shards[index], buffer)
            return
        mixed = self.comm._all_gather(self.keys[index], self.shards[index], buffer, in_place=False)
        into.view(-1).add_(mixed).sub_(buffer.view(-1))
        if refill:
            buffer.copy_(into)


def _check_layout(rank: int, local_world_size: int, world_size: int) -> None:
    """Ranks ``mL .. mL + L - 1`` must share a machine: the layout of torchrun and Lightning
    (``rank = node_rank x LOCAL_WORLD_SIZE + LOCAL_RANK``) when ``L`` divides ``LOCAL_WORLD_SIZE``."""
    if world_size % local_world_size:
        raise ValueError(
            f"hierarchical gossip needs world_size = machines x local_world_size; got world_size={world_size}, "
            f"local_world_size={local_world_size}. Set local_world_size to the number of ranks per machine."
        )
    local_rank, per_machine = os.environ.get("LOCAL_RANK"), os.environ.get("LOCAL_WORLD_SIZE")
    spans_machines = per_machine is not None and int(per_machine) % local_world_size != 0
    if spans_machines or (local_rank is not None and int(local_rank) % local_world_size != rank % local_world_size):
        raise ValueError(
            f"rank {rank}: hierarchical gossip groups ranks mL .. mL + L - 1 with L = local_world_size = "
            f"{local_world_size}, but this machine runs LOCAL_WORLD_SIZE={per_machine} processes (LOCAL_RANK="
            f"{local_rank}), so a group would span two machines. Set local_world_size to the number of processes "
            f"per machine (torchrun's --nproc-per-node) or a divisor of it."
        )
