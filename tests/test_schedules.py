"""The recipes' learning-rate schedule (torch's SequentialLR of LinearLR and a decay) equals the
hand-written warm-up/decay formula it replaced."""

from __future__ import annotations

import math
from functools import partial

import pytest
import torch

from lightning_decent.recipes.schedules import warmup_decay


def previous_factor(step: int, total: int, per_epoch: int, warmup_epochs: float, decay: str, milestones=(),
                    gamma=0.1, final_lr_ratio=0.0) -> float:  # fmt: skip
    """The LambdaLR factor the recipes used before (kept here as the reference)."""
    warmup_steps = round(warmup_epochs * per_epoch)
    boundaries = [round(m * per_epoch) for m in milestones]
    warm = min(1.0, (step + 1) / warmup_steps) if warmup_steps > 0 else 1.0
    if decay == "step":
        return warm * gamma ** sum(step >= b for b in boundaries)
    if decay == "none" or step < warmup_steps:
        return warm
    progress = min(1.0, (step - warmup_steps) / max(1, total - warmup_steps))
    return final_lr_ratio + (1.0 - final_lr_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))


def lr_sequence(scheduler_factory, lr: float, steps: int) -> list[float]:
    weight = torch.nn.Parameter(torch.zeros(1))
    optimizer = torch.optim.SGD([{"params": [weight]}, {"params": [], "weight_decay": 0.0}], lr=lr)
    scheduler = scheduler_factory(optimizer)
    lrs = []
    for _ in range(steps):
        lrs.append(optimizer.param_groups[0]["lr"])
        assert optimizer.param_groups[1]["lr"] == lrs[-1]
        optimizer.step()
        scheduler.step()
    return lrs


@pytest.mark.parametrize(
    "case",
    [
        {"warmup_epochs": 5, "decay": "step", "milestones": (30, 60, 80)},  # ImageNet, Goyal et al.
        {"warmup_epochs": 5, "decay": "cosine"},  # ImageNet, cosine alternative
        {"warmup_epochs": 0.1, "decay": "step", "milestones": (16, 22)},  # detection
        {"warmup_epochs": 0.1, "decay": "cosine", "final_lr_ratio": 0.1},  # language model
        {"warmup_epochs": 0, "decay": "cosine"},
        {"warmup_epochs": 2, "decay": "none"},
        {"warmup_epochs": 0, "decay": "none"},
    ],
)
def test_the_schedule_equals_the_previous_formula(case: dict) -> None:
    per_epoch, epochs, lr = 10, 90, 0.4
    total = per_epoch * epochs
    new = lr_sequence(partial(warmup_decay, total_steps=total, steps_per_epoch=per_epoch, **case), lr, total)
    old = [lr * previous_factor(step, total, per_epoch, **case) for step in range(total)]
    assert new == pytest.approx(old, rel=1e-9, abs=1e-15)


def test_milestones_inside_the_warm_up_and_mixed_lrs_with_a_cosine_floor_are_refused() -> None:
    optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=0.1)
    with pytest.raises(ValueError, match="fall inside the 5-epoch warm-up"):
        warmup_decay(optimizer, total_steps=100, steps_per_epoch=10, warmup_epochs=5, decay="step", milestones=[3])
    groups = [{"params": [torch.nn.Parameter(torch.zeros(1))], "lr": lr} for lr in (0.1, 0.2)]
    with pytest.raises(ValueError, match="one lr for every parameter group"):
        warmup_decay(torch.optim.SGD(groups), total_steps=100, steps_per_epoch=10, final_lr_ratio=0.1)
