"""Exact resume and failure handling in real 4-process gloo runs.

Each test launches ``tests/mp_scripts/*.py`` in a subprocess (Lightning's popen launcher starts
the other ranks), so every run is a real set of processes that is stopped and started again.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest
import torch
from mp_launch import launch

RANKS = 4
#: Exact resume is checked for these: plain gossip, a tracker state, push-sum weights on a digraph.
RESUME_ALGORITHMS = ("dsgd", "gradient_tracking", "push_sum")


def params(out: Path, name: str, rank: int) -> list[torch.Tensor]:
    return torch.load(out / f"{name}_rank{rank}.pt", weights_only=True)


@pytest.fixture(scope="module")
def resumed(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("resume")
    for phase in ("first", "resume"):  # two separate launches: the processes stop in between
        proc = launch("resume.py", str(out), phase, "--algorithms", ",".join(RESUME_ALGORITHMS), cwd=out, timeout=900)
        assert proc.returncode == 0, proc.stderr[-5000:]
    return out


@pytest.mark.parametrize("algorithm", RESUME_ALGORITHMS)
def test_stop_and_resume_equals_training_straight_bitwise_on_every_rank(resumed: Path, algorithm: str) -> None:
    for rank in range(RANKS):
        straight = params(resumed, f"{algorithm}_straight", rank)
        resumed_params = params(resumed, f"{algorithm}_resumed", rank)
        assert all(torch.equal(a, b) for a, b in zip(straight, resumed_params)), f"{algorithm}: rank {rank} differs"
    first, second = params(resumed, f"{algorithm}_straight", 0)[0], params(resumed, f"{algorithm}_straight", 1)[0]
    assert not torch.equal(first, second)


@pytest.mark.slow
def test_resume_with_another_world_size_is_refused_then_works_from_the_average(resumed: Path) -> None:
    proc = launch("resume.py", str(resumed), "resume", "--devices", "2", cwd=resumed)
    assert proc.returncode != 0
    assert "saved with world size 4 (now 2)" in proc.stderr and "resume_from_average=True" in proc.stderr
    proc = launch("resume.py", str(resumed), "resume", "--devices", "2", "--resume-from-average", cwd=resumed)
    assert proc.returncode == 0, proc.stderr[-5000:]
    assert len(params(resumed, "dsgd_from_average", 0)) == len(params(resumed, "dsgd_straight", 0))


def run_failure(tmp_path: Path, mode: str, gossip_timeout: float, *options: str) -> tuple[float, str]:
    """Launch ``failure.py``; seconds from the victim's signal to the exit of every process, and stderr."""
    argv = ("--mode", mode, "--gossip-timeout", str(gossip_timeout), *options)
    proc = launch("failure.py", str(tmp_path), *argv, cwd=tmp_path)
    exited = time.time()
    assert proc.returncode != 0
    died = float((tmp_path / "victim_time").read_text())
    return exited - died, proc.stderr


def test_a_killed_rank_stops_the_others_with_its_rank_and_step_named(tmp_path: Path) -> None:
    elapsed, stderr = run_failure(tmp_path, "kill", gossip_timeout=60)
    assert elapsed < 30, f"took {elapsed:.1f}s to stop after rank 2 was killed"
    assert "rank 1: lost rank 2 at gossip step 5" in stderr
    assert "rank 3: lost rank 2 at gossip step 5" in stderr


@pytest.mark.slow
def test_a_hung_rank_stops_the_others_after_the_gossip_timeout(tmp_path: Path) -> None:
    elapsed, stderr = run_failure(tmp_path, "hang", gossip_timeout=5)
    assert 5 <= elapsed < 30, f"took {elapsed:.1f}s to stop after rank 2 hung"
    assert "rank 1: lost rank 2 at gossip step 5" in stderr
    assert "gossip_timeout=5s" in stderr


#: (mode, when, what the other ranks must say). ``collective_timeout=5`` bounds every world-wide collective; after it,
#: the launching rank gives the others 10 s to report before it stops them.
COLLECTIVE_FAULTS = [
    ("hang", "validation", "rank 2 did not reach the metric reduction (sync_dist, ModelCheckpoint) within timeout=5s"),
    ("hang", "checkpoint", "rank 2 did not reach the checkpoint save: shard hashes within timeout=5s"),
    ("hang", "end", "rank 2 did not reach the network average of the model within timeout=5s"),
    ("kill", "validation", "rank 2 died (connection closed)"),
    ("kill", "checkpoint", "rank 2 died (connection closed)"),
]


