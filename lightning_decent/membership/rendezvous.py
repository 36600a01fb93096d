"""Membership epochs on torch's dynamic rendezvous (``torch.distributed.elastic``).

Every training process is one participant of a :class:`~torch.distributed.elastic.rendezvous.dynamic_rendezvous.
DynamicRendezvousHandler` whose state lives in the membership store. A *round* of the rendezvous is a
*membership epoch*: its participants are the members, and the round's own store prefixes the process group
built for it. A round changes when

* a member calls :meth:`Membership.next_epoch` after losing a neighbour: it leaves the completed round; the
  lost member's heartbeats stop, so the rendezvous drops it after ``heartbeat x 2`` seconds; once every old
  participant has left, the survivors form the next round (complete after ``last_call`` seconds, or at once
  when ``max_ranks`` joined); fewer than ``min_ranks`` never complete it and the wait ends in
  :class:`MembershipError`;
* a new process asks to be admitted (:meth:`Membership.request_admission`, a ticket in the store); the members
  admit the waiting tickets at their next epoch start and, with the admitted joiners, form the next round. The
  admission keeps joiners out of the rendezvous until then, so that a loss never takes one in mid-step.

Ranks inside an epoch are not the rendezvous's (it sorts by host and process id) but the order of the members'
keys: the ranks launched at the start keep their order, joiners come after them, so the lowest surviving rank
becomes rank 0 when rank 0 is lost.
"""

from __future__ import annotations

import logging
import os
import pickle
import socket
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

import torch.distributed as dist
from torch.distributed.elastic.rendezvous import RendezvousError
from torch.distributed.elastic.rendezvous.c10d_rendezvous_backend import C10dRendezvousBackend
from torch.distributed.elastic.rendezvous.dynamic_rendezvous import DynamicRendezvousHandler, RendezvousTimeout

#: A member whose heartbeats stop for this many intervals is dropped (a busy process on a shared core can miss a
#: few; a lost one then costs about ``HEARTBEATS x heartbeat + last_call`` seconds).
log = logging.getLogger(__name__)

#: Set in the store once the first epoch's launched ranks are known: later launched ranks must join instead.
STARTED = "launched/started"
HEARTBEATS = 5


class MembershipError(RuntimeError):
    """The members could not form a new epoch (fewer than ``min_ranks`` left, or the store is gone)."""


@dataclass(frozen=True)
class Epoch:
    """One membership epoch: its number, this process's rank and the members' keys in rank order."""

    number: int
    rank: int
    members: tuple[str, ...]
    joined: tuple[int, ...]  # the ranks whose first epoch this is (processes that join a running job)
    store: dist.Store

    @property
    def world_size(self) -> int:
        return len(self.members)


def launch_key(launch_rank: int) -> str:
    """The key of a process launched with the run (sorted by its launch rank)."""
    return f"a{launch_rank:08d}"


def joiner_key() -> str:
    """The key of a process that joins a running job (sorted after the launched ones, by arrival)."""
    return f"j{datetime.now().strftime('%Y%m%d%H%M%S%f')}-{socket.gethostname()}"


