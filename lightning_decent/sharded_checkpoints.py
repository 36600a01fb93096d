"""Saving and resuming the sharded checkpoint of a decentralized run (the format is :mod:`lightning_decent.checkpoint`).

Every rank calls :func:`save`: it writes its own shard (Lightning's checkpoint plus :func:`rank_state`) into a
staging directory, the ranks exchange the shards' hashes, rank 0 writes the top-level file with the network
average and commits both atomically. :func:`load` gives a resuming ``fit`` this rank's shard, or the network
average when the run cannot continue exactly and ``resume_from_average`` allows it; evaluation reads the
average. Nothing here knows Lightning's hooks: the strategy calls it with its collectives and identity.
"""

from __future__ import annotations

import os
import pickle
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from lightning.fabric.plugins import CheckpointIO
from lightning.pytorch.utilities.rank_zero import rank_zero_warn

from lightning_decent import checkpoint as ckpt
from lightning_decent import rng
from lightning_decent._version import __version__
from lightning_decent.algorithms import Algorithm, Bucket
from lightning_decent.comm.collectives import BoundedCollectives
from lightning_decent.evaluation import average_state_dict
from lightning_decent.topology import Topology

#: Key of a shard's own entry (gossip step, algorithm and bucket states, RNG states).
DECENTRALIZED_KEY = "decentralized"


@dataclass(frozen=True)
class RunIdentity:
    """What makes a run's mathematics: a shard saved with another identity cannot be resumed exactly."""

    world_size: int
    topology_name: str
    topology_fingerprint: str
    algorithm: str
    communicator: str
    uses_topology: bool = True  # whether the algorithm's mathematics depends on the graph (see CheckpointMeta)

    @classmethod
    def of(cls, world_size: int, topology: Topology, algorithm: Algorithm, communicator: str) -> RunIdentity:
        return cls(
            world_size=world_size,
            topology_name=topology.name,
            topology_fingerprint=topology.fingerprint(),
            algorithm=algorithm.name,
            communicator=communicator,
            uses_topology=algorithm.uses_topology,
        )

    def meta(self, gossip_step: int, token: str) -> ckpt.CheckpointMeta:
        return ckpt.CheckpointMeta(
            world_size=self.world_size,
            topology=self.topology_name,
            topology_fingerprint=self.topology_fingerprint,
            algorithm=self.algorithm,
            communicator=self.communicator,
            gossip_step=gossip_step,
            library_version=__version__,
            token=token,
        )


@dataclass
class Loaded:
    """What :func:`load` read: Lightning's checkpoint, this rank's own state (``None`` for evaluation, a
    plain Lightning checkpoint or a resume from the average) and whether it is the network average."""

    checkpoint: dict[str, Any]
    rank_state: dict[str, Any] | None = None
    from_average: bool = False


def rank_state(gossip_step: int, algorithm: Algorithm, bucket_groups: list[list[Bucket]]) -> dict[str, Any]:
    """This rank's entry of its shard: the gossip step, the algorithm's state per bucket, the RNG states."""
    return {
        "gossip_step": gossip_step,
        "algorithm": algorithm.state_dict(),
        "buckets": [[algorithm.bucket_state_dict(b) for b in group] for group in bucket_groups],
        "rng": rng.collect_states(),
    }


def restore_rank_state(state: dict[str, Any], algorithm: Algorithm, bucket_groups: list[list[Bucket]]) -> int:
    """Restore what :func:`rank_state` saved into buckets built for this run; returns the gossip step."""
    algorithm.load_state_dict(state["algorithm"])
    saved = state["buckets"]
    if [len(b) for b in saved] != [len(b) for b in bucket_groups]:
        raise ValueError(
            "The checkpoint's parameter buckets do not match this run's (different model, optimizers or "
            "bucket_size_mb). Resume with the same bucket_size_mb, or use resume_from_average=True "
            "(training application: strategy.resume_from_average=true)."
        )
    for saved_group, buckets in zip(saved, bucket_groups):
        for saved_state, bucket in zip(saved_group, buckets):
            algorithm.load_bucket_state_dict(bucket, saved_state)
    rng.restore_states(state["rng"])
    return int(state["gossip_step"])


