"""Runs several short trainings in one 4-process launch and writes what each rank saw as JSON.

Used by ``tests/test_strategy_multiprocess.py`` (one launch amortises the start-up cost over all
checks). Usage: ``python strategy_checks.py OUT_DIR [--devices 4]``.
"""

from __future__ import annotations

import argparse
import json
import os
from functools import partial
from pathlib import Path

import lightning.pytorch as pl
import torch
import torch.distributed as dist
from lightning.pytorch.loggers import Logger

from lightning_decent import DecentralizedStrategy
from lightning_decent.recipes.digits import DigitsClassifier, DigitsDataModule

GLOBAL_COLLECTIVES = ("all_reduce", "broadcast", "all_gather", "all_gather_object", "barrier", "reduce", "scatter")


class CollectiveSpy:
    """Counts calls of world-wide collectives made during training batches (validation excluded)."""

    def __init__(self) -> None:
        self.inside_step = False
        self.calls: dict[str, int] = {}
        for name in GLOBAL_COLLECTIVES:
            original = getattr(dist, name)
            setattr(dist, name, self._wrap(name, original))

    def _wrap(self, name, original):
        def counted(*args, **kwargs):
            if self.inside_step:
                self.calls[name] = self.calls.get(name, 0) + 1
            return original(*args, **kwargs)

        return counted


SPY = CollectiveSpy()


class SpyDuringTraining(pl.Callback):
    """Switches the spy on for the training steps (Lightning's own per-step calls included; not the start of
    ``fit``, where the strategy exchanges the ranks' epoch lengths once)."""

    def on_train_batch_start(self, *args) -> None:
        SPY.inside_step = True

    def on_validation_start(self, *args) -> None:
        SPY.inside_step = False

    def on_validation_end(self, trainer, *args) -> None:
        SPY.inside_step = trainer.training

    def on_train_end(self, *args) -> None:
        SPY.inside_step = False


class ReplicaAtTrainEnd(pl.Callback):
    """The local replica's checksums when training ends, before the strategy's own ``on_train_end``
    (callbacks run first) replaces it by the network average (``final_model="average"``)."""

    def on_train_end(self, trainer, module) -> None:
        self.checksums = checksums(module)


class MetricsSeen(Logger):
    """Every metric Lightning writes to its loggers, with its step, on every rank."""

    name, version = "seen", 0

    def __init__(self) -> None:
        super().__init__()
        self.points: list[tuple[int, dict[str, float]]] = []

    def log_metrics(self, metrics: dict[str, float], step: int | None = None) -> None:
        self.points.append((int(step or 0), dict(metrics)))

    def log_hyperparams(self, *args, **kwargs) -> None:
        pass


def checksums(module: torch.nn.Module) -> list[float]:
    """Two linear functionals of the parameters: their sum and a dot product with fixed weights."""
    flat = flat_params(module)
    return [flat.sum().item(), (flat * torch.linspace(-1, 1, flat.numel(), dtype=flat.dtype)).sum().item()]


def flat_params(module: torch.nn.Module) -> torch.Tensor:
    return torch.cat([p.detach().reshape(-1).double() for p in module.parameters()])


def trainer(strategy, devices: int, logger=False, **kwargs) -> pl.Trainer:
    return pl.Trainer(
        accelerator="cpu",
        devices=devices,
        strategy=strategy,
        logger=logger,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        **kwargs,
    )