class Membership:
    """This process's view of the run's member set.

    Args:
        store: the membership store (:mod:`.store`).
        run_id: names the rendezvous (one per run).
        key: this process's member key (:func:`launch_key` or :func:`joiner_key`).
        min_ranks: the fewest members an epoch may have.
        max_ranks: the most members an epoch may have (a round with this many completes at once).
        heartbeat: the keep-alive interval; a member silent for :data:`HEARTBEATS` of them is dropped.
        last_call: how long a round waits for more members once ``min_ranks`` have joined.
        join_timeout: how long :meth:`next_epoch` waits for a round to complete.
        joining: this process joins a running job (its first epoch marks it as joined).
    """

    def __init__(
        self,
        store: dist.Store,
        run_id: str,
        key: str,
        *,
        min_ranks: int,
        max_ranks: int,
        heartbeat: timedelta,
        last_call: timedelta,
        join_timeout: timedelta,
        joining: bool = False,
    ) -> None:
        self.key, self.min_ranks, self.join_timeout, self.joining = key, min_ranks, join_timeout, joining
        # Every round's store is a prefix of the membership store, never a server inside a training process
        # (which torch's agents share with their workers, and which would end with that process).
        os.environ["TORCH_DISABLE_SHARE_RDZV_TCP_STORE"] = "1"
        self._store = store
        self._backend = C10dRendezvousBackend(store, run_id)
        self._handler = DynamicRendezvousHandler.from_backend(
            run_id=run_id,
            store=store,
            backend=self._backend,
            min_nodes=min_ranks,
            max_nodes=max_ranks,
            timeout=RendezvousTimeout(join=join_timeout, last_call=last_call, heartbeat=heartbeat * HEARTBEATS),
            keep_alive_interval=max(1, round(heartbeat.total_seconds())),
            keep_alive_max_attempt=HEARTBEATS,
        )
        self.epoch: Epoch | None = None

    def await_launched(self, store: dist.Store, launch_rank: int, world_size: int, start_timeout: timedelta) -> None:
        """Before the first epoch: wait until every launched rank reached the store, so that the first epoch
        has all of them (each arrives when its imports are done, seconds apart on a loaded machine). After
        ``start_timeout`` the run starts with the ranks present, if at least ``min_ranks`` (a machine lost while
        the job started); a launched rank that comes after that is refused: it must join as a new member."""
        if store.check([STARTED]):
            raise MembershipError(
                f"member {self.key}: the run started without launched rank {launch_rank} (it came later than "
                f"elastic.start_timeout, or it restarts a lost rank): start it with the join command "
                f"(strategy.elastic.join=true or LIGHTNING_DECENT_JOIN=1)."
            )
        store.set(f"launched/{launch_rank}", "1")
        try:
            store.wait([f"launched/{r}" for r in range(world_size)], start_timeout)
        except (RuntimeError, dist.DistStoreError) as err:
            missing = [r for r in range(world_size) if not store.check([f"launched/{r}"])]
            if world_size - len(missing) < self.min_ranks:
                raise MembershipError(
                    f"member {self.key}: launched ranks {missing} did not start within "
                    f"{start_timeout.total_seconds():g}s (elastic.start_timeout), and fewer than "
                    f"min_ranks={self.min_ranks} did."
                ) from err
            log.warning(
                f"member {self.key}: launched ranks {missing} did not start within "
                f"{start_timeout.total_seconds():g}s (elastic.start_timeout); the run starts without them (restart "
                f"them with the join command)"
            )
        store.set(STARTED, "1")

    def next_epoch(self) -> Epoch:
        """Leave the current epoch (if any) and join the next one; raises :class:`MembershipError` after
        ``join_timeout`` (fewer than ``min_ranks`` members are left, or the store is gone)."""
        try:
            info = self._handler.next_rendezvous()
        except RendezvousError as err:
            raise MembershipError(
                f"member {self.key}: no new membership epoch within {self.join_timeout.total_seconds():g}s: fewer than "
                f"min_ranks={self.min_ranks} members are left, or the membership store is gone ({err!r}). Resume "
                f"from the last checkpoint (resume_from_average=True when the world size changed)."
            ) from err
        first = self.epoch is None and self.joining
        members, joined = self._members(info.store, info.rank, info.world_size, first)
        self.epoch = Epoch(_state(self._backend).round, members.index(self.key), members, joined, info.store)
        return self.epoch

    def request_admission(self) -> None:
        """A joiner: take a ticket and wait until the members admit it (at their next epoch start), so that it
        enters the rendezvous only for a planned change, never in the middle of a step after a loss."""
        ticket = self._store.add("join/requests", 1)
        try:
            self._store.wait([f"join/admit/{ticket}"], self.join_timeout)
        except (RuntimeError, dist.DistStoreError) as err:
            raise MembershipError(
                f"member {self.key} was not admitted within {self.join_timeout.total_seconds():g}s: no member of the "
                f"run reached the start of an epoch (is the job running, with elastic.accept_joiners=true?)."
            ) from err

    def tickets(self) -> tuple[int, int]:
        """(tickets taken by joiners, tickets admitted): one read of each counter."""
        return self._store.add("join/requests", 0), self._store.add("join/admitted", 0)

    def admit(self, admitted: int, upto: int) -> None:
        """Admit the joiners holding tickets ``admitted + 1 .. upto`` (one member does it)."""
        for ticket in range(admitted + 1, upto + 1):
            self._store.set(f"join/admit/{ticket}", "1")
        self._store.add("join/admitted", upto - admitted)

    def _members(
        self, round_store: dist.Store, rank: int, world_size: int, first: bool
    ) -> tuple[tuple[str, ...], tuple[int, ...]]:
        """Every member's key (in rank order) and the ranks that join with this epoch, read from the round's store."""
        round_store.set(f"member/{rank}", f"{self.key} {int(first)}")
        entries = sorted(round_store.get(f"member/{r}").decode().split() for r in range(world_size))
        return tuple(key for key, _ in entries), tuple(r for r, (_, new) in enumerate(entries) if new == "1")


def _state(backend: C10dRendezvousBackend) -> Any:
    """The rendezvous state as the backend stores it (round, participants, heartbeats), or ``None``."""
    found = backend.get_state()
    return None if found is None else pickle.loads(found[0])


def last_heartbeat(store: dist.Store, run_id: str) -> float | None:
    """The time (seconds since the epoch) of the newest heartbeat of ``run_id``'s rendezvous, or ``None``."""
    state = _state(C10dRendezvousBackend(store, run_id))
    beats = state.last_heartbeats.values() if state is not None else ()
    return max(beat.timestamp() for beat in beats) if beats else None
