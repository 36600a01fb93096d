"""Where the application's options live: one key per option, the groups of the Hydra template, refused typos."""

from __future__ import annotations

import inspect
import logging
import os
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import CONF
from hydra import compose
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf

from lightning_decent import DecentralizedStrategy
from lightning_decent.algorithms import MODIFIER_OPTIONS, algorithm_options, get_algorithm
from lightning_decent.app.config_check import APP_KEYS, UnknownKeyError, check_added_keys
from lightning_decent.app.run import instantiate_named, run_name
from lightning_decent.app.run_log import send_lightning_logs_to_root

ROOT = Path(__file__).resolve().parents[1]
#: Arguments that Lightning's Trainer passes to every strategy; the config does not set them.
TRAINER_SET = {"accelerator", "parallel_devices", "cluster_environment", "checkpoint_io", "precision_plugin"}
#: Algorithm options that are strategy arguments (strategy.overlap, strategy.compression).
STRATEGY_SET = {"overlap", "compression", "compression_options"}


def make(tmp_path: Path, *overrides: str) -> DictConfig:
    return compose("train", overrides=[*overrides, f"paths.output_dir={tmp_path}"])


@pytest.mark.parametrize(
    ("overrides", "lr"),
    [
        ((), 0.05),  # digits is tuned for momentum SGD
        (("optimizer=dadam",), 1e-3),
        (("optimizer=adamw",), 1e-3),
        (("optimizer=dadam", "optimizer.lr=0.01"), 0.01),
        (("algorithm=push_diging",), 0.5),  # plain SGD at the effective step of momentum 0.9
        (("recipe=language_model", "optimizer=sgd"), 0.1),  # tuned for AdamW: SGD keeps its own
    ],
)
def test_a_chosen_optimizer_trains_at_its_own_rate_unless_the_recipe_tuned_it(
    hydra_context, tmp_path, overrides: tuple[str, ...], lr: float
) -> None:
    assert make(tmp_path, *overrides).optimizer.lr == pytest.approx(lr)


def test_push_diging_selects_plain_sgd() -> None:
    cfg = compose("train", overrides=["algorithm=mg_push_diging"])
    assert (cfg.optimizer._target_, cfg.optimizer.momentum) == ("torch.optim.SGD", 0.0)


def test_every_strategy_argument_is_a_key_of_the_strategy_config(hydra_context, tmp_path) -> None:
    parameters = set(inspect.signature(DecentralizedStrategy).parameters) - TRAINER_SET
    cfg = make(tmp_path)
    assert set(cfg.strategy) - {"_target_", "_convert_"} == parameters
    strategy = instantiate(
        make(tmp_path, "strategy.overlap=true", "algorithm=dsgd", "strategy.timeout.seconds=60").strategy
    )
    assert strategy.algorithm.overlap and strategy._timeout.total_seconds() == 60


@pytest.mark.parametrize("option", sorted(p.stem for p in (CONF / "algorithm").glob("*.yaml")))
def test_every_algorithm_option_is_a_key_of_its_group(hydra_context, tmp_path, option: str) -> None:
    cfg = make(tmp_path, f"algorithm={option}")
    algorithm = get_algorithm(cfg.algorithm.name)
    refused = set(MODIFIER_OPTIONS) if not _takes_modifiers(algorithm) else set()
    if cfg.algorithm.name in ("push_diging", "mg_push_diging"):
        refused = {"gossip_rounds"}
    expected = set(algorithm_options(cfg.algorithm.name)) - STRATEGY_SET - refused
    assert set(cfg.algorithm) - {"name"} == expected
    assert cfg.strategy.algorithm_options == {
        k: v for k, v in OmegaConf.to_container(cfg.algorithm).items() if k != "name"
    }


def _takes_modifiers(algorithm) -> bool:
    from lightning_decent.algorithms import Choco, LocalSteps

    return not isinstance(algorithm, (Choco, LocalSteps))


def test_an_algorithm_option_lives_in_one_place(hydra_context, tmp_path) -> None:
    cfg = make(tmp_path, "algorithm=diloco", "algorithm.H=8")
    resolved = OmegaConf.to_container(cfg, resolve=True)
    assert resolved["algorithm"]["H"] == resolved["strategy"]["algorithm_options"]["H"] == 8
    assert instantiate(cfg.strategy).algorithm.schedule.period == 8


@pytest.mark.parametrize(
    ("added", "named"),
    [
        ("+compression=int8", "strategy.compression=int8"),
        ("+strategy.overlapp=true", "strategy.overlap=true"),
        ("+algorithm.gossip_round=2", "algorithm.gossip_rounds=2"),
        ("+trainer.max_epoch=3", "trainer.max_epochs=3"),
    ],
)
def test_an_added_key_that_nothing_reads_is_refused_naming_the_nearest_key(
    hydra_context, tmp_path, added: str, named: str
) -> None:
    cfg = make(tmp_path, added)
    with pytest.raises(UnknownKeyError, match=f"Did you mean {named.partition('=')[0]}\\? \\({named}\\)"):
        check_added_keys(cfg, [added])


def test_added_keys_that_are_read_are_accepted(hydra_context, tmp_path) -> None:
    added = ["+trainer.fast_dev_run=true", "+optimizer.dampening=0.1", "++model.net.width=8"]
    check_added_keys(make(tmp_path, *added), [*added, "+debug=default", "topology=ring"])


