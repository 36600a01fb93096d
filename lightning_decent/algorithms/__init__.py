"""What each node keeps and computes per step: D-SGD and the algorithms built on the same interface.

Build one by name with :func:`get_algorithm`; the modifiers ``global_average_every``,
``adaptive_global_average`` and ``gossip_rounds`` are accepted by every algorithm, except that
``push_diging`` and ``mg_push_diging`` take their gossip rounds as ``rounds=R`` (they refuse
``gossip_rounds``). ``choco`` (compressed gossip) takes none, and the local-steps family (``local_sgd``,
``diloco``, ``gasloc``) synchronises every ``H`` steps itself and takes none either. On directed
(column-stochastic) graphs use ``push_sum``, ``push_diging`` or ``mg_push_diging``; the other algorithms
need a doubly stochastic matrix.
"""

from __future__ import annotations

from typing import Any

from lightning_decent.algorithms.base import Algorithm, Bucket, require_plain_sgd
from lightning_decent.algorithms.choco import Choco
from lightning_decent.algorithms.ddp import DDP, all_reduce_baseline
from lightning_decent.algorithms.dsgd import DSGD
from lightning_decent.algorithms.error_feedback import ErrorFeedback, allocate_residuals
from lightning_decent.algorithms.exact_diffusion import ExactDiffusion
from lightning_decent.algorithms.gradient_tracking import GradientTracking
from lightning_decent.algorithms.gut import GUT, QGGUT
from lightning_decent.algorithms.local_steps import DiLoCo, GASLoC, LocalSGD, LocalSteps
from lightning_decent.algorithms.modifiers import MODIFIER_OPTIONS, Modified, with_modifiers
from lightning_decent.algorithms.push_sum import (
    PUSH_SUM_ALGORITHMS,
    MGPushDIGing,
    PushDIGing,
    PushSum,
    recommended_gossip_rounds,
)
from lightning_decent.algorithms.qg_dsgdm import QGDSGDm
from lightning_decent.registry import Registry

#: The registered algorithms by name; ``ALGORITHMS.aliases`` holds the short names (``d2``, ``ed``, ``gt``).
ALGORITHMS: Registry[Algorithm] = Registry(
    "algorithm",
    {
        "ddp": DDP,
        "dsgd": DSGD,
        "qg_dsgdm": QGDSGDm,
        "exact_diffusion": ExactDiffusion,
        "gradient_tracking": GradientTracking,
        "gut": GUT,
        "qg_gut": QGGUT,
        "push_sum": PushSum,
        "push_diging": PushDIGing,
        "mg_push_diging": MGPushDIGing,
        "local_sgd": LocalSGD,
        "diloco": DiLoCo,
        "gasloc": GASLoC,
        "choco": Choco,
    },
    aliases={"d2": "exact_diffusion", "ed": "exact_diffusion", "gt": "gradient_tracking"},
    shared_options=MODIFIER_OPTIONS,
)

#: Short names accepted by :func:`get_algorithm`.
ALIASES: dict[str, str] = ALGORITHMS.aliases


def algorithm_options(name: str) -> tuple[str, ...]:
    """The keyword options an algorithm name accepts (its own, then the modifiers')."""
    return ALGORITHMS.options(name)


def get_algorithm(name: str | Algorithm, **options: Any) -> Algorithm:
    """Build an algorithm by name, e.g. ``get_algorithm("gut", mu=0.9, global_average_every=8)``.

    ``options`` are the algorithm's own keyword arguments plus the modifiers of
    :class:`~lightning_decent.algorithms.modifiers.Modified`. An already built algorithm is returned
    as is, or wrapped when modifier options are given.
    """
    modifiers = {k: options.pop(k) for k in MODIFIER_OPTIONS if k in options}
    if isinstance(name, Algorithm):
        if options:
            raise ValueError(
                f"Options {sorted(options)} only apply to an algorithm given by name; build the Algorithm with "
                f"them (only the modifiers {', '.join(MODIFIER_OPTIONS)} can wrap a built algorithm)."
            )
        _check_modifiers(name, modifiers)
        return with_modifiers(name, **modifiers)
    algorithm = ALGORITHMS.build(name, **options)
    _check_modifiers(algorithm, modifiers)
    return with_modifiers(algorithm, **modifiers)


def _check_modifiers(algorithm: Algorithm, modifiers: dict[str, Any]) -> None:
    """Refuse modifier combinations that would be ambiguous.

    ``push_diging``/``mg_push_diging`` already repeat every exchange ``rounds`` times (and MG-Push-DIGing's
    recommended ``R`` is computed from the graph), so a second repetition factor is refused. Global
    averaging composes with every algorithm, push-sum included: averaging ``x`` and ``v`` together gives
    ``v = 1`` and ``z = x`` equal to the exact network average.
    """
    if isinstance(algorithm, Choco) and with_modifiers(algorithm, **modifiers) is not algorithm:
        raise ValueError(
            f"choco takes no modifiers (got {', '.join(sorted(modifiers))}): its neighbour sum "
            f"s_i = sum_j w_ij x_hat_j is updated by exactly one compressed round of the static W per step. Remove "
            f"global_average_every/adaptive_global_average/gossip_rounds, or use algorithm='dsgd' for them."
        )
    rounds = modifiers.get("gossip_rounds", 1)
    active = {key: value for key, value in modifiers.items() if value not in (None, False, 1)}
    if isinstance(algorithm, LocalSteps) and active:
        raise ValueError(
            f"{algorithm.name} synchronises every H steps itself; the modifiers {sorted(active)} do not apply to it. "
            f"Set its period with H=..., or use a per-step algorithm (dsgd) with them."
        )
    if isinstance(algorithm, PushDIGing) and rounds != 1:
        raise ValueError(
            f"{algorithm.name} takes its gossip rounds per exchange as rounds=R (got gossip_rounds={rounds!r}); "
            f"use get_algorithm({algorithm.name!r}, rounds={rounds!r}) instead."
        )


__all__ = [
    "ALGORITHMS",
    "ALIASES",
    "DDP",
    "DSGD",
    "GUT",
    "MODIFIER_OPTIONS",
    "PUSH_SUM_ALGORITHMS",
    "QGGUT",
    "Algorithm",
    "Bucket",
    "Choco",
    "DiLoCo",
    "ErrorFeedback",
    "ExactDiffusion",
    "GASLoC",
    "GradientTracking",
    "LocalSGD",
    "LocalSteps",
    "MGPushDIGing",
    "Modified",
    "PushDIGing",
    "PushSum",
    "QGDSGDm",
    "algorithm_options",
    "all_reduce_baseline",
    "allocate_residuals",
    "get_algorithm",
    "recommended_gossip_rounds",
    "require_plain_sgd",
    "with_modifiers",
]
