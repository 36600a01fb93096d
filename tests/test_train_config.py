"""The Hydra configs compose and every ``_target_`` instantiates (single process, no training)."""

from __future__ import annotations

import importlib.util
import itertools
from pathlib import Path

import lightning.pytorch as pl
import pytest
import torch
from conftest import CONF
from hydra import compose
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf

from lightning_decent import DecentralizedStrategy
from lightning_decent.algorithms import ALGORITHMS, algorithm_options
from lightning_decent.app.resolvers import RUN_ID_ENV, linear_scaled_lr, new_run_id, run_id
from lightning_decent.app.run import instantiate_named
from lightning_decent.topology import get_topology

GROUPS = ("recipe", "topology", "algorithm", "optimizer", "trainer", "logger", "strategy")
RECIPES = ("digits", "imagenet", "detection", "language_model")
OPTIONS = {group: sorted(p.stem for p in (CONF / group).glob("*.yaml")) for group in GROUPS}


def make(hydra_context: None, tmp_path: Path, *overrides: str) -> DictConfig:
    """The composed config with its outputs under ``tmp_path`` (no Hydra run, so no ``${hydra:...}``)."""
    return compose("train", overrides=[*overrides, f"paths.output_dir={tmp_path}"])


def test_the_menu_offers_what_the_docs_promise() -> None:
    assert set(RECIPES) <= set(OPTIONS["recipe"])
    assert {"sgd", "sgd_nesterov", "adamw", "dadam", "accum_adam"} <= set(OPTIONS["optimizer"])
    assert {"cpu", "gpu", "multinode"} <= set(OPTIONS["trainer"])
    assert {"csv", "tensorboard", "wandb", "mlflow"} <= set(OPTIONS["logger"])
    assert {"dsgd", "gradient_tracking", "exact_diffusion", "qg_dsgdm", "gut", "qg_gut"} <= set(OPTIONS["algorithm"])
    from lightning_decent.topology import TOPOLOGIES

    assert set(TOPOLOGIES) <= set(OPTIONS["topology"])


def test_default_is_digits_gossip_on_four_cpu_processes_with_a_ddp_comparison(hydra_context, tmp_path) -> None:
    cfg = make(hydra_context, tmp_path)
    assert cfg.recipe.name == "digits" and cfg.compare_with_ddp
    assert (cfg.trainer.accelerator, cfg.trainer.devices) == ("cpu", 4)
    assert cfg.topology.name in ("one_peer_exponential", "ring")
    assert cfg.strategy._target_ == "lightning_decent.DecentralizedStrategy"


@pytest.mark.parametrize(("group", "option"), [(g, o) for g in GROUPS for o in OPTIONS[g]])
def test_every_option_of_every_group_composes_and_resolves(hydra_context, tmp_path, group: str, option: str) -> None:
    cfg = make(hydra_context, tmp_path, f"{group}={option}")
    OmegaConf.to_container(cfg, resolve=True)  # interpolations and resolvers work (``???`` stays missing)


@pytest.mark.parametrize(("recipe", "optimizer"), itertools.product(RECIPES, OPTIONS["optimizer"]))
def test_every_recipe_composes_with_every_optimizer(hydra_context, tmp_path, recipe: str, optimizer: str) -> None:
    cfg = make(hydra_context, tmp_path, f"recipe={recipe}", f"optimizer={optimizer}", "trainer.devices=2")
    resolved = OmegaConf.to_container(cfg.optimizer, resolve=True)
    assert resolved["lr"] > 0 and resolved["_partial_"]


@pytest.mark.slow
@pytest.mark.parametrize("recipe", RECIPES)
def test_every_combination_of_interacting_groups_composes(hydra_context, tmp_path, recipe: str) -> None:
    # The groups that override or interpolate each other: recipe, algorithm (picks the optimizer),
    # optimizer and trainer (the linear lr scaling reads trainer.devices). Topology, logger and
    # strategy options are independent of them and covered one by one above.
    for algorithm, optimizer, trainer in itertools.product(
        OPTIONS["algorithm"], OPTIONS["optimizer"], OPTIONS["trainer"]
    ):
        cfg = make(
            hydra_context, tmp_path, f"recipe={recipe}", f"algorithm={algorithm}", f"optimizer={optimizer}",
            f"trainer={trainer}", "trainer.devices=4",
        )  # fmt: skip
        OmegaConf.to_container(cfg, resolve=True)