def run(out: Path, devices: int) -> None:
    results: dict[str, dict] = {}
    plain_sgd = partial(torch.optim.SGD, lr=0.1)

    replica_at_end = ReplicaAtTrainEnd()

    def fit(name: str, strategy, model_kwargs=None, **trainer_kwargs) -> tuple[pl.Trainer, DigitsClassifier]:
        pl.seed_everything(0, workers=True)
        model = DigitsClassifier(**(model_kwargs or {}))
        t = trainer(strategy, devices, callbacks=[SpyDuringTraining(), replica_at_end], **trainer_kwargs)
        t.fit(model, DigitsDataModule(batch_size=32))
        return t, model

    # (1) complete graph + plain SGD == DDP after 20 steps.
    # float64 so that the comparison measures the algorithm, not float32 rounding order.
    exact = {"max_steps": 20, "num_sanity_val_steps": 0, "limit_val_batches": 0, "precision": "64-true"}
    _, ddp_model = fit("ddp", "ddp", {"optimizer": plain_sgd}, **exact)
    strategy = DecentralizedStrategy(topology="complete")
    _, model = fit("complete", strategy, {"optimizer": plain_sgd}, **exact)
    results["complete_vs_ddp"] = {"max_abs_diff": (flat_params(model) - flat_params(ddp_model)).abs().max().item()}

    # (2) gossip on sparse graphs vs DDP accuracy after the same number of epochs.
    epochs = 8
    t, _ = fit("ddp_acc", "ddp", max_epochs=epochs, num_sanity_val_steps=0)
    results["ddp_accuracy"] = {"val_acc": float(t.callback_metrics["val/acc"])}
    SPY.calls.clear()
    for topology in ("ring", "one_peer_exponential"):
        strategy = DecentralizedStrategy(topology=topology, log_consensus_every=0, final_model="local")
        t, model = fit(topology, strategy, max_epochs=epochs, num_sanity_val_steps=0)
        before = flat_params(model)
        distance, relative = strategy.consensus_distance()
        t.validate(model, DigitsDataModule(batch_size=32), verbose=False)
        results[topology] = {
            "val_acc": float(t.callback_metrics["val/acc"]),
            "consensus_distance": distance,
            "consensus_relative": relative,
            "params_restored_after_validate": bool(torch.equal(before, flat_params(model))),
            "param_checksum": before.sum().item(),
            "global_step": t.global_step,
            "gossip_step": strategy.gossip_step,
            "bytes_sent": strategy.comm_stats.bytes_sent,
            "param_bytes": sum(p.numel() * p.element_size() for p in model.parameters()),
            "collectives_during_steps": dict(SPY.calls),
        }
        SPY.calls.clear()

    # (3) bytes per step and receive sets for static, directed and time-varying graphs; what fit leaves
    # behind (final_model="average", the default).
    for topology in ("exponential", "directed_ring", "one_peer_exponential"):
        strategy = DecentralizedStrategy(topology=topology)
        t, model = fit(topology + "_short", strategy, max_steps=6, num_sanity_val_steps=0, limit_val_batches=0)
        assert strategy.topology is not None
        rank = t.global_rank
        results[topology + "_short"] = {
            "steps": strategy.gossip_step,
            "bytes_sent": strategy.comm_stats.bytes_sent,
            "messages_received": strategy.comm_stats.messages_received,
            "bytes_received": strategy.comm_stats.bytes_received,
            "expected_out_degree_sum": sum(len(strategy.topology.out_neighbors(rank, k)) for k in range(6)),
            "expected_in_degree_sum": sum(len(strategy.topology.in_neighbors(rank, k)) for k in range(6)),
            "param_bytes": sum(p.numel() * p.element_size() for p in model.parameters()),
            "buckets": sum(len(b) for b, _ in strategy._buckets.values()),
            "local_checksums_at_end": replica_at_end.checksums,
            "final_checksums": checksums(model),
        }

    # (4) accumulation, bf16 autocast, clipping, LR scheduler.
    strategy = DecentralizedStrategy(topology="ring")
    scheduler = partial(torch.optim.lr_scheduler.StepLR, step_size=2, gamma=0.5)
    t, model = fit(
        "accumulate",
        strategy,
        {"scheduler": scheduler},
        max_steps=5,
        accumulate_grad_batches=2,
        precision="bf16-mixed",
        gradient_clip_val=0.5,
        num_sanity_val_steps=0,
        limit_val_batches=2,
    )
    results["accumulate"] = {
        "global_step": t.global_step,
        "gossip_step": strategy.gossip_step,
        "lr": t.optimizers[0].param_groups[0]["lr"],
        "finite": bool(torch.isfinite(flat_params(model)).all()),
    }

    # (5) logged bytes: a sync of DiLoCo every 3 steps, loggers writing every 2 steps
    seen = MetricsSeen()
    strategy = DecentralizedStrategy(algorithm="diloco", algorithm_options={"H": 3})
    fit("logged_bytes", strategy, max_steps=6, num_sanity_val_steps=0, limit_val_batches=0, logger=seen,
        log_every_n_steps=2)  # fmt: skip
    results["logged_bytes"] = {
        "points": [(step, m["gossip/bytes_sent"]) for step, m in seen.points if "gossip/bytes_sent" in m],
        "bytes_sent": strategy.comm_stats.bytes_sent,
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
