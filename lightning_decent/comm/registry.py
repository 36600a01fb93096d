"""Communicators by name, like topologies, algorithms and compressors (``DecentralizedStrategy(communicator=...)``).

Every builder takes the graph, this rank and the strategy's settings: ``builder(topology, rank, *, timeout,
check_finite, collectives)``. Register another with ``COMMUNICATOR_REGISTRY.register(name, builder)``
(docs/extending.md).
"""

from __future__ import annotations

from datetime import timedelta

from lightning_decent.comm.allreduce import AllReduceCommunicator
from lightning_decent.comm.base import Communicator
from lightning_decent.comm.collectives import BoundedCollectives
from lightning_decent.comm.hierarchical import HierarchicalCommunicator
from lightning_decent.comm.p2p import P2PCommunicator
from lightning_decent.registry import Registry
from lightning_decent.topology import HierarchicalTopology, Topology


def point_to_point(
    topology: Topology, rank: int, *, timeout: timedelta, check_finite: bool, collectives: BoundedCollectives | None
) -> Communicator:
    """Neighbour-only messages; on a two-level topology the machine average first, then ``1/L`` of the model per
    rank between machines (``W_M (x) 11^T/L``, :class:`HierarchicalCommunicator`)."""
    if isinstance(topology, HierarchicalTopology):
        return HierarchicalCommunicator(
            topology, rank, timeout=timeout, check_finite=check_finite, collectives=collectives
        )
    return P2PCommunicator(topology, rank, timeout=timeout, check_finite=check_finite, collectives=collectives)


def all_reduce(
    topology: Topology, rank: int, *, timeout: timedelta, check_finite: bool, collectives: BoundedCollectives | None
) -> Communicator:
    """Exact averaging: every ``mix`` is the world's average (the DDP-equivalent baseline with D-SGD)."""
    del timeout  # a world-wide all-reduce is bounded by the collectives' own timeout
    return AllReduceCommunicator(topology, rank=rank, check_finite=check_finite, collectives=collectives)


COMMUNICATOR_REGISTRY: Registry[Communicator] = Registry(
    "communicator", {"p2p": point_to_point, "allreduce": all_reduce}, leading=2
)

#: Names accepted by ``DecentralizedStrategy(communicator=...)``.
COMMUNICATORS = COMMUNICATOR_REGISTRY.names()
