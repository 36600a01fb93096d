"""Every recipe on tiny data in its real on-disk format: one step in process, a 2-process run end to end,
and a clear error naming the layout when the data is missing or malformed."""

from __future__ import annotations

import json
import shutil
import urllib.error
from collections.abc import Callable
from functools import partial
from pathlib import Path

import pytest
import torch
from hydra import compose
from hydra.utils import instantiate
from recipe_data import make_coco, make_image_folder, make_text_corpus, make_voc
from torch.utils.data import DistributedSampler
from train_cli import failure_message, run_dirs, run_train, summary

from lightning_decent.app.run import build_model
from lightning_decent.recipes import text_tokens
from lightning_decent.recipes.classification import ImageClassifier
from lightning_decent.recipes.common import DataRootError
from lightning_decent.recipes.detection import WeightsUnavailableError, detection_model
from lightning_decent.recipes.grouping import GroupedSampler, aspect_ratio_groups
from lightning_decent.recipes.language_model import TextDataModule

#: recipe case -> (data generator, overrides that make it tiny; "{root}" is the generated data root)
CASES: dict[str, tuple[Callable[[Path], Path] | None, list[str]]] = {
    "digits": (None, []),
    "imagenet": (
        make_image_folder,
        ["recipe=imagenet", "data.num_classes=3", "data.image_size=32", "data.val_resize=36",
         "data.batch_size=4", "data.num_workers=0", "model.net.name=resnet18"],
    ),
    "coco": (
        make_coco,
        ["recipe=detection", "data.batch_size=2", "data.num_workers=0", "model.net.min_size=64",
         "model.net.max_size=96", "model.net.weights_backbone=null"],
    ),
    "voc": (
        make_voc,
        ["recipe=detection", "data.dataset=voc", "data.batch_size=2", "data.num_workers=0",
         "model.net.name=fasterrcnn_resnet50_fpn", "model.net.min_size=64", "model.net.max_size=96",
         "model.net.weights_backbone=null"],
    ),
    "language_model": (
        make_text_corpus,
        ["recipe=language_model", "data.pattern=**/*.txt", "data.block_size=32", "data.batch_size=8",
         "model.net.n_layer=1", "model.net.d_model=32", "model.net.n_head=2"],
    ),
}  # fmt: skip


def case_overrides(case: str, tmp_path: Path) -> list[str]:
    make, overrides = CASES[case]
    root = [f"data.root={make(tmp_path / 'data')}"] if make else []
    return [*overrides, *root]


@pytest.mark.filterwarnings("ignore:You are trying to `self.log\\(\\)`")
@pytest.mark.parametrize("case", CASES)
def test_recipe_takes_a_training_step_and_validates(hydra_context, tmp_path: Path, case: str) -> None:
    cfg = compose("train", overrides=[*case_overrides(case, tmp_path), f"paths.output_dir={tmp_path}", "trainer=cpu"])
    datamodule = instantiate(cfg.data)
    model = instantiate(cfg.model, optimizer=instantiate(cfg.optimizer))
    datamodule.setup("fit")
    loss = model.training_step(next(iter(datamodule.train_dataloader())), 0)
    assert torch.isfinite(loss)
    loss.backward()
    assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)
    model.eval()
    with torch.no_grad():
        model.validation_step(next(iter(datamodule.val_dataloader())), 0)
    assert len(datamodule.train_labels()) == len(datamodule.train_set)  # non-iid partitions work too


@pytest.mark.parametrize(
    ("case", "breakage", "message"),
    [
        ("imagenet", None, r"ROOT/train/<class>/<image>\.JPEG"),
        ("imagenet", lambda root: shutil.rmtree(root / "val"), r"val not found"),
        ("imagenet", lambda root: shutil.rmtree(root / "train" / "class_2"), "different class folders"),
        ("imagenet", lambda root: [shutil.rmtree(root / s / "class_2") for s in ("train", "val")], "num_classes=2"),
        ("coco", None, r"ROOT/annotations/instances_<split>\.json"),
        ("coco", lambda root: (root / "annotations/instances_train2017.json").write_text("{oops"), "not a COCO"),
        ("voc", None, r"ROOT/VOCdevkit/VOC<year>/Annotations/<id>\.xml"),
        ("voc", lambda root: (root / "VOCdevkit/VOC2012/ImageSets/Main/val.txt").unlink(), r"val\.txt not found"),
        ("language_model", None, r"any folder tree of text files"),
        ("language_model", lambda root: [p.unlink() for p in root.rglob("*.txt")], r"found 0 file\(s\) matching"),
    ],
)
def test_missing_or_malformed_data_names_the_expected_layout(
    hydra_context, tmp_path: Path, case: str, breakage: Callable | None, message: str
) -> None:
    make, overrides = CASES[case]
    root = make(tmp_path / "data") if breakage else tmp_path / "no-such-dir"
    if breakage:
        breakage(root)
    cfg = compose("train", overrides=[*overrides, f"data.root={root}", f"paths.output_dir={tmp_path}"])
    with pytest.raises(DataRootError, match=message):
        instantiate(cfg.data).setup("fit")


