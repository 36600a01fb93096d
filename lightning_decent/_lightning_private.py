"""The private Lightning APIs lightning-decent relies on, imported and checked in one place.

Lightning may rename or remove private names in any release. Importing this module (the strategy
does) fails at once, naming the Lightning range the project is tested with, instead of failing in
the middle of a run. Keep :data:`TESTED_LIGHTNING` equal to the ``lightning`` requirement in
``pyproject.toml`` (a test checks it).
"""

from __future__ import annotations

import lightning
from lightning.pytorch import LightningModule
from lightning.pytorch.strategies import DDPStrategy

TESTED_LIGHTNING = ">=2.6,<2.7"


class UnsupportedLightningError(ImportError):
    """The installed Lightning lacks a private API lightning-decent relies on."""


def _unsupported(what: str) -> UnsupportedLightningError:
    return UnsupportedLightningError(
        f"lightning-decent needs {what}, which lightning {lightning.__version__} does not have. It is tested "
        f"with lightning{TESTED_LIGHTNING}: pip install 'lightning{TESTED_LIGHTNING}'"
    )


try:
    from lightning.fabric.utilities.distributed import _all_gather_ddp_if_available, _sync_ddp_if_available
    from lightning.fabric.utilities.optimizer import _optimizers_to_device
    from lightning.pytorch.loops.training_epoch_loop import _TrainingEpochLoop
    from lightning.pytorch.strategies.launchers.subprocess_script import _SubprocessScriptLauncher
    from lightning.pytorch.trainer.connectors.logger_connector import _LoggerConnector
except ImportError as error:
    raise _unsupported(f"'{error.name}.{getattr(error, 'name_from', '') or ''}' ({error})") from error


def check_attributes(owner: object, *names: str) -> None:
    """Raise :class:`UnsupportedLightningError` unless ``owner`` (a class or an instance) has every attribute."""
    cls = owner if isinstance(owner, type) else type(owner)
    for name in names:
        if not hasattr(owner, name):
            raise _unsupported(f"{cls.__module__}.{cls.__qualname__}.{name}")


# The epoch loop's per-batch broadcast of the SIGTERM flag, which the strategy replaces by a local check;
# the launcher's kill (a failed rank stops the processes it started); the hook name the strategy's logging
# checks (self.log is only allowed inside hooks); whether the loggers write this step (the strategy logs its
# byte counts only then); DDP's SyncBatchNorm setting, which the strategy refuses.
check_attributes(_TrainingEpochLoop, "_broadcast_sigterm_tensor")
check_attributes(_SubprocessScriptLauncher, "kill")
check_attributes(LightningModule(), "_current_fx_name")
check_attributes(_LoggerConnector, "should_update_logs")
check_attributes(DDPStrategy(), "_layer_sync")

__all__ = [
    "TESTED_LIGHTNING",
    "UnsupportedLightningError",
    "_SubprocessScriptLauncher",
    "_all_gather_ddp_if_available",
    "_optimizers_to_device",
    "_sync_ddp_if_available",
]
