"""One run of the training application: build everything from the composed config, fit, test, report.

Every object is built with ``hydra.utils.instantiate``, and ``trainer.fit`` runs the recipe with the
configured strategy, then ``trainer.validate`` and (``test: true``, where the recipe has a test set)
``trainer.test`` evaluate the model fit leaves behind; optionally a second fit with Lightning's
``DDPStrategy`` follows, logged to the same loggers. Each run writes into its own directory: the
resolved ``config.yaml`` (also logged as hyper-parameters), ``train.log``, the loggers' files,
``checkpoints/``, and at the end (rank 0) ``training_curves.png``, ``summary.json`` and ``summary.md``.
The entry point that Hydra calls is :mod:`lightning_decent.train`.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch
from hydra.utils import instantiate
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.loggers import CSVLogger, WandbLogger
from lightning.pytorch.strategies import DDPStrategy, Strategy
from lightning.pytorch.utilities import rank_zero_only
from lightning.pytorch.utilities.model_helpers import is_overridden
from omegaconf import DictConfig, OmegaConf, open_dict

from lightning_decent.algorithms import Algorithm, LocalSteps
from lightning_decent.app.callbacks import throughput_monitor
from lightning_decent.app.loggers import instantiate_loggers
from lightning_decent.app.report import RunResult, plot_results, write_summary
from lightning_decent.strategy import DecentralizedStrategy

log = logging.getLogger(__name__)


def instantiate_named(group: DictConfig | None) -> list[Any]:
    """Instantiate every non-null entry of a ``{name: config}`` group (callbacks, loggers)."""
    return [instantiate(node) for node in (group or {}).values() if node is not None]


def with_run_label(cfg: DictConfig, run_label: str) -> DictConfig:
    """A copy of ``cfg`` for one fit, named ``run_label`` (``gossip`` or ``ddp``) in its loggers."""
    labelled = cfg.copy()
    with open_dict(labelled):
        labelled.run_label = run_label
    return labelled


def run_name(topology: str, algorithm: Algorithm, communicator: str) -> str:
    """What a decentralized run did, for the summary and the plot's legend.

    ``<algorithm> (all-reduce every step)`` for ``communicator="allreduce"``, ``<algorithm> (all-reduce every
    H steps)`` for the local-steps algorithms that average exactly (``local_sgd``, ``diloco``: the graph is
    not used), else ``gossip <topology>/<algorithm> (<communicator>)``.
    """
    if communicator == "allreduce":
        return f"{algorithm.name} (all-reduce every step)"
    if isinstance(algorithm, LocalSteps) and algorithm.averages:
        return f"{algorithm.name} (all-reduce every {algorithm.schedule.period} steps)"
    return f"gossip {topology}/{algorithm.name} ({communicator})"


def _run_name(strategy: Strategy) -> str:
    """:func:`run_name` of the decentralized strategy, else the strategy's class, e.g. ``DDP``."""
    if not isinstance(strategy, DecentralizedStrategy):
        return type(strategy).__name__.removesuffix("Strategy")
    assert strategy.topology is not None
    communicator = type(strategy.communicator).__name__.removesuffix("Communicator").lower()
    return run_name(strategy.topology.name, strategy.algorithm, communicator)


def _bytes_sent_per_step(strategy: Strategy) -> float | None:
    """Gossip bytes sent per optimizer step, averaged over ranks (one all-reduce; every rank calls it)."""
    if not isinstance(strategy, DecentralizedStrategy) or strategy.gossip_step == 0:
        return None
    local = torch.tensor(strategy.comm_stats.bytes_sent / strategy.gossip_step, device=strategy.root_device)
    return float(strategy.reduce(local, reduce_op="mean"))


def _throughput(trainer: pl.Trainer) -> tuple[float | None, float | None]:
    """``(training seconds, global samples/s)`` from the ThroughputMonitor's last logged values (rank 0)."""
    logged = trainer.logged_metrics
    if "train/time" not in logged or "train/samples" not in logged:
        return None, None
    seconds = float(logged["train/time"])
    return seconds, float(logged["train/samples"]) * trainer.world_size / max(seconds, 1e-9)


def build_model(cfg: DictConfig) -> pl.LightningModule:
    """The recipe's LightningModule. Network, optimizer and schedule reach it as plain configs, which it
    instantiates and saves as hyper-parameters, so ``Model.load_from_checkpoint(path)`` rebuilds it."""
    model = OmegaConf.to_container(cfg.model, resolve=True)
    optimizer = OmegaConf.to_container(cfg.optimizer, resolve=True)
    return instantiate(model, optimizer=optimizer, _recursive_=False, _convert_="all")


def has_test_set(model: pl.LightningModule, datamodule: pl.LightningDataModule) -> bool:
    """Whether the recipe defines a test stage: the model's ``test_step`` and the data's ``test_dataloader``."""
    return is_overridden("test_step", model) and is_overridden("test_dataloader", datamodule)


