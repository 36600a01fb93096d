"""Per-step learning-rate schedule with a linear warm-up, for :class:`lightning_decent.recipes.common.RecipeModule`.

``warmup_decay`` takes the run's length (``total_steps``, ``steps_per_epoch``) from the module once
the trainer knows it; configs give the remaining arguments (``_partial_: true``). Warm-up and
milestones are in epochs (fractions allowed), as in the papers' recipes. The schedule is built from
``torch.optim.lr_scheduler``: ``SequentialLR`` of ``LinearLR`` (warm-up) and ``CosineAnnealingLR``,
``MultiStepLR`` or nothing (decay).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal

import torch
from torch.optim.lr_scheduler import ConstantLR, CosineAnnealingLR, LinearLR, LRScheduler, MultiStepLR, SequentialLR

DECAYS = ("cosine", "step", "none")


def warmup_decay(
    optimizer: torch.optim.Optimizer,
    *,
    total_steps: int,
    steps_per_epoch: int,
    warmup_epochs: float = 0.0,
    decay: Literal["cosine", "step", "none"] = "cosine",
    milestones: Sequence[float] = (),
    gamma: float = 0.1,
    final_lr_ratio: float = 0.0,
) -> LRScheduler:
    """Linear warm-up from ``lr / warmup_steps`` to the optimizer's lr over ``warmup_steps``, then a decay.

    Args:
        optimizer: the optimizer whose lr is scaled.
        total_steps: optimizer steps in the run.
        steps_per_epoch: optimizer steps per epoch.
        warmup_epochs: length of the linear warm-up.
        decay: ``"cosine"`` (to ``final_lr_ratio * lr`` at ``total_steps``), ``"step"`` (times
            ``gamma`` at every epoch in ``milestones``, which must not fall inside the warm-up) or ``"none"``.
        milestones: epochs of the step decay.
        gamma: factor of each step.
        final_lr_ratio: the cosine's final lr relative to the peak (all parameter groups must share the
            peak lr when it is not 0: ``CosineAnnealingLR`` takes one absolute minimum).
    """
    if decay not in DECAYS:
        raise ValueError(f"decay={decay!r} is not one of {', '.join(DECAYS)}.")
    warmup_steps = round(warmup_epochs * steps_per_epoch)
    if decay == "cosine":
        after: LRScheduler = CosineAnnealingLR(
            optimizer, T_max=max(1, total_steps - warmup_steps), eta_min=final_lr_ratio * _shared_lr(optimizer)
        )
    elif decay == "step":
        boundaries = [round(m * steps_per_epoch) for m in milestones]
        if any(b < warmup_steps for b in boundaries):
            raise ValueError(
                f"milestones={list(milestones)} fall inside the {warmup_epochs}-epoch warm-up; "
                "move them after it or shorten warmup_epochs."
            )
        after = MultiStepLR(optimizer, milestones=[b - warmup_steps for b in boundaries], gamma=gamma)
    else:
        after = ConstantLR(optimizer, factor=1.0, total_iters=0)
    if warmup_steps == 0:
        return after
    if warmup_steps == 1:  # the full lr for one step, then the decay starts
        warmup: LRScheduler = ConstantLR(optimizer, factor=1.0, total_iters=0)
    else:
        warmup = LinearLR(optimizer, start_factor=1.0 / warmup_steps, total_iters=warmup_steps - 1)
    return SequentialLR(optimizer, [warmup, after], milestones=[warmup_steps])


def _shared_lr(optimizer: torch.optim.Optimizer) -> float:
    """The initial lr of every parameter group, which must be the same."""
    lrs = {group.get("initial_lr", group["lr"]) for group in optimizer.param_groups}
    if len(lrs) > 1:
        raise ValueError(
            f"final_lr_ratio > 0 needs one lr for every parameter group (got {sorted(lrs)}); set final_lr_ratio=0."
        )
    return lrs.pop()
