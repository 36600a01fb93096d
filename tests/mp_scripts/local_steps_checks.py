"""Local-steps algorithms in real multi-process training against the papers' recursions written by hand.

Each rank trains :class:`sim_equivalence.NodeObjective` (its node's objective of a simulator problem,
exact gradients, float64) through ``DecentralizedStrategy`` and records the largest difference between
its parameters and its row of ``local_steps_reference``'s result. Used by
``tests/test_local_steps_multiprocess.py`` with 2 and 4 ranks.
Usage: ``python local_steps_checks.py OUT_DIR [--devices 4]``.
"""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path

import torch.distributed as dist
from local_steps_reference import diloco_reference, gasloc_reference
from sim_equivalence import LR, STEPS, NodeObjective, node_trainer

from lightning_decent import DecentralizedStrategy
from lightning_decent.sim import get_problem
from lightning_decent.topology import get_topology

GASLOC = {"outer_optimizer": "sgd", "outer_lr": 0.8, "outer_momentum": 0.0, "gossip_momentum": 0.5}

# (case, communicator, topology, algorithm, options, inner SGD momentum)
CASES = [
    ("diloco", "p2p", "ring", "diloco", {"H": 4}, 0.9),
    ("diloco_streaming", "p2p", "ring", "diloco", {"H": 6, "fragments": 3, "delay": 1, "mix": 0.5}, 0.0),
    ("diloco_streaming_allreduce", "allreduce", "ring", "diloco", {"H": 4, "fragments": 2, "delay": 1}, 0.9),
    ("gasloc_one_peer", "p2p", "one_peer_exponential", "gasloc", {"H": 3, **GASLOC}, 0.0),
]


def reference(algorithm: str, topology: str, options: dict, momentum: float, devices: int):
    problem = get_problem("logistic", n=devices, dim=6, samples=8, heterogeneity=1.0, seed=0)
    if algorithm == "diloco":
        return diloco_reference(problem, STEPS, LR, momentum=momentum, **options)
    graph = get_topology(topology, devices)
    return gasloc_reference(
        problem, graph, STEPS, LR, options["H"], outer_lr=options["outer_lr"], gamma=options["gossip_momentum"]
    )


def run(out: Path, devices: int) -> None:
    results: dict[str, dict] = {}
    for case, communicator, topology, algorithm, options, momentum in CASES:
        problem = get_problem("logistic", n=devices, dim=6, samples=8, heterogeneity=1.0, seed=0)
        model = NodeObjective(problem, momentum)
        strategy = DecentralizedStrategy(
            topology=topology,
            algorithm=algorithm,
            communicator=communicator,
            algorithm_options=dict(options),
            final_model="local",
        )
        trainer = node_trainer(strategy, devices)
        trainer.fit(model)
        expected = reference(algorithm, topology, options, momentum, devices)[trainer.global_rank]
        results[case] = {
            "max_abs_diff": (model.x.detach() - expected).abs().max().item(),
            "moved": (model.x.detach() - problem.initial_params()).abs().max().item(),
            "bytes_sent": strategy.comm_stats.bytes_sent,
            "param_bytes": model.x.numel() * model.x.element_size(),
        }
    rank = dist.get_rank() if dist.is_initialized() else 0
    (out / f"rank{rank}.json").write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("out", type=Path)
    parser.add_argument("--devices", type=int, default=4)
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    run(args.out, args.devices)
