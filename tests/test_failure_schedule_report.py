"""The failure-schedule benchmark's pure pieces: the schedule, the numbers read from a run's events, the
goals and the table, on hand-made events (the cluster itself needs root and many minutes; it is not run here)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from benchmarks.failure import report

LAUNCHED = 1000.0


def steps(machine: int, times: list[float]) -> list[dict]:
    return [{"t": LAUNCHED + t, "m": machine, "kind": "step", "step": i, "world": 4} for i, t in enumerate(times)]


def test_schedule_is_fractions_of_the_reference() -> None:
    kills = report.failure_schedule(80.0, [3, 6], [0.25, 0.5], 20.0)
    assert kills == [report.Kill(3, 20.0, 40.0), report.Kill(6, 40.0, 60.0)]
    with pytest.raises(ValueError, match="2 victims but 1"):
        report.failure_schedule(80.0, [3, 6], [0.25], 20.0)
    with pytest.raises(ValueError, match="positive"):
        report.failure_schedule(0.0, [3], [0.25], 20.0)


def test_read_events_skips_a_line_being_written(tmp_path: Path) -> None:
    path = tmp_path / "events.jsonl"
    path.write_text(json.dumps({"t": 1.0, "m": 0, "kind": "start"}) + '\n{"t": 2.0, "m"')
    assert report.read_events(path) == [{"t": 1.0, "m": 0, "kind": "start"}]
    assert report.read_events(tmp_path / "missing.jsonl") == []


def test_time_to_target_is_the_first_evaluation_at_the_target() -> None:
    events = [{"t": LAUNCHED + s, "m": 0, "kind": "eval", "acc": a} for s, a in [(30, 0.9), (40, 0.951), (50, 0.97)]]
    assert report.time_to_target(events, LAUNCHED, 0.95) == pytest.approx(40.0)
    assert report.time_to_target(events, LAUNCHED, 0.99) is None


def test_survivor_stall_is_the_last_survivor_to_step_again() -> None:
    kill = report.Kill(machine=2, at=10.0, restart_at=30.0)
    events = [*steps(0, [8, 9, 9.9, 14.0, 14.5]), *steps(1, [8.5, 9.5, 17.0]), *steps(2, [8, 9, 9.9])]
    events.append({"t": LAUNCHED + 40, "m": 3, "kind": "step"})  # started after the kill: not a survivor
    assert report.survivor_stall(events, LAUNCHED, kill) == pytest.approx(7.0)
    assert report.survivor_stall([*steps(0, [8, 9]), *steps(1, [8, 12])], LAUNCHED, kill) is None


def test_rejoin_times_the_restarted_machine_and_the_others_pause() -> None:
    kill = report.Kill(machine=1, at=10.0, restart_at=30.0)
    survivor = steps(0, [28, 29, 30, 31, 32, 36, 37, 38])  # median step 1 s, one 4 s gap when 1 joins
    mine = [
        {"t": LAUNCHED + 5, "m": 1, "kind": "first_step", "rx_bytes": 1},  # before the kill: not the rejoin
        {"t": LAUNCHED + 34, "m": 1, "kind": "start"},
        {"t": LAUNCHED + 36, "m": 1, "kind": "first_step", "rx_bytes": 9_000_000, "handover_bytes": 8_000_000},
    ]
    row = report.rejoin([*survivor, *mine], LAUNCHED, kill)
    assert row == {
        "first_step_s": pytest.approx(6.0),
        "start_s": pytest.approx(4.0),
        "rx_bytes": 9_000_000,
        "handover_bytes": 8_000_000,
        "checkpoint_bytes": None,
        "survivor_pause_s": pytest.approx(3.0),
    }
    assert report.rejoin(survivor, LAUNCHED, kill)["first_step_s"] is None


def summary(ttq: float | None, stall: float = 3.0, first: float = 12.0, handover: int = 25_000_000) -> dict:
    failure = {"survivor_stall_s": stall, "first_step_s": first, "start_s": 5.0, "survivor_pause_s": 1.0,
               "rx_bytes": handover, "handover_bytes": handover, "checkpoint_bytes": None}  # fmt: skip
    return {"time_to_target_s": ttq, "final_world": 8, "failures": [failure, failure]}


def test_goals_compare_within_the_launch() -> None:
    runs = {
        "ours_elastic/free": {"time_to_target_s": 100.0, "failures": []},
        "ours_elastic/schedule": summary(105.0),
        "torchft_ddp/schedule": summary(300.0),
        "torchft_diloco/schedule": summary(None),
    }
    found = {g.name.split(" (")[0]: g for g in report.goals(runs, gossip_timeout=10.0, bandwidth_bytes=1.25e7)}
    assert found["ours elastic: schedule / failure-free"].value == pytest.approx(1.05)
    assert found["ours elastic / best torchft, both under the schedule"].value == pytest.approx(0.35)
    assert found["survivors' stall per failure"].status == "met"
    joiner = found["joiner: restart to first step minus its state at link rate"]
    assert joiner.value == pytest.approx(12.0 - 2.0) and joiner.status == "met"  # 25 MB at 12.5 MB/s: 2 s
    assert report.goals({}, 10.0, 1.25e8)[0].status == "not measured"


def test_table_has_a_row_per_run_and_the_ratio_to_failure_free() -> None:
    runs = {"ddp/free": {"time_to_target_s": 50.0, "failures": []}, "ddp/schedule": summary(75.0)}
    runs["ddp/schedule"]["failures"][1] = {**runs["ddp/schedule"]["failures"][1], "survivor_stall_s": None}
    text = report.table(runs)
    assert "| ddp | schedule | 75.0 | 1.50 | 8 | 3.0 / never | 12.0 (5.0) / 12.0 (5.0) |" in text
    assert "| ddp | free | 50.0 |  |" in text
    assert "not reached (every process ended)" in report.table(
        {"ddp/schedule": {"time_to_target_s": None, "error": "every process ended"}}
    )
    assert "| a | 1.00 | 2 | met |" in report.goals_table([report.Goal("a", 1.0, 2.0)])
