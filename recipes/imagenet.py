"""ImageNet-1k (or any ImageFolder tree) with the standard ResNet training augmentation.

The model is a torchvision classifier (``torchvision.models.get_model``, ``weights=None``) inside
:class:`lightning_decent.recipes.classification.ImageClassifier`; see ``conf/recipe/imagenet.yaml``.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import torch
from torch.utils.data import DataLoader
from torchvision.datasets import ImageFolder
from torchvision.transforms import v2

from lightning_decent.data import Partition
from lightning_decent.recipes.common import DataRootError, RecipeDataModule, require_paths

MEAN = (0.485, 0.456, 0.406)
STD = (0.229, 0.224, 0.225)

LAYOUT = """\
  ROOT/train/<class>/<image>.JPEG   one folder per class (e.g. n01440764/), 1,281,167 images for ImageNet-1k
  ROOT/val/<class>/<image>.JPEG     the same class folders; ImageNet's 50,000 validation images must be
                                    sorted into them (torchvision.datasets.ImageNet or the usual valprep.sh do)"""


def train_transform(image_size: int) -> v2.Compose:
    """RandomResizedCrop, horizontal flip, normalisation (He et al. 2016; Goyal et al. 2017)."""
    return v2.Compose(
        [
            v2.RandomResizedCrop(image_size, antialias=True),
            v2.RandomHorizontalFlip(),
            v2.PILToTensor(),
            v2.ToDtype(torch.float32, scale=True),
            v2.Normalize(MEAN, STD),
        ]
    )


def eval_transform(image_size: int, resize: int) -> v2.Compose:
    """Resize the short side to ``resize``, center-crop ``image_size``, normalise."""
    return v2.Compose(
        [
            v2.Resize(resize, antialias=True),
            v2.CenterCrop(image_size),
            v2.PILToTensor(),
            v2.ToDtype(torch.float32, scale=True),
            v2.Normalize(MEAN, STD),
        ]
    )


class ImageNetDataModule(RecipeDataModule):
    """``ImageFolder`` train/val splits under ``root`` (see :data:`LAYOUT`).

    Args:
        root: the data root.
        num_classes: the number of class folders expected (1000 for ImageNet-1k).
        batch_size: per-rank batch size.
        image_size: training crop and validation center-crop size.
        val_resize: validation short-side resize before the center crop.
        num_workers: ``DataLoader`` workers per rank.
        partition: the training split over ranks (labels are the class folders).
        pin_memory: page-locked batches for faster copies to the GPU (only used on CUDA).
    """

    def __init__(
        self,
        root: str,
        num_classes: int = 1000,
        batch_size: int = 32,
        image_size: int = 224,
        val_resize: int = 256,
        num_workers: int = 8,
        partition: Partition | None = None,
        pin_memory: bool = True,
    ) -> None:
        super().__init__(batch_size, num_workers, partition, pin_memory=pin_memory)
        self.root = root
        self.num_classes = num_classes
        self.image_size = image_size
        self.val_resize = val_resize
        self.train_set: ImageFolder | None = None
        self.val_set: ImageFolder | None = None

    def setup(self, stage: str | None = None) -> None:
        root = require_paths("imagenet", self.root, LAYOUT, "train", "val")
        self.train_set = self._folder(root / "train", train_transform(self.image_size))
        self.val_set = self._folder(root / "val", eval_transform(self.image_size, self.val_resize))
        if self.train_set.classes != self.val_set.classes:
            raise DataRootError(
                f"imagenet: {root}/train and {root}/val have different class folders "
                f"({len(self.train_set.classes)} vs {len(self.val_set.classes)}). Expected the layout\n{LAYOUT}"
            )
        if len(self.train_set.classes) != self.num_classes:
            raise DataRootError(
                f"imagenet: found {len(self.train_set.classes)} class folders in {root}/train but "
                f"data.num_classes={self.num_classes}; set data.num_classes={len(self.train_set.classes)} "
                f"or point data.root at the full dataset."
            )

    @staticmethod
    def _folder(path: Path, transform: v2.Compose) -> ImageFolder:
        try:
            return ImageFolder(path, transform=transform)
        except FileNotFoundError as error:  # no class folders, or class folders without images
            raise DataRootError(f"imagenet: {error}. Expected the layout\n{LAYOUT}") from error

    def train_labels(self) -> Sequence[int]:
        assert self.train_set is not None
        return self.train_set.targets

    def train_dataloader(self) -> DataLoader:
        assert self.train_set is not None
        return self._train_loader(self.train_set)

    def val_dataloader(self) -> DataLoader:
        assert self.val_set is not None
        return self._eval_loader(self.val_set)
