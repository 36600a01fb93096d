"""Callbacks of the training application: throughput in the progress bar, the data split's label table."""

from __future__ import annotations

import time
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.fabric.utilities.throughput import Throughput
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.trainer.states import TrainerFn
from lightning.pytorch.utilities import rank_zero_info

from lightning_decent.data import LabelPartitionSampler, label_skew


def batch_size_of(batch: Any) -> int:
    """Samples in a batch: the length of its first element (images, token blocks, a tuple of images)."""
    if isinstance(batch, dict):
        batch = next(iter(batch.values()))
    return len(batch[0] if isinstance(batch, (tuple, list)) else batch)


class TrainingThroughput(Callback):
    """Global training samples per second: rolling in the progress bar and logs, averaged at the end.

    Validation time is excluded. The global rate is this rank's rate times the world size (every
    rank runs the same number of equal batches). After fit, :attr:`samples_per_s` and
    :attr:`train_time_s` hold the whole run's average and training time.

    Args:
        window: training batches in the rolling average shown in the progress bar.
    """

    def __init__(self, window: int = 10) -> None:
        self.window = window
        self.samples_per_s: float | None = None
        self.train_time_s: float | None = None
        self._meter: Throughput | None = None
        self._start = 0.0
        self._paused_since: float | None = None
        self._samples = 0
        self._batches = 0

    def _elapsed(self, trainer: pl.Trainer) -> float:
        if trainer.strategy.root_device.type == "cuda":
            torch.cuda.synchronize()
        return time.perf_counter() - self._start

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._meter = Throughput(window_size=self.window, world_size=trainer.world_size)
        self._start = time.perf_counter()
        self._samples = self._batches = 0

    def on_train_batch_end(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        assert self._meter is not None
        self._samples += batch_size_of(batch)
        self._batches += 1
        self._meter.update(time=self._elapsed(trainer), batches=self._batches, samples=self._samples)
        rate = self._meter.compute().get("samples_per_sec")
        if rate is not None:
            pl_module.log("train/samples_per_s", rate, prog_bar=True, on_step=True, on_epoch=False, batch_size=1)

    def on_validation_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if trainer.state.fn == TrainerFn.FITTING and not trainer.sanity_checking:
            self._paused_since = time.perf_counter()

    def on_validation_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self._paused_since is not None:
            self._start += time.perf_counter() - self._paused_since
            self._paused_since = None

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.train_time_s = self._elapsed(trainer)
        self.samples_per_s = self._samples * trainer.world_size / max(self.train_time_s, 1e-9)


def format_label_table(histograms: torch.Tensor, classes: Any, max_classes: int = 16) -> str:
    """A plain-text table, one row per rank, one column per class (the first ``max_classes``)."""
    more = ["..."] if len(classes) > max_classes else []
    header = ["rank", *(str(c) for c in classes[:max_classes]), *more, "total"]
    rows = [
        [str(rank), *(str(int(v)) for v in row[:max_classes]), *more, str(int(row.sum()))]
        for rank, row in enumerate(histograms)
    ]
    widths = [max(len(row[i]) for row in [header, *rows]) for i in range(len(header))]
    return "\n".join(" ".join(cell.rjust(w) for cell, w in zip(row, widths)) for row in [header, *rows])


class PartitionReport(Callback):
    """At the start of training, rank 0 prints and logs every rank's label histogram of a non-iid split.

    Does nothing for loaders without a :class:`~lightning_decent.data.LabelPartitionSampler`
    (an iid split uses Lightning's own ``DistributedSampler``). Logs the mean total-variation
    distance to the global label distribution as the metric ``data/label_skew`` and the table as
    hyper-parameters ``data_partition``.

    Args:
        max_classes: classes shown in the printed table.
    """

    def __init__(self, max_classes: int = 16) -> None:
        self.max_classes = max_classes

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        sampler = getattr(trainer.train_dataloader, "sampler", None)
        if not isinstance(sampler, LabelPartitionSampler):
            return
        gathered = trainer.strategy.all_gather(sampler.label_histogram().to(pl_module.device))
        histograms = gathered.reshape(trainer.world_size, -1).cpu()
        if not trainer.is_global_zero:
            return
        skew = label_skew(histograms)
        table = format_label_table(histograms, sampler.classes, self.max_classes)
        rank_zero_info(f"Training labels per rank ({sampler.scheme} split, label skew {skew:.3f}):\n{table}")
        for logger in trainer.loggers:
            logger.log_hyperparams(
                {
                    "data_partition": {
                        "scheme": sampler.scheme,
                        "label_skew": skew,
                        "classes": [int(c) for c in sampler.classes],
                        "histograms": {f"rank{r}": row.tolist() for r, row in enumerate(histograms)},
                    }
                }
            )
            logger.log_metrics({"data/label_skew": skew}, step=0)
