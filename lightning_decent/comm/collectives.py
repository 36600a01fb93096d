"""World-wide collectives that end within a time limit and name the ranks they waited for.

The strategy's own collectives (evaluation and final averages, consensus measurement, checkpoint
saves, set-up checks, the all-reduce communicator, global averaging) and the ones Lightning runs
through the strategy (``barrier``, ``broadcast``, ``reduce`` for ``sync_dist`` and ``ModelCheckpoint``,
``all_gather``) go through :class:`BoundedCollectives`:

* **Roll call.** Before a collective, every rank sends its rank, the number of collectives it ran and
  the collective's name to every other rank on a small gloo group, and waits up to ``timeout`` for
  theirs (``2 (n - 1)`` messages of 64 bytes). A rank that does not answer is stopped, hung or waiting
  in another part of the program; one whose connection is closed has died; one that answers with
  another collective is elsewhere (e.g. ranks that ran different numbers of batches). Nothing then
  waits on them: the collective is not started and :class:`CollectiveTimeoutError` names them, e.g.
  ``rank 1: rank 2 did not reach the evaluation average within timeout=5s (stopped, hung, or waiting
  elsewhere)``. A barrier is a roll call alone.
* **Bounded operation.** The collective itself runs on a process group of all ranks created with the
  same ``timeout`` (gloo enforces it per operation; the world group keeps Lightning's long ``timeout``,
  which also bounds the start-up rendezvous), for a rank that fails between the roll call and the
  collective. Collectives that may run every step (the all-reduce communicator, global averaging)
  skip the roll call and hold one only after such a failure, to name who is missing (best effort: gloo
  may already have closed some healthy connections by then).

So a collective ends on every live rank within ``timeout`` when a rank is missing when it starts, and
within ``2 x timeout`` otherwise. On NCCL the group's timeout is enforced by NCCL's watchdog, which
aborts the process instead of raising; the roll call still names missing ranks first.
"""

from __future__ import annotations

import logging
import math
import numbers
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, contextmanager, nullcontext
from dataclasses import dataclass, field
from datetime import timedelta
from typing import Any, TypeVar

import torch
import torch.distributed as dist

T = TypeVar("T")
_log = logging.getLogger(__name__)

_ROLL_CALL_TAG = 7
#: Once a rank is known dead (its connection closed), how long the roll call still waits for the others'
#: answers: ranks stuck in a collective with the dead one answer only when their own operation fails.
DEAD_RANK_GRACE_SECONDS = 3.0
_NAME_BYTES = 48  # a roll-call message: rank and sequence (2 x int64), then the collective's name


#: The longest timeout accepted: a year. Longer ones (and ``inf``) are refused rather than read as "no limit":
#: a wait without a bound is what these timeouts exist to prevent.
MAX_TIMEOUT_SECONDS = 365 * 24 * 3600


def check_timeout(name: str, seconds: float) -> timedelta:
    """``seconds`` as a :class:`~datetime.timedelta`, or a :class:`ValueError` naming ``name`` and the fix.

    Accepted: a finite real number in ``(0, MAX_TIMEOUT_SECONDS]``. Refused: zero, negative values, NaN,
    ``inf`` (there is no "no limit": every wait for another rank must end) and booleans."""
    if isinstance(seconds, bool) or not isinstance(seconds, numbers.Real):
        raise ValueError(f"{name} must be a number of seconds (e.g. {name}=60); got {seconds!r}.")
    if not math.isfinite(seconds) or not 0 < seconds <= MAX_TIMEOUT_SECONDS:
        raise ValueError(
            f"{name} must be a positive number of seconds, finite and at most {MAX_TIMEOUT_SECONDS} (a year); got "
            f"{seconds!r}. It bounds every wait for another rank (e.g. {name}=60); there is no unlimited setting, "
            f"for a very slow rank pass a large value."
        )
    return timedelta(seconds=float(seconds))


class CollectiveTimeoutError(RuntimeError):
    """A world-wide collective did not complete: a rank died, hangs, or is in another part of the program."""


