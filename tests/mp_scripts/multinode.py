"""One node of a 2-node x 2-process run launched by torchrun; every rank writes what it saw as JSON.

``torchrun --nnodes 2 --nproc-per-node 2 --node-rank R --master-addr A --master-port P multinode.py OUT
[--algorithm choco --compression int8 --epochs 8]``
"""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path

import lightning.pytorch as pl

from lightning_decent import DecentralizedStrategy
from lightning_decent.recipes.digits import DigitsClassifier, DigitsDataModule


def main(out: Path, algorithm: str, compression: str | None, epochs: int) -> None:
    pl.seed_everything(0)
    strategy = DecentralizedStrategy(topology="ring", algorithm=algorithm, compression=compression)
    trainer = pl.Trainer(
        accelerator="cpu",
        devices=2,
        num_nodes=2,
        strategy=strategy,
        max_epochs=epochs,
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        enable_checkpointing=False,
        num_sanity_val_steps=0,
    )
    trainer.fit(DigitsClassifier(), DigitsDataModule())
    assert strategy.topology is not None
    rank = trainer.global_rank
    result = {
        "rank": rank,
        "node_rank": trainer.node_rank,
        "world_size": trainer.world_size,
        "cluster_environment": type(strategy.cluster_environment).__name__,
        "out_peers": [peer for peer, _ in strategy.topology.out_neighbors(rank, 0)],
        "gossip_step": strategy.gossip_step,
        "bytes_sent": strategy.comm_stats.bytes_sent,
        "param_bytes": sum(p.numel() * p.element_size() for p in trainer.lightning_module.parameters()),
        "val_acc": float(trainer.callback_metrics["val/acc"]),
    }
    (out / f"rank{rank}.json").write_text(json.dumps(result))


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("out", type=Path)
    parser.add_argument("--algorithm", default="dsgd")
    parser.add_argument("--compression")
    parser.add_argument("--epochs", type=int, default=8)
    args = parser.parse_args()
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    main(args.out, args.algorithm, args.compression, args.epochs)
