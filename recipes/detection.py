"""Object detection on COCO or Pascal VOC with torchvision's RetinaNet / Faster R-CNN, mAP from torchmetrics.

Defaults follow torchvision's detection reference: the network comes from
``torchvision.models.get_model`` (``retinanet_resnet50_fpn`` or ``fasterrcnn_resnet50_fpn``) with an
ImageNet-pretrained ResNet-50 backbone (``weights_backbone``, which also makes torchvision freeze its
BatchNorm layers and train only the last three stages), images batched by aspect ratio (group factor
3). The model resizes and normalises images itself (``min_size``/``max_size``), so the data pipeline
only converts and flips. Detection batches are lists of differently sized images and per-image target dicts.
"""

from __future__ import annotations

import json
import xml.etree.ElementTree as ET
from collections import Counter
from collections.abc import Sequence
from typing import Any, Literal

import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset
from torchmetrics.detection import MeanAveragePrecision
from torchvision import tv_tensors
from torchvision.datasets import CocoDetection, VOCDetection, wrap_dataset_for_transforms_v2
from torchvision.models import get_model
from torchvision.transforms import v2
from torchvision.transforms.v2 import functional as F

from lightning_decent.data import Partition
from lightning_decent.recipes.common import (
    Config,
    DataRootError,
    OptimizerFactory,
    RecipeDataModule,
    RecipeModule,
    ScheduleFactory,
    build,
    require_paths,
)
from lightning_decent.recipes.grouping import aspect_ratio_groups

VOC_CLASSES = (
    "aeroplane", "bicycle", "bird", "boat", "bottle", "bus", "car", "cat", "chair", "cow", "diningtable",
    "dog", "horse", "motorbike", "person", "pottedplant", "sheep", "sofa", "train", "tvmonitor",
)  # fmt: skip

COCO_LAYOUT = """\
  ROOT/annotations/instances_<split>.json   COCO detection annotations (e.g. instances_train2017.json)
  ROOT/<split>/<file_name>                  the images named in the json (e.g. ROOT/train2017/000000000009.jpg)
with <split> = data.train_split (train2017) and data.val_split (val2017)"""

VOC_LAYOUT = """\
  ROOT/VOCdevkit/VOC<year>/Annotations/<id>.xml             one Pascal VOC xml per image
  ROOT/VOCdevkit/VOC<year>/JPEGImages/<id>.jpg
  ROOT/VOCdevkit/VOC<year>/ImageSets/Main/<split>.txt       image ids, one per line
with <year> = data.year (2012) and <split> = data.train_split (train) / data.val_split (val)"""

DEFAULT_SPLITS = {"coco": ("train2017", "val2017"), "voc": ("train", "val")}

Target = dict[str, Any]
Batch = tuple[tuple[torch.Tensor, ...], tuple[Target, ...]]


def collate_detection(samples: Sequence[tuple[torch.Tensor, Target]]) -> Batch:
    """A batch of detection samples as ``(images, targets)`` tuples (images keep their own sizes)."""
    images, targets = zip(*samples)
    return tuple(images), tuple(targets)


def _ensure_boxes(image: Any, target: Target) -> tuple[Any, Target]:
    """Give an image without annotations an empty box list (torchvision's COCO wrapper omits it)."""
    if "boxes" in target:
        return image, target
    empty = tv_tensors.BoundingBoxes(torch.zeros(0, 4), format="XYXY", canvas_size=tuple(F.get_size(image)))
    return image, {**target, "boxes": empty, "labels": torch.zeros(0, dtype=torch.int64)}


def detection_transform(train: bool) -> v2.Compose:
    """To float tensors, a random horizontal flip for training, degenerate boxes removed."""
    steps: list[Any] = [_ensure_boxes, v2.ToImage()]
    if train:
        steps.append(v2.RandomHorizontalFlip())
    steps += [v2.ToDtype(torch.float32, scale=True), v2.SanitizeBoundingBoxes(), v2.ToPureTensor()]
    return v2.Compose(steps)


def _dominant(labels: Sequence[int]) -> int:
    """The most frequent label of an image (ties: the smallest), 0 for an image without objects."""
    if not labels:
        return 0
    counts = Counter(labels)
    return min(counts, key=lambda label: (-counts[label], label))


