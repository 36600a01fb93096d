"""Refuse keys that a command line adds (``+key=value``) but the application never reads.

Hydra's struct mode refuses a misspelt ``key=value``, and its error suggests ``+key=value``, which adds
the key; nothing would then read it (``+compression=int8`` trains without compression). A key added at
the top level must be one the application reads; one added to a node that is built from a ``_target_``
must be a parameter of that callable (unless it takes ``**kwargs``); one added to ``algorithm`` must be
an option of the algorithm. Anything else stops the run, naming the nearest existing key.
"""

from __future__ import annotations

import difflib
import inspect
from collections.abc import Iterable, Sequence
from importlib import resources
from typing import Any

from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.core.override_parser.types import OverrideType
from hydra.utils import get_object
from omegaconf import DictConfig, OmegaConf

CONFIG_MODULE = "lightning_decent.conf"

#: The top-level keys of ``train.yaml`` and its groups that the application reads.
APP_KEYS = frozenset(
    {
        "seed", "compare_with_ddp", "ckpt_path", "run_label", "test", "optimized_metric", "paths", "data",
        "model", "recipe", "topology", "algorithm", "optimizer", "trainer", "logger", "strategy", "callbacks",
    }
)  # fmt: skip


class UnknownKeyError(KeyError):
    """A key added on the command line that the application does not read."""

    def __str__(self) -> str:
        return str(self.args[0])


def _leaf_paths(node: Any, prefix: str = "") -> Iterable[str]:
    """The dotted path of every leaf of a plain (unresolved) config container."""
    for key, child in node.items():
        if isinstance(child, dict) and child:
            yield from _leaf_paths(child, f"{prefix}{key}.")
        else:
            yield f"{prefix}{key}"


def nearest_key(key: str, cfg: DictConfig) -> str | None:
    """The existing key whose last part (then whole path) is closest to ``key``'s, or None if none is close."""
    leaf = key.rpartition(".")[2]
    container = OmegaConf.to_container(cfg, resolve=False)
    paths = [p for p in _leaf_paths(container) if p != key and not p.startswith("hydra.")]
    scored = [
        (
            difflib.SequenceMatcher(None, leaf, p.rpartition(".")[2]).ratio(),
            difflib.SequenceMatcher(None, key, p).ratio(),
            p,
        )
        for p in paths
    ]
    best = max(scored, default=None)
    return best[2] if best is not None and best[0] >= 0.6 else None


def _accepted(cfg: DictConfig, parent: str) -> Sequence[str] | None:
    """The keys the node ``parent`` may hold, or None where anything may be added."""
    if parent == "":
        return sorted(APP_KEYS)
    if parent == "algorithm":
        from lightning_decent.algorithms import algorithm_options

        return ["name", *algorithm_options(cfg.algorithm.name)]
    node = OmegaConf.select(cfg, parent)
    if not isinstance(node, DictConfig) or "_target_" not in node:
        return None
    parameters = inspect.signature(get_object(node._target_)).parameters.values()
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in parameters):
        return None
    return [p.name for p in parameters]


def _is_group(name: str) -> bool:
    """Whether ``name`` is a config group of the application (``experiment``, ``callbacks``, ...)."""
    return resources.files(CONFIG_MODULE).joinpath(*name.split("/")).is_dir()


def check_added_keys(cfg: DictConfig, overrides: Sequence[str]) -> None:
    """Raise :class:`UnknownKeyError` for an added key (``+key=value``) that nothing reads.

    Args:
        cfg: the composed configuration.
        overrides: the command line's overrides (Hydra's ``overrides.task``).
    """
    for override in OverridesParser.create().parse_overrides(list(overrides)):
        if override.type not in (OverrideType.ADD, OverrideType.FORCE_ADD) or override.is_sweep_override():
            continue
        key = override.key_or_group
        if key.startswith("hydra.") or override.package is not None or _is_group(key):
            continue  # Hydra's own settings; +group=option composes a file of the group, not a key
        parent, _, name = key.rpartition(".")
        accepted = _accepted(cfg, parent)
        if accepted is None or name.startswith("_") or name in accepted:
            continue
        suggestion = nearest_key(key, cfg)
        value = override.input_line.partition("=")[2]
        hint = f" Did you mean {suggestion}? ({suggestion}={value})" if suggestion else ""
        where = f"'{parent}' does not take" if parent else "the application does not read"
        raise UnknownKeyError(
            f"{override.input_line}: {where} the key {name!r}, so it would be ignored.{hint} "
            f"Keys of {parent or 'the top level'}: {', '.join(accepted)}."
        )
