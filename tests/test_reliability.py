"""Reliability checks in one process: refused options, the all-reduce baseline's choice of algorithm, and the
roll-call messages of the bounded collectives (their multi-process behaviour is in
``test_reliability_multiprocess.py``)."""

from __future__ import annotations

import time
from datetime import timedelta

import pytest

from lightning_decent import DecentralizedStrategy
from lightning_decent.algorithms import DDP, DSGD, GradientTracking
from lightning_decent.comm.collectives import (
    DEAD_RANK_GRACE_SECONDS,
    MAX_TIMEOUT_SECONDS,
    _await_answers,
    _decode,
    _encode,
    check_timeout,
)
from lightning_decent.uneven import EpochAgreement, StepMismatchError, UnevenInputsError


@pytest.mark.parametrize("name", ["gossip_timeout", "collective_timeout"])
@pytest.mark.parametrize("value", [0, 0.0, -1.0, float("nan"), float("inf"), MAX_TIMEOUT_SECONDS + 1])
def test_a_non_positive_or_unbounded_timeout_is_refused(name: str, value: float) -> None:
    # Before: gossip_timeout=0 meant "no timeout", a negative value blamed a healthy peer at once, and
    # collective_timeout=inf failed at set-up with "OverflowError: cannot convert float infinity to integer".
    with pytest.raises(ValueError, match=f"{name} must be a positive number of seconds, finite and at most"):
        check_timeout(name, value)
    with pytest.raises(ValueError, match=f"{name} must be a positive number of seconds"):
        DecentralizedStrategy(**{name: value})


@pytest.mark.parametrize("value", ["60", True, None])
def test_a_timeout_that_is_not_a_number_is_refused(value: object) -> None:
    with pytest.raises(ValueError, match=r"gossip_timeout must be a number of seconds \(e.g. gossip_timeout=60\)"):
        check_timeout("gossip_timeout", value)  # type: ignore[arg-type]


def test_a_valid_timeout_becomes_a_timedelta_gloo_accepts() -> None:
    assert check_timeout("collective_timeout", 2.5) == timedelta(seconds=2.5)
    assert check_timeout("collective_timeout", MAX_TIMEOUT_SECONDS) == timedelta(days=365)
    assert check_timeout("collective_timeout", 7) == timedelta(seconds=7)


def test_the_all_reduce_communicator_runs_ddp_for_dsgd_and_exact_mixing_for_the_others() -> None:
    baseline = DecentralizedStrategy(communicator="allreduce", check_finite=False)
    assert isinstance(baseline.algorithm, DDP) and baseline.algorithm.check_finite is False
    assert isinstance(DecentralizedStrategy(communicator="p2p").algorithm, DSGD)
    tracking = DecentralizedStrategy(communicator="allreduce", algorithm="gradient_tracking")
    assert isinstance(tracking.algorithm, GradientTracking)  # its mix is then an exact average of both buffers


def test_roll_call_messages_carry_rank_sequence_and_collective() -> None:
    assert _decode(_encode(3, 12, "checkpoint save: shard hashes")) == (3, 12, "checkpoint save: shard hashes")
    assert len(_encode(0, 0, "x" * 100)) == 64  # names are cut to fit a fixed 64-byte message


# ---- uneven inputs: the epoch agreement, run synchronously over a ring --------------------------------
def run_epoch(lengths: list[int | None], real: list[int]) -> list[int]:
    """Every rank's number of steps when it ends the epoch, exchanging headers with its ring neighbours each
    step as the point-to-point communicator does; ``real`` are the batches each rank really has."""
    n = len(lengths)
    ranks = [EpochAgreement(r) for r in range(n)]
    for rank in ranks:
        rank.start_epoch(0, lengths)
    ended: dict[int, int] = {}
    for step in range(100):
        active = [r for r in range(n) if r not in ended]
        if not active:
            break
        for r in active:
            is_real = ranks[r].real_steps < real[r]
            last = is_real and ranks[r].real_steps == real[r] - 1
            ranks[r].begin_step(step, real=is_real, last_real=last, batch=step + 1 if is_real else -1)
        headers = {r: ranks[r].outgoing(step) for r in active}
        for r in active:
            for peer in ((r - 1) % n, (r + 1) % n):
                if peer in headers:
                    ranks[r].incoming(peer, step, headers[peer], headers[r])
        for r in active:
            ranks[r].end_step(real=ranks[r].real_steps < real[r])
            if ranks[r].real_steps == real[r] and not ranks[r].wants_empty_step():
                ended[r] = ranks[r].steps_taken
    return [ended[r] for r in range(n)]


