"""Several short trainings in one 4-process launch for ``tests/test_reliability_checks.py``; every rank
writes what it saw to ``OUT/rank<r>.pt``.

* accumulation: ``gut`` and ``gradient_tracking`` with 2 micro-batches of 16 vs 1 batch of 32 (float64);
* the all-reduce baseline with Adam vs Lightning's DDP, and D-SGD on the complete graph (parameter
  averaging) vs DDP (float64);
* a push-sum checkpoint on the challenging digraph: every rank's ``z_i`` and ``v_i`` when it was saved,
  and the paths ``ModelCheckpoint`` reports.

Usage: ``python reliability_checks.py OUT [--devices 4]``.
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path

import lightning.pytorch as pl
import torch
import torch.distributed as dist
from lightning.pytorch.callbacks import ModelCheckpoint
from tiny_model import TinyClassifier, flat_params

from lightning_decent import DecentralizedStrategy
from lightning_decent.recipes.digits import DigitsDataModule


def trainer(strategy, devices: int, callbacks=(), **kwargs) -> pl.Trainer:
    return pl.Trainer(
        accelerator="cpu",
        devices=devices,
        strategy=strategy,
        logger=False,
        enable_checkpointing=bool(callbacks),
        callbacks=list(callbacks),
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
        **kwargs,
    )


def fit(strategy, devices: int, optimizer: str, batch_size: int = 32, **kwargs) -> TinyClassifier:
    pl.seed_everything(0)
    model = TinyClassifier(optimizer=optimizer, lr=0.1 if optimizer != "adam" else 0.01)
    trainer(strategy, devices, precision="64-true", limit_val_batches=0, **kwargs).fit(
        model, DigitsDataModule(batch_size=batch_size)
    )
    return model


def ring(algorithm: str) -> DecentralizedStrategy:
    return DecentralizedStrategy(topology="ring", algorithm=algorithm, final_model="local")


def run(out: Path, devices: int) -> None:
    results: dict[str, object] = {}
    for algorithm in ("gut", "gradient_tracking"):  # 10 steps: within the first epoch (360 samples per rank)
        micro = fit(ring(algorithm), devices, "plain_sgd", batch_size=16, accumulate_grad_batches=2, max_steps=10)
        large = fit(ring(algorithm), devices, "plain_sgd", batch_size=32, max_steps=10)
        results[f"accumulation/{algorithm}"] = (flat_params(micro), flat_params(large))

    ddp = fit("ddp", devices, "adam", max_steps=20)
    baseline = fit(DecentralizedStrategy(communicator="allreduce", final_model="local"), devices, "adam", max_steps=20)
    averaging = fit(DecentralizedStrategy(topology="complete", final_model="local"), devices, "adam", max_steps=20)
    results["adam"] = {"ddp": flat_params(ddp), "allreduce": flat_params(baseline), "complete": flat_params(averaging)}

    pl.seed_everything(0)
    model = TinyClassifier(optimizer="plain_sgd", lr=0.1)
    saver = ModelCheckpoint(dirpath=out / "push_sum", monitor="val/loss", save_last=True)
    strategy = DecentralizedStrategy(topology="challenging_digraph", algorithm="push_sum", final_model="local")
    trainer(strategy, devices, [saver], max_epochs=2).fit(model, DigitsDataModule())
    ((_, buckets),) = strategy._buckets.values()
    results["push_sum"] = {
        "z": flat_params(model),
        "v": float(buckets[0].state["push_weight"]),
        "best": saver.best_model_path,
        "last": saver.last_model_path,
    }
    rank = dist.get_rank() if dist.is_initialized() else 0
    torch.save(results, out / f"rank{rank}.pt")


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("out", type=Path)
    parser.add_argument("--devices", type=int, default=4)
    args = parser.parse_args()
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    run(args.out, args.devices)
