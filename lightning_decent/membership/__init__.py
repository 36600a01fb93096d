"""Elastic membership: who is in the run, membership epochs, the process group of each epoch, state hand-over.

With ``DecentralizedStrategy(elastic=True)`` (or :class:`ElasticOptions`) a lost rank costs the survivors a
membership change instead of the run:

1. a rank notices the loss locally (a neighbour's timeout or closed connection; no heartbeat service on the
   training path) and tears down its process group, which closes its connections so that every rank waiting
   on it notices at once too;
2. the survivors form the next *membership epoch* through torch's dynamic rendezvous (:mod:`.rendezvous`), whose
   state lives in a store that outlives every training process (:mod:`.store`);
3. each builds the epoch's process group on the epoch's own store prefix (:class:`EpochGroup`), and the strategy
   rebuilds the topology for the new ``n``, its communicator and the algorithm's invariants
   (``Algorithm.change_membership``).

A new process started with the run's command and ``elastic.join=true`` waits in the rendezvous; the members take
it in at the start of their next epoch, and one of its neighbours hands it over its live checkpoint
(:mod:`.handover`) before its first step.
"""

from __future__ import annotations

import gc
import logging
import os
import time
from dataclasses import dataclass, fields
from datetime import timedelta
from typing import Any

import torch.distributed as dist

from lightning_decent.comm.collectives import BoundedCollectives, CollectiveTimeoutError
from lightning_decent.comm.p2p import PeerTimeoutError
from lightning_decent.membership.rendezvous import (
    Epoch,
    Membership,
    MembershipError,
    joiner_key,
    launch_key,
)
from lightning_decent.membership.store import (
    MembershipStoreError,
    connect,
    default_address,
    parse_address,
    start_detached,
)

log = logging.getLogger(__name__)

#: Environment variable that makes a process a joiner (the join command sets it; same as ``elastic.join=true``).
JOIN_ENV = "LIGHTNING_DECENT_JOIN"


@dataclass(frozen=True)
class ElasticOptions:
    """How an elastic run changes its membership (``DecentralizedStrategy(elastic=ElasticOptions(...))``).

    Args:
        min_ranks: the run stops with :class:`MembershipError` when fewer ranks than this are left.
        max_ranks: the most ranks at a time (default: the launched world size); a round with this many
            members completes at once, without waiting ``last_call``.
        store: ``"host:port"`` of a membership store started with ``python -m lightning_decent.membership
            serve``; ``None`` starts one beside the rank launched as rank 0 (``MASTER_ADDR:MASTER_PORT+1``), in
            its own process so that it survives that rank.
        run_id: names the run in the store (two runs sharing a store need different ids).
        heartbeat: seconds between a member's keep-alives; a member silent for 5 of them is dropped.
        last_call: seconds a new epoch waits for more members once ``min_ranks`` have joined.
        join_timeout: seconds a change (or a joiner) waits for the next epoch before failing.
        start_timeout: seconds the first epoch waits for every launched rank; after it the run starts with those
            present (at least ``min_ranks``), and a launched rank that comes later is refused with the join command
            to use (a machine lost while the job started is restarted as a joiner).
        accept_joiners: take processes waiting to join in at the start of every epoch (one read of the store
            and one small all-gather per epoch).
        join: this process joins a running job (also set by the environment variable ``LIGHTNING_DECENT_JOIN=1``).
    """

    min_ranks: int = 1
    max_ranks: int | None = None
    store: str | None = None
    run_id: str = "lightning-decent"
    heartbeat: float = 1.0
    last_call: float = 2.0
    join_timeout: float = 120.0
    start_timeout: float = 60.0
    accept_joiners: bool = True
    join: bool = False

    def __post_init__(self) -> None:
        if self.min_ranks < 1:
            raise ValueError(f"elastic.min_ranks must be >= 1, got {self.min_ranks}.")
        if self.max_ranks is not None and self.max_ranks < self.min_ranks:
            raise ValueError(f"elastic.max_ranks={self.max_ranks} is below elastic.min_ranks={self.min_ranks}.")
        for name in ("heartbeat", "last_call", "join_timeout", "start_timeout"):
            if not 0 < getattr(self, name) < float("inf"):
                raise ValueError(f"elastic.{name} must be a positive, finite number of seconds.")
        if self.store is not None:
            parse_address(self.store)

    @property
    def joining(self) -> bool:
        return self.join or os.environ.get(JOIN_ENV, "0") not in ("", "0", "false", "False")


def elastic_options(value: bool | dict[str, Any] | ElasticOptions | None) -> ElasticOptions | None:
    """``DecentralizedStrategy(elastic=...)``: ``False``/``None`` (off), ``True`` (defaults), a dict of
    :class:`ElasticOptions` fields (Hydra: ``strategy.elastic={min_ranks: 4}``) or the options themselves."""
    if value is None or value is False:
        return None
    if value is True:
        return ElasticOptions()
    if isinstance(value, ElasticOptions):
        return value
    if isinstance(value, dict):
        if not value.get("enabled", True):
            return None
        unknown = sorted(set(value) - {f.name for f in fields(ElasticOptions)} - {"enabled"})
        if unknown:
            names = ", ".join(f.name for f in fields(ElasticOptions))
            raise ValueError(f"elastic does not take option(s) {unknown}; its options are: enabled, {names}.")
        return ElasticOptions(**{k: v for k, v in value.items() if k != "enabled"})
    raise TypeError(f"elastic={value!r}: pass True, False, a dict of options or an ElasticOptions.")