def test_ranks_with_uneven_epochs_take_empty_steps_and_end_together() -> None:
    lengths = [12, 15, 13, 15, 9, 15]
    assert run_epoch(lengths, lengths) == [15] * 6
    assert run_epoch([1] * 6, [1] * 6) == [1] * 6  # even epochs: no empty step at all


def test_unknown_lengths_fail_at_the_first_mismatch_naming_both_ranks_and_their_steps() -> None:
    with pytest.raises(UnevenInputsError, match=r"rank 1 ran out of batches after 4 optimizer steps in epoch 0 "
                       r"while rank [02] has more \(it is at step 4\)"):  # fmt: skip
        run_epoch([None] * 4, real=[6, 4, 6, 6])


def test_a_skipped_optimizer_step_is_reported_at_once_with_both_ranks_and_batches() -> None:
    # Rounds pair up by count, so rank 2's step 6 meets rank 1's step 6; only the batches show the skip.
    sender, receiver = EpochAgreement(2), EpochAgreement(1)
    for agreement in (sender, receiver):
        agreement.start_epoch(0, [10] * 4)
    sender.begin_step(6, real=True, batch=8)
    receiver.begin_step(6, real=True, batch=7)
    match = "rank 1: at gossip step 6 rank 2 is at batch 8 of epoch 0 and this rank at batch 7"
    with pytest.raises(StepMismatchError, match=match):
        receiver.incoming(2, 6, sender.outgoing(6), receiver.outgoing(6))
    sender.begin_step(6, real=True, batch=7)
    receiver.incoming(2, 6, sender.outgoing(6), receiver.outgoing(6))  # the same batch: fine


class _FakeWork:
    """A receive or send of the roll call: answered after ``answer_after`` seconds, closed, or never answered."""

    def __init__(self, answer_after: float | None = None, closed: bool = False) -> None:
        self.answer_after, self.closed = answer_after, closed

    def wait(self, timeout: timedelta) -> bool:
        if self.closed:
            raise RuntimeError("[gloo/transport/tcp/pair.cc:561] Connection closed by peer")
        if self.answer_after is None or self.answer_after > timeout.total_seconds():
            time.sleep(timeout.total_seconds())
            raise RuntimeError("Timed out waiting for recv operation to complete")
        time.sleep(self.answer_after)
        return True


def test_the_roll_call_reports_a_dead_rank_at_once_instead_of_waiting_out_the_timeout() -> None:
    # Before: with collective_timeout=60, a rank killed during a DiLoCo sync was reported after 64 s (the roll
    # call waited the whole timeout for the healthy ranks stuck in the collective with it).
    posted = {
        0: (_FakeWork(answer_after=None), _FakeWork(answer_after=0.0)),  # stuck in the collective: no answer
        1: (_FakeWork(answer_after=0.2), _FakeWork(answer_after=0.0)),
        3: (_FakeWork(closed=True), _FakeWork(closed=True)),  # dead
    }
    start = time.monotonic()
    outcomes = _await_answers(posted, deadline=start + 60, dead=False)
    assert outcomes == {1: "done", 3: "closed"}  # rank 0 not waited for beyond the grace
    assert time.monotonic() - start < DEAD_RANK_GRACE_SECONDS + 1


def test_the_roll_call_waits_for_late_answers_in_parallel_until_the_deadline() -> None:
    posted = {peer: (_FakeWork(answer_after=0.5), _FakeWork(answer_after=0.0)) for peer in range(4)}
    posted[4] = (_FakeWork(answer_after=None), _FakeWork(answer_after=0.0))  # stopped
    start = time.monotonic()
    outcomes = _await_answers(posted, deadline=start + 1.5, dead=False)
    assert {peer: outcomes[peer] for peer in range(4)} == dict.fromkeys(range(4), "done")
    assert outcomes.get(4, "silent") == "silent"  # its wait ends at the deadline too (not recorded yet, or silent)
    assert time.monotonic() - start < 2.5  # in parallel: not 4 x 0.5 s + 1.5 s