def test_overrides_read_like_the_docs(hydra_context, tmp_path) -> None:
    overrides = ["topology=ring", "algorithm=gradient_tracking", "trainer.devices=8", "optimizer.lr=0.2"]
    cfg = make(hydra_context, tmp_path, *overrides)
    assert (cfg.strategy.topology, cfg.strategy.algorithm) == ("ring", "gradient_tracking")
    assert (cfg.trainer.devices, cfg.optimizer.lr) == (8, 0.2)
    pga = make(hydra_context, tmp_path, "algorithm=dsgd_pga", "algorithm.global_average_every=32")
    assert pga.strategy.algorithm_options == {
        "global_average_every": 32,
        "adaptive_global_average": False,
        "gossip_rounds": 1,
    }


def test_algorithms_with_their_own_momentum_select_plain_sgd(hydra_context, tmp_path) -> None:
    for algorithm in ("qg_dsgdm", "gut", "qg_gut"):
        cfg = make(hydra_context, tmp_path, f"algorithm={algorithm}")
        assert cfg.optimizer._target_ == "torch.optim.SGD" and cfg.optimizer.momentum == 0.0
    assert make(hydra_context, tmp_path, "algorithm=gut", "optimizer=adamw").optimizer._target_ == "torch.optim.AdamW"


def test_imagenet_learning_rate_follows_the_linear_scaling_rule(hydra_context, tmp_path) -> None:
    cfg = make(hydra_context, tmp_path, "recipe=imagenet", "trainer.devices=8", "data.batch_size=64")
    assert cfg.optimizer.lr == pytest.approx(0.1 * 8 * 64 / 256)
    assert cfg.optimizer.weight_decay == 1e-4 and cfg.optimizer.momentum == 0.9
    assert cfg.model.label_smoothing == 0.0 and cfg.trainer.max_epochs == 90  # Goyal et al.; imagenet_cosine: 0.1
    assert cfg.model.scheduler.warmup_epochs == 5 and cfg.model.net.weights is None
    assert linear_scaled_lr(0.1, 32, [0, 1], 2) == pytest.approx(0.1 * 32 * 4 / 256)
    with pytest.raises(ValueError, match=r"set trainer\.devices to a number"):
        linear_scaled_lr(0.1, 32, "cuda:0", 1)


def test_detection_classes_follow_the_dataset(hydra_context, tmp_path) -> None:
    coco = make(hydra_context, tmp_path, "recipe=detection")
    voc = make(hydra_context, tmp_path, "recipe=detection", "data.dataset=voc")
    assert (coco.model.net.num_classes, voc.model.net.num_classes) == (91, 21)


def test_run_ids_are_unique_within_a_second_and_inherited_by_child_ranks(monkeypatch) -> None:
    assert len({new_run_id() for _ in range(50)}) == 50
    monkeypatch.setenv(RUN_ID_ENV, "my-experiment")
    assert run_id() == "my-experiment"  # what popen children (and every node, if exported) resolve
    monkeypatch.delenv(RUN_ID_ENV)
    assert run_id() != run_id()


# ---- every _target_ instantiates ---------------------------------------------------------------------


@pytest.mark.parametrize("option", OPTIONS["topology"])
def test_every_topology_builds_for_eight_ranks(hydra_context, tmp_path, option: str) -> None:
    extra = ["topology.options.edges=[[0,1],[1,2],[2,3],[3,4],[4,5],[5,6],[6,7],[7,0]]"] * (option == "directed_graph")
    extra += ["topology.options.local_world_size=4"] * (option == "hierarchical")  # the strategy uses its devices
    cfg = make(hydra_context, tmp_path, f"topology={option}", "trainer.devices=4", *extra)
    options = OmegaConf.to_container(cfg.topology.options, resolve=True)
    topology = get_topology(cfg.topology.name, 8, **options)
    assert topology.n == 8


def test_base_and_hierarchical_topologies_take_their_options_from_the_command_line(hydra_context, tmp_path) -> None:
    cfg = make(hydra_context, tmp_path, "topology=base", "topology.options.k=2")
    assert get_topology(cfg.topology.name, 12, **cfg.topology.options).max_degree == 2
    overrides = [
        "topology=hierarchical",
        "topology.options.local_world_size=3",
        "topology.options.machines=base",
        "+topology.options.machine_options.k=2",
    ]
    cfg = make(hydra_context, tmp_path, *overrides)
    options = OmegaConf.to_container(cfg.topology.options, resolve=True)
    topology = get_topology(cfg.topology.name, 18, **options)  # 6 machines = 3 x 2: base with k = 2 uses both
    assert (topology.local_world_size, topology.machines.name, topology.machines.max_degree) == (3, "base", 2)
    strategy = instantiate(cfg.strategy)
    assert strategy._topology_options == options


def _algorithm_available(name: str, options: dict) -> bool:
    """Registered, with every option known (algorithms are added by another part of the project)."""
    return name in ALGORITHMS and set(options) <= set(algorithm_options(name))


