"""Real 4-process training through ``DecentralizedStrategy`` vs the simulator, for every algorithm.

Each rank trains a LightningModule whose loss is its own node's objective of the simulator's problem
(full local data, so exact gradients; float64), for 20 steps, then runs the simulator on the same
problem, graph and algorithm and records the largest difference between its parameters and the
simulator's row for its node, and between the network average that evaluation uses and the
simulator's (``(1/n) sum_i v_i z_i`` for push-sum). Used by ``tests/test_sim_equivalence.py`` (one launch, all cases).
Usage: ``python sim_equivalence.py OUT_DIR [--devices 4] [--only CASE_PREFIX]``.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
from pathlib import Path

import lightning.pytorch as pl
import torch
import torch.distributed as dist
from torch.utils.data import DataLoader

from lightning_decent import DecentralizedStrategy
from lightning_decent.evaluation import average_state_dict
from lightning_decent.sim import Problem, get_problem, simulate, stacked_average
from lightning_decent.topology import hierarchical

STEPS = 20
LR = 0.1
TWO_MACHINES = hierarchical(4, local_world_size=2, machines="lazy_ring")

# (case, problem, topology, algorithm, algorithm options, local SGD momentum)
CASES = [
    ("dsgd", "logistic", "ring", "dsgd", {}, 0.0),
    ("dmsgd", "logistic", "ring", "dsgd", {}, 0.9),
    ("dsgd_one_peer", "logistic", "one_peer_exponential", "dsgd", {}, 0.0),
    ("qg_dsgdm", "logistic", "ring", "qg_dsgdm", {}, 0.0),
    ("exact_diffusion", "logistic", "ring", "exact_diffusion", {}, 0.0),
    ("gradient_tracking", "logistic", "ring", "gradient_tracking", {}, 0.5),
    ("gradient_tracking_exponential", "logistic", "exponential", "gradient_tracking", {}, 0.0),
    ("gut", "logistic", "ring", "gut", {}, 0.0),
    ("qg_gut", "logistic", "ring", "qg_gut", {}, 0.0),
    ("gut_one_peer", "logistic", "one_peer_exponential", "gut", {"mu": 0.3}, 0.0),
    ("dsgd_pga_rounds", "logistic", "ring", "dsgd", {"global_average_every": 4, "gossip_rounds": 2}, 0.0),
    ("gut_digits", "digits", "ring", "gut", {}, 0.0),
    # directed (column-stochastic) graph: the push-sum weights v move away from 1
    ("push_sum_digraph", "logistic", "challenging_digraph", "push_sum", {}, 0.9),
    ("push_diging_digraph", "logistic", "challenging_digraph", "push_diging", {}, 0.0),
    ("mg_push_diging_digraph", "logistic", "challenging_digraph", "mg_push_diging", {"rounds": 2}, 0.0),
    # local steps: the all-reduce outer sync (blocking and asynchronous) and the gossip one (p2p, in flight)
    ("local_sgd_warmup", "logistic", "ring", "local_sgd", {"H": 3, "warmup_steps": 4}, 0.9),
    ("diloco", "logistic", "ring", "diloco", {"H": 4}, 0.9),
    ("diloco_streaming", "logistic", "ring", "diloco", {"H": 6, "fragments": 3, "delay": 1, "mix": 0.5}, 0.0),
    (
        "gasloc_one_peer_streaming",
        "logistic",
        "one_peer_exponential",
        "gasloc",
        {"H": 4, "fragments": 2, "delay": 1},
        0.0,
    ),
    ("gasloc_ring_momentum", "digits", "ring", "gasloc", {"H": 3, "gossip_momentum": 0.5}, 0.0),
    # compressed synchronisations (error feedback): two-stage average, blocking and started in the
    # background; a compressed gossip round in flight
    (
        "diloco_int8",
        "logistic",
        "ring",
        "diloco",
        {"H": 4, "compression": "int8", "compression_options": {"block": 4}},
        0.9,
    ),
    (
        "diloco_int8_streaming",
        "logistic",
        "ring",
        "diloco",
        {"H": 6, "fragments": 3, "delay": 1, "compression": "int8", "compression_options": {"block": 4}},
        0.0,
    ),
    (
        "gasloc_int8_one_peer_streaming",
        "logistic",
        "one_peer_exponential",
        "gasloc",
        {"H": 4, "fragments": 2, "delay": 1, "compression": "int8", "compression_options": {"block": 4}},
        0.0,
    ),
    # two machines of two ranks: W = lazy_ring(2) (x) 11^T/2, through the hierarchical communicator
    ("dsgd_hierarchical", "logistic", TWO_MACHINES, "dsgd", {}, 0.0),
    ("gradient_tracking_hierarchical", "logistic", TWO_MACHINES, "gradient_tracking", {}, 0.0),
    ("dsgd_base", "logistic", "base", "dsgd", {}, 0.0),
    # compressed gossip: payloads on the wire, decoded and mixed as the simulator's rows
    ("choco_identity", "logistic", "ring", "choco", {"compression": "none", "gamma": 1.0}, 0.0),
    ("choco_int8", "logistic", "ring", "choco", {"compression": "int8"}, 0.0),
    (
        "choco_int8_digits",
        "digits",
        "ring",
        "choco",
        {"compression": "int8", "compression_options": {"block": 64}},
        0.9,
    ),
    (
        "choco_topk",
        "logistic",
        "exponential",
        "choco",
        {"compression": "topk", "compression_options": {"fraction": 0.5}},
        0.0,
    ),
    (
        "choco_randomk",
        "logistic",
        "ring",
        "choco",
        {"compression": "randomk", "compression_options": {"fraction": 0.5}},
        0.0,
    ),
    # overlapped (one-step-delayed) forms: the strategy's overlap=True, the simulator's overlap option
    (
        "overlap_choco_int8",
        "logistic",
        "ring",
        "choco",
        {"compression": "int8", "compression_options": {"block": 4}, "overlap": True},
        0.9,
    ),
    (
        "overlap_choco_topk",
        "logistic",
        "exponential",
        "choco",
        {"compression": "topk", "compression_options": {"fraction": 0.5}, "gamma": 0.6, "overlap": True},
        0.0,
    ),
    ("overlap_gradient_tracking", "logistic", "ring", "gradient_tracking", {"overlap": True}, 0.5),
    (
        "overlap_gradient_tracking_one_peer",
        "logistic",
        "one_peer_exponential",
        "gradient_tracking",
        {"overlap": True},
        0.0,
    ),
    ("overlap_exact_diffusion", "logistic", "ring", "exact_diffusion", {"overlap": True}, 0.0),
]


def build_problem(name: str, n: int) -> Problem:
    if name == "digits":
        return get_problem("digits", n=n, alpha=0.5, hidden=8, batch_size=0, seed=0)
    return get_problem(name, n=n, dim=6, samples=8, heterogeneity=1.0, seed=0)


class NodeObjective(pl.LightningModule):
    """One node's objective ``f_rank(x)`` of a simulator problem; the batch only counts steps."""

    def __init__(self, problem: Problem, momentum: float) -> None:
        super().__init__()
        self.problem = problem
        self.momentum = momentum
        self.x = torch.nn.Parameter(problem.initial_params().clone())

    def training_step(self, batch: torch.Tensor, batch_idx: int) -> torch.Tensor:
        node = torch.tensor([self.global_rank])
        return self.problem.local_losses(self.x.unsqueeze(0), nodes=node)[0]

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=LR, momentum=self.momentum)

    def train_dataloader(self) -> DataLoader:
        return DataLoader(torch.zeros(STEPS * self.trainer.world_size), batch_size=1)