@dataclass
class RollCall:
    """What every other rank answered when a collective failed."""

    dead: list[int] = field(default_factory=list)
    silent: list[int] = field(default_factory=list)
    elsewhere: dict[int, str] = field(default_factory=dict)
    #: The wait for the silent ranks was cut to :data:`DEAD_RANK_GRACE_SECONDS` because a rank was dead.
    cut_short: bool = False


class BoundedCollectives:
    """World-wide collectives that end within ``2 x timeout`` and name the ranks that are missing.

    Create it on every rank once the world process group exists (it creates its two process groups, a
    collective call). ``group`` is the group the collectives run on.

    Args:
        rank: this process's global rank.
        world_size: the number of ranks.
        timeout: how long one operation, and the roll call after a failure, may wait.
        explain_losses: hold a roll call when a neighbour is lost (:meth:`explain`); an elastic run does not,
            it changes its membership at once instead.
    """

    def __init__(self, rank: int, world_size: int, timeout: timedelta, explain_losses: bool = True) -> None:
        self.rank = rank
        self.world_size = world_size
        self.timeout = timeout
        self.explain_losses = explain_losses
        self.sequence = 0
        self.group: dist.ProcessGroup | None = None
        self._roll_group: dist.ProcessGroup | None = None
        if world_size > 1:
            self.group = dist.new_group(timeout=timeout)
            self._roll_group = dist.new_group(backend="gloo", timeout=timeout)
            dist.barrier(group=self._roll_group)  # connects every pair now, while every rank is alive

    # ---- the guarded operations ----------------------------------------------------------------------
    def run(self, what: str, operation: Callable[[], T], *, check_in: bool = True) -> T:
        """``operation()``, a collective on the world group, named ``what`` in errors.

        With ``check_in`` the ranks first answer a roll call, so a rank that is missing is named before
        anything waits on it; otherwise (collectives that may run every step) the roll call only
        follows a failure. Raises :class:`CollectiveTimeoutError` naming who is missing."""
        self.start(what)
        if check_in:
            self._check_in(what)
        with self.diagnosed(what):
            return operation()

    def start(self, what: str) -> None:
        """Count one more collective (the roll call compares the counts): call it on every rank where a
        collective named ``what`` starts, also one started asynchronously and completed later."""
        self.sequence += 1

    @contextmanager
    def diagnosed(self, what: str) -> Iterator[None]:
        """Run the body (a collective's operation, or the wait for one started earlier); if it fails, hold
        the roll call and raise :class:`CollectiveTimeoutError` naming who is missing."""
        try:
            yield
        except RuntimeError as err:  # gloo's timeout / closed connection, torch's DistBackendError
            if isinstance(err, CollectiveTimeoutError):
                raise
            _log.error("rank %d: the %s failed; asking every rank who is missing (roll call).", self.rank, what)
            raise self._failure(what, self.roll_call(what), err) from err

    def barrier(self, what: str) -> None:
        """Every rank reaches ``what`` (a roll call: it is the barrier, and names who is missing)."""
        if self.world_size > 1:
            self.sequence += 1
            self._check_in(what)

    @torch.no_grad()
    def average(self, buffers: list[torch.Tensor], what: str, *, check_in: bool = True) -> None:
        """``x <- mean over ranks of x`` for every buffer, in place (one all-reduce per buffer)."""
        if self.world_size == 1:
            return

        def reduce_all() -> None:
            for buf in buffers:
                dist.all_reduce(buf, op=dist.ReduceOp.SUM, group=self.group)
                buf.div_(self.world_size)

        self.run(what, reduce_all, check_in=check_in)

    @torch.no_grad()
    def broadcast_tensors(
        self, tensors: list[torch.Tensor], src: int, what: str = "initial broadcast of the model"
    ) -> None:
        """Every rank's ``tensors`` become rank ``src``'s, in place."""
        if self.world_size > 1:
            self.run(what, lambda: [dist.broadcast(t, src, self.group) for t in tensors])

    def broadcast_object(self, obj: T, src: int, what: str) -> T:
        if self.world_size == 1:
            return obj
        holder = [obj]
        self.run(what, lambda: dist.broadcast_object_list(holder, src, group=self.group))
        return holder[0]

    def all_gather_object(self, obj: Any, what: str) -> list[Any]:
        if self.world_size == 1:
            return [obj]
        everyone: list[Any] = [None] * self.world_size
        self.run(what, lambda: dist.all_gather_object(everyone, obj, group=self.group))
        return everyone

    def close(self) -> None:
        for group in (self.group, self._roll_group):
            if group is not None:
                dist.destroy_process_group(group)
        self.group = self._roll_group = None

    # ---- diagnosis -----------------------------------------------------------------------------------
    def _check_in(self, what: str) -> None:
        roll = self.roll_call(what)
        if roll.dead or roll.silent or roll.elsewhere:
            raise self._failure(what, roll)

    def explain(self, what: str, timeout: timedelta, failure: str) -> str:
        """After a failed wait for another rank in ``what`` (a gossip round, a machine's collective): a roll
        call of every rank bounded by ``timeout`` (the failed wait's own), and what it found, e.g. ``"rank 2
        died (connection closed)"``; ``""`` if every rank answered. The ranks whose waits failed because of
        the same rank hold it at about the same time, so each names that rank rather than the neighbour it
        waited for. ``failure`` (the error so far) is logged first: a launcher that stops the other
        processes as soon as one dies may not leave time for the roll call. ``""`` at once without
        ``explain_losses``."""
        if not self.explain_losses:
            return ""
        _log.error("%s Asking every rank who is missing (roll call, up to %gs).", failure, timeout.total_seconds())
        roll = self.roll_call(what, timeout=timeout)
        roll.elsewhere.clear()  # they answered: alive, and stopped by the same failure somewhere else
        return "; ".join(self._causes(what, roll, timeout))

    def _failure(self, what: str, roll: RollCall, err: RuntimeError | None = None) -> CollectiveTimeoutError:
        seconds = f"{self.timeout.total_seconds():g}s"
        causes = self._causes(what, roll, self.timeout)
        if not causes:
            causes.append(f"the {what} failed although every rank answered afterwards: {err}")
        return CollectiveTimeoutError(
            f"rank {self.rank}: {'; '.join(causes)} (world-wide collective #{self.sequence}). Every rank must "
            f"reach it; raise collective_timeout (now {seconds}) only if a rank is legitimately that slow."
        )

    @staticmethod
    def _causes(what: str, roll: RollCall, timeout: timedelta) -> list[str]:
        seconds = f"{timeout.total_seconds():g}s"
        causes = []
        if roll.dead:
            causes.append(f"{_ranks(roll.dead)} died (connection closed)")
        if roll.silent and roll.cut_short and roll.dead:
            causes.append(
                f"{_ranks(roll.silent)} had not answered {DEAD_RANK_GRACE_SECONDS:g}s after that (not waited for "
                f"longer: probably waiting on the dead rank)"
            )
        elif roll.silent:
            causes.append(
                f"{_ranks(roll.silent)} did not reach the {what} within timeout={seconds} (stopped, hung, or "
                f"waiting elsewhere)"
            )
        for rank, where in sorted(roll.elsewhere.items()):
            causes.append(f"rank {rank} is at {where} instead of the {what}")
        return causes

    def roll_call(self, what: str, timeout: timedelta | None = None) -> RollCall:
        """Exchange (rank, sequence number, name of the failed collective) with every other rank, waiting up to
        ``timeout`` (default: the collectives' own).

        Every answer is awaited in its own thread until the deadline, so the answers that come are all
        read before a wait times out (in gloo a timed-out wait closes every connection of its group, and
        the ranks that answer late would then see this one as dead); once a rank is found dead, the others
        get :data:`DEAD_RANK_GRACE_SECONDS` more."""
        roll = RollCall()
        if self._roll_group is None:
            return roll
        mine = _encode(self.rank, self.sequence, what)
        peers = [r for r in range(self.world_size) if r != self.rank]
        answers = {peer: torch.zeros_like(mine) for peer in peers}
        posted: dict[int, tuple[dist.Work, dist.Work]] = {}
        for peer in peers:
            try:
                receive = dist.irecv(answers[peer], peer, group=self._roll_group, tag=_ROLL_CALL_TAG)
                posted[peer] = (receive, dist.isend(mine, peer, group=self._roll_group, tag=_ROLL_CALL_TAG))
            except RuntimeError:
                roll.dead.append(peer)
        limit = (self.timeout if timeout is None else timeout).total_seconds()
        outcomes = _await_answers(posted, time.monotonic() + limit, bool(roll.dead))
        for peer in posted:
            outcome = outcomes.get(peer, "late")
            if outcome == "late":
                roll.cut_short = True
                roll.silent.append(peer)
            elif outcome != "done":
                (roll.dead if outcome == "closed" else roll.silent).append(peer)
            else:
                _, sequence, theirs = _decode(answers[peer])
                if sequence != self.sequence or theirs != _decode(mine)[2]:  # both names as sent (truncated)
                    roll.elsewhere[peer] = f"the {theirs} (#{sequence})"
        roll.dead.sort()
        return roll


