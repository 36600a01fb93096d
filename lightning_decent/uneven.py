"""Ranks whose data loaders yield different numbers of batches in an epoch, and ranks out of step.

Every gossip round carries a small header (:mod:`lightning_decent.comm.headers`) with the sender's
gossip step and what it knows about this epoch's lengths, which :class:`EpochAgreement` writes and
checks:

* **Out of step.** Neighbours gossip round ``k`` with round ``k``, so a rank that skipped or repeated an
  ``optimizer.step()`` (manual optimization) stays paired by round but not by batch: the header holds
  the batch the sender's step belongs to, and a round whose two sides come from different batches of
  the same epoch raises :class:`StepMismatchError` naming both ranks, the gossip step and both
  batches, at once, instead of when the step counts finally differ at the end of the epoch.
* **Uneven epochs (known lengths).** Each rank puts its own number of optimizer steps in this epoch into
  its headers; the maximum over the ranks and the set of ranks whose number is known spread over the
  graph with every round (an OR of bit masks and a max). A rank that has taken its last real step then
  takes *empty steps* (the algorithm's step with a zero gradient and no optimizer update: D-SGD just
  gossips, like torch's ``Join`` for DDP's uneven inputs) until it knows every rank's length and has
  reached the longest: every rank ends the epoch at the same gossip step. Once the lengths have
  spread (after the graph's propagation delay, a few steps), even epochs cost nothing.
* **Unknown lengths** (an ``IterableDataset``, manual optimization): no rank can pad, so the first
  round in which one rank takes its last real step while a neighbour does not raises
  :class:`UnevenInputsError` naming both ranks and their step counts, instead of a hang that blames a
  healthy peer.

Header layout (int64): ``[communicator step, gossip step, epoch, batch (-1 for an empty step), flags,
longest known length, real steps taken, known-mask words...]``; ``flags`` bit 0: some rank's length is
unknown, bit 1: this is the sender's last real step.
"""

from __future__ import annotations

import torch

from lightning_decent.comm.headers import RoundHeaders

_BITS = 63  # bits of a mask word (int64, kept non-negative)
_UNKNOWN, _LAST = 1, 2
_FIELDS = 7


class StepMismatchError(RuntimeError):
    """Two neighbours are at different gossip steps: one skipped or repeated an optimizer step."""


class UnevenInputsError(RuntimeError):
    """Ranks ran different numbers of steps in an epoch and their lengths could not be agreed in advance."""


