"""DecentralizedStrategy in real 4-process gloo runs (one launch, several trainings; ~1 minute).

The launch script is ``tests/mp_scripts/strategy_checks.py``; every rank writes what it saw.
"""

from __future__ import annotations

import pytest
from mp_launch import launch_and_read_ranks

RANKS = 4


@pytest.fixture(scope="module")
def ranks(tmp_path_factory: pytest.TempPathFactory) -> list[dict]:
    out = tmp_path_factory.mktemp("strategy_checks")
    return launch_and_read_ranks("strategy_checks.py", out, RANKS)


def test_complete_graph_with_plain_sgd_equals_ddp(ranks: list[dict]) -> None:
    # Averaging parameters after identical SGD steps is averaging gradients (float64 run).
    for r in ranks:
        assert r["complete_vs_ddp"]["max_abs_diff"] < 1e-6


@pytest.mark.parametrize("topology", ["ring", "one_peer_exponential"])
def test_sparse_gossip_keeps_local_replicas_close_and_matches_ddp_accuracy(ranks: list[dict], topology: str) -> None:
    # Really local replicas: not all equal. (After a hop-2 round of the one-peer graph on 4 nodes,
    # ranks i and i+2 hold the same average, so two distinct values is all it can show.)
    checksums = {r[topology]["param_checksum"] for r in ranks}
    assert len(checksums) >= (RANKS if topology == "ring" else 2)
    for r in ranks:
        result = r[topology]
        assert result["consensus_distance"] > 0
        assert result["consensus_relative"] < 1e-3
        assert result["val_acc"] >= r["ddp_accuracy"]["val_acc"] - 0.02
        assert result["gossip_step"] == result["global_step"] > 0


@pytest.mark.parametrize("topology", ["ring", "one_peer_exponential"])
def test_no_world_collective_during_training_steps(ranks: list[dict], topology: str) -> None:
    for r in ranks:
        assert r[topology]["collectives_during_steps"] == {}


def test_evaluation_on_the_average_restores_local_replicas(ranks: list[dict]) -> None:
    for r in ranks:
        for topology in ("ring", "one_peer_exponential"):
            assert r[topology]["params_restored_after_validate"]


@pytest.mark.parametrize(
    ("topology", "out_degree"), [("ring", 2), ("exponential", 2), ("one_peer_exponential", 1), ("directed_ring", 1)]
)
def test_bytes_on_the_wire_are_out_degree_times_model_bytes(ranks: list[dict], topology: str, out_degree: int) -> None:
    for r in ranks:
        if topology == "ring":
            result = r["ring"]
            assert result["bytes_sent"] == out_degree * result["param_bytes"] * result["gossip_step"]
            continue
        result = r[topology + "_short"]
        assert result["expected_out_degree_sum"] == out_degree * result["steps"]
        assert result["bytes_sent"] == result["expected_out_degree_sum"] * result["param_bytes"]


def test_logged_bytes_are_the_mean_per_step_since_the_previous_point(ranks: list[dict]) -> None:
    # DiLoCo syncs after steps 3 and 6; the loggers write at steps 2, 4 and 6 (log_every_n_steps=2): the
    # first point saw no sync, each later one half a sync per step (not the one step it samples: 0, 0, all)
    for r in ranks:
        result = r["logged_bytes"]
        sync = result["bytes_sent"] / 2
        assert sync > 0
        assert result["points"] == [[1, 0.0], [3, sync / 2], [5, sync / 2]]


@pytest.mark.parametrize("topology", ["directed_ring", "one_peer_exponential"])
def test_directed_and_time_varying_graphs_receive_from_in_neighbours(ranks: list[dict], topology: str) -> None:
    for r in ranks:
        result = r[topology + "_short"]
        assert result["messages_received"] == result["expected_in_degree_sum"] * result["buckets"]
        assert result["bytes_received"] == result["expected_in_degree_sum"] * result["param_bytes"]


@pytest.mark.parametrize("topology", ["exponential", "one_peer_exponential"])
def test_fit_leaves_every_rank_the_network_average(ranks: list[dict], topology: str) -> None:
    """``final_model="average"``: after ``fit`` every replica is the mean of the local replicas at
    the end of training (checked through two linear functionals of the parameters)."""
    local = [r[topology + "_short"]["local_checksums_at_end"] for r in ranks]
    assert len({round(c[0], 4) for c in local}) > 1  # the replicas really differed
    mean = [sum(c[k] for c in local) / RANKS for k in range(2)]
    for r in ranks:
        assert r[topology + "_short"]["final_checksums"] == pytest.approx(mean, rel=1e-6, abs=1e-6)


def test_accumulation_gossips_once_per_optimizer_step_with_bf16_clipping_and_scheduler(ranks: list[dict]) -> None:
    for r in ranks:
        result = r["accumulate"]
        assert result["global_step"] == result["gossip_step"] == 5
        assert result["finite"]
        assert result["lr"] == pytest.approx(0.05 * 0.5**2)  # StepLR(step_size=2) stepped 5 times
