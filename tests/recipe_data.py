"""Tiny datasets written in each recipe's real on-disk format (ImageFolder, COCO, Pascal VOC, text files)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
from PIL import Image

VOC_NAMES = ("cat", "dog", "person")


def _image(rng: np.random.Generator, size: tuple[int, int], tint: int) -> Image.Image:
    """A noisy image whose dominant colour channel depends on ``tint`` (so classes are learnable)."""
    height, width = size
    pixels = rng.integers(0, 80, (height, width, 3), dtype=np.uint8)
    pixels[..., tint % 3] += 150
    return Image.fromarray(pixels)


def make_image_folder(root: Path, classes: int = 3, per_class: int = 4, size: int = 40) -> Path:
    """``root/{train,val}/class_k/img_i.JPEG``."""
    rng = np.random.default_rng(0)
    for split, count in (("train", per_class), ("val", max(1, per_class // 2))):
        for k in range(classes):
            folder = root / split / f"class_{k}"
            folder.mkdir(parents=True, exist_ok=True)
            for i in range(count):
                _image(rng, (size, size), k).save(folder / f"img_{i}.JPEG", quality=90)
    return root


def _boxes(rng: np.random.Generator, width: int, height: int, count: int) -> list[tuple[int, int, int, int]]:
    """``count`` boxes ``(x0, y0, x1, y1)`` inside a ``width x height`` image."""
    boxes = []
    for _ in range(count):
        x0, y0 = int(rng.integers(0, width // 2)), int(rng.integers(0, height // 2))
        boxes.append((x0, y0, x0 + int(rng.integers(8, width // 2)), y0 + int(rng.integers(8, height // 2))))
    return boxes


def make_coco(root: Path, images: int = 4, size: tuple[int, int] = (48, 64)) -> Path:
    """``root/annotations/instances_{train,val}2017.json`` and ``root/{train,val}2017/*.jpg``."""
    rng = np.random.default_rng(1)
    height, width = size
    (root / "annotations").mkdir(parents=True, exist_ok=True)
    categories = [{"id": i, "name": f"thing{i}", "supercategory": "thing"} for i in (1, 2, 3)]
    for split in ("train2017", "val2017"):
        (root / split).mkdir(parents=True, exist_ok=True)
        entries, annotations = [], []
        for i in range(images):
            name = f"{i:012d}.jpg"
            _image(rng, size, i).save(root / split / name)
            entries.append({"id": i + 1, "file_name": name, "height": height, "width": width})
            for x0, y0, x1, y1 in _boxes(rng, width, height, count=1 + i % 2):
                annotations.append(
                    {
                        "id": len(annotations) + 1,
                        "image_id": i + 1,
                        "category_id": 1 + i % 3,
                        "bbox": [x0, y0, x1 - x0, y1 - y0],
                        "area": (x1 - x0) * (y1 - y0),
                        "iscrowd": 0,
                    }
                )
        document = {"images": entries, "annotations": annotations, "categories": categories}
        (root / "annotations" / f"instances_{split}.json").write_text(json.dumps(document))
    return root


def make_voc(root: Path, images: int = 4, size: tuple[int, int] = (48, 64), year: str = "2012") -> Path:
    """``root/VOCdevkit/VOC<year>/{Annotations,JPEGImages,ImageSets/Main/{train,val}.txt}``."""
    rng = np.random.default_rng(2)
    height, width = size
    base = root / "VOCdevkit" / f"VOC{year}"
    for folder in ("Annotations", "JPEGImages", "ImageSets/Main"):
        (base / folder).mkdir(parents=True, exist_ok=True)
    ids = [f"2012_{i:06d}" for i in range(2 * images)]
    for i, image_id in enumerate(ids):
        _image(rng, size, i).save(base / "JPEGImages" / f"{image_id}.jpg")
        objects = "".join(
            f"<object><name>{VOC_NAMES[i % 3]}</name><pose>Unspecified</pose><truncated>0</truncated>"
            f"<difficult>0</difficult><bndbox><xmin>{x0}</xmin><ymin>{y0}</ymin><xmax>{x1}</xmax>"
            f"<ymax>{y1}</ymax></bndbox></object>"
            for x0, y0, x1, y1 in _boxes(rng, width, height, count=1 + i % 2)
        )
        (base / "Annotations" / f"{image_id}.xml").write_text(
            f"<annotation><folder>VOC{year}</folder><filename>{image_id}.jpg</filename><size><width>{width}</width>"
            f"<height>{height}</height><depth>3</depth></size><segmented>0</segmented>{objects}</annotation>"
        )
    (base / "ImageSets" / "Main" / "train.txt").write_text("\n".join(ids[:images]) + "\n")
    (base / "ImageSets" / "Main" / "val.txt").write_text("\n".join(ids[images:]) + "\n")
    return root


def make_text_corpus(root: Path, files_per_folder: int = 3) -> Path:
    """``root/<topic>/doc_i.txt``: a few kilobytes of text in two folders (two partition labels)."""
    for topic, line in (
        ("alpha", "the quick brown fox jumps over the lazy dog. "),
        ("beta", "def f(x): return x * 2\n"),
    ):
        (root / topic).mkdir(parents=True, exist_ok=True)
        for i in range(files_per_folder):
            (root / topic / f"doc_{i}.txt").write_text(f"{topic} {i}: " + line * 40)
    return root
