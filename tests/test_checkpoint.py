"""Sharded checkpoints in a single process: layout, atomicity, validation, average export, errors."""

from __future__ import annotations

import hashlib
import json
import shutil
import struct
import zipfile
from pathlib import Path

import lightning.pytorch as pl
import pytest
import torch
import torch.distributed as dist
from lightning.pytorch.callbacks import ModelCheckpoint
from mp_scripts.tiny_model import TinyClassifier, flat_params

from lightning_decent import DecentralizedStrategy
from lightning_decent import checkpoint as ckpt
from lightning_decent.recipes.digits import DigitsClassifier, DigitsDataModule

NAMES = ("epoch=0-step=4.ckpt", "epoch=1-step=8.ckpt", "last.ckpt")


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


def test_checkpoint_is_a_lightning_file_with_its_shards_beside_it(saved: Path) -> None:
    names = sorted(p.name for p in saved.iterdir())
    assert names == sorted(f"{n}{suffix}" for n in NAMES for suffix in ("", ".shards"))
    last, shards = saved / "last.ckpt", saved / "last.ckpt.shards"
    assert last.is_file() and sorted(p.name for p in shards.iterdir()) == ["meta.json", "rank_0.ckpt"]
    meta = json.loads((shards / "meta.json").read_text())
    assert meta["format"] == "lightning-decent/sharded-v2"
    assert meta["world_size"] == 1 and meta["algorithm"] == "dsgd" and meta["gossip_step"] == 8
    assert meta["file_sizes"]["rank_0.ckpt"] == (shards / "rank_0.ckpt").stat().st_size
    assert meta["file_sha256"]["rank_0.ckpt"] == hashlib.sha256((shards / "rank_0.ckpt").read_bytes()).hexdigest()
    rank_file = torch.load(shards / "rank_0.ckpt", weights_only=True)
    assert rank_file["decentralized"]["gossip_step"] == 8
    assert {"torch", "numpy", "python"} <= set(rank_file["decentralized"]["rng"])
    top = torch.load(last, weights_only=True)
    assert top["optimizer_states"] and top["loops"] and top["global_step"] == 8
    assert top["decentralized_shards"]["token"] == meta["token"]


def test_the_reported_path_loads_as_a_plain_lightning_checkpoint(tmp_path: Path) -> None:
    pl.seed_everything(0)
    saver = ModelCheckpoint(dirpath=tmp_path / "ckpts", monitor="val/loss", save_last=True)
    model = TinyClassifier(hidden=12, lr=0.03)
    make_trainer(tmp_path, 2, [saver]).fit(model, DigitsDataModule())
    for path in (saver.best_model_path, saver.last_model_path):
        restored = TinyClassifier.load_from_checkpoint(path)  # hyper-parameters from the file alone
        assert restored.hparams.hidden == 12 and restored.hparams.lr == 0.03
        assert torch.equal(flat_params(restored), flat_params(model))  # one rank: the average is the model
        plain = TinyClassifier(hidden=12)
        plain.load_state_dict(torch.load(path, weights_only=True)["state_dict"])
        assert torch.equal(flat_params(plain), flat_params(model))
    # DDP continues from it (the average, rank 0's optimizer state, the loops) and evaluates it.
    ddp = pl.Trainer(accelerator="cpu", devices=1, strategy="ddp", max_epochs=3, limit_train_batches=4,
                     limit_val_batches=1, logger=False, enable_progress_bar=False, enable_checkpointing=False,
                     enable_model_summary=False, default_root_dir=tmp_path)  # fmt: skip
    resumed = TinyClassifier(hidden=12, lr=0.03)
    ddp.fit(resumed, DigitsDataModule(), ckpt_path=saver.last_model_path)
    assert ddp.global_step == 12
    ddp.validate(TinyClassifier(hidden=12), DigitsDataModule(), ckpt_path=saver.best_model_path, verbose=False)


def test_resume_continues_the_gossip_step(saved: Path, tmp_path: Path) -> None:
    trainer = make_trainer(tmp_path, 3)
    trainer.fit(DigitsClassifier(), DigitsDataModule(), ckpt_path=saved / "epoch=1-step=8.ckpt")
    assert trainer.global_step == 12
    assert trainer.strategy.gossip_step == 12


def test_an_interrupted_save_leaves_hidden_leftovers_that_the_next_save_removes(tmp_path: Path, monkeypatch) -> None:
    def crash(*args, **kwargs):
        raise KeyboardInterrupt("killed while saving")

    trainer = make_trainer(tmp_path, 1)
    trainer.fit(DigitsClassifier(), DigitsDataModule())
    with monkeypatch.context() as patched:
        patched.setattr(ckpt, "write_meta", crash)
        with pytest.raises(KeyboardInterrupt):
            trainer.save_checkpoint(tmp_path / "last.ckpt")
    assert not (tmp_path / "last.ckpt").exists() and not (tmp_path / "last.ckpt.shards").exists()
    leftovers = [p.name for p in tmp_path.iterdir() if "incomplete" in p.name]
    assert len(leftovers) == 2 and all(name.startswith(".") for name in leftovers)  # never matched by last*.ckpt
    trainer.save_checkpoint(tmp_path / "other.ckpt")  # the next successful save, under another name
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []


