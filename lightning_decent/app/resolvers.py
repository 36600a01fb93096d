"""OmegaConf resolvers used by the configs in ``conf/``.

- ``${run_id:}``: a run's unique name, ``<date>_<time>_<6 hex digits>``. Two runs started in the
  same second get different names. The entry point stores it in ``LIGHTNING_DECENT_RUN_ID``
  before Hydra starts, so the ranks that Lightning's popen launcher re-executes (they inherit the
  environment) resolve the same name, also inside a ``-m`` sweep. Export the variable yourself to
  name a run, or to give every node of a multi-node job the same directory.
- ``${linear_scaled_lr:base_lr,batch_per_device,devices,num_nodes[,reference_batch]}``: the linear
  scaling rule ``base_lr * global_batch / reference_batch`` (Goyal et al. 2017).
- ``${options_of:${algorithm}}``: every key of a group but its ``name``, as a dict (the strategy's
  ``algorithm_options``), so that an algorithm's options are the keys of its group: ``algorithm.H=64``.
"""

from __future__ import annotations

import os
import secrets
from datetime import datetime
from typing import Any

from omegaconf import DictConfig, OmegaConf

RUN_ID_ENV = "LIGHTNING_DECENT_RUN_ID"


def new_run_id() -> str:
    """``YYYY-MM-DD_HH-MM-SS_xxxxxx``: sortable by start time, unique within a second."""
    return f"{datetime.now():%Y-%m-%d_%H-%M-%S}_{secrets.token_hex(3)}"


def run_id() -> str:
    """The current run's name: ``$LIGHTNING_DECENT_RUN_ID``, or a fresh one when it is unset."""
    return os.environ.get(RUN_ID_ENV) or new_run_id()


def _device_count(devices: Any) -> int:
    if isinstance(devices, int) and devices > 0:
        return devices
    if isinstance(devices, (list, tuple)) or OmegaConf.is_list(devices):
        return len(devices)
    if isinstance(devices, str) and devices.strip().isdigit():
        return int(devices)
    if devices in (-1, "-1", "auto"):
        import torch  # here, so that composing a config (--cfg job, --help) does not load torch

        return max(torch.cuda.device_count(), 1)
    raise ValueError(
        f"linear_scaled_lr cannot count trainer.devices={devices!r}; set trainer.devices to a number "
        f"or set optimizer.lr explicitly."
    )


def linear_scaled_lr(
    base_lr: float, batch_per_device: int, devices: Any, num_nodes: int, reference_batch: int = 256
) -> float:
    """``base_lr * batch_per_device * devices * num_nodes / reference_batch``."""
    return float(base_lr) * int(batch_per_device) * _device_count(devices) * int(num_nodes) / int(reference_batch)


def options_of(node: DictConfig) -> dict[str, Any]:
    """The resolved keys of ``node`` except ``name``."""
    options = OmegaConf.to_container(node, resolve=True)
    assert isinstance(options, dict)
    return {key: value for key, value in options.items() if key != "name"}


def register_resolvers() -> None:
    """Register the resolvers (idempotent; called when ``lightning_decent.train`` is imported)."""
    OmegaConf.register_new_resolver("run_id", run_id, replace=True)
    OmegaConf.register_new_resolver("linear_scaled_lr", linear_scaled_lr, replace=True)
    OmegaConf.register_new_resolver("options_of", options_of, replace=True)