def is_membership_loss(error: BaseException) -> bool:
    """Whether ``error`` means a member is gone (a neighbour or a collective lost a rank, or its connection)."""
    if isinstance(error, PeerTimeoutError | CollectiveTimeoutError | dist.DistBackendError):
        return True
    text = str(error).lower()
    return isinstance(error, RuntimeError) and any(
        sign in text for sign in ("connection closed", "connection reset", "timed out", "broken pipe")
    )


class EpochGroup:
    """The default process group of the current membership epoch, rebuilt at every change.

    Args:
        options: the elastic options.
        launch_rank: this process's rank as launched (``None`` for a joiner).
        launch_world_size: the world size the run was launched with.
        backend: the process-group backend (``"gloo"``, ``"nccl"``).
        timeout: the process group's timeout.
    """

    def __init__(
        self,
        options: ElasticOptions,
        launch_rank: int | None,
        launch_world_size: int,
        backend: str,
        timeout: timedelta,
    ) -> None:
        self.options, self.backend, self.timeout = options, backend, timeout
        host, port = parse_address(options.store) if options.store else default_address()
        if options.store is None and launch_rank == 0:
            start_detached(host, port, options.run_id, idle_seconds=max(120.0, 2 * options.join_timeout))
        store = connect(host, port, timedelta(seconds=options.join_timeout))
        # The process groups rendezvous on a connection of their own: a store client serves one call at a time,
        # and the heartbeats must not wait behind a group's creation.
        self._groups_store = connect(host, port, timedelta(seconds=options.join_timeout))
        key = launch_key(launch_rank) if launch_rank is not None else joiner_key()
        self.membership = Membership(
            store,
            options.run_id,
            key,
            min_ranks=options.min_ranks,
            max_ranks=options.max_ranks or launch_world_size,
            heartbeat=timedelta(seconds=options.heartbeat),
            last_call=timedelta(seconds=options.last_call),
            join_timeout=timedelta(seconds=options.join_timeout),
            joining=launch_rank is None,
        )
        self.previous_members: tuple[str, ...] = ()
        self.epoch: Epoch | None = None
        if launch_rank is not None:
            start = timedelta(seconds=options.start_timeout)
            self.membership.await_launched(store, launch_rank, launch_world_size, start)

    @property
    def key(self) -> str:
        return self.membership.key

    def next_epoch(self) -> Epoch:
        """Leave the current epoch's process group (closing its connections), join the next epoch, build its group.

        A member that fails to come up in the new group (it died while the epoch formed) starts another change."""
        deadline = time.monotonic() + self.options.join_timeout
        while True:
            if dist.is_initialized():
                dist.destroy_process_group()
                gc.collect()  # the last references to the old groups: their connections close now, so that every
                # member still waiting on this one fails at once instead of after its gossip_timeout
            if self.epoch is not None:
                self.previous_members = self.epoch.members
            elif self.options.joining:
                self.membership.request_admission()
            self.epoch = self.membership.next_epoch()
            if len(self.epoch.joined) == self.epoch.world_size and self.epoch.world_size > 0 and self.options.joining:
                raise MembershipError(
                    f"member {self.key} found no running job to join in the store's run {self.options.run_id!r}: "
                    f"the epoch it formed has joiners only ({', '.join(self.epoch.members)}). Start it while the "
                    f"job runs, with the job's store address and run id."
                )
            try:
                prefix = f"lightning_decent/{self.options.run_id}/epoch_{self.epoch.number}/process_group"
                dist.init_process_group(
                    self.backend,
                    store=dist.PrefixStore(prefix, self._groups_store),
                    rank=self.epoch.rank,
                    world_size=self.epoch.world_size,
                    timeout=min(self.timeout, timedelta(seconds=self.options.join_timeout)),
                )
                return self.epoch
            except (RuntimeError, dist.DistError) as err:
                if time.monotonic() > deadline:
                    raise MembershipError(f"member {self.key}: no process group for a new epoch: {err}") from err

    @property
    def joined(self) -> list[int]:
        """The ranks of this epoch that join the running job with it."""
        assert self.epoch is not None
        return list(self.epoch.joined)

    @property
    def lost(self) -> list[str]:
        """The keys of the previous epoch's members that are not in this one."""
        assert self.epoch is not None
        return [key for key in self.previous_members if key not in self.epoch.members]

    def admit_joiners(self, collectives: BoundedCollectives) -> bool:
        """At a change point for joins (an epoch start): admit the processes that asked to join, as every member
        sees them (each reads the store's counters; one small all-gather makes them agree). Returns whether a
        change follows."""
        if not self.options.accept_joiners:
            return False
        try:
            seen = self.membership.tickets()
        except (RuntimeError, dist.DistError) as err:  # the store is gone: train on, fail at the next change
            log.warning(f"member {self.key}: cannot read the membership store, no joiner is admitted ({err})")
            seen = (0, 0)
        if collectives.world_size > 1:
            seen = max(collectives.all_gather_object(seen, "check for processes waiting to join"))
        requested, admitted = seen
        if requested <= admitted:
            return False
        if collectives.rank == 0:
            self.membership.admit(admitted, requested)
        return True

    def describe(self) -> str:
        assert self.epoch is not None
        epoch = self.epoch
        text = f"membership epoch {epoch.number}: rank {epoch.rank} of {epoch.world_size} (member {self.key})"
        if self.lost:
            text += f"; lost {', '.join(self.lost)}"
        if self.previous_members and self.joined:
            text += f"; joined {', '.join(epoch.members[r] for r in self.joined)}"
        return text


__all__ = [
    "JOIN_ENV",
    "ElasticOptions",
    "Epoch",
    "EpochGroup",
    "MembershipError",
    "MembershipStoreError",
    "elastic_options",
    "is_membership_loss",
]
