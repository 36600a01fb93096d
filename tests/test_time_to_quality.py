"""The time-to-quality benchmark's pure pieces: time to a target loss, byte and clock accounting, data dealing."""

from __future__ import annotations

import numpy as np
import pytest

from benchmarks.cluster.time_to_quality import OURS, Meter, rank_batch_indices, time_to_target
from benchmarks.cluster.ttq_report import Run, _goals
from lightning_decent import DecentralizedStrategy
from lightning_decent.topology import get_topology


def test_time_to_target_is_the_first_evaluation_at_or_below_it() -> None:
    curve = [(1.0, 3.0), (2.0, 2.5), (3.0, 2.6), (4.0, 2.0)]
    assert time_to_target(curve, 2.5) == 2.0
    assert time_to_target(curve, 2.0) == 4.0
    assert time_to_target(curve, 1.9) is None
    assert time_to_target([], 1.0) is None


def test_meter_counts_only_training_segments() -> None:
    """Time and interface bytes between stop() and start() (evaluation) are left out."""
    now, sent = [0.0], [1000]
    meter = Meter(read_bytes=lambda: sent[0], clock=lambda: now[0])
    meter.start()
    now[0], sent[0] = 2.0, 1500  # training: 2 s, 500 bytes
    meter.stop()
    now[0], sent[0] = 7.0, 9000  # evaluation: ignored
    meter.record(3.25)
    meter.start()
    meter.start()  # a second start while running changes nothing
    now[0], sent[0] = 8.5, 9100
    meter.stop()
    meter.stop()
    assert meter.seconds == 3.5
    assert meter.bytes == 600
    assert meter.curve == [(2.0, 3.25)]


def test_ranks_get_disjoint_blocks_within_an_epoch_and_the_same_ones_every_run() -> None:
    world, steps, batch = 4, 5, 3
    per_rank = [rank_batch_indices(100, world, r, steps, batch, seed=0) for r in range(world)]
    assert all(p.shape == (steps, batch) for p in per_rank)
    everything = np.concatenate([p.ravel() for p in per_rank])
    assert len(set(everything.tolist())) == world * steps * batch
    assert np.array_equal(per_rank[1], rank_batch_indices(100, world, 1, steps, batch, seed=0))
    assert rank_batch_indices(10, 2, 0, 5, 2, seed=0).max() < 10  # wraps around after an epoch


def test_run_takes_the_slowest_rank_and_the_mean_bytes() -> None:
    records = [
        {"steps": 10, "seconds": 4.0, "bytes": 1000, "curve": [[1.0, 3.0], [4.0, 2.0]]},
        {"steps": 10, "seconds": 5.0, "bytes": 3000, "curve": [[1.5, 3.0], [5.0, 2.0]]},
    ]
    run = Run.of("x", records)
    assert run.seconds == 5.0 and run.mean_step == 0.5
    assert run.bytes_per_step == 200.0
    assert run.curve == [(1.5, 3.0), (5.0, 2.0)]
    assert run.final_loss == 2.0


def test_a_torchft_run_that_never_reaches_the_target_bounds_the_ratio_by_its_whole_time() -> None:
    def run(name: str, seconds: float, losses: list[float]) -> Run:
        step = seconds / len(losses)
        return Run(name, 10, seconds, 0.0, [(step * (k + 1), loss) for k, loss in enumerate(losses)])

    measured = [
        run("ddp", 20.0, [3.0, 2.0]),
        run("ours:choco_int8", 8.0, [2.5, 2.0]),
        run("torchft:diloco:16", 10.0, [2.8, 2.4]),
        run("torchft:streaming:16", 12.0, [2.7, 2.3]),
    ]
    runs = {r.name: r for r in measured}
    goals, _ = _goals("100mbit", runs, None, runs["ddp"], 20.0, 2.0)
    by_name = {g.name: g for g in goals}
    assert by_name["ours best time to DDP loss / DDP time"].value == 8.0 / 20.0
    versus = by_name["ours best time to DDP loss / best torchft"]
    assert versus.value == 8.0 / 10.0  # torchft's time to 2.0 exceeds its whole run: at most 0.8
    assert "upper bound" in versus.note and "torchft:diloco:16" in versus.note


@pytest.mark.parametrize("config", sorted(OURS))
def test_every_configuration_of_ours_is_accepted_on_the_suites_eight_ranks(config: str) -> None:
    """The strategy's set-up checks of each run, without processes (CHOCO on a one-peer graph was refused
    only after the suite had started its processes)."""
    kwargs = OURS[config]
    strategy = DecentralizedStrategy(**kwargs)
    strategy.algorithm.prepare_topology(get_topology(kwargs.get("topology", "one_peer_exponential"), 8))
