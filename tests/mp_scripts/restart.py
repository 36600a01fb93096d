"""One worker of a D-SGD run on the digits under ``torchrun --nnodes MIN:MAX --max-restarts K``: every (re)start
resumes from the last checkpoint (``ckpt_path="last"``, ``resume_from_average=True``).

``torchrun ... restart.py OUT [--epochs 4] [--every-n-steps 10] [--pause-at-step 35]``

The world comes from torchrun's environment, so a restart after a machine was lost runs with fewer ranks.
Every rank writes ``OUT/start_r<restart>_rank<rank>.json`` when training starts (after the checkpoint was
restored: the step it resumed at, the world size, torchrun's restart count, the time) and
``OUT/result_rank<rank>.json`` when ``fit`` returns (the steps, epochs and the validation accuracy of the network
average). In the first attempt every rank stops after optimizer step ``--pause-at-step``, writes
``OUT/paused_rank<rank>`` and waits (at most 120 s) for ``OUT/go``: the test kills a machine at a known step.
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
from lightning.pytorch.callbacks import ModelCheckpoint

from lightning_decent import DecentralizedStrategy
from lightning_decent.recipes.digits import DigitsClassifier, DigitsDataModule

#: How long a paused rank waits for the test's ``go`` before going on anyway.
PAUSE_LIMIT_S = 120.0


def restart_count() -> int:
    """torchrun's count of restarts of this worker group (0 in the first attempt)."""
    return int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0"))


class Record(pl.Callback):
    """Writes where each attempt starts, pauses the first attempt at a known step, records the end."""

    def __init__(self, out: Path, pause_at_step: int) -> None:
        self.out, self.pause_at_step = out, pause_at_step

    def on_train_start(self, trainer: pl.Trainer, module: pl.LightningModule) -> None:
        start = {
            "time": time.time(),
            "restart": restart_count(),
            "world_size": trainer.world_size,
            "global_step": trainer.global_step,
            "epoch": trainer.current_epoch,
        }
        write_json(self.out / f"start_r{restart_count()}_rank{trainer.global_rank}.json", start)

    def on_train_batch_end(self, trainer: pl.Trainer, module: pl.LightningModule, *args: Any) -> None:
        if restart_count() == 0 and trainer.global_step == self.pause_at_step:
            (self.out / f"paused_rank{trainer.global_rank}").write_text(repr(time.time()))
            deadline = time.monotonic() + PAUSE_LIMIT_S
            while not (self.out / "go").exists() and time.monotonic() < deadline:
                time.sleep(0.05)


def write_json(path: Path, data: dict[str, Any]) -> None:
    """Write ``data`` to ``path`` in one rename (a reader never sees half a file)."""
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(data))
    os.replace(tmp, path)


def make_trainer(out: Path, epochs: int, every_n_steps: int, pause_at_step: int) -> pl.Trainer:
    """A trainer for the world torchrun started: ``LOCAL_WORLD_SIZE`` devices on each of the machines."""
    local, world = int(os.environ["LOCAL_WORLD_SIZE"]), int(os.environ["WORLD_SIZE"])
    saver = ModelCheckpoint(dirpath=out / "checkpoints", every_n_train_steps=every_n_steps, save_last=True)
    return pl.Trainer(
        accelerator="cpu",
        devices=local,
        num_nodes=world // local,
        strategy=DecentralizedStrategy(
            topology="ring", resume_from_average=True, gossip_timeout=30, collective_timeout=60
        ),
        max_epochs=epochs,
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
        callbacks=[Record(out, pause_at_step), saver],
    )


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("out", type=Path)
    parser.add_argument("--epochs", type=int, default=4)
    parser.add_argument("--every-n-steps", type=int, default=10)
    parser.add_argument("--pause-at-step", type=int, default=35)
    args = parser.parse_args()
    pl.seed_everything(0)
    trainer = make_trainer(args.out, args.epochs, args.every_n_steps, args.pause_at_step)
    trainer.fit(DigitsClassifier(), DigitsDataModule(), ckpt_path="last")
    result = {
        "restart": restart_count(),
        "world_size": trainer.world_size,
        "global_step": trainer.global_step,
        "epochs": trainer.current_epoch,
        "val_acc": float(trainer.callback_metrics["val/acc"]),
    }
    write_json(args.out / f"result_rank{trainer.global_rank}.json", result)


if __name__ == "__main__":
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    main()
