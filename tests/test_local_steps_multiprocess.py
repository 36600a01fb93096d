"""Local-steps algorithms in real gloo runs (slow): the papers' recursions on 2 and 4 ranks, and exact resume.

* ``tests/mp_scripts/local_steps_checks.py``: DiLoCo, Streaming DiLoCo (p2p and all-reduce communicators,
  an exchange in flight for ``delay`` steps) and GASLoC on the one-peer exponential graph, each rank's
  parameters after 20 steps against ``local_steps_reference`` (written by hand from the papers).
* ``tests/mp_scripts/resume.py``: stop after epoch 1 and resume equals training straight, bitwise, with
  the checkpoint mid-period, before syncs, and with a streaming fragment's exchange in flight.
The simulator == real run cases are in ``tests/test_sim_equivalence.py``.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from mp_launch import launch, launch_and_read_ranks

pytestmark = pytest.mark.slow

STEPS = 20
RESUME_RUNS = ("diloco", "local_sgd", "diloco_streaming", "gasloc_streaming", "diloco_int8", "gasloc_int8_streaming")


@pytest.mark.parametrize("devices", [2, 4])
def test_real_runs_follow_the_hand_written_recursions(tmp_path: Path, devices: int) -> None:
    ranks = launch_and_read_ranks("local_steps_checks.py", tmp_path, devices)
    for rank in ranks:
        for case, result in rank.items():
            assert result["moved"] > 1e-2, case
            assert result["max_abs_diff"] < 1e-10, (case, result["max_abs_diff"])  # measured: ~1e-16
        model = rank["diloco"]["param_bytes"]
        # one all-reduce of the model per sync (H=4: 5 syncs), counted as a ring all-reduce's payload
        assert rank["diloco"]["bytes_sent"] == STEPS // 4 * (model * 2 * (devices - 1) // devices)
        # one model to the one peer per sync (H=3: 6 syncs)
        assert rank["gasloc_one_peer"]["bytes_sent"] == STEPS // 3 * model


@pytest.fixture(scope="module")
def resumed(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("local_steps_resume")
    for phase in ("first", "resume"):  # two launches: the processes stop in between
        proc = launch("resume.py", str(out), phase, "--algorithms", ",".join(RESUME_RUNS), cwd=out, timeout=900)
        assert proc.returncode == 0, proc.stderr[-5000:]
    return out


@pytest.mark.parametrize("run", RESUME_RUNS)
def test_stop_and_resume_equals_training_straight_bitwise(resumed: Path, run: str) -> None:
    def params(name: str, rank: int) -> list[torch.Tensor]:
        return torch.load(resumed / f"{name}_rank{rank}.pt", weights_only=True)

    for rank in range(4):
        straight, again = params(f"{run}_straight", rank), params(f"{run}_resumed", rank)
        assert all(torch.equal(a, b) for a, b in zip(straight, again)), f"{run}: rank {rank} differs"
    assert not torch.equal(params(f"{run}_straight", 0)[0], params(f"{run}_straight", 1)[0])  # mid-period: differ
