"""Every recipe on tiny data in its real on-disk format: one step in process, a 2-process run end to end,
and a clear error naming the layout when the data is missing or malformed."""

from __future__ import annotations

import shutil
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from hydra.utils import instantiate
from recipe_data import make_coco, make_image_folder, make_text_corpus, make_voc
from train_cli import failure_message, run_dirs, run_train, summary

import lightning_decent.train  # noqa: F401 - registers the config resolvers
from lightning_decent.recipes.common import DataRootError

CONF = Path(__file__).resolve().parents[1] / "conf"

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
         "model.net.max_size=96"],
    ),
    "voc": (
        make_voc,
        ["recipe=detection", "data.dataset=voc", "data.batch_size=2", "data.num_workers=0",
         "model.net.name=fasterrcnn_resnet50_fpn", "model.net.min_size=64", "model.net.max_size=96"],
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


@pytest.fixture(scope="module")
def hydra_context() -> Iterator[None]:
    GlobalHydra.instance().clear()
    with initialize_config_dir(str(CONF), version_base="1.3"):
        yield
    GlobalHydra.instance().clear()


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
        ("language_model", lambda root: [p.unlink() for p in root.rglob("*.txt")], r"no files matching"),
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
