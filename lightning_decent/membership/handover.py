"""State hand-over to a joiner: a neighbour sends its live checkpoint, the joiner resumes from it.

A process that joins a running job needs what a resume needs: the model, the optimizer and LR-scheduler
states, Lightning's loop progress (epoch and global step) and the algorithm's state. Its *donor* sends all of it
as one Lightning checkpoint, taken at the start of an epoch (the change point for joins), so the joiner resumes
exactly as from a checkpoint saved there and runs the same epoch as everyone else.

The donor is the joiner's first in-neighbour in the new graph that was a member before (its replica is one the
joiner will gossip with anyway, so the joiner starts close to its neighbourhood's average), else the lowest
ranked old member. A neighbour rather than the network average: the average needs a world-wide all-reduce of
the model and of the optimizer state, and the average of the optimizer states is not the state of any optimizer.
"""

from __future__ import annotations

import io
import logging
from collections.abc import Callable
from typing import Any

import torch
import torch.distributed as dist

from lightning_decent.topology import Topology

log = logging.getLogger(__name__)


def hand_over(
    joined: list[int], topology: Topology, rank: int, step: int, live_state: Callable[[], dict[str, Any]]
) -> tuple[dict[str, Any], int]:
    """Every donor sends ``live_state()`` to its joiners of this epoch; a joiner returns (what it received, its
    bytes), every other member ``({}, 0)``."""
    received: tuple[dict[str, Any], int] = ({}, 0)
    for joiner in joined:
        donor = donor_of(joiner, joined, topology, step)
        if rank == donor:
            send_state(live_state(), joiner)
        elif rank == joiner:
            received = receive_state(donor)
            log.warning(f"rank {joiner}: received {received[1]} bytes of state from rank {donor}")
    return received


def donor_of(joiner: int, joined: list[int], topology: Topology, step: int) -> int:
    """The member that hands ``joiner`` its state: its first in-neighbour at ``step`` that is not new."""
    old = [r for r in range(topology.n) if r not in joined]
    if not old:
        raise ValueError("a membership epoch of joiners only has no member to hand over the state.")
    neighbours = [r for r, _ in topology.in_neighbors(joiner, step) if r in old and r != joiner]
    return neighbours[0] if neighbours else old[0]


def send_state(state: dict[str, Any], joiner: int) -> int:
    """Send ``state`` (a checkpoint dict) to ``joiner`` over the current process group; returns its bytes."""
    buffer = io.BytesIO()
    torch.save(state, buffer)
    payload = torch.frombuffer(bytearray(buffer.getvalue()), dtype=torch.uint8)
    dist.send(torch.tensor([payload.numel()], dtype=torch.int64), joiner)
    dist.send(payload, joiner)
    return payload.numel()


def receive_state(donor: int) -> tuple[dict[str, Any], int]:
    """Receive the checkpoint dict ``donor`` sends; returns it and its size in bytes."""
    size = torch.zeros(1, dtype=torch.int64)
    dist.recv(size, donor)
    payload = torch.empty(int(size.item()), dtype=torch.uint8)
    dist.recv(payload, donor)
    # A member of the same run wrote it (hyper-parameters may be any picklable object, as in a checkpoint).
    state = torch.load(io.BytesIO(payload.numpy().tobytes()), map_location="cpu", weights_only=False)
    return state, payload.numel()
