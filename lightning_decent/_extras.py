"""Optional dependencies: imported by the feature that needs them, with the install command when absent."""

from __future__ import annotations

import importlib
from types import ModuleType


class MissingExtraError(ModuleNotFoundError):
    """An optional dependency of a feature is not installed; the message names the extra that installs it."""


def require(module: str, extra: str, feature: str) -> ModuleType:
    """Import ``module`` for ``feature``, or raise :class:`MissingExtraError` naming ``extra``.

    Args:
        module: the module to import, e.g. ``"sklearn.datasets"``.
        extra: the ``lightning-decent[...]`` extra that installs it, e.g. ``"app"``.
        feature: what needs it, for the message, e.g. ``"the digits recipe"``.
    """
    try:
        return importlib.import_module(module)
    except ModuleNotFoundError as error:
        top_level = module.partition(".")[0]
        if error.name is None or error.name.partition(".")[0] != top_level:
            raise  # the module exists but one of its own imports failed
        raise MissingExtraError(
            f"{feature} needs the '{top_level}' module, which is not installed: "
            f"pip install 'lightning-decent[{extra}]'",
            name=error.name,
        ) from error