@pytest.mark.slow
@pytest.mark.parametrize(
    ("mode", "when", "message"), COLLECTIVE_FAULTS, ids=[f"{m}-{w}" for m, w, _ in COLLECTIVE_FAULTS]
)
def test_a_rank_lost_in_a_collective_is_named_within_the_timeout(tmp_path: Path, mode: str, when: str, message: str):
    # A stopped rank once left the others in the evaluation all-reduce or the checkpoint broadcast for
    # the process group's 30 minutes; a killed one ended the run with gloo's "Connection reset by peer".
    elapsed, stderr = run_failure(tmp_path, mode, 60, "--when", when, "--collective-timeout", "5")
    assert elapsed < 45, f"took {elapsed:.1f}s to stop after rank 2 {'was killed' if mode == 'kill' else 'hung'}"
    for rank in (1, 3):  # (rank 0, the launcher, is stopped by Lightning once a child has failed)
        assert f"rank {rank}: {message}" in stderr, stderr[-3000:]
    if when == "checkpoint":  # nothing that looks like a complete checkpoint was left behind
        assert not [p for p in (tmp_path / "checkpoints").glob("*.ckpt")]


@pytest.mark.slow
def test_check_finite_stops_the_all_reduce_baseline_naming_the_origin(tmp_path: Path) -> None:
    # Before: NaN from one rank spread to every replica and the run exited 0.
    _, stderr = run_failure(tmp_path, "nan", 60, "--communicator", "allreduce")
    assert "rank 2: NaN or Inf in the parameters after the averaged-gradient step 5" in stderr
    assert "this node's own gradient was NaN/Inf: this node is an origin" in stderr


#: (algorithm, communicator, options): plain gossip, a tracker, the DDP baseline, compressed gossip (CHOCO's
#: int8 rounds carry the headers too), and the local-steps family synchronising every 4 steps, so that
#: synchronisations fall inside the shorter ranks' empty steps (an outer all-reduce, a gossip outer step).
UNEVEN_RUNS = [
    ("dsgd", "p2p", {}),
    ("gradient_tracking", "p2p", {}),
    ("dsgd", "allreduce", {}),
    ("choco", "p2p", {}),
    ("diloco", "allreduce", {"H": 4}),
    ("gasloc", "p2p", {"H": 4}),
]


@pytest.mark.slow
@pytest.mark.parametrize(
    ("algorithm", "communicator", "options"), UNEVEN_RUNS, ids=[f"{a}-{c}" for a, c, _ in UNEVEN_RUNS]
)
def test_ranks_with_uneven_epochs_end_every_epoch_together(
    tmp_path: Path, algorithm: str, communicator: str, options: dict
) -> None:
    # Rank r has 10 + r batches per epoch. Before: the ranks with fewer hung in validation until gossip_timeout,
    # and their neighbours then blamed a healthy peer.
    argv = ("--mode", "sized", "--algorithm", algorithm, "--communicator", communicator)
    argv += ("--algorithm-options", json.dumps(options))
    proc = launch("uneven.py", str(tmp_path), *argv, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-5000:]
    runs = [torch.load(tmp_path / f"{algorithm}_{communicator}_rank{r}.pt", weights_only=True) for r in range(RANKS)]
    for rank, run in enumerate(runs):
        assert run["global_step"] == 2 * (10 + rank)  # its own optimizer steps
        assert run["gossip_step"] == 2 * 13  # the longest rank's, padded with empty steps
        assert torch.isfinite(run["params"]).all()


@pytest.mark.slow
def test_unknown_uneven_lengths_fail_at_the_first_mismatch_naming_ranks_and_steps(tmp_path: Path) -> None:
    start = time.time()
    proc = launch("uneven.py", str(tmp_path), "--mode", "iterable", cwd=tmp_path)
    assert proc.returncode != 0
    assert "rank 0 ran out of batches after 10 optimizer steps in epoch 0 while rank 1 has more" in proc.stderr
    assert time.time() - start < 120  # at once, not after gossip_timeout on every rank


@pytest.mark.slow
def test_a_skipped_optimizer_step_stops_the_run_at_once_naming_both_ranks(tmp_path: Path) -> None:
    proc = launch("uneven.py", str(tmp_path), "--mode", "skip", cwd=tmp_path)
    assert proc.returncode != 0
    # Rank 2 skipped its step at batch 4: its step 3 comes from batch 5, its neighbours' from batch 4.
    assert "rank 1: at gossip step 3 rank 2 is at batch 5 of epoch 0 and this rank at batch 4" in proc.stderr
