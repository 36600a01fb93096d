"""What each node keeps and computes per step: D-SGD and the algorithms built on the same interface."""

from __future__ import annotations

from typing import Any

from lightning_decent.algorithms.base import Algorithm, Bucket
from lightning_decent.algorithms.dsgd import DSGD

ALGORITHMS: dict[str, type[Algorithm]] = {
    "dsgd": DSGD,
}


def get_algorithm(name: str | Algorithm, **options: Any) -> Algorithm:
    """Build an algorithm by name (or return an already built one unchanged)."""
    if isinstance(name, Algorithm):
        if options:
            raise ValueError("Algorithm options are only accepted together with an algorithm name.")
        return name
    key = name.replace("-", "_").lower()
    if key not in ALGORITHMS:
        raise ValueError(f"Unknown algorithm {name!r}. Valid names: {', '.join(sorted(ALGORITHMS))}.")
    return ALGORITHMS[key](**options)


__all__ = ["ALGORITHMS", "DSGD", "Algorithm", "Bucket", "get_algorithm"]
