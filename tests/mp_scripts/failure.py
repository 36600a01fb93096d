"""One of the ranks dies (SIGKILL), hangs (SIGSTOP) or produces NaN at some point of a run; the others
must stop with an error that names it, within a bounded time.

``python failure.py OUT --mode kill|hang|nan [--when train|validation|checkpoint|end] [--victim 2]
[--at-step 5] [--gossip-timeout 60] [--collective-timeout 300] [--communicator p2p|allreduce]``

* ``train``: after optimizer step ``--at-step`` (the original failure test: no validation, no checkpoints);
* ``validation``: after the victim's first validation batch;
* ``checkpoint``: inside the victim's write of its shard (a ``CheckpointIO`` that signals first);
* ``end``: in ``on_train_end``, before the strategy's final network average.

The victim writes ``OUT/victim_time`` (the moment it dies or stops) just before the signal.
"""

from __future__ import annotations

import argparse
import os
import signal
import time
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.fabric.plugins import TorchCheckpointIO
from lightning.pytorch.callbacks import ModelCheckpoint
from tiny_model import TinyClassifier

from lightning_decent import DecentralizedStrategy
from lightning_decent.recipes.digits import DigitsClassifier, DigitsDataModule


def strike(out: Path, sig: signal.Signals | None, module: pl.LightningModule) -> None:
    (out / "victim_time").write_text(repr(time.time()))
    if sig is None:  # nan: poison one weight; the next step's gradient is NaN on this rank only
        with torch.no_grad():
            next(module.parameters()).view(-1)[0] = float("nan")
    else:
        os.kill(os.getpid(), sig)


class Victim(pl.Callback):
    def __init__(self, out: Path, rank: int, step: int, sig: signal.Signals | None, when: str) -> None:
        self.out, self.rank, self.step, self.sig, self.when = out, rank, step, sig, when

    def on_train_batch_end(self, trainer: pl.Trainer, module: pl.LightningModule, *args: Any) -> None:
        if self.when == "train" and trainer.global_rank == self.rank and trainer.global_step == self.step:
            strike(self.out, self.sig, module)

    def on_validation_batch_end(self, trainer: pl.Trainer, module: pl.LightningModule, *args: Any) -> None:
        if self.when == "validation" and trainer.global_rank == self.rank and not trainer.sanity_checking:
            strike(self.out, self.sig, module)

    def on_train_end(self, trainer: pl.Trainer, module: pl.LightningModule) -> None:
        if self.when == "end" and trainer.global_rank == self.rank:
            strike(self.out, self.sig, module)


class VictimIO(TorchCheckpointIO):
    """Signals the victim rank while it writes its shard (half of the file written for a kill)."""

    def __init__(self, out: Path, rank: int, sig: signal.Signals) -> None:
        super().__init__()
        self.out, self.rank, self.sig = out, rank, sig

    def save_checkpoint(self, checkpoint: dict[str, Any], path: Any, storage_options: Any | None = None) -> None:
        if Path(path).name == f"rank_{self.rank}.ckpt":
            Path(path).write_bytes(b"\0" * 4096)
            (self.out / "victim_time").write_text(repr(time.time()))
            os.kill(os.getpid(), self.sig)
        super().save_checkpoint(checkpoint, path, storage_options)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("out", type=Path)
    parser.add_argument("--mode", choices=["kill", "hang", "nan"], default="kill")
    parser.add_argument("--when", choices=["train", "validation", "checkpoint", "end"], default="train")
    parser.add_argument("--victim", type=int, default=2)
    parser.add_argument("--at-step", type=int, default=5)
    parser.add_argument("--gossip-timeout", type=float, default=60.0)
    parser.add_argument("--collective-timeout", type=float, default=300.0)
    parser.add_argument("--communicator", default="p2p")
    parser.add_argument("--devices", type=int, default=4)
    args = parser.parse_args()
    sig = {"kill": signal.SIGKILL, "hang": signal.SIGSTOP, "nan": None}[args.mode]
    callbacks: list[pl.Callback] = [Victim(args.out, args.victim, args.at_step, sig, args.when)]
    checkpoint_io = None
    if args.when == "checkpoint":
        checkpoint_io = VictimIO(args.out, args.victim, sig)
        callbacks.append(ModelCheckpoint(dirpath=args.out / "checkpoints"))
    strategy = DecentralizedStrategy(
        topology="ring",
        communicator=args.communicator,
        gossip_timeout=args.gossip_timeout,
        collective_timeout=args.collective_timeout,
        checkpoint_io=checkpoint_io,
    )
    evaluate = args.when != "train"
    trainer = pl.Trainer(
        accelerator="cpu",
        devices=args.devices,
        strategy=strategy,
        max_epochs=1 if args.when == "end" else 50,
        limit_train_batches=5 if evaluate else None,
        limit_val_batches=2 if evaluate else 0,
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        enable_checkpointing=args.when == "checkpoint",
        num_sanity_val_steps=0,
        callbacks=callbacks,
    )
    trainer.fit(TinyClassifier() if evaluate else DigitsClassifier(), DigitsDataModule())


if __name__ == "__main__":
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    main()
