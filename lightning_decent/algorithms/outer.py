"""The outer optimizer of local-steps algorithms: a stock ``torch.optim`` optimizer on the flat anchors.

It is stepped with the pseudo-gradient ``Delta = a - x`` (the anchor minus the model after the local
steps) as the gradient of the anchor ``a``. ``torch.optim``'s updates are element-wise, so one
optimizer over the simulator's stacked ``[n, m]`` anchors is ``n`` independent ones.
"""

from __future__ import annotations

import torch

#: Outer optimizers by name: ``sgd`` (momentum optional), ``nesterov`` (SGD with Nesterov momentum,
#: DiLoCo's), ``adam`` and ``adamw`` (FedOpt's adaptive outer optimizers; ``momentum`` is their beta1).
#: Weight decay is the ``weight_decay`` argument, 0 by default for every one of them: ``adamw`` does not keep
#: ``torch.optim.AdamW``'s 0.01, which would shrink the anchor by ``lr x 0.01`` per synchronisation even when
#: the pseudo-gradient is zero (0.7 % at DiLoCo's ``lr = 0.7``).
OUTER_OPTIMIZERS = ("sgd", "nesterov", "adam", "adamw")


def check_outer_optimizer(name: str, lr: float, momentum: float, weight_decay: float = 0.0) -> None:
    """Fail at construction, naming the fix, on an unknown name or a setting the optimizer refuses.

    Raises:
        ValueError: for an unknown name, ``lr <= 0``, ``momentum`` outside [0, 1), ``nesterov``
            without momentum, or a negative ``weight_decay``.
    """
    if name not in OUTER_OPTIMIZERS:
        raise ValueError(f"Unknown outer_optimizer={name!r}; valid: {', '.join(OUTER_OPTIMIZERS)}.")
    if not lr > 0:
        raise ValueError(f"outer_lr must be positive; got {lr!r}.")
    if not 0.0 <= momentum < 1.0:
        raise ValueError(f"outer_momentum must be in [0, 1); got {momentum!r}.")
    if name == "nesterov" and momentum == 0:
        raise ValueError("outer_optimizer='nesterov' needs outer_momentum > 0 (e.g. 0.9); else use 'sgd'.")
    if not weight_decay >= 0:
        raise ValueError(f"outer_weight_decay must be >= 0 (0: none); got {weight_decay!r}.")


def build_outer_optimizer(
    name: str, params: list[torch.Tensor], lr: float, momentum: float, weight_decay: float = 0.0
) -> torch.optim.Optimizer:
    """The ``torch.optim`` optimizer ``name`` over ``params`` (anchor slices), with ``weight_decay`` passed
    explicitly (SGD, Adam: L2 added to the pseudo-gradient; AdamW: decoupled, ``a <- a (1 - lr wd)``)."""
    check_outer_optimizer(name, lr, momentum, weight_decay)
    if name in ("sgd", "nesterov"):
        return torch.optim.SGD(params, lr=lr, momentum=momentum, nesterov=name == "nesterov", weight_decay=weight_decay)
    adam = torch.optim.Adam if name == "adam" else torch.optim.AdamW
    return adam(params, lr=lr, betas=(momentum, 0.999), weight_decay=weight_decay)


def outer_state_models(name: str, momentum: float) -> int:
    """Model-sized tensors the outer optimizer keeps per node (momentum buffer; Adam's two moments)."""
    if name in ("adam", "adamw"):
        return 2
    return 1 if momentum > 0 else 0