class WeightsUnavailableError(RuntimeError):
    """Pretrained weights named in the config could be neither found in torch's cache nor downloaded."""


def detection_model(
    name: str, weights: str | None = None, weights_backbone: str | None = None, **kwargs: Any
) -> nn.Module:
    """``torchvision.models.get_model(name, weights=..., weights_backbone=..., **kwargs)``, with a message
    naming the overrides when pretrained weights are neither in torch's cache nor downloadable."""
    try:
        return get_model(name, weights=weights, weights_backbone=weights_backbone, **kwargs)
    except OSError as error:  # urllib's URLError when offline
        raise WeightsUnavailableError(
            f"detection: the pretrained weights (weights={weights!r}, weights_backbone={weights_backbone!r}) are not "
            f"in {torch.hub.get_dir()}/checkpoints and could not be downloaded ({error}). Copy the file there, or "
            "train from scratch with model.net.weights_backbone=null (and model.net.weights=null); without a "
            "pretrained backbone torchvision also trains its BatchNorm layers."
        ) from error


class DetectionDataModule(RecipeDataModule):
    """COCO (``dataset="coco"``) or Pascal VOC (``dataset="voc"``) detection data.

    For a non-iid ``partition`` an image's label is its most frequent object class. With
    ``aspect_ratio_group_factor`` set, each training batch holds images of one aspect-ratio group
    (:mod:`lightning_decent.recipes.grouping`).

    Args:
        root: the data root (see :data:`COCO_LAYOUT` and :data:`VOC_LAYOUT`).
        dataset: ``"coco"`` or ``"voc"``.
        year: the VOC year (``"2007"`` or ``"2012"``).
        train_split: COCO image folder / VOC image set for training (default train2017 / train).
        val_split: the same for validation (default val2017 / val).
        batch_size: images per rank and step.
        num_workers: ``DataLoader`` workers per rank.
        partition: the training split over ranks.
        aspect_ratio_group_factor: ``k`` of :func:`~lightning_decent.recipes.grouping.aspect_ratio_groups`
            (``None``: batches of any shapes).
    """

    def __init__(
        self,
        root: str,
        dataset: Literal["coco", "voc"] = "coco",
        year: str = "2012",
        train_split: str | None = None,
        val_split: str | None = None,
        batch_size: int = 2,
        num_workers: int = 4,
        partition: Partition | None = None,
        aspect_ratio_group_factor: int | None = 3,
    ) -> None:
        super().__init__(batch_size, num_workers, partition)
        self.aspect_ratio_group_factor = aspect_ratio_group_factor
        if dataset not in DEFAULT_SPLITS:
            raise ValueError(f"data.dataset={dataset!r} is not one of {', '.join(DEFAULT_SPLITS)}.")
        self.root = root
        self.dataset = dataset
        self.year = str(year)
        self.train_split = train_split or DEFAULT_SPLITS[dataset][0]
        self.val_split = val_split or DEFAULT_SPLITS[dataset][1]
        self.train_set: Dataset | None = None
        self.val_set: Dataset | None = None
        self._raw_train: CocoDetection | VOCDetection | None = None

    def setup(self, stage: str | None = None) -> None:
        build = self._coco if self.dataset == "coco" else self._voc
        self._raw_train = build(self.train_split)
        self.train_set = wrap_dataset_for_transforms_v2(self._raw_train)
        self.train_set.transforms = detection_transform(train=True)
        self.val_set = wrap_dataset_for_transforms_v2(build(self.val_split))
        self.val_set.transforms = detection_transform(train=False)

    def _coco(self, split: str) -> CocoDetection:
        annotations = f"annotations/instances_{split}.json"
        root = require_paths("detection (coco)", self.root, COCO_LAYOUT, annotations, split)
        try:
            dataset = CocoDetection(str(root / split), str(root / annotations))
        except (json.JSONDecodeError, KeyError, TypeError, IndexError) as error:
            raise DataRootError(
                f"detection (coco): {root / annotations} is not a COCO annotation file ({error!r}). "
                f"Expected the layout\n{COCO_LAYOUT}"
            ) from error
        if len(dataset) == 0:
            raise DataRootError(f"detection (coco): {root / annotations} lists no images. Expected\n{COCO_LAYOUT}")
        return dataset

    def _voc(self, split: str) -> VOCDetection:
        base = f"VOCdevkit/VOC{self.year}"
        root = require_paths(
            "detection (voc)",
            self.root,
            VOC_LAYOUT,
            f"{base}/Annotations",
            f"{base}/JPEGImages",
            f"{base}/ImageSets/Main/{split}.txt",
        )
        return VOCDetection(str(root), year=self.year, image_set=split, download=False)

    def train_labels(self) -> Sequence[int]:
        raw = self._raw_train
        if isinstance(raw, CocoDetection):
            return [_dominant(self._coco_classes(raw, image_id)) for image_id in raw.ids]
        assert isinstance(raw, VOCDetection)
        return [_dominant(self._voc_classes(path)) for path in raw.annotations]

    def train_aspect_ratios(self) -> list[float]:
        """Width / height of every training image, from the annotations (no image is opened)."""
        raw = self._raw_train
        if isinstance(raw, CocoDetection):
            return [raw.coco.imgs[i]["width"] / raw.coco.imgs[i]["height"] for i in raw.ids]
        assert isinstance(raw, VOCDetection)
        sizes = [ET.parse(path).find("size") for path in raw.annotations]
        return [float(size.findtext("width")) / float(size.findtext("height")) for size in sizes]

    @staticmethod
    def _coco_classes(dataset: CocoDetection, image_id: int) -> list[int]:
        return [a["category_id"] for a in dataset.coco.imgToAnns[image_id] if not a.get("iscrowd", 0)]

    @staticmethod
    def _voc_classes(path: str) -> list[int]:
        names = [obj.findtext("name") for obj in ET.parse(path).iter("object")]
        unknown = sorted({str(n) for n in names if n not in VOC_CLASSES})
        if unknown:
            raise DataRootError(f"detection (voc): {path} names objects {unknown} that are not VOC classes.")
        return [VOC_CLASSES.index(name) + 1 for name in names]

    def train_dataloader(self) -> DataLoader:
        assert self.train_set is not None
        factor = self.aspect_ratio_group_factor
        groups = None if factor is None else aspect_ratio_groups(self.train_aspect_ratios(), factor)
        return self._train_loader(self.train_set, collate_detection, group_ids=groups)

    def val_dataloader(self) -> DataLoader:
        assert self.val_set is not None
        return self._eval_loader(self.val_set, collate_detection)


