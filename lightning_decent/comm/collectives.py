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

import math
import numbers
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import timedelta
from typing import Any, TypeVar

import torch
import torch.distributed as dist

T = TypeVar("T")

_ROLL_CALL_TAG = 7
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


class BoundedCollectives:
    """World-wide collectives that end within ``2 x timeout`` and name the ranks that are missing.

    Create it on every rank once the world process group exists (it creates its two process groups, a
    collective call). ``group`` is the group the collectives run on.

    Args:
        rank: this process's global rank.
        world_size: the number of ranks.
        timeout: how long one operation, and the roll call after a failure, may wait.
    """

    def __init__(self, rank: int, world_size: int, timeout: timedelta) -> None:
        self.rank = rank
        self.world_size = world_size
        self.timeout = timeout
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
        self.sequence += 1
        if check_in:
            self._check_in(what)
        try:
            return operation()
        except RuntimeError as err:  # gloo's timeout / closed connection, torch's DistBackendError
            if isinstance(err, CollectiveTimeoutError):
                raise
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

    def _failure(self, what: str, roll: RollCall, err: RuntimeError | None = None) -> CollectiveTimeoutError:
        seconds = f"{self.timeout.total_seconds():g}s"
        causes = []
        if roll.silent:
            causes.append(
                f"{_ranks(roll.silent)} did not reach the {what} within timeout={seconds} (stopped, hung, or "
                f"waiting elsewhere)"
            )
        if roll.dead:
            causes.append(f"{_ranks(roll.dead)} died (connection closed)")
        for rank, where in sorted(roll.elsewhere.items()):
            causes.append(f"rank {rank} is at {where} instead of the {what}")
        if not causes:
            causes.append(f"the {what} failed although every rank answered afterwards: {err}")
        return CollectiveTimeoutError(
            f"rank {self.rank}: {'; '.join(causes)} (world-wide collective #{self.sequence}). Every rank must "
            f"reach it; raise collective_timeout (now {seconds}) only if a rank is legitimately that slow."
        )

    def roll_call(self, what: str) -> RollCall:
        """Exchange (rank, sequence number, name of the failed collective) with every other rank."""
        roll = RollCall()
        if self._roll_group is None:
            return roll
        mine = _encode(self.rank, self.sequence, what)
        peers = [r for r in range(self.world_size) if r != self.rank]
        answers = {peer: torch.zeros_like(mine) for peer in peers}
        receives, sends = {}, []
        for peer in peers:
            try:
                receives[peer] = dist.irecv(answers[peer], peer, group=self._roll_group, tag=_ROLL_CALL_TAG)
                sends.append(dist.isend(mine, peer, group=self._roll_group, tag=_ROLL_CALL_TAG))
            except RuntimeError:
                roll.dead.append(peer)
        deadline = time.monotonic() + self.timeout.total_seconds()
        for peer, work in receives.items():
            outcome = _wait(work, deadline)
            if outcome != "done":
                (roll.dead if outcome == "closed" else roll.silent).append(peer)
                continue
            _, sequence, theirs = _decode(answers[peer])
            if sequence != self.sequence or theirs != what:
                roll.elsewhere[peer] = f"the {theirs} (#{sequence})"
        for work in sends:  # stay until late peers have read this rank's answer
            _wait(work, deadline)
        roll.dead.sort()
        return roll


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
