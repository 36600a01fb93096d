"""A small message next to every gossip round: who sent it, at which step, and what it knows.

The point-to-point communicator sends :meth:`RoundHeaders.outgoing` to each out-neighbour with every
round (a separate message of a few int64, tag :data:`HEADER_TAG`, so the buffers travel as they are)
and hands each in-neighbour's header, with this rank's own header of the same round, to
:meth:`RoundHeaders.incoming` before the round is combined (a round may be finished a step after it
was posted, so the two are compared as they were when posted).
What the header holds and checks is the caller's (the strategy's
:class:`~lightning_decent.uneven.EpochAgreement`: the sender's gossip step, so a rank that skipped or
repeated an optimizer step is stopped at once, and whether it is the sender's last real step of the
epoch, so ranks with uneven inputs of unknown length are stopped at the first mismatch).
"""

from __future__ import annotations

from abc import ABC, abstractmethod

import torch

#: The point-to-point tag of header messages (buffers use tag 0).
HEADER_TAG = 1


class RoundHeaders(ABC):
    """What travels next to the buffers of every gossip round."""

    @abstractmethod
    def outgoing(self, step: int) -> torch.Tensor:
        """The header this rank sends with the round of communicator step ``step`` (int64, fixed length)."""

    @abstractmethod
    def incoming(self, peer: int, step: int, theirs: torch.Tensor, mine: torch.Tensor) -> None:
        """Check ``peer``'s header ``theirs`` of the round of ``step`` against this rank's ``mine``; raise to
        stop the run."""