def node_trainer(strategy: DecentralizedStrategy, devices: int) -> pl.Trainer:
    """A float64 trainer of :data:`STEPS` steps on ``devices`` CPU ranks, without logging or checkpoints."""
    return pl.Trainer(
        accelerator="cpu",
        devices=devices,
        strategy=strategy,
        precision="64-true",
        max_steps=STEPS,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )


def neighbour_sum_gap(strategy: DecentralizedStrategy) -> float:
    """CHOCO's public copies agree on every rank: ``max |s_i - sum_j w_ij x_hat_j|``, with ``x_hat_j`` the copy
    that rank ``j`` holds of itself (gathered) and ``s_i`` the sum rank ``i`` built from the received ``q_j``."""
    (bucket,) = strategy._bucket_groups[0]
    public = bucket.state["public"]
    copies = [torch.empty_like(public) for _ in range(dist.get_world_size())]
    dist.all_gather(copies, public)
    assert strategy.topology is not None
    row = strategy.topology.matrix(0)[dist.get_rank()].tolist()
    expected = sum(weight * copy for weight, copy in zip(row, copies))
    return (bucket.state["neighbour_sum"] - expected).abs().max().item()


def run(out: Path, devices: int, only: str | None = None) -> None:
    results: dict[str, dict] = {}
    for case, problem_name, topology, algorithm, options, momentum in CASES:
        if only and not case.startswith(only):
            continue
        problem = build_problem(problem_name, devices)
        model = NodeObjective(problem, momentum)
        algorithm_options = {key: value for key, value in copy.deepcopy(options).items() if key != "overlap"}
        strategy = DecentralizedStrategy(
            topology=topology,
            algorithm=algorithm,
            algorithm_options=algorithm_options,
            final_model="local",
            overlap=options.get("overlap", False),
        )
        trainer = node_trainer(strategy, devices)
        trainer.fit(model)
        simulated = simulate(
            problem, algorithm, topology, steps=STEPS, lr=LR, momentum=momentum, eval_every=STEPS, **options
        )
        rank = trainer.global_rank
        # what evaluation and average.ckpt see
        evaluated = average_state_dict({"x": model.x.detach()}, strategy._average_weight(), strategy.collectives)["x"]
        expected_average = stacked_average(simulated.params, simulated.push_weights)
        results[case] = {
            "communicator": type(strategy.communicator).__name__,
            "max_abs_diff": (model.x.detach() - simulated.params[rank]).abs().max().item(),
            "average_max_abs_diff": (evaluated - expected_average).abs().max().item(),
            "plain_mean_gap": (simulated.params.mean(dim=0) - expected_average).abs().max().item(),
            "gossip_step": strategy.gossip_step,
            "moved": (model.x.detach() - problem.initial_params()).abs().max().item(),
            "params": model.x.detach().tolist(),
            **({"neighbour_sum_gap": neighbour_sum_gap(strategy)} if algorithm == "choco" else {}),
        }
    rank = dist.get_rank() if dist.is_initialized() else 0
    (out / f"rank{rank}.json").write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("out", type=Path)
    parser.add_argument("--devices", type=int, default=4)
    parser.add_argument("--only", help="run only the cases whose name starts with this")
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    run(args.out, args.devices, args.only)
