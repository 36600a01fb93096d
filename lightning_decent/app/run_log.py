"""Route Lightning's log and Python warnings into the run's log (Hydra's console and ``train.log``), once.

Hydra configures the root logger (console and ``<run dir>/<job name>.log``) when the job starts. Lightning
gives its loggers console handlers of their own at import: ``lightning`` always (``INFO: ...`` on stderr),
``lightning.pytorch`` and ``lightning.fabric`` when the root logger has none yet, and then also stops
them from propagating. Either way a message reached the console twice or never reached the file.
Lightning has no option for this, so :func:`send_lightning_logs_to_root` removes those handlers.
"""

from __future__ import annotations

import logging

LIGHTNING_LOGGERS = ("lightning", "lightning.pytorch", "lightning.fabric")


def send_lightning_logs_to_root() -> None:
    """Let Lightning's loggers propagate to the root logger (Hydra's console and file handlers) without
    their own console handlers, and log warnings (``warnings.warn``, Lightning's ``rank_zero_warn``)
    through the standard library's ``py.warnings`` logger (:func:`logging.captureWarnings`)."""
    for name in LIGHTNING_LOGGERS:
        logger = logging.getLogger(name)
        for handler in list(logger.handlers):
            if type(handler) is logging.StreamHandler:  # the console handler Lightning added at import
                logger.removeHandler(handler)
        logger.propagate = True
    logging.captureWarnings(True)
