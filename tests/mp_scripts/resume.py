"""Exact resume in real multi-process runs; every rank saves its final parameters.

``python resume.py OUT PHASE --algorithms dsgd,... [--devices 4] [--resume-from-average]``

* ``PHASE=first``: per algorithm, train 2 epochs straight, then (fresh model) 1 epoch with a
  checkpoint at its end.
* ``PHASE=resume``: per algorithm, resume that checkpoint for the second epoch.

An algorithm is a name, or one of :data:`CONFIGURATIONS` (an algorithm with options).

Every algorithm trains on the ring except ``push_sum``, which trains on the 4-node challenging
digraph (column-stochastic, so its push-sum weights ``v`` move away from 1 and must be restored).
"""

from __future__ import annotations

import argparse
import os
from functools import partial
from pathlib import Path

import lightning.pytorch as pl
import torch
import torch.distributed as dist
from lightning.pytorch.callbacks import ModelCheckpoint

from lightning_decent import DecentralizedStrategy
from lightning_decent.recipes.digits import DigitsClassifier, DigitsDataModule

#: The graph each algorithm trains on (default: the ring).
TOPOLOGIES = {"push_sum": "challenging_digraph"}
#: Further strategy options per algorithm: choco sends random-k messages, whose coordinates are drawn
#: from the gossip step (restored by the checkpoint).
STRATEGY_OPTIONS = {"choco": {"compression": "randomk", "compression_options": {"fraction": 0.25}}}

#: Runs of an algorithm with options: name -> (algorithm, options). An epoch is 12 steps (4 ranks), so
#: the checkpoint after epoch 1 falls mid-period, and the second epoch crosses synchronisations; with
#: H=8, 4 fragments and delay 1, fragment 1's exchange (started after the 12th step) is in flight at the checkpoint.
CONFIGURATIONS = {
    "diloco": ("diloco", {"H": 5}),
    "local_sgd": ("local_sgd", {"H": 6, "warmup_steps": 3}),
    "diloco_streaming": ("diloco", {"H": 8, "fragments": 4, "delay": 1}),
    "gasloc_streaming": ("gasloc", {"H": 8, "fragments": 4, "delay": 1, "mix": 0.5, "gossip_momentum": 0.5}),
    "diloco_int8": ("diloco", {"H": 5, "compression": "int8"}),
    "gasloc_int8_streaming": ("gasloc", {"H": 8, "fragments": 4, "delay": 1, "compression": "int8"}),
}


def make_trainer(devices: int, epochs: int, run: str, callbacks=(), **strategy_kwargs) -> pl.Trainer:
    algorithm, options = CONFIGURATIONS.get(run, (run, {}))
    topology = TOPOLOGIES.get(algorithm, "ring")
    strategy = DecentralizedStrategy(
        topology=topology,
        algorithm=algorithm,
        algorithm_options=options,
        final_model="local",
        **STRATEGY_OPTIONS.get(algorithm, {}),
        **strategy_kwargs,
    )
    return pl.Trainer(
        accelerator="cpu",
        devices=devices,
        strategy=strategy,
        max_epochs=epochs,
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
        limit_val_batches=0,
        callbacks=list(callbacks),
        enable_checkpointing=bool(callbacks),
    )


def model() -> DigitsClassifier:
    pl.seed_everything(0)
    return DigitsClassifier(optimizer=partial(torch.optim.SGD, lr=0.05, momentum=0.9, weight_decay=1e-4))


def save_params(module: torch.nn.Module, path: Path) -> None:
    rank = dist.get_rank() if dist.is_initialized() else 0
    torch.save([p.detach().clone() for p in module.parameters()], f"{path}_rank{rank}.pt")


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("out", type=Path)
    parser.add_argument("phase", choices=["first", "resume"])
    parser.add_argument("--algorithms", default="dsgd")
    parser.add_argument("--devices", type=int, default=4)
    parser.add_argument("--resume-from-average", action="store_true")
    args = parser.parse_args()
    for algorithm in args.algorithms.split(","):
        ckpt_dir = args.out / f"{algorithm}_ckpt"
        if args.phase == "first":
            m = model()
            make_trainer(args.devices, 2, algorithm).fit(m, DigitsDataModule())
            save_params(m, args.out / f"{algorithm}_straight")
            m = model()
            saver = ModelCheckpoint(dirpath=ckpt_dir, every_n_epochs=1, save_top_k=-1, save_last=True)
            make_trainer(args.devices, 1, algorithm, [saver]).fit(m, DigitsDataModule())
        else:
            m = model()
            trainer = make_trainer(args.devices, 2, algorithm, resume_from_average=args.resume_from_average)
            trainer.fit(m, DigitsDataModule(), ckpt_path=str(ckpt_dir / "last.ckpt"))
            suffix = "_from_average" if args.resume_from_average else "_resumed"
            save_params(m, args.out / f"{algorithm}{suffix}")


if __name__ == "__main__":
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    main()
