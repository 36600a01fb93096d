"""Elastic membership in real gloo runs: every rank its own process, as torchrun or SLURM start them.

A lost rank (killed, or stopped past ``gossip_timeout``) costs the survivors a membership change, not the run;
a process started with ``elastic.join=true`` joins the running job from a neighbour's live state; too few ranks
or a lost membership store end the run with an error that says so, and nothing hangs.
"""

from __future__ import annotations

import re
import subprocess
import sys
import time
from pathlib import Path

import pytest
from elastic_launch import finish, free_port, logs, results, start_rank, stop_store

from lightning_decent import checkpoint as ckpt

pytestmark = pytest.mark.slow

EPOCHS = "8"


def run_job(out: Path, world: int, *args: str, stopped: tuple[int, ...] = (), joiner: bool = False) -> dict:
    """Launch ``world`` ranks (and a joiner that starts once the victim is gone); their exit codes and results."""
    port = free_port()
    try:
        procs = {r: start_rank(out, r, world, port, "--epochs", EPOCHS, *args) for r in range(world)}
        if joiner:
            joining = ("--epochs", EPOCHS, *args, "--join", "--join-after", str(out / "victim_time"))
            procs[world] = start_rank(out, world, world, port, *joining)
        codes = finish(procs, timeout=600, stopped=stopped)
    finally:
        stop_store(port)
    return {"codes": codes, "results": results(out, list(procs)), "logs": logs(out)}


#: The accuracy comparison trains until the digits plateau (about 180 steps per rank).
CONVERGED = ("--epochs", "12", "--batch-size", "16")


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory: pytest.TempPathFactory) -> dict:
    return run_job(tmp_path_factory.mktemp("uninterrupted"), 6, *CONVERGED)


@pytest.fixture(scope="module")
def killed(tmp_path_factory: pytest.TempPathFactory) -> dict:
    return run_job(tmp_path_factory.mktemp("killed"), 6, *CONVERGED, "--victim", "3", "--at-epoch", "1")


def accuracy(job: dict) -> float:
    accuracies = {round(r["val_acc"], 6) for r in job["results"].values()}
    assert len(accuracies) == 1, f"the ranks evaluated different models: {accuracies}"
    return accuracies.pop()


def test_a_killed_rank_costs_a_membership_change_and_the_others_finish_every_epoch(
    uninterrupted: dict, killed: dict
) -> None:
    assert killed["codes"][3] == -9
    survivors = [0, 1, 2, 4, 5]
    assert all(killed["codes"][r] == 0 for r in survivors), killed["logs"]
    for r in survivors:
        run = killed["results"][r]
        assert [e["epoch"] for e in run["epochs"]] == list(range(12))  # no restart, no epoch lost
        assert [e["world_size"] for e in run["epochs"]][1:] == [5] * 11
        assert all(e["loss"] is not None for e in run["epochs"])  # each rank logs its loss
    assert len(re.findall(r"membership epoch 1: rank \d of 5 .*lost a00000003", killed["logs"])) == 5
    assert abs(accuracy(killed) - accuracy(uninterrupted)) <= 0.01, (accuracy(killed), accuracy(uninterrupted))


def test_a_hung_rank_is_dropped_after_the_gossip_timeout(tmp_path: Path) -> None:
    job = run_job(tmp_path, 4, "--victim", "2", "--mode", "hang", "--gossip-timeout", "5", stopped=(2,))
    assert all(job["codes"][r] == 0 for r in (0, 1, 3)), job["logs"]
    assert all(job["results"][r]["world_size"] == 3 for r in (0, 1, 3))
    assert "gossip_timeout=5s" in job["logs"]  # its neighbours noticed it; the others followed at once


def test_losing_rank_0_moves_logging_and_checkpoints_to_the_lowest_survivor(tmp_path: Path) -> None:
    job = run_job(tmp_path, 4, "--victim", "0", "--at-epoch", "1", "--checkpoints")
    assert all(job["codes"][r] == 0 for r in (1, 2, 3)), job["logs"]
    assert job["results"][1]["rank"] == 0  # the lowest survivor is rank 0 of the new epoch
    metrics = (tmp_path / "logs" / "elastic" / "version_0" / "metrics.csv").read_text()
    assert re.search(rf"^{int(EPOCHS) - 1},", metrics, re.MULTILINE) or f",{int(EPOCHS) - 1}," in metrics
    last = tmp_path / "checkpoints" / "last.ckpt"
    meta = ckpt.read_meta(ckpt.shard_dir(last))
    assert meta.world_size == 3  # saved by the survivors, after the change
    assert sorted(p.name for p in ckpt.shard_dir(last).glob("rank_*.ckpt")) == [f"rank_{r}.ckpt" for r in range(3)]


