"""Route Lightning's log and Python warnings into the run's log file (``train.log``).

Hydra configures the root logger (console and ``<run dir>/<job name>.log``) when the job starts, but
Lightning, imported earlier, gave its ``lightning.pytorch`` and ``lightning.fabric`` loggers their own
console handler and stopped them from propagating to the root, so none of Lightning's messages
reached the file. :func:`send_lightning_logs_to_root` undoes that once Hydra's handlers are in place.
"""

from __future__ import annotations

import logging

LIGHTNING_LOGGERS = ("lightning.pytorch", "lightning.fabric")


def send_lightning_logs_to_root() -> None:
    """Let Lightning's loggers propagate to the root logger (Hydra's console and file handlers) and log
    warnings (``warnings.warn``, Lightning's ``rank_zero_warn``) through the ``py.warnings`` logger."""
    for name in LIGHTNING_LOGGERS:
        logger = logging.getLogger(name)
        for handler in list(logger.handlers):
            if type(handler) is logging.StreamHandler:  # the console handler Lightning added at import
                logger.removeHandler(handler)
        logger.propagate = True
    logging.captureWarnings(True)
