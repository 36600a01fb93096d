"""One machine of a failure-schedule run of a Lightning system: ours elastic, ours with restarts, Lightning DDP.

``python -m benchmarks.failure.lightning_worker --system ours_elastic|ours_restart|ddp --out DIR --machine M ...``

* ``ours_elastic``: started with ``MASTER_ADDR``/``MASTER_PORT``/``NODE_RANK``/``LOCAL_RANK=0``/``WORLD_SIZE`` (one
  process per machine); a restarted machine runs the same command with ``LIGHTNING_DECENT_JOIN=1``.
* ``ours_restart`` and ``ddp``: started by a torchrun agent (``RANK``, ``WORLD_SIZE``, ...); a loss ends the job,
  torchrun starts it again and it resumes from ``DIR/ckpt/last.ckpt`` (``ModelCheckpoint`` every few steps).

Digits, ``digits_cnn(hidden=...)``, SGD with momentum, validation accuracy after every epoch (of the network
average for ours, of the model for DDP), written to ``DIR/events.jsonl`` by global rank 0 (see
:mod:`benchmarks.failure.events`).
"""

from __future__ import annotations

import argparse
import logging
import os
from functools import partial
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.strategies import DDPStrategy

from benchmarks.failure.events import EventLog
from lightning_decent import DecentralizedStrategy
from lightning_decent.recipes.digits import DigitsClassifier, DigitsDataModule, digits_cnn


class Events(pl.Callback):
    """Writes this process's steps and, on global rank 0, every validation accuracy."""

    def __init__(self, log: EventLog, strategy: Any) -> None:
        self.events = log
        self.strategy = strategy

    def on_train_batch_end(self, trainer: pl.Trainer, *args: Any) -> None:
        self.events.step(trainer.global_step, trainer.world_size,
                      handover_bytes=getattr(self.strategy, "handover_bytes", 0))  # fmt: skip

    def on_validation_end(self, trainer: pl.Trainer, module: pl.LightningModule) -> None:
        if trainer.sanity_checking or trainer.global_rank != 0:
            return
        accuracy = float(trainer.callback_metrics["val/acc"])
        self.events.write("eval", acc=accuracy, epoch=trainer.current_epoch, step=trainer.global_step,
                       world=trainer.world_size)  # fmt: skip


def strategy_of(args: argparse.Namespace) -> Any:
    if args.system == "ddp":
        return DDPStrategy(process_group_backend="gloo")
    common = {"topology": args.topology, "overlap": args.overlap, "gossip_timeout": args.gossip_timeout,
              "collective_timeout": args.collective_timeout}  # fmt: skip
    if args.system == "ours_elastic":
        return DecentralizedStrategy(**common, elastic={"min_ranks": args.min_ranks})
    return DecentralizedStrategy(**common, resume_from_average=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--system", choices=["ours_elastic", "ours_restart", "ddp"], required=True)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--machine", type=int, required=True)
    parser.add_argument("--hidden", type=int, default=2048)
    parser.add_argument("--lr", type=float, default=0.05)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--epochs", type=int, default=40)
    parser.add_argument("--topology", default="one_peer_exponential")
    parser.add_argument("--overlap", action="store_true")
    parser.add_argument("--gossip-timeout", type=float, default=10.0)
    parser.add_argument("--collective-timeout", type=float, default=30.0)
    parser.add_argument("--min-ranks", type=int, default=6)
    parser.add_argument("--ckpt-every", type=int, default=6, help="restart systems: steps between checkpoints")
    args = parser.parse_args()
    torch.set_num_threads(1)
    log = EventLog(args.out / "events.jsonl", args.machine)
    log.write("start", system=args.system, restart=int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")))
    strategy = strategy_of(args)
    callbacks: list[pl.Callback] = [Events(log, strategy)]
    checkpoints = args.out / "ckpt"
    restarts = args.system != "ours_elastic"
    if restarts:
        callbacks.append(ModelCheckpoint(dirpath=checkpoints, every_n_train_steps=args.ckpt_every, save_top_k=0,
                                         save_last=True))  # fmt: skip
    trainer = pl.Trainer(
        accelerator="cpu",
        devices=1,
        num_nodes=int(os.environ["WORLD_SIZE"]),
        strategy=strategy,
        max_epochs=args.epochs,
        logger=False,
        enable_checkpointing=restarts,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
        callbacks=callbacks,
    )
    pl.seed_everything(0)
    optimizer = partial(torch.optim.SGD, lr=args.lr, momentum=0.9)
    model = DigitsClassifier(net=digits_cnn(width=32, hidden=args.hidden), optimizer=optimizer)
    last = checkpoints / "last.ckpt"
    resume = str(last) if restarts and last.exists() else None
    if resume:
        log.write("resume", checkpoint_bytes=_size(last))
    trainer.fit(model, DigitsDataModule(batch_size=args.batch), ckpt_path=resume)


def _size(path: Path) -> int:
    """Bytes of a checkpoint file, or of every file under a checkpoint directory."""
    return path.stat().st_size if path.is_file() else sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


if __name__ == "__main__":
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    logging.basicConfig(format="%(asctime)s %(message)s")
    main()