@pytest.mark.parametrize("option", OPTIONS["algorithm"])
def test_every_available_algorithm_instantiates_inside_the_strategy(hydra_context, tmp_path, option: str) -> None:
    cfg = make(hydra_context, tmp_path, f"algorithm={option}", "topology=ring")
    if not _algorithm_available(cfg.algorithm.name, cfg.strategy.algorithm_options):
        pytest.skip(f"algorithm {cfg.algorithm.name!r} with {cfg.strategy.algorithm_options} is not registered yet")
    strategy = instantiate(cfg.strategy)
    assert isinstance(strategy, DecentralizedStrategy)
    assert strategy.algorithm.name.startswith(cfg.algorithm.name)


def test_strategy_options_reach_the_strategy(hydra_context, tmp_path) -> None:
    cfg = make(
        hydra_context, tmp_path, "strategy.communicator=allreduce", "strategy.bucket_size_mb=1",
        "strategy.eval_model=local", "strategy.log_consensus_every=5",
    )  # fmt: skip
    strategy = instantiate(cfg.strategy)
    assert (strategy.eval_model, strategy.log_consensus_every) == ("local", 5)
    ddp = instantiate(make(hydra_context, tmp_path, "strategy=ddp").strategy)
    assert type(ddp).__name__ == "DDPStrategy"


@pytest.mark.parametrize("option", OPTIONS["optimizer"])
def test_every_optimizer_instantiates(hydra_context, tmp_path, option: str) -> None:
    cfg = make(hydra_context, tmp_path, f"optimizer={option}")
    module_name, _, class_name = cfg.optimizer._target_.rpartition(".")
    if importlib.util.find_spec(module_name) is None or not hasattr(importlib.import_module(module_name), class_name):
        pytest.skip(f"{cfg.optimizer._target_} does not exist yet")
    factory = instantiate(cfg.optimizer)
    weight = torch.nn.Parameter(torch.ones(3))
    optimizer = factory([weight])
    weight.grad = torch.ones(3)
    optimizer.step()
    assert weight.detach().lt(1).all()


@pytest.mark.parametrize("option", OPTIONS["logger"])
def test_every_logger_instantiates_into_the_run_directory(hydra_context, tmp_path, option: str) -> None:
    loggers = instantiate_named(make(hydra_context, tmp_path, f"logger={option}").logger)
    assert loggers and all(Path(lg.save_dir).is_relative_to(tmp_path) for lg in loggers)
    assert any(type(lg).__name__ == "CSVLogger" for lg in loggers)  # the summary plot reads it


@pytest.mark.parametrize("option", OPTIONS["trainer"])
def test_every_trainer_instantiates(hydra_context, tmp_path, option: str) -> None:
    overrides = [f"trainer={option}"] + ([] if torch.cuda.is_available() else ["trainer.accelerator=cpu"])
    cfg = make(hydra_context, tmp_path, *overrides, "trainer.devices=2")
    trainer = instantiate(cfg.trainer, strategy=instantiate(cfg.strategy), logger=False)
    assert isinstance(trainer, pl.Trainer) and trainer.num_nodes == cfg.trainer.num_nodes


def test_callbacks_instantiate_and_can_be_dropped(hydra_context, tmp_path) -> None:
    names = [type(c).__name__ for c in instantiate_named(make(hydra_context, tmp_path).callbacks)]
    assert names == ["ModelCheckpoint", "LearningRateMonitor", "PartitionReport", "TQDMProgressBar"]
    dropped = instantiate_named(make(hydra_context, tmp_path, "callbacks.partition_report=null").callbacks)
    assert "PartitionReport" not in [type(c).__name__ for c in dropped]


def test_one_override_turns_the_progress_bar_off(hydra_context, tmp_path) -> None:
    cfg = make(hydra_context, tmp_path, "callbacks.progress_bar.refresh_rate=0", "trainer.devices=1")
    trainer = instantiate(cfg.trainer, callbacks=instantiate_named(cfg.callbacks), logger=False)
    assert trainer.progress_bar_callback is not None and trainer.progress_bar_callback.is_disabled
    on = make(hydra_context, tmp_path, "trainer.devices=1")
    assert instantiate(on.trainer, callbacks=instantiate_named(on.callbacks)).progress_bar_callback.is_enabled


def test_consensus_distance_is_logged_by_default_on_digits_only(hydra_context, tmp_path) -> None:
    assert instantiate(make(hydra_context, tmp_path).strategy).log_consensus_every == 4
    assert instantiate(make(hydra_context, tmp_path, "recipe=language_model").strategy).log_consensus_every == 0
    # the digits recipe still composes with Lightning's DDP, which has no such option
    assert type(instantiate(make(hydra_context, tmp_path, "strategy=ddp").strategy)).__name__ == "DDPStrategy"