def save(
    checkpoint: dict[str, Any],
    filepath: str | os.PathLike,
    *,
    io: CheckpointIO,
    collectives: BoundedCollectives,
    identity: RunIdentity,
    own_state: dict[str, Any],
    average_weight: float,
) -> None:
    """Write ``filepath`` with the network average and every rank's shard beside it (every rank calls this)."""
    rank, zero = collectives.rank, collectives.rank == 0
    final = Path(collectives.broadcast_object(str(filepath), 0, "checkpoint save: path"))
    token = collectives.broadcast_object(uuid.uuid4().hex[:12], 0, "checkpoint save: token")
    shards = ckpt.shard_dir(final)
    staging = ckpt.staging_path(shards, token)
    if zero:
        staging.mkdir(parents=True)
    collectives.barrier("barrier 'checkpoint save: staging directory'")
    own = staging / ckpt.rank_file(rank)
    io.save_checkpoint({**checkpoint, DECENTRALIZED_KEY: own_state}, own)
    hashes = dict(collectives.all_gather_object((own.name, ckpt.sha256(own)), "checkpoint save: shard hashes"))
    average = average_state_dict(checkpoint["state_dict"], average_weight, collectives)
    if zero:
        top = ckpt.staging_path(final, token)
        record = ckpt.record(shards, token, collectives.world_size)
        io.save_checkpoint({**checkpoint, "state_dict": average, ckpt.RECORD_KEY: record}, top)
        ckpt.write_meta(staging, identity.meta(own_state["gossip_step"], token), hashes)
        ckpt.commit(staging, shards)
        ckpt.commit(top, final)
        ckpt.remove_stale_staging(final.parent, token)
    collectives.barrier("barrier 'checkpoint save: commit'")


def load(
    checkpoint_path: str | os.PathLike,
    *,
    io: CheckpointIO,
    rank: int,
    identity: RunIdentity | None,
    weights_only: bool,
    resume_from_average: bool,
) -> Loaded:
    """Resuming ``fit`` (``identity`` given): this rank's shard (bitwise resume), or the network average when the
    shards do not match ``identity`` and ``resume_from_average``. Evaluating (``identity=None``): the network
    average (the top-level file). A plain Lightning checkpoint is read as is."""
    path = Path(checkpoint_path)
    try:
        if path.is_dir():
            if not path.name.endswith(ckpt.SHARDS_SUFFIX):
                ckpt.read_meta(path)  # raises: an incomplete or foreign directory
            path = ckpt.file_of_shard_dir(path)
        return _load_file(path, io, rank, identity, weights_only, resume_from_average)
    except pickle.UnpicklingError as err:
        raise pickle.UnpicklingError(
            f"{path} holds objects that torch.load(weights_only=True) refuses (e.g. hyper-parameters that "
            f"are not plain data). If you trust this checkpoint, pass weights_only=False to fit/validate/test. "
            f"{err}"
        ) from err


def _load_file(
    path: Path, io: CheckpointIO, rank: int, identity: RunIdentity | None, weights_only: bool, from_average: bool
) -> Loaded:
    record = ckpt.read_record(path, weights_only) if identity is not None else None
    if record is None:  # evaluation, or a plain Lightning checkpoint (DDP's, say): the file itself
        return Loaded(io.load_checkpoint(path, weights_only=weights_only))
    assert identity is not None
    shards = ckpt.shard_dir(path)
    problems = ckpt.shard_problems(shards, record, identity.meta(0, ""), identity.uses_topology)
    if problems:
        return _resume_from_average(path, io.load_checkpoint(path, weights_only=weights_only), problems, from_average)
    meta = ckpt.read_meta(shards)
    own = ckpt.rank_file(rank)
    ckpt.verify(shards, own, meta)
    loaded = io.load_checkpoint(shards / own, weights_only=weights_only)
    return Loaded(loaded, rank_state=loaded.pop(DECENTRALIZED_KEY))


def _resume_from_average(path: Path, average: dict[str, Any], problems: list[str], allowed: bool) -> Loaded:
    """Every rank starts from ``average`` (the network average, loops continued, fresh optimizer and algorithm
    state) if ``allowed``; else refuse naming ``problems``."""
    if not allowed:
        raise ValueError(
            f"Cannot resume {path} exactly: {'; '.join(problems)}. Resume with the same configuration, or pass "
            f"DecentralizedStrategy(resume_from_average=True) to start every rank from the checkpoint's "
            f"network-average model (training application: strategy.resume_from_average=true)."
        )
    rank_zero_warn(f"Resuming every rank from the network-average model of {path} (fresh optimizer state).")
    average.pop(ckpt.RECORD_KEY, None)
    average.pop(DECENTRALIZED_KEY, None)
    average.pop("optimizer_states", None)
    return Loaded(average, from_average=True)
