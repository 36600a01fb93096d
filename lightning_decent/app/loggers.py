"""The loggers of ``conf/logger/``: built with the install command of a missing extra, and MLflow's file store."""

from __future__ import annotations

import os
from typing import Any

from hydra.utils import instantiate
from lightning.pytorch.loggers import Logger, MLFlowLogger
from omegaconf import DictConfig

from lightning_decent._extras import require

FILE_STORE_OPT_IN = "MLFLOW_ALLOW_FILE_STORE"

#: ``_target_`` of a logger config -> (the module it needs, the ``lightning-decent[...]`` extra that installs it).
LOGGER_EXTRAS: dict[str, tuple[str, str]] = {
    "lightning.pytorch.loggers.TensorBoardLogger": ("tensorboard", "tensorboard"),
    "lightning.pytorch.loggers.WandbLogger": ("wandb", "wandb"),
    "lightning_decent.app.loggers.mlflow_logger": ("mlflow", "mlflow"),
}


def instantiate_loggers(group: DictConfig | None) -> list[Logger]:
    """Every non-null logger of the ``logger`` group; a logger whose package is missing stops the run with
    ``pip install 'lightning-decent[<extra>]'`` (Lightning's own hint names its package, not the extra)."""
    loggers = []
    for name, node in (group or {}).items():
        if node is None:
            continue
        if node._target_ in LOGGER_EXTRAS:
            module, extra = LOGGER_EXTRAS[node._target_]
            require(module, extra, f"logger={name}")
        loggers.append(instantiate(node))
    return loggers


def mlflow_logger(tracking_uri: str, **kwargs: Any) -> MLFlowLogger:
    """Lightning's ``MLFlowLogger``; a local file store (``file:<dir>``) also works with MLflow >= 3.7.

    MLflow 3.7 put its file-system store in maintenance mode and refuses it unless
    ``MLFLOW_ALLOW_FILE_STORE=true``. A run directory on any machine, without a server or a database,
    is what the default config asks for, so this opts in for ``file:`` URIs (an explicit setting of the
    variable is kept). Pass a server URL or ``sqlite:///...`` for anything else.
    """
    if tracking_uri.startswith("file:"):
        os.environ.setdefault(FILE_STORE_OPT_IN, "true")
    return MLFlowLogger(tracking_uri=tracking_uri, **kwargs)
