"""One rank of an elastic D-SGD run on the digits, launched as its own process (as torchrun or SLURM do).

``python elastic.py OUT --rank R --world N [--victim V --mode kill|hang --at-epoch E --at-batch B
[--during training|validation|save]] [--join]
[--join-after FILE] [--store HOST:PORT] [--min-ranks M] [--checkpoints] [--algorithm NAME] [--machines-of L]``

The environment names the rank as a cluster scheduler would (``MASTER_ADDR``, ``MASTER_PORT``, ``NODE_RANK``,
``LOCAL_RANK=0``): every process is a one-device "node". The victim signals itself (SIGKILL or SIGSTOP) after
training batch ``B`` of epoch ``E`` (``--during validation``: before validation batch ``B``; ``save``: while
its checkpoint of epoch ``E`` is being built) and writes ``OUT/victim_time`` first. Every rank that finishes writes
``OUT/rank<R>.json``: its last world size and rank, the epochs it completed, its training loss per epoch and the
validation accuracy of the network-average model; a joiner (``--join``, rank label R) also its first step.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import signal
import time
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.loggers import CSVLogger

from lightning_decent import DecentralizedStrategy
from lightning_decent.recipes.digits import DigitsClassifier, DigitsDataModule


class Record(pl.Callback):
    """Signals the victim; records every rank's epochs, losses and world sizes."""

    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.epochs: list[dict[str, Any]] = []
        self.first_step: int | None = None

    def on_train_batch_start(self, trainer: pl.Trainer, module: pl.LightningModule, *rest: Any) -> None:
        if self.first_step is None:
            self.first_step = trainer.global_step

    def on_train_batch_end(self, trainer: pl.Trainer, module: pl.LightningModule, outputs: Any, batch: Any, i: int):
        if self.args.during == "training":
            self._signal_if_victim(trainer, i)

    def on_validation_batch_start(self, trainer: pl.Trainer, module: pl.LightningModule, *rest: Any) -> None:
        if self.args.during == "validation" and not trainer.sanity_checking:
            self._signal_if_victim(trainer, rest[1])

    def on_save_checkpoint(self, trainer: pl.Trainer, module: pl.LightningModule, checkpoint: dict) -> None:
        if self.args.during == "save":
            self._signal_if_victim(trainer, self.args.at_batch)

    def _signal_if_victim(self, trainer: pl.Trainer, batch: int) -> None:
        a = self.args
        if a.rank == a.victim and trainer.current_epoch == a.at_epoch and batch == a.at_batch:
            (a.out / "victim_time").write_text(repr(time.time()))
            os.kill(os.getpid(), signal.SIGKILL if a.mode == "kill" else signal.SIGSTOP)

    def on_train_epoch_end(self, trainer: pl.Trainer, module: pl.LightningModule) -> None:
        loss = trainer.callback_metrics.get("train/loss")
        self.epochs.append(
            {"epoch": trainer.current_epoch, "world_size": trainer.world_size, "loss": float(loss) if loss else None}
        )


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("out", type=Path)
    parser.add_argument("--rank", type=int, required=True)
    parser.add_argument("--world", type=int, required=True)
    parser.add_argument("--victim", type=int, default=-1)
    parser.add_argument("--mode", choices=["kill", "hang"], default="kill")
    parser.add_argument("--at-epoch", type=int, default=1)
    parser.add_argument("--at-batch", type=int, default=3)
    parser.add_argument("--during", choices=["training", "validation", "save"], default="training")
    parser.add_argument("--epochs", type=int, default=4)
    parser.add_argument("--gossip-timeout", type=float, default=10.0)
    parser.add_argument("--store", default=None)
    parser.add_argument("--join", action="store_true")
    parser.add_argument("--join-after", type=Path, default=None, help="a joiner waits for this file to appear")
    parser.add_argument("--checkpoints", action="store_true")
    parser.add_argument("--min-ranks", type=int, default=1)
    parser.add_argument("--join-timeout", type=float, default=90.0)
    parser.add_argument("--algorithm", default="dsgd")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument(
        "--machines-of",
        type=int,
        default=0,
        help="a two-level topology on machines of this many ranks, each rank its own process on its machine (as "
        "SLURM's srun starts them: NODE_RANK, LOCAL_RANK); a joiner starts on the victim's machine",
    )
    args = parser.parse_args()
    if args.machines_of:
        slot = args.victim if args.join else args.rank
        os.environ["NODE_RANK"], os.environ["LOCAL_RANK"] = str(slot // args.machines_of), str(slot % args.machines_of)
    elastic = {"store": args.store, "join": args.join, "join_timeout": args.join_timeout, "min_ranks": args.min_ranks}
    two_level = {"local_world_size": args.machines_of, "machines": "ring"} if args.machines_of else None
    strategy = DecentralizedStrategy(
        topology="hierarchical" if two_level else "ring",
        topology_options=two_level,
        algorithm=args.algorithm,
        gossip_timeout=args.gossip_timeout,
        collective_timeout=30,
        elastic=elastic,
    )
    record = Record(args)
    callbacks: list[pl.Callback] = [record]
    if args.checkpoints:
        callbacks.append(ModelCheckpoint(dirpath=args.out / "checkpoints", save_last=True))
    trainer = pl.Trainer(
        accelerator="cpu",
        devices=args.machines_of or 1,
        num_nodes=args.world // (args.machines_of or 1),
        strategy=strategy,
        max_epochs=args.epochs,
        logger=CSVLogger(args.out / "logs", name="elastic", version=0),
        log_every_n_steps=5,
        enable_progress_bar=False,
        enable_model_summary=False,
        enable_checkpointing=args.checkpoints,
        num_sanity_val_steps=0,
        callbacks=callbacks,
    )
    module = DigitsClassifier()
    while args.join_after is not None and not args.join_after.exists():  # imports done: join as soon as told
        time.sleep(0.2)
    trainer.fit(module, DigitsDataModule(batch_size=args.batch_size))
    accuracy = trainer.callback_metrics.get("val/acc")
    result = {
        "rank": trainer.global_rank,
        "world_size": trainer.world_size,
        "epochs": record.epochs,
        "val_acc": float(accuracy) if accuracy is not None else None,
        "first_step": record.first_step,
        "handover_bytes": strategy.handover_bytes,
        "communicator": type(strategy.communicator).__name__,
    }
    (args.out / f"rank{args.rank}.json").write_text(json.dumps(result))


if __name__ == "__main__":
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    logging.basicConfig(format="%(asctime)s %(message)s")
    main()
