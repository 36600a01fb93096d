"""Ranks with different numbers of batches per epoch, and a rank that skips an optimizer step.

``python uneven.py OUT --mode sized|iterable|skip [--algorithm dsgd] [--algorithm-options '{"H": 4}']
[--communicator p2p] [--devices 4]``

* ``sized``: rank r's loader yields ``10 + r`` batches of 32 (its own slice, no distributed sampler);
  2 epochs with validation; every rank writes ``OUT/rank<r>.pt`` with its gossip and global steps.
* ``iterable``: the same lengths from an ``IterableDataset`` (not known in advance): must fail.
* ``skip``: manual optimization; rank 2 skips ``optimizer.step()`` once: must fail at once.
"""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path

import lightning.pytorch as pl
import torch
import torch.distributed as dist
from tiny_model import TinyClassifier, flat_params
from torch.utils.data import DataLoader, IterableDataset, Subset, TensorDataset

from lightning_decent import DecentralizedStrategy
from lightning_decent.recipes.digits import load_digits_tensors

BATCH = 32


class Batches(IterableDataset):
    def __init__(self, data: TensorDataset, count: int) -> None:
        self.data, self.count = data, count

    def __iter__(self):
        for b in range(self.count):
            yield self.data[b * BATCH : (b + 1) * BATCH]


class UnevenDigits(pl.LightningDataModule):
    """Rank r trains on ``10 + r`` batches of its own slice of the digits."""

    def __init__(self, iterable: bool) -> None:
        super().__init__()
        self.iterable = iterable

    def setup(self, stage: str) -> None:
        images, labels = load_digits_tensors()
        self.data = TensorDataset(images, labels)

    def train_dataloader(self) -> DataLoader:
        rank = self.trainer.global_rank
        count = 10 + rank
        if self.iterable:
            return DataLoader(Batches(self.data, count), batch_size=None)
        start = rank * 13 * BATCH % (len(self.data) - count * BATCH)
        return DataLoader(Subset(self.data, range(start, start + count * BATCH)), batch_size=BATCH)

    def val_dataloader(self) -> DataLoader:
        return DataLoader(Subset(self.data, range(256)), batch_size=64)


class SkipsAStep(TinyClassifier):
    """Manual optimization; rank 2 does not call ``optimizer.step()`` at batch 3."""

    def __init__(self) -> None:
        super().__init__(optimizer="plain_sgd")
        self.automatic_optimization = False

    def training_step(self, batch, batch_idx: int) -> None:
        optimizer = self.optimizers()
        optimizer.zero_grad()
        self.manual_backward(torch.nn.functional.cross_entropy(self(batch[0]), batch[1]))
        if not (self.trainer.global_rank == 2 and batch_idx == 3):
            optimizer.step()


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("out", type=Path)
    parser.add_argument("--mode", choices=["sized", "iterable", "skip"], default="sized")
    parser.add_argument("--algorithm", default="dsgd")
    parser.add_argument("--algorithm-options", type=json.loads, default={})
    parser.add_argument("--communicator", default="p2p")
    parser.add_argument("--devices", type=int, default=4)
    args = parser.parse_args()
    strategy = DecentralizedStrategy(
        topology="ring",
        algorithm=args.algorithm,
        algorithm_options=args.algorithm_options,
        communicator=args.communicator,
        gossip_timeout=30,
    )
    trainer = pl.Trainer(
        accelerator="cpu",
        devices=args.devices,
        strategy=strategy,
        max_epochs=2,
        limit_val_batches=2,
        num_sanity_val_steps=0,
        use_distributed_sampler=False,
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        enable_checkpointing=False,
    )
    pl.seed_everything(0)
    model = SkipsAStep() if args.mode == "skip" else TinyClassifier(optimizer="plain_sgd")
    trainer.fit(model, UnevenDigits(iterable=args.mode == "iterable"))
    rank = dist.get_rank() if dist.is_initialized() else 0
    results = {"gossip_step": strategy.gossip_step, "global_step": trainer.global_step, "params": flat_params(model)}
    torch.save(results, args.out / f"{args.algorithm}_{args.communicator}_rank{rank}.pt")


if __name__ == "__main__":
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    main()