def test_every_top_level_key_is_one_the_application_reads(hydra_context, tmp_path) -> None:
    for group in ("recipe", "experiment", "debug", "hparams_search"):
        for option in sorted(p.stem for p in (CONF / group).glob("*.yaml")):
            cfg = make(tmp_path, f"{group}={option}", "trainer.devices=2")
            assert set(cfg) <= APP_KEYS, (group, option)


def test_callbacks_are_a_group_chosen_on_the_command_line(hydra_context, tmp_path) -> None:
    chosen = instantiate_named(make(tmp_path, "callbacks=[default,early_stopping]").callbacks)
    names = [type(c).__name__ for c in chosen]
    assert names == ["ModelCheckpoint", "LearningRateMonitor", "PartitionReport", "TQDMProgressBar", "EarlyStopping"]
    assert chosen[-1].monitor == "val/acc"
    assert instantiate_named(make(tmp_path, "callbacks=none").get("callbacks")) == []


def test_experiment_debug_and_search_groups_compose(hydra_context, tmp_path) -> None:
    experiment = make(tmp_path, "experiment=digits_non_iid")
    assert (experiment.topology.name, experiment.algorithm.name) == ("ring", "gradient_tracking")
    assert (experiment.data.partition.scheme, experiment.data.partition.alpha, experiment.trainer.devices) == (
        "dirichlet", 0.1, 8,
    )  # fmt: skip
    debug = make(tmp_path, "debug=default")
    assert (debug.trainer.max_epochs, debug.trainer.limit_train_batches, debug.compare_with_ddp) == (1, 4, False)
    search = compose("train", overrides=["hparams_search=digits_lr"], return_hydra_config=True)
    assert search.optimized_metric == "val/acc" and search.hydra.sweeper.params["optimizer.lr"] == "0.02,0.05,0.1"


def test_run_names_say_what_synchronises() -> None:
    assert run_name("ring", get_algorithm("diloco", H=32), "p2p") == "diloco (all-reduce every 32 steps)"
    assert run_name("ring", get_algorithm("local_sgd"), "p2p") == "local_sgd (all-reduce every 16 steps)"
    assert run_name("ring", get_algorithm("gasloc"), "p2p") == "gossip ring/gasloc (p2p)"
    assert run_name("ring", get_algorithm("dsgd"), "allreduce") == "dsgd (all-reduce every step)"


def test_lightning_messages_reach_the_run_log_once(capfd) -> None:
    import lightning.pytorch  # noqa: F401  (adds Lightning's console handlers)

    records: list[logging.LogRecord] = []
    root_handler = logging.Handler()
    root_handler.emit = records.append  # type: ignore[method-assign]
    logging.getLogger().addHandler(root_handler)
    saved = {
        n: (logging.getLogger(n).handlers[:], logging.getLogger(n).propagate)
        for n in ("lightning", "lightning.pytorch")
    }
    try:
        logging.getLogger("lightning").addHandler(logging.StreamHandler())  # as `import lightning` does
        send_lightning_logs_to_root()
        logging.getLogger("lightning.pytorch.trainer").info("the step")
    finally:
        logging.getLogger().removeHandler(root_handler)
        logging.captureWarnings(False)
        for name, (handlers, propagate) in saved.items():
            logging.getLogger(name).handlers[:] = handlers
            logging.getLogger(name).propagate = propagate
    assert [r.getMessage() for r in records] == ["the step"]
    assert "the step" not in capfd.readouterr().err


def _app(*args: str) -> subprocess.CompletedProcess:
    """``python -X importtime -m lightning_decent.train *args``: stderr lists every module it imported."""
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    return subprocess.run(
        [sys.executable, "-X", "importtime", "-m", "lightning_decent.train", *args],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=120,
    )  # fmt: skip


def _imported(proc: subprocess.CompletedProcess) -> set[str]:
    return {line.rpartition("|")[2].strip() for line in proc.stderr.splitlines() if line.startswith("import time:")}


def test_the_app_help_lists_groups_and_examples() -> None:
    proc = _app("--help")
    assert proc.returncode == 0, proc.stderr[-3000:]
    for group in ("algorithm:", "callbacks:", "experiment:", "debug:", "hparams_search:", "Examples:"):
        assert group in proc.stdout, group


def test_printing_the_job_config_does_not_load_torch() -> None:
    proc = _app("--cfg", "job", "algorithm=diloco", "algorithm.H=8")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "  H: 8\n" in proc.stdout
    imported = _imported(proc)
    assert "hydra" in imported and "torch" not in imported and "lightning" not in imported


def test_the_job_returns_the_optimized_metric_for_sweepers(hydra_context, tmp_path, monkeypatch) -> None:
    from lightning_decent import train as entry
    from lightning_decent.app import run
    from lightning_decent.app.report import RunResult

    result = RunResult(name="gossip", metrics={"val/acc": 0.75, "val/loss": 0.5, "test/acc": 0.7}, steps=3)
    monkeypatch.setattr(run, "train", lambda cfg: [result])
    monkeypatch.setattr(entry, "send_lightning_logs_to_root", lambda: None)  # leave this process's logging alone
    assert entry.run_job(make(tmp_path), []) == 0.75  # the recipe's monitor
    assert entry.run_job(make(tmp_path, "optimized_metric=test/acc"), []) == 0.7
    with pytest.raises(UnknownKeyError):
        entry.run_job(make(tmp_path, "+compression=int8"), ["+compression=int8"])
