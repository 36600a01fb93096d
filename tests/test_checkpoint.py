"""Sharded checkpoints in a single process: layout, atomicity, validation, average export, errors."""

from __future__ import annotations

import json
from pathlib import Path

import lightning.pytorch as pl
import pytest
import torch
import torch.distributed as dist
from lightning.pytorch.callbacks import ModelCheckpoint

from lightning_decent import DecentralizedStrategy
from lightning_decent import checkpoint as ckpt
from lightning_decent.recipes.digits import DigitsClassifier, DigitsDataModule


@pytest.fixture(autouse=True, scope="module")
def _own_process_group():
    yield
    if dist.is_initialized():
        dist.destroy_process_group()


def make_trainer(root: Path, epochs: int, callbacks=(), **strategy_kwargs) -> pl.Trainer:
    return pl.Trainer(
        accelerator="cpu",
        devices=1,
        strategy=DecentralizedStrategy(topology="ring", **strategy_kwargs),
        max_epochs=epochs,
        limit_train_batches=4,
        limit_val_batches=1,
        num_sanity_val_steps=0,
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        enable_checkpointing=bool(callbacks),
        callbacks=list(callbacks),
        default_root_dir=root,
    )


@pytest.fixture(scope="module")
def saved(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("ckpt")
    pl.seed_everything(0)
    saver = ModelCheckpoint(dirpath=root / "ckpts", every_n_epochs=1, save_top_k=-1, save_last=True)
    trainer = make_trainer(root, 2, [saver])
    trainer.fit(DigitsClassifier(), DigitsDataModule())
    return root / "ckpts"


def test_checkpoint_is_a_directory_with_rank_files_average_and_meta(saved: Path) -> None:
    assert sorted(p.name for p in saved.iterdir()) == ["epoch=0-step=4.ckpt", "epoch=1-step=8.ckpt", "last.ckpt"]
    last = saved / "last.ckpt"
    assert sorted(p.name for p in last.iterdir()) == ["average.ckpt", "meta.json", "rank_0.ckpt"]
    meta = json.loads((last / "meta.json").read_text())
    assert meta["world_size"] == 1 and meta["algorithm"] == "dsgd" and meta["gossip_step"] == 8
    assert meta["file_sizes"]["rank_0.ckpt"] == (last / "rank_0.ckpt").stat().st_size
    rank_file = torch.load(last / "rank_0.ckpt", weights_only=True)
    assert rank_file["decentralized"]["gossip_step"] == 8
    assert {"torch", "numpy", "python"} <= set(rank_file["decentralized"]["rng"])
    assert rank_file["optimizer_states"] and rank_file["loops"]


def test_average_file_loads_with_plain_torch_and_load_from_checkpoint(saved: Path) -> None:
    path = saved / "last.ckpt" / "average.ckpt"
    plain = DigitsClassifier()
    plain.load_state_dict(torch.load(path, weights_only=True)["state_dict"])
    restored = DigitsClassifier.load_from_checkpoint(path)
    for a, b in zip(plain.state_dict().values(), restored.state_dict().values()):
        assert torch.equal(a, b)


def test_resume_continues_the_gossip_step(saved: Path, tmp_path: Path) -> None:
    trainer = make_trainer(tmp_path, 3)
    trainer.fit(DigitsClassifier(), DigitsDataModule(), ckpt_path=saved / "epoch=1-step=8.ckpt")
    assert trainer.global_step == 12
    assert trainer.strategy.gossip_step == 12


def test_an_interrupted_save_leaves_no_complete_looking_directory(saved: Path, tmp_path: Path, monkeypatch) -> None:
    def crash(*args, **kwargs):
        raise KeyboardInterrupt("killed while saving")

    trainer = make_trainer(tmp_path, 1)
    trainer.fit(DigitsClassifier(), DigitsDataModule())
    monkeypatch.setattr(ckpt, "write_meta", crash)
    with pytest.raises(KeyboardInterrupt):
        trainer.save_checkpoint(tmp_path / "last.ckpt")
    assert not (tmp_path / "last.ckpt").exists()
    leftovers = [p.name for p in tmp_path.iterdir() if "incomplete" in p.name]
    assert leftovers and all(name.startswith(".") for name in leftovers)  # hidden: never matched by last*.ckpt


def test_overwriting_a_checkpoint_replaces_it_completely(tmp_path: Path) -> None:
    trainer = make_trainer(tmp_path, 1)
    trainer.fit(DigitsClassifier(), DigitsDataModule())
    target = tmp_path / "model.ckpt"
    trainer.save_checkpoint(target)
    first = ckpt.read_meta(target).gossip_step
    trainer.fit_loop.max_epochs = 2
    trainer.fit(trainer.lightning_module, DigitsDataModule())
    trainer.save_checkpoint(target)
    assert ckpt.read_meta(target).gossip_step == first + 4
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []


def test_incomplete_or_truncated_directories_are_refused(saved: Path, tmp_path: Path) -> None:
    empty = tmp_path / "half.ckpt"
    empty.mkdir()
    with pytest.raises(ValueError, match="not a complete lightning-decent checkpoint"):
        ckpt.read_meta(empty)
    damaged = tmp_path / "damaged.ckpt"
    damaged.mkdir()
    for f in (saved / "last.ckpt").iterdir():
        (damaged / f.name).write_bytes(f.read_bytes())
    with open(damaged / "rank_0.ckpt", "r+b") as f:
        f.truncate(100)
    with pytest.raises(ValueError, match="truncated"):
        ckpt.read_meta(damaged)


def test_resuming_with_another_configuration_is_refused_by_default(saved: Path, tmp_path: Path) -> None:
    trainer = make_trainer(tmp_path, 3, algorithm="dsgd")
    meta_path = saved / "last.ckpt" / "meta.json"
    original = meta_path.read_text()
    try:
        meta = json.loads(original)
        meta["world_size"] = 8
        meta_path.write_text(json.dumps(meta))
        with pytest.raises(ValueError, match=r"world size 8 \(now 1\).*resume_from_average=True"):
            trainer.fit(DigitsClassifier(), DigitsDataModule(), ckpt_path=saved / "last.ckpt")
        averaged = make_trainer(tmp_path, 3, resume_from_average=True)
        model = DigitsClassifier()
        averaged.fit(model, DigitsDataModule(), ckpt_path=saved / "last.ckpt")
        assert averaged.global_step == 12  # loops continue; optimizer state starts fresh
    finally:
        meta_path.write_text(original)


def test_sync_batchnorm_is_refused_with_the_reason() -> None:
    trainer = pl.Trainer(
        accelerator="cpu", devices=1, strategy=DecentralizedStrategy(), sync_batchnorm=True, logger=False
    )
    with pytest.raises(ValueError, match="sync_batchnorm=True is not supported"):
        trainer.fit(DigitsClassifier(), DigitsDataModule())
