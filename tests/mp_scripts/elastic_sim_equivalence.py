"""One rank of an elastic run that the simulator replays exactly: a rank killed in a step, a joiner at an epoch start.

``python elastic_sim_equivalence.py OUT --rank R --world 4 --algorithm NAME [--join]``, every rank its own
process (``MASTER_ADDR``, ``MASTER_PORT``, ``NODE_RANK``, ``LOCAL_RANK=0``, as a cluster scheduler sets them).

Each member trains its own node's objective of the simulator's logistic problem (``f_rank``, full local data, so
exact gradients; float64) on the ``exponential`` graph, where every rank is every other's neighbour for 4 and 3
ranks, so every survivor loses the same exchange:

* the rank launched last is killed (SIGKILL) at the start of step :data:`KILLED_AT` (its forward), so the
  survivors' exchange of that step fails on every one of them;
* a joiner (``--join``) starts once the victim is gone; the members wait for its request at the start of epoch 1
  (the change point for joins), so it is admitted there and takes the free rank (and node) 3.

Every process that finishes writes ``OUT/rank<R>.json``: its rank, world size, parameters, gossip step, and the
bytes of state it received. The test runs the simulator on the same schedule and compares.
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
import torch
from sim_equivalence import NodeObjective, build_problem

from lightning_decent import DecentralizedStrategy

STEPS_PER_EPOCH = 6
EPOCHS = 2
KILLED_AT = 3
TOPOLOGY = "exponential"
#: (algorithm, local SGD momentum): D-SGD with momentum (the joiner needs the optimizer state too) and gradient
#: tracking (its trackers' sum is restored after each change).
MOMENTUM = {"dsgd": 0.9, "gradient_tracking": 0.5}


class Schedule(pl.Callback):
    """Kills the victim at the start of its step :data:`KILLED_AT`; at epoch 1's start every member waits until
    the joiner's request is in the store, so that all of them admit it there."""

    def __init__(self, out: Path, victim: bool, member: bool, strategy: DecentralizedStrategy) -> None:
        self.out, self.victim, self.member, self.strategy = out, victim, member, strategy

    def on_train_batch_start(self, trainer: pl.Trainer, module: pl.LightningModule, batch: Any, i: int) -> None:
        if self.victim and trainer.global_step == KILLED_AT:
            (self.out / "victim_time").write_text(repr(time.time()))
            os.kill(os.getpid(), signal.SIGKILL)

    def on_train_epoch_start(self, trainer: pl.Trainer, module: pl.LightningModule) -> None:
        if trainer.current_epoch != 1 or not self.member:
            return
        assert self.strategy._elastic is not None
        membership = self.strategy._elastic.membership
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            requested, admitted = membership.tickets()
            if requested > admitted:
                return
            time.sleep(0.1)
        raise TimeoutError("no joiner asked to join within 120 s")


class EpochData(NodeObjective):
    """The simulator's node objective for this member's rank, :data:`STEPS_PER_EPOCH` batches per epoch."""

    def train_dataloader(self) -> torch.utils.data.DataLoader:
        return torch.utils.data.DataLoader(torch.zeros(STEPS_PER_EPOCH * self.trainer.world_size), batch_size=1)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("out", type=Path)
    parser.add_argument("--rank", type=int, required=True)
    parser.add_argument("--world", type=int, required=True)
    parser.add_argument("--algorithm", required=True, choices=sorted(MOMENTUM))
    parser.add_argument("--join", action="store_true")
    args = parser.parse_args()
    while args.join and not (args.out / "victim_time").exists():  # imports done: ask to join once it is gone
        time.sleep(0.1)
    strategy = DecentralizedStrategy(
        topology=TOPOLOGY,
        algorithm=args.algorithm,
        final_model="local",
        gossip_timeout=20,
        collective_timeout=60,
        elastic={"join": args.join, "join_timeout": 90, "last_call": 1.0},
    )
    trainer = pl.Trainer(
        accelerator="cpu",
        devices=1,
        num_nodes=args.world,
        strategy=strategy,
        precision="64-true",
        max_epochs=EPOCHS,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        callbacks=[Schedule(args.out, args.rank == args.world - 1 and not args.join, not args.join, strategy)],
    )
    model = EpochData(build_problem("logistic", args.world), MOMENTUM[args.algorithm])
    trainer.fit(model)
    result = {
        "rank": trainer.global_rank,
        "world_size": trainer.world_size,
        "gossip_step": strategy.gossip_step,
        "params": model.x.detach().tolist(),
        "handover_bytes": strategy.handover_bytes,
    }
    (args.out / f"rank{args.rank}.json").write_text(json.dumps(result))


if __name__ == "__main__":
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    logging.basicConfig(format="%(asctime)s %(message)s")
    main()
