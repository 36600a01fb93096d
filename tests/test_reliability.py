"""Single-process parts of issue 13: refused options, the all-reduce baseline's choice of algorithm, and the
roll-call messages of the bounded collectives (their multi-process behaviour is in
``test_reliability_multiprocess.py``)."""

from __future__ import annotations

import pytest

from lightning_decent import DecentralizedStrategy
from lightning_decent.algorithms import DDP, DSGD, GradientTracking
from lightning_decent.comm.collectives import _decode, _encode


@pytest.mark.parametrize("name", ["gossip_timeout", "collective_timeout"])
@pytest.mark.parametrize("value", [0, 0.0, -1.0, float("nan")])
def test_a_non_positive_timeout_is_refused(name: str, value: float) -> None:
    # Before: gossip_timeout=0 meant "no timeout" and a negative value blamed a healthy peer at once.
    with pytest.raises(ValueError, match=f"{name} must be a positive number of seconds"):
        DecentralizedStrategy(**{name: value})


def test_the_all_reduce_communicator_runs_ddp_for_dsgd_and_exact_mixing_for_the_others() -> None:
    baseline = DecentralizedStrategy(communicator="allreduce", check_finite=False)
    assert isinstance(baseline.algorithm, DDP) and baseline.algorithm.check_finite is False
    assert isinstance(DecentralizedStrategy(communicator="p2p").algorithm, DSGD)
    tracking = DecentralizedStrategy(communicator="allreduce", algorithm="gradient_tracking")
    assert isinstance(tracking.algorithm, GradientTracking)  # its mix is then an exact average of both buffers


def test_roll_call_messages_carry_rank_sequence_and_collective() -> None:
    assert _decode(_encode(3, 12, "checkpoint save: shard hashes")) == (3, 12, "checkpoint save: shard hashes")
    assert len(_encode(0, 0, "x" * 100)) == 64  # names are cut to fit a fixed 64-byte message
