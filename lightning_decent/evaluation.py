"""The network-average model: what evaluation, the final model and ``average.ckpt`` see.

Every rank keeps its own replica ``x_i``; the model the run stands for is the network average
``x_bar = (1/n) sum_i w_i x_i`` (``w_i = 1``, except push-sum's de-biasing weights ``v_i``, which sum to ``n``).
This module computes it with bounded all-reduces, swaps it into a module for validation/test/predict and
back, and measures the consensus distance ``(1/n) sum_i ||x_i - x_bar||^2``. Nothing here knows Lightning's
hooks: the strategy calls it.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from lightning_decent.comm.collectives import BoundedCollectives
from lightning_decent.comm.p2p import average_all_reduce


def floating_tensors(state: dict[str, torch.Tensor]) -> list[torch.Tensor]:
    """The floating-point entries of a state dict (parameters and buffers such as BatchNorm statistics)."""
    return [t for t in state.values() if t.is_floating_point()]


@torch.no_grad()
def network_average(
    tensors: list[torch.Tensor],
    weight: float = 1.0,
    collectives: BoundedCollectives | None = None,
    what: str = "network average",
) -> list[torch.Tensor]:
    """``(1/n) sum_i weight_i t_i`` for every tensor, as new tensors: one all-reduce per dtype and device.

    ``weight`` is this rank's ``weight_i`` (push-sum's ``v_i``, which sum to ``n``; 1 otherwise). With
    ``collectives`` the all-reduces are bounded and a missing rank is named (``what`` names the average)."""
    groups: dict[tuple[torch.dtype, torch.device], list[int]] = {}
    for index, t in enumerate(tensors):
        groups.setdefault((t.dtype, t.device), []).append(index)
    out: list[torch.Tensor] = list(tensors)
    for indices in groups.values():
        members = [tensors[i].detach() for i in indices]
        flat = torch.cat([m.reshape(-1) for m in members])  # a copy, also of a single tensor
        if weight != 1.0:
            flat.mul_(weight)
        if collectives is None:
            average_all_reduce([flat])
        else:
            collectives.average([flat], what)
        for i, t in zip(indices, torch._utils._unflatten_dense_tensors(flat, members)):
            out[i] = t
    return out


def average_state_dict(
    state: dict[str, torch.Tensor], weight: float, collectives: BoundedCollectives, what: str = "checkpoint average"
) -> dict[str, torch.Tensor]:
    """``state`` with every floating-point entry replaced by its network average (integer entries as they are)."""
    if collectives.world_size == 1:
        return state
    keys = [k for k, t in state.items() if t.is_floating_point()]
    average = network_average([state[k] for k in keys], weight, collectives, what)
    return {**state, **dict(zip(keys, average))}


class AveragedReplica:
    """Swaps a module's parameters and floating-point buffers for their network average, and back.

    ``swap_in`` keeps a copy of the local replica (one model of memory while evaluating) and ``restore`` puts
    it back, so training continues from each rank's own ``x_i``.
    """

    def __init__(self) -> None:
        self._backup: list[tuple[torch.Tensor, torch.Tensor]] | None = None

    @property
    def swapped(self) -> bool:
        return self._backup is not None

    @torch.no_grad()
    def swap_in(self, module: torch.nn.Module, weight: float, collectives: BoundedCollectives) -> None:
        if self._backup is not None or collectives.world_size == 1:
            return
        tensors = floating_tensors(module.state_dict())
        averaged = network_average(tensors, weight, collectives, "network average of the model")
        self._backup = [(t, t.clone()) for t in tensors]
        torch._foreach_copy_(tensors, averaged)

    @torch.no_grad()
    def restore(self) -> None:
        if self._backup is None:
            return
        targets, backups = zip(*self._backup)
        torch._foreach_copy_(list(targets), list(backups))
        self._backup = None


@torch.no_grad()
def replace_by_average(module: torch.nn.Module, weight: float, collectives: BoundedCollectives) -> None:
    """Make ``module`` the network average for good (the final model of ``fit``)."""
    if collectives.world_size == 1:
        return
    tensors = floating_tensors(module.state_dict())
    torch._foreach_copy_(tensors, network_average(tensors, weight, collectives, "network average of the model"))


@torch.no_grad()
def consensus_distance(flats: list[torch.Tensor], collectives: BoundedCollectives) -> tuple[float, float]:
    """``(1/n) sum_i ||x_i - x_bar||^2`` over the flat buckets ``flats`` and its ratio to ``||x_bar||^2``
    (a bounded global collective)."""
    n = collectives.world_size
    if n == 1 or not flats:
        return 0.0, 0.0
    means = [x.clone() for x in flats]
    sums = torch.zeros(2, dtype=torch.float64, device=flats[0].device)

    def measure() -> None:
        average_all_reduce(means, collectives.group)
        for x, mean in zip(flats, means):
            sums[0] += (x - mean).double().pow(2).sum()
            sums[1] += mean.double().pow(2).sum() / n
        dist.all_reduce(sums, group=collectives.group)

    collectives.run("consensus measurement", measure)
    distance = sums[0].item() / n
    return distance, distance / max(sums[1].item(), torch.finfo(torch.float64).tiny)