class Detector(RecipeModule):
    """Trains a torchvision detection model (it returns its losses in train mode) and reports COCO mAP.

    Logs ``train/loss`` (the sum), each ``train/<loss term>``, and ``val/map``, ``val/map_50``,
    ``val/map_75`` from ``torchmetrics.detection.MeanAveragePrecision`` (pycocotools backend).

    Args:
        net: a torchvision detection model (e.g. :func:`detection_model`), or its config.
        optimizer: ``params -> Optimizer``, or its config.
        scheduler: optional per-step schedule factory or its config (see :mod:`lightning_decent.recipes.schedules`).
        decay_bias_and_norm: apply weight decay to biases and norm weights too.
    """

    def __init__(
        self,
        net: nn.Module | Config,
        optimizer: OptimizerFactory | Config,
        scheduler: ScheduleFactory | Config | None = None,
        decay_bias_and_norm: bool = False,
    ) -> None:
        super().__init__(optimizer, scheduler, decay_bias_and_norm)
        self.net: nn.Module = build(net)
        self.val_map = MeanAveragePrecision(box_format="xyxy", iou_type="bbox", backend="pycocotools")

    def training_step(self, batch: Batch, batch_idx: int) -> torch.Tensor:
        images, targets = batch
        losses = self.net(list(images), list(targets))
        loss = sum(losses.values())
        self.log("train/loss", loss, prog_bar=True, batch_size=len(images))
        self.log_dict({f"train/{name}": value for name, value in losses.items()}, batch_size=len(images))
        return loss

    def validation_step(self, batch: Batch, batch_idx: int) -> None:
        images, targets = batch
        predictions = self.net(list(images))
        self.val_map.update(predictions, [{"boxes": t["boxes"], "labels": t["labels"]} for t in targets])

    def on_validation_epoch_end(self) -> None:
        result = self.val_map.compute()  # gathers every rank's detections
        self.log_dict({f"val/{key}": result[key] for key in ("map", "map_50", "map_75")}, sync_dist=True)
        self.val_map.reset()