@pytest.mark.parametrize("during", ["validation", "save"])
def test_a_rank_lost_in_an_evaluation_or_a_checkpoint_save_costs_a_membership_change(tmp_path: Path, during) -> None:
    """The survivors take the interrupted step again on the new group: the evaluation's average and metric
    reductions, or the whole save, whose checkpoint then holds the survivors' shards only."""
    victim = ("--victim", "2", "--at-epoch", "1", "--at-batch", "0", "--during", during)  # 1 eval batch
    job = run_job(tmp_path, 4, *victim, "--checkpoints")
    assert job["codes"][2] == -9
    assert all(job["codes"][r] == 0 for r in (0, 1, 3)), job["logs"]
    for r in (0, 1, 3):
        run = job["results"][r]
        assert [e["epoch"] for e in run["epochs"]] == list(range(int(EPOCHS)))
        assert run["world_size"] == 3
    assert len(re.findall(r"membership epoch 1: rank \d of 3 .*lost a00000002", job["logs"])) == 3
    assert accuracy(job) >= 0.9
    last = tmp_path / "checkpoints" / "last.ckpt"
    assert ckpt.read_meta(ckpt.shard_dir(last)).world_size == 3
    assert sorted(p.name for p in ckpt.shard_dir(last).glob("rank_*.ckpt")) == [f"rank_{r}.ckpt" for r in range(3)]
    leftovers = [p.name for p in (tmp_path / "checkpoints").glob(".*") if p.name not in (".", "..")]
    assert not leftovers, f"a save the loss interrupted left {leftovers} behind"


@pytest.fixture(scope="module")
def uninterrupted_4(tmp_path_factory: pytest.TempPathFactory) -> dict:
    return run_job(tmp_path_factory.mktemp("uninterrupted_4"), 4, *CONVERGED)


def test_a_new_process_joins_with_a_neighbours_state_and_the_job_ends_with_4_members(
    tmp_path: Path, uninterrupted_4: dict
) -> None:
    job = run_job(tmp_path, 4, *CONVERGED, "--victim", "1", "--at-epoch", "1", joiner=True)
    assert all(job["codes"][r] == 0 for r in (0, 2, 3, 4)), job["logs"]
    joiner = job["results"][4]
    assert all(job["results"][r]["world_size"] == 4 for r in (0, 2, 3, 4))
    assert joiner["handover_bytes"] > 100_000  # the model, optimizer and loop state of a neighbour
    assert joiner["first_step"] > 0  # it continued the job's steps, it did not start over
    assert re.search(r"received \d+ bytes of state from rank \d", job["logs"])
    assert abs(accuracy(job) - accuracy(uninterrupted_4)) <= 0.01, (accuracy(job), accuracy(uninterrupted_4))


def test_a_two_level_run_gossips_flat_while_a_machine_misses_a_rank_and_two_level_again_once_it_is_whole(
    tmp_path: Path,
) -> None:
    """Two machines of 2 ranks, each rank its own process (as srun starts them): losing rank 3 leaves 3 members
    (flat ring over the ranks); the joiner, started on the machine that lost it, makes 2 whole machines again,
    and the run ends on the two-level graph."""
    job = run_job(tmp_path, 4, "--machines-of", "2", "--victim", "3", "--at-epoch", "1", joiner=True)
    assert all(job["codes"][r] == 0 for r in (0, 1, 2, 4)), job["logs"]
    assert len(re.findall(r"the members gossip on ring over the ranks", job["logs"])) == 3
    assert {job["results"][r]["communicator"] for r in (0, 1, 2, 4)} == {"HierarchicalCommunicator"}
    assert all(job["results"][r]["world_size"] == 4 for r in (0, 1, 2, 4))
    assert accuracy(job) >= 0.9


def test_fewer_ranks_than_min_ranks_end_the_run_with_an_error_that_names_it(tmp_path: Path) -> None:
    started = time.monotonic()
    job = run_job(tmp_path, 4, "--victim", "1", "--at-epoch", "1", "--min-ranks", "4", "--join-timeout", "15")
    assert time.monotonic() - started < 300
    assert all(job["codes"][r] not in (0, None) for r in (0, 2, 3)), job["logs"]
    assert "min_ranks=4" in job["logs"]


def test_a_lost_membership_store_ends_the_run_with_an_error_and_the_last_checkpoint_resumable(tmp_path: Path) -> None:
    port = free_port()
    store = subprocess.Popen(
        [sys.executable, "-m", "lightning_decent.membership", "serve", "--host", "127.0.0.1", "--port", str(port)]
    )
    try:
        args = ("--store", f"127.0.0.1:{port}", "--checkpoints", "--join-timeout", "15")
        victim = ("--victim", "2", "--at-epoch", "2")
        main_port = free_port()
        procs = {r: start_rank(tmp_path, r, 4, main_port, "--epochs", EPOCHS, *args, *victim) for r in range(4)}
        deadline = time.monotonic() + 300
        while not (tmp_path / "checkpoints" / "last.ckpt").exists():
            time.sleep(0.5)
            assert all(p.poll() is None for p in procs.values()) and time.monotonic() < deadline, logs(tmp_path)
        store.kill()  # training goes on without the store; the next change cannot
        codes = finish(procs, timeout=300)
    finally:
        store.kill()
    assert codes[2] == -9
    assert all(codes[r] not in (0, None) for r in (0, 1, 3)), logs(tmp_path)
    assert "membership store" in logs(tmp_path)
    meta = ckpt.read_meta(ckpt.shard_dir(tmp_path / "checkpoints" / "last.ckpt"))
    assert meta.world_size == 4
