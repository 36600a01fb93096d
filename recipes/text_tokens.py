"""Byte-token files for the language-model recipe: a prepare step writes them once, training memory-maps them.

``python -m lightning_decent.recipes.text_tokens --root /data/books --pattern '**/*.txt' --out /data/books_tokens``
reads the files one at a time (a corpus larger than memory works) and writes, into ``--out``:

- ``train.bin``, ``val.bin``: the files' raw bytes (token ids 0-255, ``uint8``) one after the other in a
  seeded order, the first ``--val-fraction`` of the bytes in validation (one file is split if needed);
- ``meta.json``: the vocabulary size, the byte count of each split, and where each training file
  starts with its top-level folder (the label of a non-iid partition).

Training (``data.tokens_dir=/data/books_tokens``) reads them with ``numpy.memmap``; only the blocks in
use are paged in. Without ``data.tokens_dir`` the recipe prepares its files in the run directory first.
"""

from __future__ import annotations

import argparse
import json
import sysconfig
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

VOCAB_SIZE = 256
FILES = ("train.bin", "val.bin", "meta.json")
DEFAULT_EXCLUDE = ("site-packages", "dist-packages", "__pycache__")


def default_corpus() -> str:
    """The Python standard library's source folder (nothing to download)."""
    return sysconfig.get_paths()["stdlib"]


def is_prepared(out: Path) -> bool:
    """Whether ``out`` holds every file of :data:`FILES`."""
    return all((out / name).is_file() for name in FILES)


def _group(path: Path, root: Path) -> str:
    parts = path.relative_to(root).parts
    return parts[0] if len(parts) > 1 else "."


def prepare(
    root: Path,
    out: Path,
    pattern: str = "**/*.py",
    max_bytes: int | None = None,
    exclude_dirs: Sequence[str] = DEFAULT_EXCLUDE,
    val_fraction: float = 0.05,
    seed: int = 0,
) -> dict[str, Any]:
    """Write ``train.bin``, ``val.bin`` and ``meta.json`` into ``out`` from the files under ``root``.

    Files matching ``pattern`` (none inside ``exclude_dirs``) are taken in a seeded random order until
    ``max_bytes`` are read (the last one truncated). The first ``round(val_fraction * total)`` bytes of that
    stream (at least 1) are the validation split: whole files, then the head of the file that crosses the
    boundary, whose rest starts the training split. One file works too. Returns the metadata.
    """
    if not 0.0 < val_fraction < 1.0:
        raise ValueError(f"val_fraction must be in (0, 1), got {val_fraction!r} (e.g. 0.05).")
    files = sorted(
        p for p in root.glob(pattern) if p.is_file() and not set(p.relative_to(root).parts[:-1]) & set(exclude_dirs)
    )
    order = [files[i] for i in np.random.default_rng(seed).permutation(len(files))]
    sizes: list[int] = []
    budget = max_bytes if max_bytes is not None else float("inf")
    for path in order:
        if budget <= 0:
            break
        sizes.append(int(min(path.stat().st_size, budget)))
        budget -= sizes[-1]
    total = sum(sizes)
    if total < 2:
        raise ValueError(
            f"found {len(sizes)} file(s) matching {pattern!r} under {root} with {total} byte(s); a training and a "
            f"validation split need at least 2 bytes: point data.root (--root) and data.pattern (--pattern) at text."
        )
    val_target = min(max(1, round(val_fraction * total)), total - 1)
    out.mkdir(parents=True, exist_ok=True)
    meta: dict[str, Any] = {"vocab_size": VOCAB_SIZE, "source": str(root), "pattern": pattern, "train_files": []}
    written = {"train": 0, "val": 0}
    with (out / "train.bin").open("wb") as train, (out / "val.bin").open("wb") as val:
        for path, size in zip(order, sizes):
            data = path.read_bytes()[:size]
            head = min(len(data), val_target - written["val"])
            val.write(data[:head])
            written["val"] += head
            if head < len(data):
                meta["train_files"].append({"offset": written["train"], "group": _group(path, root)})
                train.write(data[head:])
                written["train"] += len(data) - head
    meta.update(train_bytes=written["train"], val_bytes=written["val"])
    (out / "meta.json").write_text(json.dumps(meta))
    return meta


class TokenBlocks:
    """Non-overlapping ``(input, target)`` blocks of a memory-mapped byte-token file; the target is the
    input shifted by one. The file is opened in each process that reads it (DataLoader workers too).

    Args:
        path: a ``.bin`` file of ``uint8`` token ids.
        block_size: tokens per input.
    """

    def __init__(self, path: Path, block_size: int) -> None:
        self.path = path
        self.block_size = block_size
        self.length = max(0, (path.stat().st_size - 1) // block_size)
        self._tokens: np.memmap | None = None

    def __len__(self) -> int:
        return self.length

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        if self._tokens is None:
            self._tokens = np.memmap(self.path, dtype=np.uint8, mode="r")
        start = index * self.block_size
        block = torch.from_numpy(self._tokens[start : start + self.block_size + 1].astype(np.int64))
        return block[:-1], block[1:]

    def __getstate__(self) -> dict[str, Any]:
        return {**self.__dict__, "_tokens": None}  # workers map the file themselves

    def block_starts(self) -> np.ndarray:
        """The token offset of every block."""
        return np.arange(self.length, dtype=np.int64) * self.block_size


def main(argv: list[str] | None = None) -> None:
    """The prepare step's command line (see the module docstring)."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--root", default=default_corpus(), help="corpus folder (default: the Python standard library)")
    parser.add_argument("--pattern", default="**/*.py", help="glob of the files under --root")
    parser.add_argument("--out", required=True, help="folder for train.bin, val.bin and meta.json")
    parser.add_argument("--max-bytes", type=int, default=None, help="read at most this many bytes")
    parser.add_argument("--val-fraction", type=float, default=0.05)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    meta = prepare(Path(args.root), Path(args.out), args.pattern, args.max_bytes, val_fraction=args.val_fraction,
                   seed=args.seed)  # fmt: skip
    print(f"{args.out}: {meta['train_bytes']} training and {meta['val_bytes']} validation tokens")


if __name__ == "__main__":
    main()
