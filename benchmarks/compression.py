"""Compression benchmarks: bytes per gossip round, encode/decode cost, and accuracy of CHOCO-SGD on digits.

Sections (each a table on stdout and JSON under ``--out``):

* ``bytes``: payload per message and its ratio to float32 for every compressor, on the simulator's
  digits MLP (2,410 parameters), the recipe's digits CNN (151,306) and a 25 MB bucket (6.55 M values).
* ``speed``: encode + decode time of a 25 MB bucket, one CPU thread.
* ``digits``: the simulator's digits MLP (float32) on an 8-node ring, mini-batches of 32, lr 0.1, for
  Dirichlet(0.1) (non-iid) and Dirichlet(100) (~iid) label splits and several seeds: held-out accuracy
  of the network average after the same number of steps, uncompressed D-SGD against CHOCO-SGD with
  every compressor (default gamma), and the bytes each sends per node and step.
* ``average``: the compressed global average on 4 gloo processes (loopback): float32 all-reduce,
  int8 two-stage average and int8 all-gather average of a 25 MB bucket; bytes each rank sent
  (counted) and wall time.

Usage::

    PYTHONPATH=. python benchmarks/compression.py --out benchmarks/results/compression
    PYTHONPATH=. python benchmarks/compression.py --only digits --seeds 3 --steps 1000
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from lightning_decent.algorithms import get_algorithm
from lightning_decent.comm import AllReduceCommunicator, get_compressor
from lightning_decent.comm.compressed_collectives import all_gather_average
from lightning_decent.sim import simulate
from lightning_decent.sim.problems import Digits
from lightning_decent.topology import get_topology

#: (label, compressor name, options) of every compressor measured.
COMPRESSORS = [
    ("fp32 (none)", "none", {}),
    ("bf16", "bf16", {}),
    ("fp16", "fp16", {}),
    ("int8 (block 256)", "int8", {}),
    ("int4 (block 64)", "int4", {}),
    ("topk 10%", "topk", {"fraction": 0.1}),
    ("topk 1%", "topk", {"fraction": 0.01}),
    ("randomk 10%", "randomk", {"fraction": 0.1}),
    ("randomk 1%", "randomk", {"fraction": 0.01}),
]
BUCKET = 25 * 2**20 // 4  # values in a 25 MB float32 bucket


def table(header: list[str], rows: list[list[Any]]) -> str:
    cells = [header, *[[f"{v:.4g}" if isinstance(v, float) else str(v) for v in row] for row in rows]]
    widths = [max(len(r[c]) for r in cells) for c in range(len(header))]
    lines = [" | ".join(v.ljust(w) for v, w in zip(r, widths)) for r in cells]
    return "\n".join([lines[0], "-+-".join("-" * w for w in widths), *lines[1:]])


def write(out: Path, name: str, data: dict[str, Any]) -> None:
    (out / f"{name}.json").write_text(json.dumps(data, indent=1))


def section_bytes(args: argparse.Namespace, out: Path) -> None:
    from recipes.digits import digits_cnn

    models = {
        "digits MLP (sim)": Digits(n=2).dim,
        "digits CNN (recipe)": sum(p.numel() for p in digits_cnn().parameters()),
        "25 MB bucket": BUCKET,
    }
    rows, data = [], {}
    for label, name, options in COMPRESSORS:
        compressor = get_compressor(name, **options)
        ratios = {m: compressor.payload_bytes(numel) / (4 * numel) for m, numel in models.items()}
        rows.append([label, *(f"{compressor.payload_bytes(n):,} B ({ratios[m]:.3f})" for m, n in models.items())])
        rows[-1].append(f"{1 - compressor.omega(BUCKET):.3g}")
        data[label] = {"payload_bytes": {m: compressor.payload_bytes(n) for m, n in models.items()}, "ratio": ratios}
    header = ["compressor", *(f"{m}, {n:,} values" for m, n in models.items()), "1 - omega (25 MB)"]
    print("\n## bytes per message (ratio to float32)\n" + table(header, rows))
    write(out, "bytes", {"values": models, "compressors": data})


def section_speed(args: argparse.Namespace, out: Path) -> None:
    torch.set_num_threads(1)
    x = torch.randn(BUCKET, generator=torch.Generator().manual_seed(0))
    decoded = torch.empty_like(x)
    rows, data = [], {}
    for label, name, options in COMPRESSORS:
        compressor = get_compressor(name, **options)
        payload = compressor.new_payload(x)
        times = {"encode": [], "decode": []}
        for repeat in range(args.repeats):
            start = time.perf_counter()
            compressor.encode(x, payload, key=(repeat, 0))
            times["encode"].append(time.perf_counter() - start)
            start = time.perf_counter()
            compressor.decode(payload, decoded, key=(repeat, 0))
            times["decode"].append(time.perf_counter() - start)
        best = {k: min(v) * 1e3 for k, v in times.items()}
        rows.append([label, best["encode"], best["decode"], 4 * BUCKET / 2**20 / (sum(best.values()) / 1e3)])
        data[label] = {"encode_ms": best["encode"], "decode_ms": best["decode"]}
    print("\n## encode + decode of a 25 MB bucket, 1 CPU thread (best of repeats)")
    print(table(["compressor", "encode ms", "decode ms", "MB/s (enc+dec)"], rows))
    write(out, "speed", {"values": BUCKET, "threads": 1, "repeats": args.repeats, "compressors": data})


def section_digits(args: argparse.Namespace, out: Path) -> None:
    torch.set_num_threads(1)
    runs = [("dsgd (fp32)", "dsgd", {})] + [
        (f"choco {label}", "choco", {"compression": name, "compression_options": options})
        for label, name, options in COMPRESSORS
        if name != "none"
    ]
    results: dict[str, dict[str, Any]] = {}
    for alpha in args.alphas:
        for seed in range(args.seeds):
            problem = Digits(n=args.n, alpha=alpha, batch_size=32, seed=seed).to(torch.float32)
            for label, algorithm, options in runs:
                result = simulate(
                    problem, algorithm, "ring", steps=args.steps, lr=0.1, eval_every=args.steps, seed=seed,
                    dtype=torch.float32, **options,
                )  # fmt: skip
                entry = results.setdefault(f"{label} @ alpha {alpha:g}", {"accuracy": [], "loss": []})
                entry["accuracy"].append(result.final("accuracy"))
                entry["loss"].append(result.final("loss"))
                entry["bytes_per_node_step"] = result.bytes_sent_per_node_step
                entry["gamma"] = get_algorithm(algorithm, **options).gamma if algorithm == "choco" else None
    rows = []
    for alpha in args.alphas:
        reference = np.mean(results[f"dsgd (fp32) @ alpha {alpha:g}"]["accuracy"])
        for label, _, _ in runs:
            entry = results[f"{label} @ alpha {alpha:g}"]
            accuracy = np.array(entry["accuracy"])
            entry["mean"], entry["gap_to_dsgd"] = float(accuracy.mean()), float(accuracy.mean() - reference)
            fp32 = results[f"dsgd (fp32) @ alpha {alpha:g}"]["bytes_per_node_step"]
            sent = entry["bytes_per_node_step"]
            gamma = "-" if entry["gamma"] is None else f"{entry['gamma']:g}"
            rows.append(
                [f"{alpha:g}", label, gamma, f"{accuracy.mean():.4f}", f"{accuracy.min():.4f}..{accuracy.max():.4f}",
                 f"{100 * entry['gap_to_dsgd']:+.2f}", f"{np.mean(entry['loss']):.4f}",
                 f"{sent:,.0f} ({sent / fp32:.3f})"]
            )  # fmt: skip
    title = (
        f"digits MLP (sim), {args.n} nodes on a ring, Dirichlet alpha {args.alphas}, batch 32, lr 0.1, "
        f"{args.steps} steps, {args.seeds} seeds; default gamma per compressor"
    )
    header = [
        "alpha",
        "run",
        "gamma",
        "accuracy (mean)",
        "min..max",
        "gap to dsgd (pp)",
        "train loss",
        "bytes/node/step (x fp32)",
    ]
    print(f"\n## digits: {title}\n" + table(header, rows))
    write(out, "digits", {"title": title, "runs": results})


def _average_worker(rank: int, world: int, port: int, repeats: int, queue: Any) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), OMP_NUM_THREADS="1")
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    comm = AllReduceCommunicator(get_topology("ring", world))
    int8 = get_compressor("int8")
    x = torch.randn(BUCKET, generator=torch.Generator().manual_seed(rank))
    cases = {
        "fp32 all-reduce": lambda step: comm.global_average([x]),
        "int8 two-stage (reduce-scatter + all-gather)": lambda step: comm.average_compressed([x], int8, step),
        "int8 all-gather of payloads": lambda step: all_gather_average(comm, [x], int8, step),
    }
    for label, run in cases.items():
        run(0)  # allocate buffers
        comm.stats.reset()
        dist.barrier()
        start = time.perf_counter()
        for step in range(repeats):
            run(step + 1)
        seconds = (time.perf_counter() - start) / repeats
        queue.put((label, rank, seconds, comm.stats.bytes_sent / repeats))
    dist.destroy_process_group()


def section_average(args: argparse.Namespace, out: Path) -> None:
    world = 4
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    port = 29000 + os.getpid() % 1000
    procs = [ctx.Process(target=_average_worker, args=(r, world, port, args.repeats, queue)) for r in range(world)]
    for p in procs:
        p.start()
    items = [queue.get(timeout=600) for _ in range(3 * world)]
    for p in procs:
        p.join()
    rows, data = [], {}
    for label in dict.fromkeys(item[0] for item in items):
        mine = [item for item in items if item[0] == label]
        seconds, sent = max(i[2] for i in mine), mine[0][3]
        rows.append([label, f"{sent:,.0f}", f"{sent / (4 * BUCKET):.3f}", f"{seconds * 1e3:.0f}"])
        data[label] = {"bytes_sent_per_rank": sent, "seconds": seconds}
    print(f"\n## compressed global average, {world} gloo processes on loopback, 25 MB bucket, 1 thread each")
    print(table(["method", "bytes sent per rank", "x model", "ms per average"], rows))
    write(out, "average", {"world": world, "values": BUCKET, "methods": data})


SECTIONS = {"bytes": section_bytes, "speed": section_speed, "digits": section_digits, "average": section_average}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "compression")
    parser.add_argument("--only", choices=list(SECTIONS))
    parser.add_argument("--n", type=int, default=8, help="simulated nodes (digits)")
    parser.add_argument("--steps", type=int, default=1000)
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--alphas", type=float, nargs="+", default=[0.1, 100.0])
    parser.add_argument("--repeats", type=int, default=3, help="timing repeats (speed, average)")
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    for name, section in SECTIONS.items():
        if args.only in (None, name):
            section(args, args.out)
    print(f"\nwrote {args.out}/*.json in {time.perf_counter() - start:.0f} s")


if __name__ == "__main__":
    main()
