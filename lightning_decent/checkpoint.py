"""Checkpoints of a decentralized run: a regular Lightning file with the network average, and every
rank's shard beside it.

Layout (format ``lightning-decent/sharded-v2``)::

    epoch=3-step=480.ckpt              the path Lightning reports (ModelCheckpoint.best_model_path ...): a
                                       regular Lightning checkpoint whose ``state_dict`` is the network
                                       average (push-sum weighted), with rank 0's optimizer, LR-scheduler,
                                       loop and callback state, and a small ``"decentralized"`` record naming
                                       its shard directory and save token
    epoch=3-step=480.ckpt.shards/
        rank_0.ckpt ... rank_{n-1}.ckpt   each rank's full checkpoint plus its algorithm state, gossip step
                                          and RNG states (what an exact resume reads)
        meta.json                         world size, topology, algorithm, version, save token, and the size
                                          and SHA-256 of every shard

So ``Model.load_from_checkpoint(path)``, ``torch.load(path)`` and ``Trainer(strategy="ddp").fit(...,
ckpt_path=path)`` read the average like any Lightning checkpoint, and the strategy resumes every rank
bitwise from the shards.

Atomic writes: the shards go to a hidden staging directory (``.<name>.shards.incomplete-<token>``) and
the average to a hidden temporary file; once every shard and ``meta.json`` are complete, the directory
is renamed into place and then the file. A crash at any point leaves either the previous checkpoint
or hidden leftovers, which the next successful save in that directory removes; a shard directory
whose token differs from its file's (a crash between the two renames) is refused on resume.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

import torch

META_FILE = "meta.json"
SHARDS_SUFFIX = ".shards"
FORMAT = "lightning-decent/sharded-v2"
#: Key of the record in the top-level file that names its shard directory.
RECORD_KEY = "decentralized_shards"
_STAGING_MARK = ".incomplete-"


def rank_file(rank: int) -> str:
    return f"rank_{rank}.ckpt"


def shard_dir(path: str | os.PathLike) -> Path:
    """The shard directory beside the checkpoint file ``path`` (symbolic links followed, so a ``last.ckpt``
    link made by ``ModelCheckpoint(save_last="link")`` finds its target's shards)."""
    real = Path(os.path.realpath(path))
    return real.parent / (real.name + SHARDS_SUFFIX)


def file_of_shard_dir(directory: Path) -> Path:
    """The checkpoint file a shard directory belongs to."""
    return directory.parent / directory.name[: -len(SHARDS_SUFFIX)]


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
    token: str = ""
    file_sizes: dict[str, int] = field(default_factory=dict)
    file_sha256: dict[str, str] = field(default_factory=dict)

    def incompatibilities(self, current: CheckpointMeta, uses_topology: bool = True) -> list[str]:
        """Human-readable differences from the resuming run's settings (``current``) that prevent an exact
        per-rank resume: the world size, the algorithm, and where the algorithm mixes over the graph
        (``uses_topology``) the topology and the communicator that realises it (gossip or an exact
        all-reduce). An algorithm whose only exchange is an exact average over all ranks (DiLoCo, local
        SGD, the DDP baseline) computes the same on any graph, so those two are not compared for it."""
        problems = []
        if self.world_size != current.world_size:
            problems.append(f"world size {self.world_size} (now {current.world_size})")
        if self.algorithm != current.algorithm:
            problems.append(f"algorithm {self.algorithm!r} (now {current.algorithm!r})")
        if uses_topology and self.topology_fingerprint != current.topology_fingerprint:
            problems.append(
                f"topology {self.topology!r} with fingerprint {self.topology_fingerprint} (now {current.topology!r} "
                f"with {current.topology_fingerprint})"
            )
        if uses_topology and self.communicator != current.communicator:
            problems.append(f"communicator {self.communicator!r} (now {current.communicator!r})")
        return problems


def record(shards: Path, token: str, world_size: int) -> dict[str, Any]:
    """The ``"decentralized"`` entry of the top-level file (plain data: ``weights_only`` loads it)."""
    return {"format": FORMAT, "shards": shards.name, "token": token, "world_size": world_size}


def read_record(path: Path, weights_only: bool) -> dict[str, Any] | None:
    """The shard record of a top-level file, or ``None`` for a plain Lightning checkpoint (the file is
    memory-mapped: its tensors are not read)."""
    loaded = torch.load(path, map_location="cpu", weights_only=weights_only, mmap=True)
    found = loaded.get(RECORD_KEY) if isinstance(loaded, dict) else None
    return found if isinstance(found, dict) and found.get("format") == FORMAT else None


def shard_problems(
    shards: Path, found: dict[str, Any], current: CheckpointMeta, uses_topology: bool = True
) -> list[str]:
    """Why the shards beside a top-level file (whose record is ``found``) cannot be resumed exactly by a run
    with the settings ``current`` (see :meth:`CheckpointMeta.incompatibilities`)."""
    if not shards.is_dir():
        return [f"its shard directory {shards} is missing"]
    try:
        meta = read_meta(shards)
    except ValueError as err:
        return [str(err)]
    problems = []
    if meta.token != found.get("token"):
        problems.append(
            f"its shard directory {shards} holds another save (token {meta.token}, the file's is {found.get('token')}:"
            f" a save was interrupted between renaming the two)"
        )
    differences = meta.incompatibilities(current, uses_topology)
    return problems + ([f"it was saved with {', '.join(differences)}"] if differences else [])


def staging_path(final: Path, token: str) -> Path:
    """A hidden sibling of ``final`` that Lightning's ``last*.ckpt`` lookup never matches."""
    return final.parent / f".{final.name}{_STAGING_MARK}{token}"


def remove_stale_staging(directory: Path, keep_token: str) -> list[Path]:
    """Remove hidden staging leftovers of interrupted saves in ``directory`` (not those of ``keep_token``)."""
    removed = []
    for leftover in directory.glob(f".*{_STAGING_MARK}*"):
        if leftover.name.endswith(_STAGING_MARK + keep_token):
            continue
        if leftover.is_dir():
            shutil.rmtree(leftover, ignore_errors=True)
        else:
            leftover.unlink(missing_ok=True)
        removed.append(leftover)
    return removed


def sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def write_meta(directory: Path, meta: CheckpointMeta, hashes: dict[str, str]) -> None:
    """Record file sizes and hashes and write ``meta.json`` (flushed to disk): the directory is complete."""
    meta.file_sizes = {p.name: p.stat().st_size for p in sorted(directory.iterdir()) if p.name != META_FILE}
    meta.file_sha256 = dict(sorted(hashes.items()))
    tmp = directory / (META_FILE + ".tmp")
    with open(tmp, "w") as f:
        json.dump(asdict(meta), f, indent=1)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, directory / META_FILE)