def test_image_folder_without_images_names_the_layout(hydra_context, tmp_path: Path) -> None:
    root = make_image_folder(tmp_path / "data")
    for image in (root / "train" / "class_0").iterdir():
        image.unlink()
    cfg = compose("train", overrides=[*CASES["imagenet"][1], f"data.root={root}", f"paths.output_dir={tmp_path}"])
    with pytest.raises(DataRootError, match="Expected the layout"):
        instantiate(cfg.data).setup("fit")


@pytest.mark.slow
@pytest.mark.parametrize("case", CASES)
def test_recipe_end_to_end_with_two_processes(tmp_path: Path, case: str) -> None:
    # A few steps on 2 gloo ranks, a non-iid split for the classification and text recipes,
    # validation of the averaged model, a checkpoint and the report.
    partition = ["data.partition.scheme=dirichlet", "data.partition.alpha=0.5"] if case not in ("coco", "voc") else []
    steps = "trainer.max_steps=1" if case == "voc" else "trainer.max_steps=3"
    proc = run_train(
        tmp_path, *case_overrides(case, tmp_path), *partition, "trainer=cpu", "trainer.devices=2", steps,
        "trainer.max_epochs=1", "compare_with_ddp=false", "topology=ring", timeout=240,
    )  # fmt: skip
    assert proc.returncode == 0, failure_message(proc)
    (run_dir,) = run_dirs(tmp_path)
    result = summary(run_dir)["runs"][0]
    assert result["steps"] >= 1 and result["metrics"], result
    assert all(v == v for v in result["metrics"].values())  # no NaN
    assert result["bytes_sent_per_step"] > 0
    assert (run_dir / "checkpoints" / "last.ckpt").exists()
    assert (run_dir / "config.yaml").is_file() and (run_dir / "training_curves.png").is_file()
    if partition:
        assert "Training labels per rank (dirichlet split" in proc.stdout + proc.stderr
        assert "data_partition" in (run_dir / "csv" / "gossip" / "hparams.yaml").read_text()


# ---- fidelity to the references ------------------------------------------------------------------------------


def test_detection_without_its_pretrained_weights_fails_at_start_naming_the_override(
    hydra_context, tmp_path: Path, monkeypatch
) -> None:
    # Offline and with an empty cache: the torchvision reference's ImageNet backbone cannot be had.
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    monkeypatch.setattr(torch.hub, "download_url_to_file", _offline)
    cfg = compose("train", overrides=["recipe=detection", "data.root=/data/coco", f"paths.output_dir={tmp_path}"])
    assert cfg.model.net.weights_backbone == "ResNet50_Weights.IMAGENET1K_V1" and cfg.optimizer.lr > 0
    with pytest.raises(WeightsUnavailableError, match=r"model\.net\.weights_backbone=null"):
        detection_model(**{k: v for k, v in cfg.model.net.items() if k != "_target_"})
    with pytest.raises(Exception, match=r"model\.net\.weights_backbone=null"):
        build_model(cfg)  # the application builds the model before any process starts


def _offline(url: str, *args, **kwargs) -> None:
    raise urllib.error.URLError("no network")


