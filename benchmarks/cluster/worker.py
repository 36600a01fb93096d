"""One rank of the emulated-cluster benchmark: joins the gloo world and runs the cases in order.

Started inside a machine's network namespace by ``benchmarks/emulated_cluster.py`` with ``RANK``,
``WORLD_SIZE``, ``MASTER_ADDR``, ``MASTER_PORT`` and, for Lightning and hierarchical gossip, ``NODE_RANK``
(the machine), ``LOCAL_RANK`` and ``LOCAL_WORLD_SIZE`` (ranks per machine). Every case's result is
appended to ``OUT/rank<r>.jsonl`` as soon as it is done.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import traceback
from datetime import timedelta
from pathlib import Path

import torch
import torch.distributed as dist

from benchmarks.cluster.cases import Context, run_case
from benchmarks.cluster.workloads import ModelSpec


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--cases", required=True, help="comma-separated case names (see benchmarks.cluster.cases)")
    parser.add_argument("--model", default="mlp16m")
    parser.add_argument("--model-mb", type=float, default=None)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--lr", type=float, default=0.01)
    parser.add_argument("--epochs", type=int, default=10)
    parser.add_argument("--accuracy-hidden", type=int, default=16384)
    parser.add_argument("--accuracy-lr", type=float, default=0.05)
    return parser.parse_args()


def _rss_mb() -> float:
    """This process's resident memory now (MB)."""
    pages = int(Path("/proc/self/statm").read_text().split()[1])
    return pages * os.sysconf("SC_PAGE_SIZE") / 1e6


def main() -> None:
    args = parse_args()
    torch.set_num_threads(1)
    dist.init_process_group("gloo", timeout=timedelta(minutes=10))
    rank, world = dist.get_rank(), dist.get_world_size()
    spec = ModelSpec.of_size(args.model_mb) if args.model_mb else ModelSpec.named(args.model)
    ctx = Context(
        rank=rank,
        world=world,
        spec=spec,
        steps=args.steps,
        warmup=args.warmup,
        batch=args.batch,
        lr=args.lr,
        epochs=args.epochs,
        accuracy_hidden=args.accuracy_hidden,
        accuracy_lr=args.accuracy_lr,
        local_world_size=int(os.environ.get("LOCAL_WORLD_SIZE", "1")),
    )
    results = args.out / f"rank{rank}.jsonl"
    for name in args.cases.split(","):
        dist.barrier()
        try:
            result = run_case(name, ctx)
        except Exception:
            with results.open("a") as f:
                f.write(json.dumps({"case": name, "error": traceback.format_exc()}) + "\n")
            raise
        gc.collect()  # a case's models, optimizers and receive buffers go before the next one starts
        with results.open("a") as f:
            f.write(json.dumps({"case": name, "rank": rank, "rss_mb": _rss_mb(), **result}) + "\n")
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    main()