def commit(staging: Path, final: Path) -> None:
    """Move a complete staging file or directory to its final name, replacing an older one there."""
    if final.is_dir():
        previous = final.parent / f".{final.name}.replaced-{staging.name.rsplit('-', 1)[-1]}"
        os.replace(final, previous)
        os.replace(staging, final)
        shutil.rmtree(previous, ignore_errors=True)
    else:
        os.replace(staging, final)


def read_meta(directory: str | os.PathLike) -> CheckpointMeta:
    """Read and check ``meta.json``; raise a clear error for an incomplete, damaged or foreign directory."""
    directory = Path(directory)
    meta_path = directory / META_FILE
    if not meta_path.is_file():
        raise ValueError(
            f"{directory} is not a complete lightning-decent checkpoint (no {META_FILE}): a save was "
            f"interrupted or this is another kind of directory. Resume from an earlier checkpoint."
        )
    damaged = f"{meta_path} is damaged"
    try:
        raw = json.loads(meta_path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise ValueError(f"{damaged}: it is not valid JSON ({err}). Resume from an earlier checkpoint.") from None
    if not isinstance(raw, dict):
        raise ValueError(f"{damaged}: expected a JSON object, found {type(raw).__name__}.")
    if raw.get("format") != FORMAT:
        raise ValueError(f"{meta_path} has format {raw.get('format')!r}; this version reads {FORMAT!r}.")
    known = {f.name for f in fields(CheckpointMeta)}
    unknown, missing = (
        sorted(set(raw) - known),
        sorted(f.name for f in fields(CheckpointMeta) if f.name not in raw and f.name not in ("token", "file_sha256")),
    )
    if unknown or missing:
        raise ValueError(f"{damaged}: unknown key(s) {unknown}, missing key(s) {missing}.")
    meta = CheckpointMeta(**raw)
    for name, size in meta.file_sizes.items():
        actual = directory / name
        if not actual.is_file() or actual.stat().st_size != size:
            raise ValueError(f"{actual} is missing or truncated (expected {size} bytes): the checkpoint is damaged.")
    return meta


def verify(directory: Path, name: str, meta: CheckpointMeta) -> None:
    """Refuse ``directory/name`` if its content differs from the SHA-256 recorded at save time."""
    expected = meta.file_sha256.get(name)
    if expected is not None and sha256(directory / name) != expected:
        raise ValueError(
            f"{directory / name} does not match the SHA-256 recorded in {META_FILE} when it was saved: the file "
            f"was modified or corrupted. Restore it, or resume from another checkpoint."
        )
