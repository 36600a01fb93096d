"""When local-steps algorithms synchronise: the period ``H``, streaming fragments, overlap and warm-up.

Every rank computes the same schedule from the optimizer-step counter ``k`` alone (the strategy's
``gossip_step``, which checkpoints keep), so no coordination is needed and a resumed run continues
the schedule where it stopped.

* Warm-up (post-local SGD, Lin, Stich, Patel & Jaggi, ICLR 2020): after each of the first ``K`` steps
  every fragment synchronises (``H = 1``), blocking.
* Then, with ``j = k - K``, fragment ``f`` (of ``F``) starts a synchronisation after step ``k`` when
  ``(j + 1) mod H = (f + 1) H/F mod H`` (Streaming DiLoCo, Douillard et al. 2025: fragment ``f`` at
  offset ``f H/F`` in the period; the last fragment at the period's end, so ``F = 1`` is DiLoCo's
  schedule), and finishes it ``tau`` steps later, after step ``k + tau``.

``tau < H/F`` keeps at most one fragment in flight: a fragment's next start (``H/F`` steps later for
the next fragment, ``H`` for the same one) comes after its finish.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass


def _positive_int(name: str, value: object, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"{name} must be an integer >= {minimum}; got {value!r}.")
    return value


@dataclass(frozen=True)
class SyncSchedule:
    """The synchronisation schedule of a local-steps algorithm.

    Args:
        period: ``H``, inner steps between two synchronisations of the same fragment.
        fragments: ``F``, the number of fragments synchronised at staggered offsets (1: all at once).
        delay: ``tau``, inner steps between the start of a fragment's exchange and its use (0: blocking).
        warmup_steps: ``K``, initial steps that each end with a full synchronisation (``H = 1``).

    Raises:
        ValueError: naming the fix, for ``H < 1``, ``F`` not dividing ``H`` (or ``F > H``),
            ``tau >= H/F`` or ``K < 0``.
    """

    period: int
    fragments: int = 1
    delay: int = 0
    warmup_steps: int = 0

    def __post_init__(self) -> None:
        period = _positive_int("H (the number of local steps between synchronisations)", self.period, 1)
        fragments = _positive_int("fragments", self.fragments, 1)
        _positive_int("delay", self.delay, 0)
        _positive_int("warmup_steps", self.warmup_steps, 0)
        if fragments > period or period % fragments:
            raise ValueError(
                f"fragments={fragments} must divide H={period} (fragment f is synchronised at offset f*H/F of every "
                f"period of H steps, so at most H fragments); choose H a multiple of fragments."
            )
        if self.delay >= period // fragments:
            raise ValueError(
                f"delay={self.delay} must be smaller than H/fragments={period // fragments}: a fragment's exchange "
                f"must be applied before the next fragment starts its own. Lower delay, or raise H."
            )

    @property
    def stride(self) -> int:
        """``H/F``: inner steps between the starts of two consecutive fragments."""
        return self.period // self.fragments

    def is_warmup(self, step: int) -> bool:
        return step < self.warmup_steps

    def starting(self, step: int) -> tuple[int, int] | None:
        """``(fragment, round)`` that starts a synchronisation after (post-warm-up) step ``step``, else None.

        ``round`` counts the fragment's synchronisations so far, warm-up ones included (the gossip form
        mixes its ``round``-th synchronisation with ``W(round)``)."""
        j = step - self.warmup_steps
        if j < 0 or (j + 1) % self.stride:
            return None
        fragment = ((j + 1) // self.stride - 1) % self.fragments
        return fragment, self.warmup_steps + (j + 1 - (fragment + 1) * self.stride) // self.period

    def bounds(self, size: int) -> list[tuple[int, int]]:
        """``[start, end)`` of each fragment in a flat buffer of ``size`` elements: ``F`` contiguous slices
        whose sizes differ by at most one.

        Raises:
            ValueError: if the buffer has fewer than ``F`` elements.
        """
        if size < self.fragments:
            raise ValueError(
                f"a parameter bucket of {size} elements cannot be split into fragments={self.fragments}; "
                f"use fewer fragments."
            )
        edges = [size * f // self.fragments for f in range(self.fragments + 1)]
        return list(itertools.pairwise(edges))
