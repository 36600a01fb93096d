"""Logger factories for the configs in ``conf/logger/`` where Lightning's class alone does not do."""

from __future__ import annotations

import os
from typing import Any

from lightning.pytorch.loggers import MLFlowLogger

FILE_STORE_OPT_IN = "MLFLOW_ALLOW_FILE_STORE"


def mlflow_logger(tracking_uri: str, **kwargs: Any) -> MLFlowLogger:
    """Lightning's ``MLFlowLogger``; a local file store (``file:<dir>``) also works with MLflow >= 3.7.

    MLflow 3.7 put its file-system store in maintenance mode and refuses it unless
    ``MLFLOW_ALLOW_FILE_STORE=true``. A run directory on any machine, without a server or a database,
    is what the default config asks for, so this opts in for ``file:`` URIs (an explicit setting of the
    variable is kept). Pass a server URL or ``sqlite:///...`` (full ``mlflow`` package) for anything else.
    """
    if tracking_uri.startswith("file:"):
        os.environ.setdefault(FILE_STORE_OPT_IN, "true")
    return MLFlowLogger(tracking_uri=tracking_uri, **kwargs)
