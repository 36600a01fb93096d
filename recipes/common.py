"""What every recipe shares: optimizer/schedule wiring, partition-aware loaders and data-root checks."""

from __future__ import annotations

import inspect
import math
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch
from hydra.utils import instantiate
from lightning.pytorch.utilities.parsing import collect_init_args
from torch.utils.data import DataLoader, Dataset, DistributedSampler

from lightning_decent.data import Partition
from lightning_decent.optim import weight_decay_groups
from lightning_decent.recipes.grouping import GroupedSampler

Config = Mapping[str, Any]
"""A plain Hydra config of an object, ``{"_target_": "torch.optim.SGD", "_partial_": True, "lr": 0.1}``."""

OptimizerFactory = Callable[..., torch.optim.Optimizer]
"""``params -> Optimizer``, e.g. ``functools.partial(torch.optim.SGD, lr=0.1)``."""

ScheduleFactory = Callable[..., torch.optim.lr_scheduler.LRScheduler]
"""``optimizer -> LRScheduler``, e.g. ``partial(StepLR, step_size=30)``. A factory whose signature names
``total_steps`` or ``steps_per_epoch`` also gets the run's length (see :mod:`lightning_decent.recipes.schedules`)."""

RUN_LENGTH_KEYWORDS = frozenset({"total_steps", "steps_per_epoch"})


class DataRootError(FileNotFoundError):
    """The data root is missing or does not have the layout the recipe reads."""


def require_paths(recipe: str, root: str | Path | None, layout: str, *relative: str) -> Path:
    """``root`` as a ``Path``, after checking that it and every ``root / r`` for ``r`` in ``relative`` exist.

    Args:
        recipe: the recipe's name, for the message.
        root: the data root from the config (``data.root``).
        layout: the expected directory layout, written for the user.
        relative: paths under ``root`` that must exist.

    Raises:
        DataRootError: naming the missing path and the expected layout.
    """
    if root is None or not Path(root).is_dir():
        raise DataRootError(
            f"{recipe}: data root {root!r} is not a directory. Pass data.root=/path/to/data with the layout\n{layout}"
        )
    missing = [str(Path(root) / r) for r in relative if not (Path(root) / r).exists()]
    if missing:
        raise DataRootError(f"{recipe}: {', '.join(missing)} not found. Expected the layout\n{layout}")
    return Path(root)


def build(value: Any) -> Any:
    """Instantiate a :data:`Config` (a mapping with ``_target_``) with Hydra; return anything else as it is."""
    return instantiate(value) if isinstance(value, Mapping) and "_target_" in value else value


def is_plain(value: Any) -> bool:
    """Whether ``value`` is plain data (numbers, strings, None, and lists/dicts of them) that
    ``torch.load(weights_only=True)`` reads back from a checkpoint's hyper-parameters."""
    if value is None or isinstance(value, (bool, int, float, str)):
        return True
    if isinstance(value, (list, tuple)):
        return all(is_plain(v) for v in value)
    if isinstance(value, Mapping):
        return all(isinstance(k, str) and is_plain(v) for k, v in value.items())
    return False


