"""The private Lightning APIs lightning-decent relies on, imported and checked in one place.

Lightning may rename or remove private names in any release. Importing this module (the strategy
does) fails at once, naming the Lightning range the project is tested with, instead of failing in
the middle of a run. Keep :data:`TESTED_LIGHTNING` equal to the ``lightning`` requirement in
``pyproject.toml`` (a test checks it).
"""

from __future__ import annotations

import contextlib
import signal
import subprocess
import time

import lightning
from lightning.pytorch import LightningModule, Trainer
from lightning.pytorch.strategies import DDPStrategy
from lightning.pytorch.utilities.exceptions import SIGTERMException

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
    from lightning.pytorch.trainer.connectors.checkpoint_connector import _CheckpointConnector
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
check_attributes(LightningModule(), "_current_fx_name", "_trainer")
check_attributes(_LoggerConnector, "should_update_logs")
check_attributes(DDPStrategy(), "_layer_sync")
check_attributes(_CheckpointConnector, "dump_checkpoint", "_restore_modules_and_callbacks")


def trainer_of(module: LightningModule | None) -> Trainer | None:
    """The trainer ``module`` is attached to, or ``None`` (``module.trainer`` raises when there is none)."""
    return None if module is None else module._trainer


def current_hook(module: LightningModule) -> str | None:
    """The Lightning hook running now (``self.log`` is only allowed inside one)."""
    return module._current_fx_name


def loggers_write_this_step(trainer: Trainer) -> bool:
    """Whether Lightning writes this step's ``on_step`` metrics to its loggers (``log_every_n_steps``)."""
    return trainer._logger_connector.should_update_logs


def make_sigterm_check_local(trainer: Trainer) -> None:
    """Replace the per-step world broadcast of Lightning's SIGTERM flag by a local check.

    Lightning (>= 2.5) broadcasts a SIGTERM flag from rank 0 before every training batch: a world-wide
    synchronisation per step that ties every rank to the slowest one and, when a rank hangs, blocks for the
    whole process-group timeout. Here each rank stops on its own SIGTERM; its neighbours then stop with an
    error naming it.
    """
    epoch_loop = trainer.fit_loop.epoch_loop

    def check_local_sigterm() -> None:
        if getattr(trainer, "received_sigterm", False):
            raise SIGTERMException()

    epoch_loop._broadcast_sigterm_tensor = check_local_sigterm


def live_checkpoint(trainer: Trainer) -> dict:
    """What ``Trainer.save_checkpoint`` would write now (model, optimizers, schedulers, loops, callbacks), in memory."""
    return trainer._checkpoint_connector.dump_checkpoint(weights_only=False)


def resume_from_checkpoint_in_memory(trainer: Trainer, checkpoint: dict) -> None:
    """Make the trainer restore ``checkpoint`` after the strategy's set-up, exactly as a ``ckpt_path`` given to
    ``fit`` is restored (model, callbacks, loops, optimizers and schedulers)."""
    trainer._checkpoint_connector._loaded_checkpoint = checkpoint


def stop_launched_ranks(launcher: object, grace_seconds: float) -> None:
    """Kill the ranks a popen launcher started on this node, after letting them report their own errors.

    Lightning leaves the processes it launched running when the launching rank fails; with gossip, a hung
    neighbour (the usual cause of a ``PeerTimeoutError``) would then never exit.
    """
    if not isinstance(launcher, _SubprocessScriptLauncher) or not getattr(launcher, "procs", None):
        return
    deadline = time.monotonic() + grace_seconds
    for proc in launcher.procs:
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(timeout=max(0.0, deadline - time.monotonic()))
    launcher.kill(signal.SIGKILL)


__all__ = [
    "TESTED_LIGHTNING",
    "UnsupportedLightningError",
    "_all_gather_ddp_if_available",
    "_optimizers_to_device",
    "_sync_ddp_if_available",
    "current_hook",
    "live_checkpoint",
    "loggers_write_this_step",
    "make_sigterm_check_local",
    "resume_from_checkpoint_in_memory",
    "stop_launched_ranks",
    "trainer_of",
]