def fit_and_validate(
    cfg: DictConfig,
    strategy: Strategy,
    callbacks: list[Callback],
    ckpt_path: str | None = None,
    **trainer_overrides: Any,
) -> tuple[RunResult, pl.Trainer]:
    """Seed, build data, model and trainer from ``cfg``, fit, then validate (and with ``cfg.test``, where the
    recipe has a test set, test) the model fit leaves behind: the network average.

    Args:
        cfg: the composed configuration (see :func:`with_run_label`); its resolved form is logged to each
            of its loggers as hyper-parameters.
        strategy: the training strategy.
        callbacks: callbacks besides the throughput meter that this function adds.
        ckpt_path: a checkpoint to resume from.
        trainer_overrides: ``Trainer`` arguments that replace the config's.
    """
    pl.seed_everything(cfg.seed, workers=True)
    datamodule = instantiate(cfg.data)
    model = build_model(cfg)
    trainer = instantiate(
        cfg.trainer,
        strategy=strategy,
        callbacks=[throughput_monitor(), *callbacks],
        logger=instantiate_loggers(cfg.logger),
        **trainer_overrides,
    )
    config = OmegaConf.to_container(cfg, resolve=True)
    for logger in trainer.loggers:
        logger.log_hyperparams(config)
    trainer.fit(model, datamodule=datamodule, ckpt_path=ckpt_path)
    train_time_s, samples_per_s = _throughput(trainer)  # before validate() resets the logged metrics
    metrics = trainer.validate(model, datamodule=datamodule, verbose=False)[0]
    if cfg.get("test") and has_test_set(model, datamodule):
        metrics.update(trainer.test(model, datamodule=datamodule, verbose=False)[0])
    csv_logs = [Path(lg.log_dir) / "metrics.csv" for lg in trainer.loggers if isinstance(lg, CSVLogger)]
    result = RunResult(
        name=_run_name(trainer.strategy),
        metrics={name: float(value) for name, value in metrics.items()},
        steps=trainer.global_step,
        train_time_s=train_time_s,
        samples_per_s=samples_per_s,
        bytes_sent_per_step=_bytes_sent_per_step(trainer.strategy),
        metrics_csv=str(csv_logs[0]) if csv_logs else None,
    )
    for logger in trainer.loggers:
        if isinstance(logger, WandbLogger) and trainer.is_global_zero:
            logger.experiment.finish()  # the next fit (the DDP comparison) starts its own W&B run
    return result, trainer


def _report(cfg: DictConfig, runs: list[RunResult], trainer: pl.Trainer, out_dir: Path) -> None:
    """Rank 0: the runs' curves from their CSV logs, the summary table logged and saved."""
    curves = plot_results(runs, cfg.recipe.monitor, out_dir / "training_curves.png")
    checkpoint = getattr(trainer.checkpoint_callback, "best_model_path", "") or None
    info = {
        "recipe": cfg.recipe.name,
        "monitor": cfg.recipe.monitor,
        "world_size": trainer.world_size,
        "accelerator": type(trainer.accelerator).__name__,
        "output_dir": str(out_dir),
        "checkpoint": checkpoint,
        "training_curves": str(curves) if curves else None,
    }
    title = f"{cfg.recipe.name}: {trainer.world_size} x {info['accelerator'].removesuffix('Accelerator')}"
    markdown = write_summary(out_dir, runs, title, info)
    log.info(f"\n{markdown}\nRun directory: {out_dir}")


def train(cfg: DictConfig) -> list[RunResult]:
    """Run the configured training (and the DDP comparison if ``compare_with_ddp``); return the results.

    Every rank calls this; only rank 0 writes the resolved config and the report.
    """
    out_dir = Path(cfg.paths.output_dir)
    rank_zero_only(_save_resolved_config)(cfg, out_dir)
    strategy = instantiate(cfg.strategy)
    label = "gossip" if isinstance(strategy, DecentralizedStrategy) else "ddp"
    callbacks = instantiate_named(cfg.get("callbacks"))
    result, trainer = fit_and_validate(with_run_label(cfg, label), strategy, callbacks, cfg.ckpt_path)
    runs = [result]
    if cfg.compare_with_ddp:
        # The same data, model and epochs with all-reduce. Lightning reuses this run's processes and
        # process group (LOCAL_RANK is set now), so no new processes start.
        bar = OmegaConf.select(cfg, "callbacks.progress_bar")
        progress_bar = [instantiate(bar)] if bar is not None else []
        baseline, _ = fit_and_validate(
            with_run_label(cfg, "ddp"), DDPStrategy(), progress_bar, enable_checkpointing=False
        )
        runs.append(baseline)
    if trainer.is_global_zero:
        _report(cfg, runs, trainer, out_dir)
    return runs


def _save_resolved_config(cfg: DictConfig, out_dir: Path) -> None:
    out_dir.mkdir(parents=True, exist_ok=True)
    OmegaConf.save(cfg, out_dir / "config.yaml", resolve=True)
