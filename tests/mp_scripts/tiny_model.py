"""A small LightningModule of the tests' own that saves its hyper-parameters (``load_from_checkpoint``
rebuilds it from a checkpoint alone), on the scikit-learn digits of ``recipes.digits``."""

from __future__ import annotations

import lightning.pytorch as pl
import torch
import torch.nn.functional as F
from torch import nn


class TinyClassifier(pl.LightningModule):
    """64 -> ``hidden`` -> 10 MLP; ``optimizer`` is ``"sgd"`` (momentum 0.9), ``"plain_sgd"`` or ``"adam"``."""

    def __init__(self, hidden: int = 16, lr: float = 0.05, optimizer: str = "sgd") -> None:
        super().__init__()
        self.save_hyperparameters()
        self.net = nn.Sequential(nn.Flatten(), nn.Linear(64, hidden), nn.ReLU(), nn.Linear(hidden, 10))
        self.evaluated: list[torch.Tensor] = []  # flat parameters seen by each evaluation epoch

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)

    def training_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> torch.Tensor:
        images, labels = batch
        loss = F.cross_entropy(self(images), labels)
        self.log("train/loss", loss)
        return loss

    def _evaluate(self, batch: tuple[torch.Tensor, torch.Tensor], stage: str) -> None:
        images, labels = batch
        logits = self(images)
        self.log(f"{stage}/loss", F.cross_entropy(logits, labels), sync_dist=True)
        self.log(f"{stage}/acc", (logits.argmax(-1) == labels).float().mean(), sync_dist=True)

    def validation_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> None:
        self._evaluate(batch, "val")

    def test_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> None:
        self._evaluate(batch, "test")

    def on_validation_epoch_start(self) -> None:
        self.evaluated.append(flat_params(self))

    def on_test_epoch_start(self) -> None:
        self.evaluated.append(flat_params(self))

    def configure_optimizers(self) -> torch.optim.Optimizer:
        if self.hparams.optimizer == "adam":
            return torch.optim.Adam(self.parameters(), lr=self.hparams.lr)
        momentum = 0.0 if self.hparams.optimizer == "plain_sgd" else 0.9
        return torch.optim.SGD(self.parameters(), lr=self.hparams.lr, momentum=momentum)


def flat_params(module: torch.nn.Module) -> torch.Tensor:
    return torch.cat([p.detach().reshape(-1).double().clone() for p in module.parameters()])
