"""Every logger option writes where the docs say, with the resolved config as hyper-parameters; one fit of
the application logs it and the throughput; a recipe module loads back from a checkpoint without arguments."""

from __future__ import annotations

import re
import sys
from pathlib import Path

import lightning.pytorch as pl
import pytest
import torch
from hydra import compose
from hydra.utils import instantiate
from omegaconf import OmegaConf

from lightning_decent._extras import MissingExtraError
from lightning_decent.app.loggers import instantiate_loggers
from lightning_decent.app.report import read_metrics_csv
from lightning_decent.app.run import build_model, fit_and_validate, with_run_label
from lightning_decent.recipes.digits import DigitsClassifier
from lightning_decent.recipes.language_model import LanguageModel


def _files(root: Path, pattern: str) -> list[Path]:
    return [p for p in root.rglob(pattern) if p.is_file()]


@pytest.mark.parametrize(
    ("option", "module"), [("tensorboard", "tensorboard"), ("wandb", "wandb"), ("mlflow", "mlflow")]
)
def test_a_missing_logger_package_names_the_extra_that_installs_it(
    hydra_context, tmp_path: Path, monkeypatch, option: str, module: str
) -> None:
    monkeypatch.setitem(sys.modules, module, None)  # import fails as when the package is not installed
    cfg = compose("train", overrides=[f"logger={option}", f"paths.output_dir={tmp_path}"])
    with pytest.raises(MissingExtraError, match=re.escape(f"pip install 'lightning-decent[{option}]'")):
        instantiate_loggers(cfg.logger)


@pytest.mark.parametrize("option", ["csv", "tensorboard", "wandb", "mlflow"])
def test_logger_option_writes_metrics_and_the_config(hydra_context, tmp_path: Path, option: str) -> None:
    cfg = with_run_label(compose("train", overrides=[f"logger={option}", f"paths.output_dir={tmp_path}"]), "ddp")
    loggers = instantiate_loggers(cfg.logger)
    config = OmegaConf.to_container(cfg, resolve=True)
    for logger in loggers:
        logger.log_hyperparams(config)
        logger.log_metrics({"train/loss": 1.5}, step=3)
        logger.finalize("success")
    # Every option keeps the CSV log the report reads, under the fit's label.
    assert read_metrics_csv(tmp_path / "csv" / "ddp" / "metrics.csv") == {"train/loss": ([3.0], [1.5])}
    assert "run_label: ddp" in (tmp_path / "csv" / "ddp" / "hparams.yaml").read_text()
    if option == "tensorboard":
        assert _files(tmp_path / "tensorboard" / "ddp", "events.out.tfevents.*")
    if option == "wandb":
        (run,) = (tmp_path / "wandb").glob("offline-run-*")  # offline: nothing leaves the machine
        assert _files(run, "run-*.wandb")
        loggers[1].experiment.finish()
    if option == "mlflow":
        (params,) = (p for p in (tmp_path / "mlruns").rglob("params") if p.is_dir())
        assert (params / "optimizer" / "lr").read_text() == str(cfg.optimizer.lr)
        assert (params.parent / "metrics" / "train" / "loss").read_text().split()[1] == "1.5"
        assert (params.parent / "tags" / "mlflow.runName").read_text() == "ddp"


def test_one_fit_logs_the_config_throughput_and_curves(hydra_context, tmp_path: Path) -> None:
    cfg = compose(
        "train",
        overrides=[f"paths.output_dir={tmp_path}", "trainer.devices=1", "trainer.max_epochs=1",
                   "trainer.limit_train_batches=8", "trainer.log_every_n_steps=2", "trainer.limit_val_batches=1"],
    )  # fmt: skip
    result, _ = fit_and_validate(
        with_run_label(cfg, "gossip"),
        instantiate(cfg.strategy),
        [],
        enable_progress_bar=False,
        enable_checkpointing=False,
    )
    assert result.metrics_csv == str(tmp_path / "csv" / "gossip" / "metrics.csv")
    series = read_metrics_csv(Path(result.metrics_csv))
    assert series["train/time"][0] == [1.0, 3.0, 5.0, 7.0]  # ThroughputMonitor, every log_every_n_steps
    assert result.train_time_s == pytest.approx(series["train/time"][1][-1])
    assert result.samples_per_s == pytest.approx(series["train/samples"][1][-1] / result.train_time_s)
    hparams = (tmp_path / "csv" / "gossip" / "hparams.yaml").read_text()
    assert "topology:\n  name: one_peer_exponential" in hparams and "_target_: torch.optim.SGD" in hparams


def test_a_recipe_module_loads_from_a_plain_lightning_checkpoint(hydra_context, tmp_path: Path) -> None:
    cfg = compose("train", overrides=[f"paths.output_dir={tmp_path}", "model.net.width=8"])
    model = build_model(cfg)
    assert model.hparams.net == {"_target_": "lightning_decent.recipes.digits.digits_cnn", "width": 8, "hidden": 128}
    trainer = pl.Trainer(
        accelerator="cpu", devices=1, max_steps=2, limit_val_batches=1, logger=False, enable_checkpointing=False,
        enable_progress_bar=False, enable_model_summary=False, default_root_dir=tmp_path,
    )  # fmt: skip
    trainer.fit(model, datamodule=instantiate(cfg.data))
    trainer.save_checkpoint(tmp_path / "plain.ckpt")
    loaded = DigitsClassifier.load_from_checkpoint(tmp_path / "plain.ckpt", weights_only=True)  # plain data only
    assert loaded.net[0].out_channels == 8 and loaded.hparams == model.hparams
    for (name, value), other in zip(model.state_dict().items(), loaded.state_dict().values()):
        assert torch.equal(value, other), name
    assert isinstance(loaded.configure_optimizers(), torch.optim.SGD)


def test_objects_passed_directly_are_not_saved_as_hyper_parameters() -> None:
    net = torch.nn.Embedding(256, 8)  # stands for a network built in Python
    model = LanguageModel(net, optimizer=lambda params: torch.optim.SGD(params, lr=0.1))
    assert set(model.hparams) == {"scheduler", "decay_bias_and_norm"}  # net and optimizer must be passed again
    assert DigitsClassifier().hparams == {
        "net": None, "optimizer": None, "scheduler": None, "num_classes": 10, "label_smoothing": 0.0,
        "top5": False, "decay_bias_and_norm": True, "channels_last": False, "compile": False,
    }  # fmt: skip
