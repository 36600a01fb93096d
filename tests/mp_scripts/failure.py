"""One of the ranks dies (SIGKILL) or hangs (SIGSTOP) mid-training; the others must stop with an error.

``python failure.py OUT --mode kill|hang [--victim 2] [--at-step 5] [--gossip-timeout 60]``
The victim writes ``OUT/victim_time`` (the moment it dies) just before the signal.
"""

from __future__ import annotations

import argparse
import os
import signal
import time
from pathlib import Path

import lightning.pytorch as pl

from lightning_decent import DecentralizedStrategy
from lightning_decent.recipes.digits import DigitsClassifier, DigitsDataModule


class Victim(pl.Callback):
    def __init__(self, out: Path, rank: int, step: int, sig: signal.Signals) -> None:
        self.out, self.rank, self.step, self.sig = out, rank, step, sig

    def on_train_batch_end(self, trainer: pl.Trainer, *args) -> None:
        if trainer.global_rank == self.rank and trainer.global_step == self.step:
            (self.out / "victim_time").write_text(repr(time.time()))
            os.kill(os.getpid(), self.sig)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("out", type=Path)
    parser.add_argument("--mode", choices=["kill", "hang"], default="kill")
    parser.add_argument("--victim", type=int, default=2)
    parser.add_argument("--at-step", type=int, default=5)
    parser.add_argument("--gossip-timeout", type=float, default=60.0)
    parser.add_argument("--devices", type=int, default=4)
    args = parser.parse_args()
    sig = signal.SIGKILL if args.mode == "kill" else signal.SIGSTOP
    trainer = pl.Trainer(
        accelerator="cpu",
        devices=args.devices,
        strategy=DecentralizedStrategy(topology="ring", gossip_timeout=args.gossip_timeout),
        max_epochs=50,
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        enable_checkpointing=False,
        num_sanity_val_steps=0,
        limit_val_batches=0,
        callbacks=[Victim(args.out, args.victim, args.at_step, sig)],
    )
    trainer.fit(DigitsClassifier(), DigitsDataModule())


if __name__ == "__main__":
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    main()