def _await_answers(posted: dict[int, tuple[dist.Work, dist.Work]], deadline: float, dead: bool) -> dict[int, str]:
    """Wait for every peer's answer (then for its receipt of this rank's) in a thread per peer until
    ``deadline``; ``"done"``, ``"closed"`` or ``"silent"`` per peer whose wait ended, none for those still
    waited for when a dead peer (``dead``: one found already) cut the wait short."""
    outcomes: dict[int, str] = {}
    finished = threading.Condition()

    def wait_for(peer: int, receive: dist.Work, send: dist.Work) -> None:
        outcome = _wait(receive, deadline)
        if outcome == "done":  # it is in its roll call: it reads this rank's answer now
            _wait(send, deadline)
        with finished:
            outcomes[peer] = outcome
            finished.notify()

    for peer, (receive, send) in posted.items():
        threading.Thread(target=wait_for, args=(peer, receive, send), daemon=True).start()
    cut = time.monotonic() + DEAD_RANK_GRACE_SECONDS if dead else deadline
    with finished:
        while len(outcomes) < len(posted):
            if "closed" in outcomes.values():
                cut = min(cut, time.monotonic() + DEAD_RANK_GRACE_SECONDS)
            remaining = min(cut, deadline) - time.monotonic()
            if remaining <= 0:
                break
            finished.wait(remaining)
        return dict(outcomes)


