"""The time-to-quality benchmark's pure pieces: time to a target loss, byte and clock accounting, data dealing."""

from __future__ import annotations

import numpy as np
import pytest

from benchmarks.cluster.time_to_quality import OURS, Meter, rank_batch_indices, time_to_target
from benchmarks.cluster.ttq_report import Run, _goals, repeats_table, step_ratios, sync_excess
from benchmarks.emulated_cluster import repeated_groups
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


def test_meter_times_every_step_without_the_evaluations_between_them() -> None:
    now = [0.0]
    meter = Meter(read_bytes=lambda: 0, clock=lambda: now[0])
    meter.start()
    for end in (1.0, 3.0):
        now[0] = end
        meter.step_done()
    meter.stop()
    now[0] = 10.0  # evaluation
    meter.start()
    now[0] = 10.5
    meter.step_done()
    meter.stop()
    assert meter.step_seconds == [1.0, 2.0, 0.5]
    assert sum(meter.step_seconds) == meter.seconds


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


def test_repeats_run_every_group_again_under_numbered_names() -> None:
    assert repeated_groups(["compute+ours:x", "ddp"], 1) == ["compute+ours:x", "ddp"]
    assert repeated_groups(["compute+ours:x", "ddp"], 3) == [
        "compute+ours:x", "ddp", "compute#2+ours:x#2", "ddp#2", "compute#3+ours:x#3", "ddp#3",
    ]  # fmt: skip
    with pytest.raises(ValueError, match="at least 1"):
        repeated_groups(["ddp"], 0)


def test_the_streaming_goal_takes_the_median_of_ratios_paired_within_each_repeat() -> None:
    """Repeat k of a run is compared with repeat k of compute-only (same set of processes): a repeat whose
    compute-only step was slow as well does not count as a slow sync."""

    def run(name: str, step: float) -> Run:
        return Run(name, 10, 10 * step, 0.0, [(10 * step, 3.0)])

    steps = {"compute": 0.10, "compute#2": 0.12, "compute#3": 0.10,
             "ours:gasloc_int8_streaming:16": 0.104, "ours:gasloc_int8_streaming:16#2": 0.132,
             "ours:gasloc_int8_streaming:16#3": 0.103}  # fmt: skip
    runs = {name: run(name, step) for name, step in steps.items()}
    assert step_ratios(runs, "ours:gasloc_int8_streaming:16") == pytest.approx([1.04, 1.1, 1.03])
    goals, _ = _goals("1gbit", runs, runs["compute"], None, None, None)
    (goal,) = goals
    assert goal.value == pytest.approx(1.04) and goal.status == "met"
    assert "median of 3 repeats" in goal.note
    text = repeats_table("1gbit", runs)
    assert "100 / 120 / 100" in text and "1.030 - 1.100" in text
    assert repeats_table("1gbit", {"compute": runs["compute"]}) == ""  # nothing repeated: no table


def test_the_sync_cost_is_measured_inside_the_run_against_its_own_other_steps() -> None:
    """H = 16 over 4 fragments, delay 1: a sync starts after every 4th step (phase 3) and finishes after
    the next (phase 0). The run's machine was 10% slower than compute-only's (drift between runs) and
    both pay the evaluations every 32 steps on phase 0: only the syncs' own 4 + 8 ms count."""

    def steps(base: float, start: float, finish: float) -> list[float]:
        return [base + (0.02 if t % 32 == 0 else 0.0) + (start if t % 4 == 3 else finish if t % 4 == 0 else 0.0)
                for t in range(320)]  # fmt: skip

    def run(name: str, step_seconds: list[float]) -> Run:
        return Run(name, 320, sum(step_seconds), 0.0, [], step_seconds=step_seconds)

    compute = run("compute", steps(0.100, 0.0, 0.0))
    streaming = run("ours:gasloc_int8_streaming:16", steps(0.110, 0.004, 0.008))
    assert sync_excess(streaming, compute, stride=4, delay=1) == pytest.approx((0.004 + 0.008) / 4)
    assert sync_excess(compute, compute, stride=4, delay=1) == pytest.approx(0.0)
    assert sync_excess(streaming, compute, stride=4, delay=3) is None  # every phase holds sync work
    mean = sum(streaming.step_seconds) / 320
    runs = {r.name: r for r in (compute, streaming)}
    (goal,) = _goals("1gbit", runs, compute, None, None, None)[0]
    assert goal.value == pytest.approx(mean / (mean - 0.003)) and goal.status == "met"  # 1.027
    assert "same run without its syncs' excess" in goal.name


@pytest.mark.parametrize("config", sorted(OURS))
def test_every_configuration_of_ours_is_accepted_on_the_suites_eight_ranks(config: str) -> None:
    """The strategy's set-up checks of each run, without processes (CHOCO on a one-peer graph was refused
    only after the suite had started its processes)."""
    kwargs = OURS[config]
    strategy = DecentralizedStrategy(**kwargs)
    strategy.algorithm.prepare_topology(get_topology(kwargs.get("topology", "one_peer_exponential"), 8))