def test_overwriting_a_checkpoint_replaces_it_completely(tmp_path: Path) -> None:
    trainer = make_trainer(tmp_path, 1)
    trainer.fit(DigitsClassifier(), DigitsDataModule())
    target = tmp_path / "model.ckpt"
    trainer.save_checkpoint(target)
    first = ckpt.read_meta(ckpt.shard_dir(target)).gossip_step
    trainer.fit_loop.max_epochs = 2
    trainer.fit(trainer.lightning_module, DigitsDataModule())
    trainer.save_checkpoint(target)
    assert ckpt.read_meta(ckpt.shard_dir(target)).gossip_step == first + 4
    assert torch.load(target, weights_only=True)["global_step"] == first + 4
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []


def copy_checkpoint(source: Path, target_dir: Path) -> Path:
    target_dir.mkdir()
    shutil.copy(source, target_dir / source.name)
    shutil.copytree(ckpt.shard_dir(source), target_dir / (source.name + ".shards"))
    return target_dir / source.name


def test_incomplete_or_truncated_directories_are_refused(saved: Path, tmp_path: Path) -> None:
    empty = tmp_path / "half.ckpt"
    empty.mkdir()
    with pytest.raises(ValueError, match="not a complete lightning-decent checkpoint"):
        ckpt.read_meta(empty)
    damaged = copy_checkpoint(saved / "last.ckpt", tmp_path / "damaged")
    with open(ckpt.shard_dir(damaged) / "rank_0.ckpt", "r+b") as f:
        f.truncate(100)
    with pytest.raises(ValueError, match="truncated"):
        ckpt.read_meta(ckpt.shard_dir(damaged))


def largest_tensor_offset(path: Path) -> int:
    """File offset of the middle of the largest tensor record in a ``torch.save`` zip archive."""
    with zipfile.ZipFile(path) as archive:
        entry = max((e for e in archive.infolist() if "/data/" in e.filename), key=lambda e: e.file_size)
    with open(path, "rb") as f:
        f.seek(entry.header_offset + 26)
        name_length, extra_length = struct.unpack("<HH", f.read(4))
    return entry.header_offset + 30 + name_length + extra_length + entry.file_size // 2


def test_a_same_size_edit_of_a_shard_is_refused_naming_the_file(saved: Path, tmp_path: Path) -> None:
    # torch.load ignores the zip CRC and meta.json used to keep only sizes: this loaded without complaint.
    edited = copy_checkpoint(saved / "last.ckpt", tmp_path / "edited")
    shard = ckpt.shard_dir(edited) / "rank_0.ckpt"
    data = bytearray(shard.read_bytes())
    data[largest_tensor_offset(shard)] ^= 0xFF  # one byte of a stored weight
    shard.write_bytes(bytes(data))
    torch.load(shard, weights_only=True)  # still loads
    with pytest.raises(ValueError, match=r"rank_0\.ckpt does not match the SHA-256 recorded in meta\.json"):
        make_trainer(tmp_path, 3).fit(DigitsClassifier(), DigitsDataModule(), ckpt_path=edited)


@pytest.mark.parametrize(
    ("content", "match"),
    [
        ("{not json", r"meta\.json is damaged: it is not valid JSON"),
        ("[1, 2]", r"meta\.json is damaged: expected a JSON object"),
        ("unknown_key", r"meta\.json is damaged: unknown key\(s\) \['colour'\]"),
    ],
)
def test_a_damaged_meta_json_gets_a_clear_error(saved: Path, tmp_path: Path, content: str, match: str) -> None:
    copy = copy_checkpoint(saved / "last.ckpt", tmp_path / "copy")
    meta_path = ckpt.shard_dir(copy) / "meta.json"
    if content == "unknown_key":
        content = json.dumps({**json.loads(meta_path.read_text()), "colour": "blue"})
    meta_path.write_text(content)
    with pytest.raises(ValueError, match=match):
        ckpt.read_meta(meta_path.parent)
    with pytest.raises(ValueError, match=match):  # and on resume, with the fix named
        make_trainer(tmp_path, 3).fit(DigitsClassifier(), DigitsDataModule(), ckpt_path=copy)


def test_resuming_with_another_configuration_is_refused_by_default(saved: Path, tmp_path: Path) -> None:
    trainer = make_trainer(tmp_path, 3, algorithm="dsgd")
    meta_path = saved / "last.ckpt.shards" / "meta.json"
    original = meta_path.read_text()
    try:
        meta = json.loads(original)
        meta["world_size"] = 8
        meta_path.write_text(json.dumps(meta))
        with pytest.raises(
            ValueError, match=r"world size 8 \(now 1\).*resume_from_average=True.*application: strategy.resume"
        ):
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


