"""Ranks whose data loaders yield different numbers of batches in an epoch, and ranks out of step.

* **Uneven epochs (known lengths).** When ``fit`` starts, the ranks exchange their number of optimizer
  steps per epoch (one small bounded all-gather; again at every epoch start when data loaders are
  reloaded). A rank that has taken its last real step of an epoch then takes *empty steps* (the
  algorithm's step with a zero gradient and no optimizer update: D-SGD just gossips, like torch's
  ``Join`` for DDP's uneven inputs) up to the longest rank's count, so every rank ends the epoch at the
  same gossip step and the evaluation and checkpoints that follow line up. Even epochs cost nothing.
* **Unknown lengths** (an ``IterableDataset``, manual optimization): nobody can pad, so every gossip
  round's header says whether it is the sender's last real step of the epoch, and the first round in
  which one rank ends while a neighbour goes on raises :class:`UnevenInputsError` naming both ranks and
  their step counts, instead of a hang that blames a healthy peer.
* **Out of step.** Neighbours gossip round ``k`` with round ``k``, so a rank that skipped or repeated an
  ``optimizer.step()`` (manual optimization) stays paired by round but not by batch: the header holds
  the batch the sender's step belongs to, and a round whose two sides come from different batches of
  the same epoch raises :class:`StepMismatchError` naming both ranks, the gossip step and both
  batches, at once, instead of when the step counts finally differ at the end of the epoch.

The header (:mod:`lightning_decent.comm.headers`) is 7 int64: ``[communicator step, gossip step, epoch,
batch (-1 for an empty step), last real step (0/1), real steps taken this epoch, lengths unknown (0/1)]``.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import TYPE_CHECKING

import torch

from lightning_decent.comm.headers import RoundHeaders

if TYPE_CHECKING:
    import lightning.pytorch as pl

    from lightning_decent.algorithms import Algorithm, Bucket
    from lightning_decent.comm import Communicator
    from lightning_decent.comm.collectives import BoundedCollectives


class StepMismatchError(RuntimeError):
    """Two neighbours gossip the same round from different batches: one skipped or repeated an optimizer step."""


class UnevenInputsError(RuntimeError):
    """Ranks ran different numbers of steps in an epoch whose lengths were not known in advance."""


class EpochAgreement(RoundHeaders):
    """One rank's position in the epoch, written into and checked against its neighbours' round headers.

    The strategy calls :meth:`start_epoch` before the first step of an epoch, :meth:`begin_step` before
    each (real or empty) step's gossip and :meth:`end_step` after it, and :meth:`wants_empty_step` after
    its last real step of the epoch.

    Args:
        rank: this rank.
    """

    def __init__(self, rank: int) -> None:
        self.rank = rank
        self.reset()

    def reset(self) -> None:
        """Forget the epoch (a new ``fit``/``validate`` call starts with an epoch start)."""
        self.epoch = -1
        self.lengths: list[int | None] = []
        self.gossip_step = 0
        self.batch = -1
        self.last_real = False
        self.steps_taken = 0  # steps (real and empty) of this epoch so far
        self.real_steps = 0
        self.realigned = False  # a membership change inside this epoch put neighbours one batch apart

    @property
    def unknown(self) -> bool:
        return not self.lengths or any(length is None for length in self.lengths)

    # ---- the strategy's side -------------------------------------------------------------------------
    def start_epoch(self, epoch: int, lengths: list[int | None], steps_done: int = 0) -> None:
        """A new epoch in which rank ``r`` takes ``lengths[r]`` optimizer steps (``None``: not known), of which
        this rank took ``steps_done`` before the checkpoint it resumed from (a resumed epoch)."""
        self.epoch, self.lengths = epoch, list(lengths)
        self.steps_taken = self.real_steps = steps_done
        self.last_real = False
        self.realigned = False

    def begin_step(self, gossip_step: int, *, real: bool, last_real: bool = False, batch: int = -1) -> None:
        """Before a step's gossip: its gossip step, whether it is a real step (of ``batch``, counted from 1
        in the epoch) and this rank's last real one."""
        self.gossip_step = gossip_step
        self.last_real = real and last_real
        self.batch = batch if real else -1

    def end_step(self, *, real: bool) -> None:
        self.steps_taken += 1
        self.real_steps += int(real)

    def wants_empty_step(self) -> bool:
        """After this rank's last real step: whether another empty step is needed to end with the others."""
        if self.unknown:
            return False  # nothing to agree on; a mismatch was (or will be) reported by the headers
        return self.steps_taken < max(length or 0 for length in self.lengths)

    # ---- the communicator's side ---------------------------------------------------------------------
    def outgoing(self, step: int) -> torch.Tensor:
        fields = [step, self.gossip_step, self.epoch, self.batch, int(self.last_real), self.real_steps, self.unknown]
        return torch.tensor(fields, dtype=torch.int64)

    def incoming(self, peer: int, step: int, theirs: torch.Tensor, mine: torch.Tensor) -> None:
        their_step, their_gossip_step, epoch, batch, last_real, real_steps, _ = theirs.tolist()
        _, gossip_step, my_epoch, my_batch, my_last_real, my_real_steps, _ = mine.tolist()
        if their_step != step:
            raise StepMismatchError(
                f"rank {self.rank} at gossip step {gossip_step} received rank {peer}'s round of gossip step "
                f"{their_gossip_step}: the ranks disagree on the gossip rounds of a step (same algorithm, topology "
                f"and checkpoint on every rank?)."
            )
        if epoch != my_epoch:
            return
        if batch != my_batch and batch >= 0 and my_batch >= 0 and not self.realigned:
            raise StepMismatchError(
                f"rank {self.rank}: at gossip step {gossip_step} rank {peer} is at batch {batch} of epoch {epoch} "
                f"and this rank at batch {my_batch}: one of them skipped or repeated an optimizer step. Every rank "
                f"must call optimizer.step() on the same batches (manual optimization: also when skipping a batch)."
            )
        if self.unknown and last_real != my_last_real:
            ended, going_on = (peer, self.rank) if last_real else (self.rank, peer)
            steps = {peer: real_steps + 1, self.rank: my_real_steps + 1}  # counting the step being gossiped
            raise UnevenInputsError(
                f"rank {self.rank}: rank {ended} ran out of batches after {steps[ended]} optimizer steps in epoch "
                f"{epoch} while rank {going_on} has more (it is at step {steps[going_on]}); their lengths were not "
                f"known in advance (an IterableDataset or manual optimization), so they cannot be evened out. "
                f"Give every rank the same number of batches, or a sized data loader."
            )


