"""The outer optimizer of local-steps algorithms: a stock ``torch.optim`` optimizer on the flat anchors.

It is stepped with the pseudo-gradient ``Delta = a - x`` (the anchor minus the model after the local
steps) as the gradient of the anchor ``a``. ``torch.optim``'s updates are element-wise, so one
optimizer over the simulator's stacked ``[n, m]`` anchors is ``n`` independent ones.
"""

from __future__ import annotations

import torch

#: Outer optimizers by name: ``sgd`` (momentum optional), ``nesterov`` (SGD with Nesterov momentum,
#: DiLoCo's), ``adam`` and ``adamw`` (FedOpt's adaptive outer optimizers; ``momentum`` is their beta1).
OUTER_OPTIMIZERS = ("sgd", "nesterov", "adam", "adamw")


def check_outer_optimizer(name: str, lr: float, momentum: float) -> None:
    """Fail at construction, naming the fix, on an unknown name or a setting the optimizer refuses.

    Raises:
        ValueError: for an unknown name, ``lr <= 0``, ``momentum`` outside [0, 1), or ``nesterov``
            without momentum.
    """
    if name not in OUTER_OPTIMIZERS:
        raise ValueError(f"Unknown outer_optimizer={name!r}; valid: {', '.join(OUTER_OPTIMIZERS)}.")
    if not lr > 0:
        raise ValueError(f"outer_lr must be positive; got {lr!r}.")
    if not 0.0 <= momentum < 1.0:
        raise ValueError(f"outer_momentum must be in [0, 1); got {momentum!r}.")
    if name == "nesterov" and momentum == 0:
        raise ValueError("outer_optimizer='nesterov' needs outer_momentum > 0 (e.g. 0.9); else use 'sgd'.")


def build_outer_optimizer(name: str, params: list[torch.Tensor], lr: float, momentum: float) -> torch.optim.Optimizer:
    """The ``torch.optim`` optimizer ``name`` over ``params`` (anchor slices)."""
    check_outer_optimizer(name, lr, momentum)
    if name in ("sgd", "nesterov"):
        return torch.optim.SGD(params, lr=lr, momentum=momentum, nesterov=name == "nesterov")
    adam = torch.optim.Adam if name == "adam" else torch.optim.AdamW
    return adam(params, lr=lr, betas=(momentum, 0.999))


def outer_state_models(name: str, momentum: float) -> int:
    """Model-sized tensors the outer optimizer keeps per node (momentum buffer; Adam's two moments)."""
    if name in ("adam", "adamw"):
        return 2
    return 1 if momentum > 0 else 0
