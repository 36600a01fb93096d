"""The intra-machine collectives of hierarchical gossip in one process (a machine of one rank): the
shared-memory path, and its fallback to the process group when ``/dev/shm`` cannot hold a segment.
Machines of several ranks run in ``tests/test_hierarchical.py`` (slow), both paths against ``W @ X``."""

from __future__ import annotations

import errno
import os
from pathlib import Path

import pytest
import torch
import torch.distributed as dist

from lightning_decent.comm import machine_collectives
from lightning_decent.comm.machine_collectives import SharedMemoryMachine


@pytest.fixture
def group(tmp_path: Path):
    """A world of this one process (an earlier test of the session may have left one: it is used as it is)."""
    owned = not dist.is_initialized()
    if owned:
        dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    assert dist.get_world_size() == 1
    yield dist.group.WORLD
    if owned:
        dist.destroy_process_group()


def segments() -> list[Path]:
    return list(Path(machine_collectives.SHM_DIR).glob("lightning_decent_*"))


def test_a_machine_of_one_rank_reduces_and_gathers_through_shared_memory(group) -> None:
    machine = SharedMemoryMachine(group, local_rank=0, local_world_size=1)
    source, shard, target = torch.arange(6.0), torch.empty(6), torch.empty(6)
    for round_ in range(2):  # the segment is mapped once and reused
        machine.reduce_scatter(("b",), shard, source + round_)
        machine.all_gather(("b",), target, shard * 2)
        assert torch.equal(shard, source + round_) and torch.equal(target, 2 * (source + round_))
    assert len(machine._segments) == 1 and next(iter(machine._segments.values())) is not None
    assert not segments()  # unlinked once mapped
    machine.close()


def test_a_full_dev_shm_falls_back_to_the_process_group_with_a_warning(group, monkeypatch) -> None:
    def full(fd: int, offset: int, length: int) -> None:
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(machine_collectives.os, "posix_fallocate", full)
    machine = SharedMemoryMachine(group, local_rank=0, local_world_size=1)
    shard, target = torch.empty(4), torch.empty(4)
    with pytest.warns(UserWarning, match="cannot hold a 0 MiB segment .*--shm-size"):
        machine.reduce_scatter(("b",), shard, torch.arange(4.0))
    machine.all_gather(("b",), target, shard)
    assert torch.equal(target, torch.arange(4.0))
    assert machine._segments == {("b", 4, torch.float32): None}
    assert not segments()  # the file it could not fill was removed


@pytest.mark.parametrize("failing", ["broadcast_object_list", "barrier"])
def test_a_segment_is_removed_when_its_set_up_fails(group, monkeypatch, failing: str) -> None:
    # Before: the creating rank unlinked the file only after the barrier, so a mate that died or stopped before
    # mapping it (a failed broadcast or barrier here) left /dev/shm/lightning_decent_* behind.
    machine = SharedMemoryMachine(group, local_rank=0, local_world_size=1)

    def lost_mate(*args, **kwargs) -> None:
        assert segments()  # the segment exists at this point of the set-up
        raise RuntimeError("Connection closed by peer")

    monkeypatch.setattr(machine_collectives.dist, failing, lost_mate)
    with pytest.raises(RuntimeError, match="Connection closed by peer"):
        machine.reduce_scatter(("b",), torch.empty(4), torch.arange(4.0))
    assert not segments()
