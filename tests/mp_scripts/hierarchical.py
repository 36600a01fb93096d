"""One machine of a 2-machine x 2-process hierarchical-gossip check, launched by torchrun in a namespace.

``torchrun --nnodes 2 --nproc-per-node 2 --node-rank R ... hierarchical.py OUT``. Every rank mixes a
buffer with :class:`HierarchicalCommunicator` (``W = lazy_ring(2) (x) 11^T/2``), then the same rounds with
the flat :class:`P2PCommunicator` on the same W, and saves its results; local rank 0 also records the
bytes its machine's interface sent during each part.
"""

from __future__ import annotations

import json
import os
import sys
import time
from datetime import timedelta
from pathlib import Path

import torch
import torch.distributed as dist

from lightning_decent.comm import HierarchicalCommunicator, P2PCommunicator
from lightning_decent.topology import hierarchical

ELEMENTS = 1 << 21  # 8 MB of float32 per rank: the payload dwarfs the protocol's own bytes
STEPS = 3


def initial(rank: int) -> torch.Tensor:
    return torch.randn(ELEMENTS, generator=torch.Generator().manual_seed(rank))


def interface_bytes() -> int:
    """eth0's transmit counter once it stops moving: a finished send may still sit in the socket and the
    shaper's queue (read at once, the last ~100 kB of a part were counted in the next part or not at all)."""
    last = int(Path("/sys/class/net/eth0/statistics/tx_bytes").read_text())
    while True:
        time.sleep(0.2)
        now = int(Path("/sys/class/net/eth0/statistics/tx_bytes").read_text())
        if now == last:
            return now
        last = now


def timed_rounds(comm, rank: int) -> tuple[torch.Tensor, int]:
    """``STEPS`` rounds of ``comm`` on this rank's buffer, and the bytes eth0 sent meanwhile."""
    buffer = initial(rank)
    dist.barrier()
    before = interface_bytes()
    for step in range(STEPS):
        comm.mix([buffer], step)
    dist.barrier()
    return buffer, interface_bytes() - before


def main(out: Path) -> None:
    dist.init_process_group("gloo", timeout=timedelta(seconds=120))
    rank = dist.get_rank()
    topology = hierarchical(dist.get_world_size(), machines="lazy_ring")  # local_world_size: $LOCAL_WORLD_SIZE
    hier = HierarchicalCommunicator(topology, rank)
    mixed, hier_bytes = timed_rounds(hier, rank)
    flat = P2PCommunicator(topology, rank)
    flat_mixed, flat_bytes = timed_rounds(flat, rank)
    torch.save({"hierarchical": mixed, "flat": flat_mixed}, out / f"rank{rank}.pt")
    result = {
        "rank": rank,
        "local_rank": int(os.environ["LOCAL_RANK"]),
        "interface_bytes": {"hierarchical": hier_bytes, "flat": flat_bytes},
        "counted": {"between_machines": hier.between_machines.bytes_sent, "flat": flat.stats.bytes_sent},
    }
    (out / f"rank{rank}.json").write_text(json.dumps(result))
    hier.close()
    flat.close()
    dist.destroy_process_group()


if __name__ == "__main__":
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    main(Path(sys.argv[1]))
