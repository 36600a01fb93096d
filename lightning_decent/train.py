"""The training application: ``python -m lightning_decent.train [group=option ...] [key=value ...]``.

Hydra composes ``train.yaml`` from the package's configs (``lightning_decent.conf``, the repository's
``conf/`` folder): recipe, topology, algorithm, optimizer, trainer, logger, strategy, callbacks, and
optionally an experiment, a debug mode and a hyper-parameter search. ``--help`` lists the groups and
examples; ``--cfg job`` prints the composed configuration without loading torch (this module imports
only Hydra; :mod:`lightning_decent.app.run` trains). The return value of the Hydra main is the run's
optimised metric, for sweepers that optimise it (``optimized_metric``, default the recipe's monitor).

Lightning's popen launcher re-executes this module for ranks 1..n-1 with ``hydra.run.dir`` set
to rank 0's directory; the run's name travels in ``$LIGHTNING_DECENT_RUN_ID`` so that sweeps
(``-m``) resolve the same directories in every rank too.
"""

from __future__ import annotations

import logging
import os
import warnings

import hydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig

from lightning_decent.app.config_check import CONFIG_MODULE, check_added_keys
from lightning_decent.app.resolvers import RUN_ID_ENV, new_run_id, register_resolvers
from lightning_decent.app.run_log import send_lightning_logs_to_root

register_resolvers()
log = logging.getLogger(__name__)


def run_job(cfg: DictConfig, overrides: list[str]) -> float | None:
    """Check the command line's added keys, train, and return the value of ``optimized_metric`` (default the
    recipe's monitor) of the decentralized run: what a sweeper (Optuna, Ax) optimises."""
    check_added_keys(cfg, overrides)
    from lightning_decent.app.run import train  # torch and Lightning load only when a run starts

    send_lightning_logs_to_root()  # after Lightning's import, which adds its console handlers
    # ThroughputMonitor asks for a FLOPs estimate that the recipes do not provide; samples/s is what it is for here.
    warnings.filterwarnings("ignore", message=".*`flops_per_batch`.*")
    runs = train(cfg)
    metric = cfg.get("optimized_metric") or cfg.recipe.monitor
    value = runs[0].metrics.get(metric)
    if value is None:
        log.warning(f"optimized_metric {metric!r} is not among the run's metrics {sorted(runs[0].metrics)}.")
    return value


@hydra.main(version_base="1.3", config_path=f"pkg://{CONFIG_MODULE}", config_name="train")
def _hydra_main(cfg: DictConfig) -> float | None:
    return run_job(cfg, list(HydraConfig.get().overrides.task))


def main() -> None:
    """Console entry point (``lightning-decent-train``); Hydra reads the overrides from ``sys.argv``."""
    os.environ.setdefault(RUN_ID_ENV, new_run_id())
    _hydra_main()


if __name__ == "__main__":
    main()
