"""What the emulated-cluster benchmark trains: the model, synthetic batches, and per-step clocks."""

from __future__ import annotations

import math
import statistics
import time
from dataclasses import dataclass

import lightning.pytorch as pl
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

#: Named models: (width, hidden layers). ``mlp16m``: four 2048 x 2048 Linear+ReLU layers and a
#: 10-way head, 16.8M parameters (67 MB in float32), the issue's reference model.
MODELS = {"mlp16m": (2048, 4)}
CLASSES = 10


@dataclass(frozen=True)
class ModelSpec:
    """A square MLP: ``depth`` Linear(width, width)+ReLU layers and a ``CLASSES``-way head."""

    width: int
    depth: int

    @classmethod
    def named(cls, name: str) -> ModelSpec:
        if name not in MODELS:
            raise ValueError(f"Unknown model {name!r}; named models: {', '.join(MODELS)} (or pass --model-mb).")
        return cls(*MODELS[name])

    @classmethod
    def of_size(cls, megabytes: float, depth: int = 4) -> ModelSpec:
        """The width whose float32 parameters take about ``megabytes`` MiB."""
        if megabytes <= 0:
            raise ValueError(f"--model-mb must be positive, got {megabytes}.")
        return cls(max(8, round(math.sqrt(megabytes * 2**20 / 4 / depth))), depth)

    def build(self) -> nn.Sequential:
        layers: list[nn.Module] = []
        for _ in range(self.depth):
            layers += [nn.Linear(self.width, self.width), nn.ReLU()]
        return nn.Sequential(*layers, nn.Linear(self.width, CLASSES))

    @property
    def parameters(self) -> int:
        return self.depth * (self.width + 1) * self.width + (self.width + 1) * CLASSES

    @property
    def megabytes(self) -> float:
        return self.parameters * 4 / 1e6


def synthetic_loader(spec: ModelSpec, batch_size: int, batches: int, seed: int = 0) -> DataLoader:
    """``batches`` batches of Gaussian inputs and random labels (the content does not matter for timing)."""
    g = torch.Generator().manual_seed(seed)
    inputs = torch.randn(batches * batch_size, spec.width, generator=g)
    labels = torch.randint(0, CLASSES, (batches * batch_size,), generator=g)
    return DataLoader(TensorDataset(inputs, labels), batch_size=batch_size, shuffle=False)


class Classifier(pl.LightningModule):
    """Cross-entropy on a network, SGD with momentum; ``delay`` seconds of extra work per step emulate a
    straggler (a slower machine)."""

    def __init__(self, net: nn.Module, lr: float = 0.01, momentum: float = 0.9, delay: float = 0.0) -> None:
        super().__init__()
        self.net = net
        self.lr = lr
        self.momentum = momentum
        self.delay = delay

    def training_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> torch.Tensor:
        if self.delay:
            time.sleep(self.delay)
        inputs, labels = batch
        return nn.functional.cross_entropy(self.net(inputs), labels)

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=self.lr, momentum=self.momentum)


class StepClock(pl.Callback):
    """The time at the end of every training batch (``perf_counter``)."""

    def __init__(self) -> None:
        self.ends: list[float] = []

    def on_train_batch_end(self, *args: object) -> None:
        self.ends.append(time.perf_counter())


def step_summary(ends: list[float], warmup: int) -> dict[str, float | list[float]]:
    """Durations of the steps after ``warmup`` from their end times: each step, median and mean."""
    durations = [b - a for a, b in zip(ends[warmup:], ends[warmup + 1 :])]
    if not durations:
        raise ValueError(f"No step left to time after {warmup} warm-up steps; raise --steps.")
    return {"steps": durations, "median": statistics.median(durations), "mean": statistics.fmean(durations)}
