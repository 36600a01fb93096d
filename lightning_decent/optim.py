"""Optimizers and parameter grouping for decentralized training.

``AccumAdam`` is the accumulation trick of Wang & Johansson (the AccumAdam of decent-dp): a
per-step Adam update from temporary moments, while the persistent moments are refreshed only
every ``accum_iter`` steps from the gradient averaged over those steps. With gossip, each node's
single-step gradient is noisy and biased by its local data; moments built from an average over
several steps are closer to what a global-batch Adam would see.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from typing import Any

import torch
from torch import nn
from torch.optim import Optimizer


def weight_decay_groups(module: nn.Module) -> list[dict[str, Any]]:
    """Two optimizer parameter groups: weights decayed, biases and normalization parameters not.

    Every trainable parameter with at most one dimension (biases, BatchNorm/LayerNorm/GroupNorm
    scales and shifts) goes into a group with ``weight_decay=0``; matrices, convolution kernels and
    embeddings keep the optimizer's weight decay. (decent-dp 0.2.3 groups these the other way round.)
    """
    trainable = [p for p in module.parameters() if p.requires_grad]
    return [
        {"params": [p for p in trainable if p.ndim > 1]},
        {"params": [p for p in trainable if p.ndim <= 1], "weight_decay": 0.0},
    ]


class AccumAdam(Optimizer):
    r"""Adam with moments refreshed from gradients accumulated over ``accum_iter`` steps.

    For step ``t = 1, 2, ...`` with ``s = accum_iter`` and ``\hat t = \lceil t / s \rceil``::

        g   = grad + wd * x                      (L2; with decoupled_weight_decay: x <- x (1 - lr wd))
        b  += g / s                              (running average of this window's gradients)
        m_t = beta1 * m_hat + (1 - beta1) * g     (temporary moments; m_hat, v_hat persist)
        v_t = beta2 * v_hat + (1 - beta2) * g^2
        x  <- x - lr * (m_t / (1 - beta1^\hat t)) / (sqrt(v_t) / sqrt(1 - beta2^\hat t) + eps)
        if t mod s == 0:
            m_hat <- beta1 * m_hat + (1 - beta1) * b
            v_hat <- beta2 * v_hat + (1 - beta2) * b^2     (square of the averaged gradient)
            b <- 0

    What we implemented, reconciling the seed's algorithm box with decent-dp 0.2.3's
    ``accum_adam_foreach``: the box's v_hat refresh with beta1 is an OCR error (the code uses
    beta2, as here); the box omits weight decay, the code adds L2 decay to the gradient (AccumAdam)
    or decays the weights (AccumAdamW) — both offered here. ``accum_iter=1`` is exactly Adam.
    Memory: three buffers per parameter (m_hat, v_hat, b).

    Args:
        params: parameters or parameter groups.
        lr: step size.
        betas: ``(beta1, beta2)``.
        eps: added to the denominator.
        weight_decay: L2 coefficient (or decoupled, see below).
        accum_iter: ``s``, the number of steps whose gradients refresh the moments.
        decoupled_weight_decay: AdamW-style decay ``x <- x (1 - lr wd)`` instead of L2.
    """

    def __init__(
        self,
        params: Iterable[torch.Tensor] | Iterable[dict[str, Any]],
        lr: float = 1e-3,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float = 0.0,
        accum_iter: int = 4,
        decoupled_weight_decay: bool = False,
    ) -> None:
        if lr < 0 or eps < 0 or weight_decay < 0:
            raise ValueError(f"AccumAdam needs lr, eps, weight_decay >= 0; got {lr}, {eps}, {weight_decay}.")
        if not all(0.0 <= b < 1.0 for b in betas):
            raise ValueError(f"AccumAdam betas must be in [0, 1); got {betas}.")
        if int(accum_iter) != accum_iter or accum_iter < 1:
            raise ValueError(f"accum_iter must be a positive integer; got {accum_iter}.")
        defaults = {
            "lr": lr,
            "betas": tuple(betas),
            "eps": eps,
            "weight_decay": weight_decay,
            "accum_iter": int(accum_iter),
            "decoupled_weight_decay": decoupled_weight_decay,
        }
        super().__init__(params, defaults)

    @torch.no_grad()
    def step(self, closure: Any = None) -> Any:
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            by_step: dict[int, list[torch.Tensor]] = {}
            for p in group["params"]:
                if p.grad is not None:
                    by_step.setdefault(self._step_of(p), []).append(p)
            for params in by_step.values():
                self._update(group, params)
        return loss

    def _step_of(self, p: torch.Tensor) -> int:
        state = self.state[p]
        if not state:
            state.update(step=0, m_hat=torch.zeros_like(p), v_hat=torch.zeros_like(p), grad_sum=torch.zeros_like(p))
        return state["step"]

    def _update(self, group: dict[str, Any], params: list[torch.Tensor]) -> None:
        """One AccumAdam step for parameters that share the same step count (one foreach pass)."""
        beta1, beta2 = group["betas"]
        lr, eps, wd, s = group["lr"], group["eps"], group["weight_decay"], group["accum_iter"]
        states = [self.state[p] for p in params]
        step = states[0]["step"] + 1
        for state in states:
            state["step"] = step
        m_hat = [st["m_hat"] for st in states]
        v_hat = [st["v_hat"] for st in states]
        grad_sum = [st["grad_sum"] for st in states]
        grads = [p.grad for p in params]
        if wd != 0:
            if group["decoupled_weight_decay"]:
                torch._foreach_mul_(params, 1 - lr * wd)
            else:
                grads = torch._foreach_add(grads, params, alpha=wd)
        torch._foreach_add_(grad_sum, grads, alpha=1.0 / s)

        window = math.ceil(step / s)
        m = torch._foreach_mul(m_hat, beta1)
        torch._foreach_add_(m, grads, alpha=1 - beta1)
        v = torch._foreach_mul(v_hat, beta2)
        torch._foreach_addcmul_(v, grads, grads, value=1 - beta2)
        torch._foreach_sqrt_(v)
        torch._foreach_div_(v, math.sqrt(1 - beta2**window))
        torch._foreach_add_(v, eps)
        torch._foreach_addcdiv_(params, m, v, value=-lr / (1 - beta1**window))

        if step % s == 0:
            torch._foreach_mul_(m_hat, beta1)
            torch._foreach_add_(m_hat, grad_sum, alpha=1 - beta1)
            torch._foreach_mul_(v_hat, beta2)
            torch._foreach_addcmul_(v_hat, grad_sum, grad_sum, value=1 - beta2)
            torch._foreach_zero_(grad_sum)
