"""Callbacks of the training application: the throughput meter, the data split's label table."""

from __future__ import annotations

from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import Callback, ThroughputMonitor
from lightning.pytorch.utilities import rank_zero_info

from lightning_decent.data import LabelPartitionSampler, label_skew


def batch_size_of(batch: Any) -> int:
    """Samples in a batch: the length of its first element (images, token blocks, a tuple of images)."""
    if isinstance(batch, dict):
        batch = next(iter(batch.values()))
    return len(batch[0] if isinstance(batch, (tuple, list)) else batch)


def throughput_monitor(window: int = 10) -> ThroughputMonitor:
    """Lightning's ``ThroughputMonitor`` for any recipe's batches, logging ``train/samples_per_sec``,
    ``train/time`` (training seconds, validation excluded), ``train/samples`` and the per-device rates
    every ``log_every_n_steps`` steps, averaged over the last ``window`` batches (rank 0)."""
    return ThroughputMonitor(batch_size_fn=batch_size_of, window_size=window, separator="/")


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
        sampler = getattr(sampler, "sampler", sampler)  # a GroupedSampler reorders a partition's indices
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