class EpochAgreement(RoundHeaders):
    """Header state of one rank: its position and what it knows about every rank's epoch length.

    The strategy calls :meth:`start_epoch` before the first step of an epoch, :meth:`begin_step` before
    each (real or empty) step's gossip, and :meth:`wants_empty_step` after its last real step.

    Args:
        rank: this rank.
        world_size: the number of ranks.
        period: the topology's period. Every rank's length is known everywhere within ``(n - 1) period``
            steps of the epoch start (over any ``period`` consecutive steps the graph's union is strongly
            connected, so the set of ranks a length has reached grows each time); waiting longer is an error.
    """

    def __init__(self, rank: int, world_size: int, period: int = 1) -> None:
        self.rank = rank
        self.world_size = world_size
        self.delay_bound = (world_size - 1) * period
        self.words = (world_size + _BITS - 1) // _BITS
        self.epoch = -1
        self.gossip_step = 0
        self.steps_taken = 0  # steps (real and empty) of this epoch so far
        self.real_steps = 0
        self.length: int | None = None
        self.last_real = False
        self.batch = -1
        self.longest = 0
        self.unknown = False
        self.known = torch.zeros(self.words, dtype=torch.int64)

    # ---- the strategy's side -------------------------------------------------------------------------
    def start_epoch(self, epoch: int, length: int | None) -> None:
        """A new epoch of ``length`` optimizer steps on this rank (``None``: not known in advance)."""
        self.epoch, self.length = epoch, length
        self.steps_taken = self.real_steps = 0
        self.last_real = False
        self.known.zero_()
        self.unknown = length is None
        self.longest = length or 0
        if length is not None:
            self._mark_known(self.rank)

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
        if not self._all_known():
            if self.steps_taken > self.delay_bound:
                raise UnevenInputsError(
                    f"rank {self.rank}: after {self.steps_taken} steps of epoch {self.epoch} the lengths of some ranks "
                    f"have still not arrived (at most {self.delay_bound} steps expected on this graph)."
                )
            return True  # keep serving the neighbours until every length is known
        if self.steps_taken > self.longest:
            raise UnevenInputsError(
                f"rank {self.rank}: epoch {self.epoch} lasts {self.longest} steps on the longest rank, shorter than "
                f"the {self.steps_taken} steps it took to learn every rank's length over this graph; give every "
                f"rank the same number of batches, or use longer epochs."
            )
        return self.steps_taken < self.longest

    # ---- the communicator's side ---------------------------------------------------------------------
    def outgoing(self, step: int) -> torch.Tensor:
        flags = (_UNKNOWN if self.unknown else 0) | (_LAST if self.last_real else 0)
        fields = [step, self.gossip_step, self.epoch, self.batch, flags, self.longest, self.real_steps]
        return torch.cat([torch.tensor(fields, dtype=torch.int64), self.known])

    def incoming(self, peer: int, step: int, header: torch.Tensor) -> None:
        their_step, their_gossip_step, epoch, batch, flags, longest, real_steps = header[:_FIELDS].tolist()
        if their_step != step:
            raise StepMismatchError(
                f"rank {self.rank} at gossip step {self.gossip_step} received rank {peer}'s round of gossip step "
                f"{their_gossip_step}: the ranks disagree on the gossip rounds of a step (same algorithm, topology "
                f"and checkpoint on every rank?)."
            )
        if epoch != self.epoch:
            return  # a round started in the previous epoch (overlapped gossip): nothing to learn
        if batch != self.batch and batch >= 0 and self.batch >= 0:
            raise StepMismatchError(
                f"rank {self.rank}: at gossip step {self.gossip_step} rank {peer} is at batch {batch} of epoch {epoch} "
                f"and this rank at batch {self.batch}: one of them skipped or repeated an optimizer step. Every rank "
                f"must call optimizer.step() on the same batches (manual optimization: also when skipping a batch)."
            )
        self.unknown = self.unknown or bool(flags & _UNKNOWN)
        self.longest = max(self.longest, longest)
        self.known.bitwise_or_(header[_FIELDS:])
        if self.unknown and bool(flags & _LAST) != self.last_real:
            ended, going_on = (peer, self.rank) if flags & _LAST else (self.rank, peer)
            steps = {peer: real_steps + 1, self.rank: self.real_steps + 1}  # counting the step being gossiped
            raise UnevenInputsError(
                f"rank {self.rank}: rank {ended} ran out of batches after {steps[ended]} optimizer steps in epoch "
                f"{epoch} while rank {going_on} has more (it is at step {steps[going_on]}); their lengths were not "
                f"known in advance (an IterableDataset or manual optimization), so they cannot be evened out. "
                f"Give every rank the same number of batches, or a sized data loader."
            )

    def learn_lengths(self, lengths: list[int | None]) -> None:
        """Every rank's length at once (communicators without headers gather them at the epoch start)."""
        self.unknown = any(length is None for length in lengths)
        self.longest = max((length or 0) for length in lengths)
        for rank in range(self.world_size):
            self._mark_known(rank)

    # ---- masks ---------------------------------------------------------------------------------------
    def _mark_known(self, rank: int) -> None:
        self.known[rank // _BITS] |= 1 << (rank % _BITS)

    def _all_known(self) -> bool:
        full = self.world_size
        return sum(bin(int(word)).count("1") for word in self.known) == full