def test_resuming_in_the_middle_of_an_epoch_takes_no_empty_steps(tmp_path: Path) -> None:
    # The ranks pad an epoch to the longest rank's length with empty steps; a resumed epoch counts the steps
    # taken before the checkpoint. Before: 2 extra empty steps, the gossip step ran ahead of the global step.
    saver = ModelCheckpoint(dirpath=tmp_path / "ckpts", every_n_train_steps=6, save_top_k=-1)
    make_trainer(tmp_path, 2, [saver]).fit(DigitsClassifier(), DigitsDataModule())
    resumed = make_trainer(tmp_path, 2)
    resumed.fit(DigitsClassifier(), DigitsDataModule(), ckpt_path=tmp_path / "ckpts" / "epoch=1-step=6.ckpt")
    assert resumed.global_step == 8 and resumed.strategy.gossip_step == 8


def _meta(**changes) -> ckpt.CheckpointMeta:
    settings = dict(world_size=4, topology="ring", topology_fingerprint="aaaa", algorithm="choco", communicator="p2p")
    return ckpt.CheckpointMeta(**{**settings, **changes}, gossip_step=8, library_version="0")


def test_a_resume_with_another_communicator_is_named_when_the_graph_enters_the_mathematics() -> None:
    # Before: a choco ring checkpoint resumed with communicator="allreduce" was accepted silently (the ranks then
    # ended 100x further apart than a run that used the all-reduce from the start).
    saved = _meta()
    assert saved.incompatibilities(_meta(communicator="allreduce")) == ["communicator 'p2p' (now 'allreduce')"]
    assert saved.incompatibilities(_meta(topology="torus", topology_fingerprint="bbbb")) == [
        "topology 'ring' with fingerprint aaaa (now 'torus' with bbbb)"
    ]
    assert saved.incompatibilities(_meta()) == []


def test_an_exact_average_algorithm_may_resume_on_another_graph_but_not_another_world_size() -> None:
    saved = _meta(algorithm="diloco")
    other_graph = _meta(algorithm="diloco", topology="torus", topology_fingerprint="bbbb", communicator="allreduce")
    assert saved.incompatibilities(other_graph, uses_topology=False) == []
    assert saved.incompatibilities(_meta(algorithm="diloco", world_size=8), uses_topology=False) == [
        "world size 4 (now 8)"
    ]
    assert saved.incompatibilities(_meta(algorithm="local_sgd"), uses_topology=False) == [
        "algorithm 'diloco' (now 'local_sgd')"
    ]


def test_which_algorithms_depend_on_the_graph() -> None:
    from lightning_decent.algorithms import get_algorithm

    assert not get_algorithm("diloco").uses_topology and not get_algorithm("local_sgd").uses_topology
    assert not get_algorithm("ddp").uses_topology
    assert all(get_algorithm(name).uses_topology for name in ("dsgd", "choco", "gasloc", "gradient_tracking"))


def _edit_meta(shards: Path, **changes: object) -> None:
    meta_path = shards / "meta.json"
    meta_path.write_text(json.dumps({**json.loads(meta_path.read_text()), **changes}))


def test_resuming_with_another_communicator_is_refused_naming_it(tmp_path: Path) -> None:
    saver = ModelCheckpoint(dirpath=tmp_path / "ckpts", every_n_epochs=1, save_top_k=-1)
    make_trainer(tmp_path, 1, [saver], algorithm="choco").fit(DigitsClassifier(), DigitsDataModule())
    path = tmp_path / "ckpts" / "epoch=0-step=4.ckpt"
    _edit_meta(ckpt.shard_dir(path), communicator="allreduce")  # as if saved by an all-reduce run
    with pytest.raises(ValueError, match=r"communicator 'allreduce' \(now 'p2p'\).*resume_from_average=True"):
        make_trainer(tmp_path, 2, algorithm="choco").fit(DigitsClassifier(), DigitsDataModule(), ckpt_path=path)


def test_a_diloco_run_resumes_exactly_after_a_change_of_topology(tmp_path: Path) -> None:
    # Issue 23's item: DiLoCo's sync is an exact all-reduce that does not use the graph, so a resume on another
    # topology (or communicator) continues the same run; before, it was refused.
    saver = ModelCheckpoint(dirpath=tmp_path / "ckpts", every_n_epochs=1, save_top_k=-1)
    options = {"algorithm": "diloco", "algorithm_options": {"H": 2}}
    make_trainer(tmp_path, 1, [saver], **options).fit(DigitsClassifier(), DigitsDataModule())
    path = tmp_path / "ckpts" / "epoch=0-step=4.ckpt"
    _edit_meta(ckpt.shard_dir(path), topology="torus", topology_fingerprint="0" * 16, communicator="allreduce")
    resumed = make_trainer(tmp_path, 2, **options)
    resumed.fit(DigitsClassifier(), DigitsDataModule(), ckpt_path=path)
    assert resumed.global_step == 8 and not resumed.strategy._resumed_from_average
