"""How bytes move: neighbour gossip, hierarchical gossip, global averaging, compressed payloads, and an
in-process simulator of n nodes."""

from lightning_decent.comm.allreduce import AllReduceCommunicator
from lightning_decent.comm.base import CommStats, Communicator, NonFiniteValueError
from lightning_decent.comm.compression import COMPRESSORS, Compressor, get_compressor
from lightning_decent.comm.hierarchical import HierarchicalCommunicator
from lightning_decent.comm.p2p import P2PCommunicator, PeerTimeoutError
from lightning_decent.comm.registry import COMMUNICATOR_REGISTRY, COMMUNICATORS
from lightning_decent.comm.simulated import SimulatedCommunicator

__all__ = [
    "COMMUNICATORS",
    "COMMUNICATOR_REGISTRY",
    "COMPRESSORS",
    "AllReduceCommunicator",
    "CommStats",
    "Communicator",
    "Compressor",
    "HierarchicalCommunicator",
    "NonFiniteValueError",
    "P2PCommunicator",
    "PeerTimeoutError",
    "SimulatedCommunicator",
    "get_compressor",
]
