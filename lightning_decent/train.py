"""The training application: ``python -m lightning_decent.train [group=option ...] [key=value ...]``.

Hydra composes ``conf/train.yaml`` (recipe, topology, algorithm, optimizer, trainer, logger,
strategy), every object is built with ``hydra.utils.instantiate``, and one ``trainer.fit`` runs
the recipe with the configured strategy (optionally a second one with Lightning's
``DDPStrategy``). Each run writes into its own directory: the resolved ``config.yaml``, logs,
``checkpoints/``, and at the end (rank 0) ``training_curves.png``, ``summary.json`` and ``summary.md``.

Lightning's popen launcher re-executes this module for ranks 1..n-1 with ``hydra.run.dir`` set
to rank 0's directory; the run's name travels in ``$LIGHTNING_DECENT_RUN_ID`` so that sweeps
(``-m``) resolve the same directories in every rank too. See the README.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import hydra
import lightning.pytorch as pl
import torch
from hydra.utils import instantiate
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.loggers import CSVLogger
from lightning.pytorch.strategies import DDPStrategy, Strategy
from lightning.pytorch.utilities import rank_zero_only
from omegaconf import DictConfig, OmegaConf

from lightning_decent.app.callbacks import TrainingThroughput
from lightning_decent.app.report import RunResult, plot_training_curves, write_summary
from lightning_decent.app.resolvers import RUN_ID_ENV, new_run_id, register_resolvers
from lightning_decent.strategy import DecentralizedStrategy

register_resolvers()


def instantiate_named(group: DictConfig | None) -> list[Any]:
    """Instantiate every non-null entry of a ``{name: config}`` group (callbacks, loggers)."""
    return [instantiate(node) for node in (group or {}).values() if node is not None]


def _run_name(strategy: Strategy) -> str:
    """``gossip <topology>/<algorithm> (<communicator>)`` for the decentralized strategy, else e.g. ``DDP``."""
    if isinstance(strategy, DecentralizedStrategy):
        assert strategy.topology is not None
        communicator = type(strategy.communicator).__name__.removesuffix("Communicator").lower()
        return f"gossip {strategy.topology.name}/{strategy.algorithm.name} ({communicator})"
    return type(strategy).__name__.removesuffix("Strategy")


def _bytes_sent_per_step(strategy: Strategy) -> float | None:
    """Gossip bytes sent per optimizer step, averaged over ranks (one all-reduce; every rank calls it)."""
    if not isinstance(strategy, DecentralizedStrategy) or strategy.gossip_step == 0:
        return None
    local = torch.tensor(strategy.comm_stats.bytes_sent / strategy.gossip_step, device=strategy.root_device)
    return float(strategy.reduce(local, reduce_op="mean"))


def fit_and_validate(
    cfg: DictConfig,
    strategy: Strategy,
    callbacks: list[Callback],
    ckpt_path: str | None = None,
    **trainer_overrides: Any,
) -> tuple[RunResult, pl.Trainer]:
    """Seed, build data, model and trainer from ``cfg``, fit, then validate the final (averaged) model.

    Args:
        cfg: the composed configuration.
        strategy: the training strategy.
        callbacks: callbacks besides the throughput meter that this function adds.
        ckpt_path: a checkpoint to resume from.
        trainer_overrides: ``Trainer`` arguments that replace the config's (e.g. ``logger``).
    """
    pl.seed_everything(cfg.seed, workers=True)
    datamodule = instantiate(cfg.data)
    model = instantiate(cfg.model, optimizer=instantiate(cfg.optimizer))
    throughput = TrainingThroughput()
    trainer = instantiate(cfg.trainer, strategy=strategy, callbacks=[throughput, *callbacks], **trainer_overrides)
    trainer.fit(model, datamodule=datamodule, ckpt_path=ckpt_path)
    metrics = trainer.validate(model, datamodule=datamodule, verbose=False)[0]
    result = RunResult(
        name=_run_name(trainer.strategy),
        metrics={name: float(value) for name, value in metrics.items()},
        steps=trainer.global_step,
        train_time_s=throughput.train_time_s,
        samples_per_s=throughput.samples_per_s,
        bytes_sent_per_step=_bytes_sent_per_step(trainer.strategy),
    )
    return result, trainer


def _report(cfg: DictConfig, runs: list[RunResult], trainer: pl.Trainer, out_dir: Path) -> None:
    """Rank 0: training curves from the CSV log, the summary table printed and saved."""
    csv_logs = [Path(lg.log_dir) / "metrics.csv" for lg in trainer.loggers if isinstance(lg, CSVLogger)]
    curves = plot_training_curves(csv_logs[0], out_dir / "training_curves.png") if csv_logs else None
    checkpoint = getattr(trainer.checkpoint_callback, "best_model_path", "") or None
    info = {
        "recipe": cfg.recipe.name,
        "world_size": trainer.world_size,
        "accelerator": type(trainer.accelerator).__name__,
        "output_dir": str(out_dir),
        "checkpoint": checkpoint,
        "training_curves": str(curves) if curves else None,
    }
    title = f"{cfg.recipe.name}: {trainer.world_size} x {info['accelerator'].removesuffix('Accelerator')}"
    markdown = write_summary(out_dir, runs, title, info)
    print(f"\n{markdown}\nRun directory: {out_dir}", flush=True)


def train(cfg: DictConfig) -> list[RunResult]:
    """Run the configured training (and the DDP comparison if ``compare_with_ddp``); return the results.

    Every rank calls this; only rank 0 writes the resolved config and the report.
    """
    out_dir = Path(cfg.paths.output_dir)
    rank_zero_only(_save_resolved_config)(cfg, out_dir)
    callbacks = instantiate_named(cfg.callbacks)
    loggers = instantiate_named(cfg.logger)
    result, trainer = fit_and_validate(cfg, instantiate(cfg.strategy), callbacks, cfg.ckpt_path, logger=loggers)
    runs = [result]
    if cfg.compare_with_ddp:
        # The same data, model and epochs with all-reduce. Lightning reuses this run's processes and
        # process group (LOCAL_RANK is set now), so no new processes start.
        progress_bar = [instantiate(cfg.callbacks.progress_bar)] if cfg.callbacks.get("progress_bar") else []
        baseline, _ = fit_and_validate(cfg, DDPStrategy(), progress_bar, logger=False, enable_checkpointing=False)
        runs.append(baseline)
    if trainer.is_global_zero:
        _report(cfg, runs, trainer, out_dir)
    return runs


def _save_resolved_config(cfg: DictConfig, out_dir: Path) -> None:
    out_dir.mkdir(parents=True, exist_ok=True)
    OmegaConf.save(cfg, out_dir / "config.yaml", resolve=True)


@hydra.main(version_base="1.3", config_path="../conf", config_name="train")
def _hydra_main(cfg: DictConfig) -> None:
    train(cfg)


def main() -> None:
    """Console entry point (``lightning-decent-train``); Hydra reads the overrides from ``sys.argv``."""
    os.environ.setdefault(RUN_ID_ENV, new_run_id())
    _hydra_main()


if __name__ == "__main__":
    main()