def test_grouped_batches_hold_one_aspect_ratio_group_and_every_index_once() -> None:
    group_ids = [0, 1, 2, 0, 1, 2, 0, 0, 1, 1, 1, 2, 0, 2, 2, 1, 0, 0, 2, 1]
    inner = DistributedSampler(range(20), num_replicas=2, rank=1, seed=3)
    grouped = GroupedSampler(inner, group_ids, batch_size=3)
    grouped.set_epoch(4)
    inner.set_epoch(4)
    order = list(grouped)
    assert sorted(order) == sorted(inner) and len(grouped) == len(inner) == 10
    full = order[: 3 * (len(order) // 3)]
    batches = [full[i : i + 3] for i in range(0, len(full), 3)]
    assert sum(len({group_ids[i] for i in batch}) == 1 for batch in batches) >= 2  # only leftovers mix
    assert aspect_ratio_groups([0.4, 0.6, 1.0, 1.33, 1.9, 3.0], factor=3) == [0, 1, 4, 5, 6, 7]


def test_detection_data_groups_images_by_their_annotated_aspect_ratio(hydra_context, tmp_path: Path) -> None:
    for case in ("coco", "voc"):
        cfg = compose("train", overrides=[*case_overrides(case, tmp_path / case), f"paths.output_dir={tmp_path}"])
        datamodule = instantiate(cfg.data)
        datamodule.setup("fit")
        assert datamodule.train_aspect_ratios() == [64 / 48] * len(datamodule.train_set)
        assert isinstance(datamodule.train_dataloader().sampler, GroupedSampler)


def test_imagenet_defaults_follow_goyal_et_al_with_cosine_as_the_alternative(hydra_context, tmp_path: Path) -> None:
    goyal = compose("train", overrides=["recipe=imagenet", "trainer.devices=8", f"paths.output_dir={tmp_path}"])
    assert (goyal.model.scheduler.decay, list(goyal.model.scheduler.milestones)) == ("step", [30, 60, 80])
    assert goyal.model.scheduler.warmup_epochs == 5 and goyal.model.label_smoothing == 0.0
    assert goyal.model.scheduler.warmup_start_lr == 0.1  # from the batch-256 lr up to the scaled one
    assert goyal.model.net.zero_init_residual and goyal.model.channels_last and not goyal.model.compile
    assert goyal.data.pin_memory and goyal.optimizer.lr == pytest.approx(0.1 * 8 * 32 / 256)
    cosine = compose("train", overrides=["recipe=imagenet_cosine", f"paths.output_dir={tmp_path}"])
    assert (cosine.recipe.name, cosine.model.scheduler.decay, cosine.model.label_smoothing) == (
        "imagenet",
        "cosine",
        0.1,
    )


def test_channels_last_and_compile_keep_the_checkpoint_keys() -> None:
    net = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.Flatten(), torch.nn.Linear(4 * 6 * 6, 10))
    model = ImageClassifier(net, 10, optimizer=partial(torch.optim.SGD, lr=0.1), channels_last=True, compile=True)
    assert model.net[0].weight.is_contiguous(memory_format=torch.channels_last)
    assert model(torch.zeros(2, 3, 8, 8)).shape == (2, 10)
    keys = sorted(model.state_dict())
    model.configure_model()  # what Lightning calls at the start of fit: compiles the network in place
    assert sorted(model.state_dict()) == keys and model.net is net


@pytest.mark.parametrize("files", [1, 3])
def test_the_validation_split_holds_val_fraction_of_the_bytes_from_any_number_of_files(
    tmp_path: Path, files: int
) -> None:
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    for index in range(files):
        (corpus / f"part{index}.txt").write_bytes(bytes(range(256)) * 4)  # 1,024 bytes each
    meta = text_tokens.prepare(corpus, tmp_path / "tokens", pattern="*.txt", val_fraction=0.05)
    assert (meta["val_bytes"], meta["train_bytes"]) == (round(0.05 * 1024 * files), 1024 * files - round(51.2 * files))
    train = (tmp_path / "tokens" / "train.bin").read_bytes()
    assert len(train) == meta["train_bytes"] and meta["train_files"][0]["offset"] == 0
    with pytest.raises(ValueError, match=r"found 0 file\(s\) matching '\*\.md'.*data.root"):
        text_tokens.prepare(corpus, tmp_path / "none", pattern="*.md")


def test_language_model_reads_token_files_prepared_once(tmp_path: Path) -> None:
    corpus = make_text_corpus(tmp_path / "corpus")
    tokens = tmp_path / "tokens"
    text_tokens.main(["--root", str(corpus), "--pattern", "**/*.txt", "--out", str(tokens), "--val-fraction", "0.2"])
    meta = json.loads((tokens / "meta.json").read_text())
    total = sum(p.stat().st_size for p in corpus.rglob("*.txt"))
    assert meta["train_bytes"] + meta["val_bytes"] == total and meta["val_bytes"] == round(0.2 * total)
    assert (tokens / "train.bin").stat().st_size == meta["train_bytes"]
    # Training finds the prepared files (no corpus needed any more) and memory-maps them.
    datamodule = TextDataModule(tokens_dir=str(tokens), root=str(tmp_path / "gone"), block_size=16, batch_size=4)
    datamodule.prepare_data()
    datamodule.setup("fit")
    inputs, targets = datamodule.train_set[3]
    raw = (tokens / "train.bin").read_bytes()[48:65]
    assert inputs.tolist() == list(raw[:16]) and targets.tolist() == list(raw[1:17])
    labels = datamodule.train_labels()
    assert len(labels) == len(datamodule.train_set) and set(labels.tolist()) == {0, 1}  # folders alpha, beta
