"""The communicator interface: the only place where nodes exchange data."""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Sequence
from dataclasses import asdict, dataclass

import torch

from lightning_decent.topology import Topology


@dataclass
class CommStats:
    """Messages and bytes this rank sent and received (payload bytes, not counting protocol overhead)."""

    messages_sent: int = 0
    bytes_sent: int = 0
    messages_received: int = 0
    bytes_received: int = 0

    def as_dict(self) -> dict[str, int]:
        return asdict(self)

    def reset(self) -> None:
        self.messages_sent = self.bytes_sent = self.messages_received = self.bytes_received = 0


def nbytes(t: torch.Tensor) -> int:
    return t.numel() * t.element_size()


class Communicator(ABC):
    """Mixes buffers with the neighbours of a topology and averages them over the whole network.

    ``mix`` is the gossip primitive of every algorithm: after it, this node's buffer is
    ``sum_j W[i, j](step) * x_j``. Buffers given together in one call travel in the same round.
    """

    def __init__(self, topology: Topology) -> None:
        self.topology = topology
        self.stats = CommStats()

    @abstractmethod
    def mix(self, buffers: Sequence[torch.Tensor], step: int) -> None:
        """In place, for every buffer: ``x_i <- sum_j W[i, j](step) x_j``."""

    @abstractmethod
    def global_average(self, buffers: Sequence[torch.Tensor]) -> None:
        """In place, for every buffer: ``x_i <- (1/n) sum_j x_j`` (a collective over all nodes)."""
