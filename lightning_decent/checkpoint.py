"""Sharded checkpoint directories: one file per rank, the network average, and a metadata file.

Layout of ``<name>.ckpt/`` (a directory)::

    rank_0.ckpt ... rank_{n-1}.ckpt   each rank's full Lightning checkpoint + ``"decentralized"`` state
    average.ckpt                      the network-average model (plain Lightning/torch checkpoint)
    meta.json                         world size, topology, algorithm, library version, file sizes

A checkpoint is written into a hidden staging directory next to its final name and renamed into
place only once every file is complete, so a crash or kill during a save never leaves a directory
that looks complete but is not; ``meta.json`` is written last and is what makes a directory valid.
"""

from __future__ import annotations

import json
import os
import shutil
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

META_FILE = "meta.json"
AVERAGE_FILE = "average.ckpt"
FORMAT = "lightning-decent/sharded-v1"


def rank_file(rank: int) -> str:
    return f"rank_{rank}.ckpt"


@dataclass
class CheckpointMeta:
    """What a sharded checkpoint was saved with; compared against the resuming run."""

    world_size: int
    topology: str
    topology_fingerprint: str
    algorithm: str
    communicator: str
    gossip_step: int
    library_version: str
    format: str = FORMAT
    file_sizes: dict[str, int] = field(default_factory=dict)

    def incompatibilities(self, world_size: int, topology_fingerprint: str, algorithm: str) -> list[str]:
        """Human-readable differences that prevent an exact per-rank resume."""
        problems = []
        if self.world_size != world_size:
            problems.append(f"world size {self.world_size} (now {world_size})")
        if self.topology_fingerprint != topology_fingerprint:
            problems.append(f"topology {self.topology!r} with fingerprint {self.topology_fingerprint} (differs now)")
        if self.algorithm != algorithm:
            problems.append(f"algorithm {self.algorithm!r} (now {algorithm!r})")
        return problems


def is_sharded(path: str | os.PathLike) -> bool:
    return Path(path).is_dir()


def staging_path(final: Path, token: str) -> Path:
    """A hidden sibling of ``final`` that Lightning's ``last*.ckpt`` lookup never matches."""
    return final.parent / f".{final.name}.incomplete-{token}"


def write_meta(directory: Path, meta: CheckpointMeta) -> None:
    """Record file sizes and write ``meta.json`` (flushed to disk): the directory is now complete."""
    meta.file_sizes = {p.name: p.stat().st_size for p in sorted(directory.iterdir()) if p.name != META_FILE}
    tmp = directory / (META_FILE + ".tmp")
    with open(tmp, "w") as f:
        json.dump(asdict(meta), f, indent=1)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, directory / META_FILE)


def commit(staging: Path, final: Path) -> None:
    """Move a complete staging directory to its final name, replacing an older checkpoint there."""
    if final.exists():
        previous = final.parent / f".{final.name}.replaced-{staging.name.rsplit('-', 1)[-1]}"
        os.replace(final, previous)
        os.replace(staging, final)
        shutil.rmtree(previous, ignore_errors=True)
    else:
        os.replace(staging, final)


def read_meta(directory: str | os.PathLike) -> CheckpointMeta:
    """Read and check ``meta.json``; raise a clear error for an incomplete or foreign directory."""
    directory = Path(directory)
    meta_path = directory / META_FILE
    if not meta_path.is_file():
        raise ValueError(
            f"{directory} is not a complete lightning-decent checkpoint (no {META_FILE}): a save was "
            f"interrupted or this is another kind of directory. Resume from an earlier checkpoint."
        )
    raw: dict[str, Any] = json.loads(meta_path.read_text())
    if raw.get("format") != FORMAT:
        raise ValueError(f"{meta_path} has format {raw.get('format')!r}; this version reads {FORMAT!r}.")
    meta = CheckpointMeta(**raw)
    for name, size in meta.file_sizes.items():
        actual = directory / name
        if not actual.is_file() or actual.stat().st_size != size:
            raise ValueError(f"{actual} is missing or truncated (expected {size} bytes): the checkpoint is damaged.")
    return meta
