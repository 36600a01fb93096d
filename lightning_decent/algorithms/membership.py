"""Network sums that a membership change restores with one global average over the new members.

After a member is lost, the survivors' share of a conserved sum is unknowable locally (the lost node
held the rest), but one exact average over the ``n'`` members restores it exactly: every member
adds the same correction, so the members' differences (what the algorithm has tracked so far) are
kept and only the network sum is set right. Both functions run on a rank's ``[m]`` buffers and on the
simulator's stacked ``[n', m]`` ones alike.
"""

from __future__ import annotations

import torch

from lightning_decent.comm import Communicator


@torch.no_grad()
def restore_sum(values: list[torch.Tensor], targets: list[torch.Tensor], comm: Communicator) -> None:
    """``v_i <- v_i + (1/n') sum_j (t_j - v_j)`` for every buffer: afterwards ``sum_i v_i = sum_i t_i``."""
    corrections = [torch.sub(target, value) for value, target in zip(values, targets)]
    comm.global_average(corrections)
    for value, correction in zip(values, corrections):
        value.add_(correction)


@torch.no_grad()
def remove_mean(values: list[torch.Tensor], comm: Communicator) -> None:
    """``v_i <- v_i - (1/n') sum_j v_j`` for every buffer: afterwards ``sum_i v_i = 0``."""
    means = [value.clone() for value in values]
    comm.global_average(means)
    for value, mean in zip(values, means):
        value.sub_(mean)
