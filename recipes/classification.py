"""Image classification: cross-entropy training and top-k accuracy from torchmetrics."""

from __future__ import annotations

import torch
from torch import nn
from torchmetrics.classification import MulticlassAccuracy

from lightning_decent.recipes.common import Config, OptimizerFactory, RecipeModule, ScheduleFactory, build

Batch = tuple[torch.Tensor, torch.Tensor]


class ImageClassifier(RecipeModule):
    """Any image classifier network trained with (label-smoothed) cross-entropy.

    Logs ``train/loss``, ``val/loss``, ``val/acc`` (top-1), ``val/acc_top5`` when ``top5`` and
    the classes allow it, and ``test/acc``.

    Args:
        net: the network, images -> logits (e.g. ``get_model("resnet50", weights=None)``), or its config.
        num_classes: number of classes (the logits' width).
        optimizer: ``params -> Optimizer``, or its config.
        scheduler: optional per-step schedule factory or its config (see :mod:`lightning_decent.recipes.schedules`).
        label_smoothing: cross-entropy label smoothing.
        top5: also report top-5 accuracy (needs more than 5 classes).
        decay_bias_and_norm: apply weight decay to biases and norm weights too.
    """

    def __init__(
        self,
        net: nn.Module | Config,
        num_classes: int,
        optimizer: OptimizerFactory | Config,
        scheduler: ScheduleFactory | Config | None = None,
        label_smoothing: float = 0.0,
        top5: bool = True,
        decay_bias_and_norm: bool = False,
        channels_last: bool = False,
        compile: bool = False,
    ) -> None:
        super().__init__(optimizer, scheduler, decay_bias_and_norm)
        self.net: nn.Module = build(net)
        self.criterion = nn.CrossEntropyLoss(label_smoothing=label_smoothing)
        self.val_accuracy = MulticlassAccuracy(num_classes=num_classes, average="micro")
        self.val_top5 = MulticlassAccuracy(num_classes, top_k=5, average="micro") if top5 and num_classes > 5 else None
        self.test_accuracy = MulticlassAccuracy(num_classes=num_classes, average="micro")
        self.memory_format = torch.channels_last if channels_last else torch.contiguous_format
        self.net.to(memory_format=self.memory_format)
        self.compile_net = compile

    def configure_model(self) -> None:
        if self.compile_net:
            self.net.compile()  # in place: the state_dict keys stay those of the plain network

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.net(images.contiguous(memory_format=self.memory_format))

    def training_step(self, batch: Batch, batch_idx: int) -> torch.Tensor:
        images, labels = batch
        loss = self.criterion(self(images), labels)
        self.log("train/loss", loss, prog_bar=True)
        return loss

    def validation_step(self, batch: Batch, batch_idx: int) -> None:
        images, labels = batch
        logits = self(images)
        self.val_accuracy(logits, labels)
        self.log("val/loss", self.criterion(logits, labels), sync_dist=True)
        self.log("val/acc", self.val_accuracy, prog_bar=True)
        if self.val_top5 is not None:
            self.val_top5(logits, labels)
            self.log("val/acc_top5", self.val_top5)

    def test_step(self, batch: Batch, batch_idx: int) -> None:
        images, labels = batch
        self.test_accuracy(self(images), labels)
        self.log("test/acc", self.test_accuracy)