class EpochAlignment:
    """The strategy's side of uneven inputs: epoch lengths, the step's place in its epoch, empty steps.

    The strategy calls :meth:`gather_lengths` when ``fit`` starts, :meth:`start_epoch_if_new` before every
    training batch, :meth:`begin_real_step` before a real step's gossip and :meth:`end_real_step` after it;
    the round headers it writes and checks are :attr:`agreement`'s.

    Args:
        rank: this rank.
    """

    def __init__(self, rank: int) -> None:
        self.agreement = EpochAgreement(rank)
        self.lengths: list[int | None] = []

    def gather_lengths(self, trainer: pl.Trainer, collectives: BoundedCollectives) -> None:
        """Every rank's number of optimizer steps per epoch (``None``: not known in advance), one bounded
        all-gather."""
        batches = trainer.num_training_batches
        known = trainer.lightning_module.automatic_optimization and math.isfinite(batches)
        length = math.ceil(batches / trainer.accumulate_grad_batches) if known else None
        if collectives.world_size == 1:
            self.lengths = [length]
        else:
            self.lengths = collectives.all_gather_object(length, "exchange of epoch lengths (uneven inputs)")
        if self.agreement.epoch >= 0:  # a membership change inside the epoch: the new members' lengths
            self.agreement.lengths = list(self.lengths)

    def start_epoch_if_new(self, trainer: pl.Trainer, collectives: BoundedCollectives) -> bool:
        """Before a training batch: start the agreement on a new epoch; returns whether one started."""
        if self.agreement.epoch == trainer.current_epoch:
            return False
        if trainer.reload_dataloaders_every_n_epochs and self.agreement.epoch >= 0:  # lengths may change
            self.gather_lengths(trainer, collectives)
        steps_done = (batch_in_epoch(trainer) - 1) // trainer.accumulate_grad_batches  # > 0 in a resumed epoch
        self.agreement.start_epoch(trainer.current_epoch, self.lengths, steps_done)
        return True

    def begin_real_step(self, trainer: pl.Trainer | None, gossip_step: int) -> bool:
        """Before a real step's gossip; returns whether it is this rank's last real step of the epoch."""
        last_real = epoch_ends_after_this_batch(trainer)
        self.agreement.begin_step(gossip_step, real=True, last_real=last_real, batch=batch_in_epoch(trainer))
        return last_real

    def realign(self, gossip_step: int, collectives: BoundedCollectives, joining: bool = False) -> int:
        """After a membership change inside an epoch: the gossip step every member continues from.

        Members notice a loss up to one step apart (a neighbour of the lost rank inside step ``k``, the others
        in step ``k + 1``), so some have taken one step more of this epoch than others. All of them continue
        from the fewest, ``s_min``, at gossip step ``base + s_min`` (``base``: the gossip step the epoch started
        at), so that they gossip in lockstep again; one that is a batch ahead takes one empty step more at the
        epoch's end, and the neighbours' batches may differ by one until then. A joiner (``joining``) takes no
        part in the minimum: it resumes from its donor's state."""
        taken = self.agreement.steps_taken
        mine = None if joining else (taken, gossip_step - taken)
        found = [e for e in collectives.all_gather_object(mine, "realignment after a membership change") if e]
        if joining or not found:
            return gossip_step
        fewest, base = min(t for t, _ in found), max(b for _, b in found)
        self.agreement.steps_taken = fewest
        self.agreement.real_steps = min(self.agreement.real_steps, fewest)
        self.agreement.realigned = True
        return base + fewest

    def end_real_step(self, last_real: bool, gossip_step: int, empty_step: Callable[[int], None]) -> int:
        """After a real step (``gossip_step`` counts it already): if it was this rank's last of the epoch,
        run ``empty_step(k)`` until every rank has ended the epoch; returns the gossip step after them."""
        self.agreement.end_step(real=True)
        while last_real and self.agreement.wants_empty_step():
            self.agreement.begin_step(gossip_step, real=False)
            empty_step(gossip_step)
            gossip_step += 1
            self.agreement.end_step(real=False)
        return gossip_step


def batch_in_epoch(trainer: pl.Trainer | None) -> int:
    """The current training batch, counted from 1 in its epoch (-1 outside ``fit``)."""
    if trainer is None or not trainer.training:
        return -1
    return trainer.fit_loop.epoch_loop.batch_progress.current.ready


def epoch_ends_after_this_batch(trainer: pl.Trainer | None) -> bool:
    if trainer is None or not trainer.training:
        return False
    progress = trainer.fit_loop.epoch_loop.batch_progress
    return progress.is_last_batch or progress.current.ready >= trainer.num_training_batches


@torch.no_grad()
def empty_step(algorithm: Algorithm, buckets: list[Bucket], comm: Communicator, step: int) -> None:
    """The algorithm's step with a zero local gradient and no optimizer update (D-SGD: gossip only)."""
    algorithm.before_step(buckets, comm, step)
    if algorithm.transforms_gradients:
        for bucket in buckets:
            assert bucket.grads is not None
            bucket.grads.zero_()
        algorithm.transform_gradients(buckets, comm, step)
    algorithm.after_step(buckets, comm, step)
