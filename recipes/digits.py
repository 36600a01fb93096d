"""The embedded default task: scikit-learn's handwritten digits (1,797 8x8 images) and a small CNN.

Nothing is downloaded: the images ship with scikit-learn, so this recipe runs on any laptop and
has no ``data.root``.
"""

from __future__ import annotations

from collections.abc import Sequence
from functools import partial

import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from lightning_decent._extras import require
from lightning_decent.data import Partition
from lightning_decent.recipes.classification import ImageClassifier
from lightning_decent.recipes.common import Config, OptimizerFactory, RecipeDataModule, ScheduleFactory


def load_digits_tensors() -> tuple[torch.Tensor, torch.Tensor]:
    """All 1,797 digits as ``[N, 1, 8, 8]`` float images in ``[0, 1]`` and integer labels."""
    data = require("sklearn.datasets", "app", "the digits recipe").load_digits()
    images = torch.tensor(data.images, dtype=torch.float32).unsqueeze(1) / 16.0
    return images, torch.tensor(data.target, dtype=torch.long)


class DigitsDataModule(RecipeDataModule):
    """A fixed, seeded train/validation split of the digits (360 validation images by default).

    Args:
        batch_size: per-rank batch size.
        val_size: number of held-out images.
        split_seed: seed of the split (the same on every rank).
        num_workers: ``DataLoader`` workers per rank.
        partition: the training split over ranks (default ``iid``).
    """

    def __init__(
        self,
        batch_size: int = 32,
        val_size: int = 360,
        split_seed: int = 0,
        num_workers: int = 0,
        partition: Partition | None = None,
    ) -> None:
        super().__init__(batch_size, num_workers, partition, eval_batch_size=256)
        self.val_size = val_size
        self.split_seed = split_seed
        self.train_set: TensorDataset | None = None
        self.val_set: TensorDataset | None = None

    def setup(self, stage: str | None = None) -> None:
        images, labels = load_digits_tensors()
        order = torch.randperm(len(labels), generator=torch.Generator().manual_seed(self.split_seed))
        val, train = order[: self.val_size], order[self.val_size :]
        self.train_set = TensorDataset(images[train], labels[train])
        self.val_set = TensorDataset(images[val], labels[val])

    def train_labels(self) -> Sequence[int]:
        assert self.train_set is not None
        return self.train_set.tensors[1]

    def train_dataloader(self) -> DataLoader:
        assert self.train_set is not None
        return self._train_loader(self.train_set)

    def val_dataloader(self) -> DataLoader:
        assert self.val_set is not None
        return self._eval_loader(self.val_set)

    def test_dataloader(self) -> DataLoader:
        return self.val_dataloader()


def digits_cnn(width: int = 32, hidden: int = 128) -> nn.Sequential:
    """Two 3x3 convolutions, a 2x2 max-pool and a two-layer classifier head for 8x8 digits."""
    return nn.Sequential(
        nn.Conv2d(1, width, 3, padding=1),
        nn.ReLU(),
        nn.Conv2d(width, 2 * width, 3, padding=1),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Flatten(),
        nn.Linear(2 * width * 16, hidden),
        nn.ReLU(),
        nn.Linear(hidden, 10),
    )


class DigitsClassifier(ImageClassifier):
    """Cross-entropy classification of the digits with accuracy from torchmetrics.

    Args:
        net: the network or its config (default: :func:`digits_cnn`).
        optimizer: a factory ``params -> Optimizer`` or its config (default SGD, lr 0.05, momentum 0.9).
        scheduler: an optional factory ``optimizer -> LRScheduler`` or its config, stepped every optimizer step.
    """

    def __init__(
        self,
        net: nn.Module | Config | None = None,
        optimizer: OptimizerFactory | Config | None = None,
        scheduler: ScheduleFactory | Config | None = None,
    ) -> None:
        super().__init__(
            net if net is not None else digits_cnn(),
            num_classes=10,
            optimizer=optimizer or partial(torch.optim.SGD, lr=0.05, momentum=0.9),
            scheduler=scheduler,
            top5=False,
            decay_bias_and_norm=True,
        )
