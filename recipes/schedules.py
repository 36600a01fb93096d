"""Per-step learning-rate schedule with a linear warm-up, for :class:`lightning_decent.recipes.common.RecipeModule`.

``warmup_decay`` takes the run's length (``total_steps``, ``steps_per_epoch``) from the module once
the trainer knows it; configs give the remaining arguments (``_partial_: true``). Warm-up and
milestones are in epochs (fractions allowed), as in the papers' recipes.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Literal

import torch
from torch.optim.lr_scheduler import LambdaLR

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
) -> LambdaLR:
    """Linear warm-up from ``lr / warmup_steps`` to the optimizer's lr, then a decay.

    Args:
        optimizer: the optimizer whose lr is scaled.
        total_steps: optimizer steps in the run.
        steps_per_epoch: optimizer steps per epoch.
        warmup_epochs: length of the linear warm-up.
        decay: ``"cosine"`` (to ``final_lr_ratio * lr`` at ``total_steps``), ``"step"`` (times
            ``gamma`` at every epoch in ``milestones``) or ``"none"``.
        milestones: epochs of the step decay.
        gamma: factor of each step.
        final_lr_ratio: the cosine's final lr relative to the peak.
    """
    if decay not in DECAYS:
        raise ValueError(f"decay={decay!r} is not one of {', '.join(DECAYS)}.")
    warmup_steps = round(warmup_epochs * steps_per_epoch)
    boundaries = [round(m * steps_per_epoch) for m in milestones]

    def factor(step: int) -> float:
        warm = min(1.0, (step + 1) / warmup_steps) if warmup_steps > 0 else 1.0
        if decay == "step":
            return warm * gamma ** sum(step >= b for b in boundaries)
        if decay == "none" or step < warmup_steps:
            return warm
        progress = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
        return final_lr_ratio + (1.0 - final_lr_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))

    return LambdaLR(optimizer, factor)