def diagnosed(collectives: BoundedCollectives | None, what: str) -> AbstractContextManager[None]:
    """:meth:`BoundedCollectives.diagnosed` of ``collectives``, or nothing without them."""
    return nullcontext() if collectives is None else collectives.diagnosed(what)


def _wait(work: dist.Work, deadline: float) -> str:
    """Wait for ``work`` until ``deadline``: ``"done"``, ``"closed"`` (the peer's connection) or ``"silent"``."""
    try:
        completed = work.wait(timedelta(seconds=max(0.01, deadline - time.monotonic())))
    except RuntimeError as err:
        return "closed" if _closed(err) else "silent"
    return "silent" if completed is False else "done"


def _encode(rank: int, sequence: int, what: str) -> torch.Tensor:
    message = torch.zeros(16 + _NAME_BYTES, dtype=torch.uint8)
    message[:16].view(torch.int64).copy_(torch.tensor([rank, sequence]))
    name = what.encode()[:_NAME_BYTES]
    message[16 : 16 + len(name)] = torch.frombuffer(bytearray(name), dtype=torch.uint8)
    return message


def _decode(message: torch.Tensor) -> tuple[int, int, str]:
    rank, sequence = message[:16].view(torch.int64).tolist()
    return rank, sequence, bytes(message[16:].tolist()).rstrip(b"\0").decode(errors="replace")


def _closed(err: RuntimeError) -> bool:
    text = str(err).lower()
    return "closed" in text or "reset" in text or "broken pipe" in text


def _ranks(ranks: list[int]) -> str:
    return f"rank {ranks[0]}" if len(ranks) == 1 else f"ranks {ranks}"