class RecipeModule(pl.LightningModule):
    """Base of the recipes' LightningModules: hyper-parameters, the optimizer and its per-step schedule.

    The constructor arguments of the recipe (this class and the subclass that calls it) are saved as
    hyper-parameters (``self.hparams``, the checkpoint's ``hyper_parameters``), so
    ``Recipe.load_from_checkpoint(path)`` rebuilds the module without arguments when they were plain
    data: the training application passes the network, optimizer and schedule as :data:`Config` s.
    Objects passed directly (an ``nn.Module``, a ``functools.partial``) are not saved (a checkpoint loaded
    with ``weights_only=True`` cannot hold them); pass them again to ``load_from_checkpoint``. Loading
    instantiates the ``_target_`` s a checkpoint names: load only checkpoints you trust.

    Args:
        optimizer: ``params -> Optimizer``, or its :data:`Config`.
        scheduler: an optional :data:`ScheduleFactory` (or its :data:`Config`), stepped after every
            optimizer step.
        decay_bias_and_norm: also apply the optimizer's weight decay to biases and norm weights
            (``False``: they form a second parameter group with ``weight_decay=0``).
    """

    def __init__(
        self,
        optimizer: OptimizerFactory | Config,
        scheduler: ScheduleFactory | Config | None = None,
        decay_bias_and_norm: bool = False,
    ) -> None:
        super().__init__()
        arguments: dict[str, Any] = {}
        for level in collect_init_args(inspect.currentframe(), [], classes=(RecipeModule,)):
            arguments.update(level)  # from this class out to the recipe that was constructed
        # The resolved Hydra config reaches the loggers from the application; logger=False avoids a second copy.
        self.save_hyperparameters(ignore=[k for k, v in arguments.items() if not is_plain(v)], logger=False)
        self.optimizer_factory: OptimizerFactory = build(optimizer)
        self.scheduler_factory: ScheduleFactory | None = build(scheduler)
        self.decay_bias_and_norm = decay_bias_and_norm

    def configure_optimizers(self) -> torch.optim.Optimizer | dict[str, Any]:
        params = self.parameters() if self.decay_bias_and_norm else weight_decay_groups(self)
        optimizer = self.optimizer_factory(params)
        if self.scheduler_factory is None:
            return optimizer
        scheduler = self._build_scheduler(optimizer)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}

    def _build_scheduler(self, optimizer: torch.optim.Optimizer) -> torch.optim.lr_scheduler.LRScheduler:
        assert self.scheduler_factory is not None
        wanted = RUN_LENGTH_KEYWORDS & set(inspect.signature(self.scheduler_factory).parameters)
        return self.scheduler_factory(optimizer, **{key: self._run_length()[key] for key in wanted})

    def _run_length(self) -> dict[str, int]:
        """The run's optimizer steps in total and per epoch (known once the trainer has seen the data)."""
        total_steps = int(self.trainer.estimated_stepping_batches)
        batches = self.trainer.num_training_batches
        per_epoch = total_steps if math.isinf(batches) else int(batches) // self.trainer.accumulate_grad_batches
        return {"total_steps": total_steps, "steps_per_epoch": max(1, per_epoch)}


class RecipeDataModule(pl.LightningDataModule):
    """Base of the recipes' DataModules: loaders, and the training split over ranks.

    With ``partition.scheme == "iid"`` the training loader shuffles and Lightning shards it with
    its own ``DistributedSampler``; otherwise every rank gets a
    :class:`~lightning_decent.data.LabelPartitionSampler` over the labels from :meth:`train_labels`.

    Args:
        batch_size: per-rank batch size.
        num_workers: ``DataLoader`` worker processes per rank.
        partition: the training split over ranks (default ``iid``).
        eval_batch_size: per-rank batch size of validation/test loaders (default ``batch_size``).
        pin_memory: page-locked batches for faster copies to the GPU (only used on CUDA).
    """

    def __init__(
        self,
        batch_size: int,
        num_workers: int = 0,
        partition: Partition | None = None,
        eval_batch_size: int | None = None,
        pin_memory: bool = True,
    ) -> None:
        super().__init__()
        self.batch_size = batch_size
        self.eval_batch_size = eval_batch_size or batch_size
        self.num_workers = num_workers
        self.partition = partition or Partition()
        self.pin_memory = pin_memory

    def train_labels(self) -> Sequence[int]:
        """One integer label per training sample (only needed by non-iid partitions)."""
        raise NotImplementedError(f"{type(self).__name__} has no labels, so data.partition.scheme must be iid.")

    def _loader_options(self) -> dict[str, Any]:
        on_cuda = self.trainer is not None and self.trainer.strategy.root_device.type == "cuda"
        return {
            "num_workers": self.num_workers,
            "persistent_workers": self.num_workers > 0,
            "pin_memory": self.pin_memory and on_cuda,
        }

    def _train_loader(
        self, dataset: Dataset, collate_fn: Callable | None = None, group_ids: Sequence[int] | None = None
    ) -> DataLoader:
        """The training loader; with ``group_ids``, batches of one group (:class:`GroupedSampler`)."""
        sampler: DistributedSampler | None = None
        if self.partition.scheme != "iid" or group_ids is not None:
            # Without a trainer this process is the only rank.
            world, rank = (self.trainer.world_size, self.trainer.global_rank) if self.trainer else (1, 0)
            if self.partition.scheme != "iid":
                sampler = self.partition.sampler(self.train_labels(), world, rank)
            else:
                sampler = DistributedSampler(dataset, num_replicas=world, rank=rank, seed=self.partition.seed)
            if group_ids is not None:
                sampler = GroupedSampler(sampler, group_ids, self.batch_size)
        return DataLoader(
            dataset,
            batch_size=self.batch_size,
            shuffle=sampler is None,
            sampler=sampler,
            collate_fn=collate_fn,
            **self._loader_options(),
        )

    def _eval_loader(self, dataset: Dataset, collate_fn: Callable | None = None) -> DataLoader:
        return DataLoader(dataset, batch_size=self.eval_batch_size, collate_fn=collate_fn, **self._loader_options())
