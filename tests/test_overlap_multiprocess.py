"""Overlapped D-SGD in real 4-process gloo runs (one launch of ``tests/mp_scripts/overlap_checks.py``)."""

from __future__ import annotations

import pytest
from mp_launch import launch_and_read_ranks

RANKS = 4

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def ranks(tmp_path_factory: pytest.TempPathFactory) -> list[dict]:
    out = tmp_path_factory.mktemp("overlap_checks")
    return launch_and_read_ranks("overlap_checks.py", out, RANKS)


def test_training_with_overlap_is_the_one_step_delayed_recursion(ranks: list[dict]) -> None:
    # float64, exact gradients, SGD with momentum and weight decay, time-varying graph:
    # x^{k+1} = W(k) x^k - lr m^{k+1}, written by hand, for every node.
    for r in ranks:
        result = r["recursion"]
        assert result["moved"] > 1e-3
        assert result["max_abs_diff"] < 1e-10
        assert result["gossip_step"] == 8


def test_accumulation_clipping_bf16_and_scheduler_gossip_once_per_optimizer_step(ranks: list[dict]) -> None:
    for r in ranks:
        result = r["accumulate"]
        assert result["global_step"] == result["gossip_step"] == 5
        assert result["finite"]
        assert result["lr"] == pytest.approx(0.05 * 0.5**2)  # StepLR(step_size=2) stepped 5 times
        # One exchange per step, plus the first one (x^0 is sent while step 0 computes).
        assert result["bytes_sent"] == (5 + 1) * result["out_degree"] * result["param_bytes"]


def test_validation_with_an_exchange_in_flight_evaluates_the_network_average(ranks: list[dict]) -> None:
    for r in ranks:
        result = r["evaluation"]
        assert result["validations"] == 3  # twice during fit (exchange in flight), once after it
        assert result["max_diff_to_average"] < 1e-6
        assert result["replicas_differ"]
        assert result["replicas_restored"] and result["restored_after_validate"]


@pytest.mark.parametrize("case", ["resume", "resume_choco", "resume_gradient_tracking", "resume_exact_diffusion"])
def test_checkpoint_resume_with_overlap_is_exact(ranks: list[dict], case: str) -> None:
    # a checkpoint taken with a round in flight: re-sent after the resume, or (CHOCO) completed into its inbox
    assert all(r[case]["bitwise_equal"] for r in ranks)
