"""The emulated-cluster benchmark's arithmetic: bounds, goal ratios and time to accuracy, on
hand-made per-rank results (the cluster itself needs root and minutes; it is not run here)."""

from __future__ import annotations

import pytest

from benchmarks.cluster import report, two_level

MODEL_BYTES = 67_200_000
BANDWIDTH = 1.25e8  # 1 Gbit/s
LINK = MODEL_BYTES / BANDWIDTH  # 0.5376 s


def timed(*steps: float, ranks: int = 2) -> list[dict]:
    """The same steps on every rank, as the worker records them."""
    return [{"steps": list(steps), "median": sorted(steps)[len(steps) // 2], "mean": sum(steps) / len(steps)}] * ranks


def test_bandwidth_and_wire_floor() -> None:
    assert report.bandwidth_bytes_per_second("1gbit") == 1.25e8
    assert report.bandwidth_bytes_per_second("500mbit") == 6.25e7
    assert report.header_overhead(1500) == pytest.approx(1514 / 1448)
    assert report.header_overhead(9000) == pytest.approx(9014 / 8948)
    with pytest.raises(ValueError, match=r"write e\.g\. 1gbit"):
        report.bandwidth_bytes_per_second("fast")


def test_core_goals_use_round_medians_and_step_means() -> None:
    results = {
        "comm:one_peer_exponential": timed(0.55, 0.56, 0.90),  # median 0.56: 1.042 x M/B
        "comm:ring": timed(1.20, 1.25, 1.30),  # median 1.25: 1.163 x 2 M/B
        "lightning_local": timed(0.25, 0.25),
        "lightning_ddp": timed(1.20, 1.40),  # mean 1.30
        "ours:one_peer_exponential:overlap": timed(0.50, 0.64),  # mean 0.57
        "ours:ring:overlap": timed(1.26, 1.30),
        "decent_dp:one-peer-exp": [{"skipped": "decent-dp is not installed"}],
    }
    _, goals, _ = report.core_report(results, 2, MODEL_BYTES, BANDWIDTH, 1500)
    by_name = {g.name: g for g in goals}
    assert by_name["one-peer round / (M/B)"].value == pytest.approx(0.56 / LINK)
    assert by_name["one-peer round / (M/B)"].status == "met"
    assert by_name["ring round / (2 M/B)"].status == "NOT met"
    overlap = by_name["one_peer_exponential overlap step / max(compute, round)"]
    assert overlap.value == pytest.approx(0.57 / 0.56)
    assert by_name["one_peer overlap step / Lightning DDP"].value == pytest.approx(0.57 / 1.30)
    versus_decent_dp = by_name["one_peer_exponential overlap / decent-dp one-peer-exp"]
    assert versus_decent_dp.status == "not measured" and "not installed" in versus_decent_dp.note


def test_scaling_table_reports_the_overlap_ratios_per_size() -> None:
    by_ranks = {
        4: {
            "comm:allreduce": timed(0.80),
            "comm:one_peer_exponential": timed(0.56),
            "lightning_local": timed(0.12),
            "lightning_ddp": timed(1.12),
            "decent_dp:one-peer-exp": timed(0.70),
            "ours:one_peer_exponential:overlap": timed(0.56),
        },
        16: {"comm:allreduce": timed(1.00), "ours:one_peer_exponential:overlap": timed(0.90)},
    }
    text = report.scaling_report(by_ranks, MODEL_BYTES, BANDWIDTH)
    four = next(line for line in text.splitlines() if line.startswith("| 4 "))
    cells = [c.strip() for c in four.strip("|").split("|")]
    assert cells[1] == f"{LINK * 2 * 3 / 4 * 1000:.0f}"  # all-reduce bound 2 (n-1)/n M/B
    assert cells[-3:] == ["1.000", "0.500", "0.800"]
    sixteen = next(line for line in text.splitlines() if line.startswith("| 16 "))
    cells = [c.strip() for c in sixteen.strip("|").split("|")]
    assert cells[-4:] == ["900", "-", "-", "-"]  # a case that did not run leaves its ratios empty


def test_time_to_accuracy_is_when_gossip_first_reaches_ddps_final_accuracy() -> None:
    ddp = [{"curve": [(10.0, 0.80), (20.0, 0.95)], "parameters": 1_000_000}] * 2
    gossip = [{"curve": [(6.0, 0.90), (12.0, 0.96)], "parameters": 1_000_000}] * 2
    _, goal = report.accuracy_report({"accuracy:ddp": ddp, "gossip": gossip}, "gossip")
    assert goal.value == pytest.approx(12.0 / 20.0) and goal.status == "met"
    never = [{"curve": [(6.0, 0.90), (12.0, 0.93)], "parameters": 1_000_000}] * 2
    _, goal = report.accuracy_report({"accuracy:ddp": ddp, "gossip": never}, "gossip")
    assert goal.value is None and "never reached" in goal.note


def test_two_level_goals_compare_the_hierarchical_step_with_ddp_and_aer() -> None:
    results = {
        "lightning_local": timed(0.20, 0.30),  # mean 0.25 < M/B: the floor is the link
        "comm:hierarchical": timed(0.60, 0.62, 0.90),
        "machine:shared_memory": timed(0.10, 0.10),  # the machine stage alone adds to the floor
        "lightning_ddp": timed(1.50, 1.70),  # mean 1.60
        two_level.AER: timed(1.00, 1.20),  # mean 1.10
        two_level.FLAT: timed(1.00, 1.00),
        two_level.HIERARCHICAL: timed(0.70, 0.74),  # mean 0.72
    }
    text, goals = two_level.step_report(results, 2, 4, MODEL_BYTES, BANDWIDTH)
    by_name = {g.name: g for g in goals}
    assert by_name["2x4: hierarchical step / Lightning DDP"].value == pytest.approx(0.72 / 1.60)
    assert by_name["2x4: hierarchical step / Lightning DDP"].status == "met"  # 0.45 <= 0.6
    assert by_name["2x4: hierarchical step / decent-dp AER"].value == pytest.approx(0.72 / 1.10)
    assert by_name["2x4: hierarchical step / decent-dp AER"].status == "met"  # 0.655 <= 0.7
    row = next(line for line in text.splitlines() if line.startswith("| ours, hierarchical"))
    floor = LINK + 0.10  # max(compute, M/B) + the machine stage
    assert [c.strip() for c in row.strip("|").split("|")][1:5] == ["720", "0.450", "0.655", f"{0.72 / floor:.3f}"]
    assert f"the machine stage alone (shared memory, not overlapped) = {floor * 1000:.0f} ms" in text
    note = f"floor here {floor / 1.60:.3f}x DDP, {floor / 1.10:.3f}x AER"
    assert by_name["2x4: hierarchical step / Lightning DDP"].note == note


def test_two_level_report_when_decent_dp_is_absent_or_the_machines_are_not_a_power_of_two() -> None:
    assert two_level.AER not in two_level.two_level_cases(3) and two_level.AER in two_level.two_level_cases(4)
    results = {
        "lightning_ddp": timed(1.0),
        two_level.HIERARCHICAL: timed(0.5),
        two_level.AER: [{"skipped": "decent-dp is not installed (pip install decent-dp)"}] * 2,
    }
    text, goals = two_level.step_report(results, 2, 4, MODEL_BYTES, BANDWIDTH)
    aer = goals[1]
    assert aer.value is None and aer.status == "not measured" and "not installed" in aer.note
    assert "| decent-dp alternating exponential ring" in text and "skipped" in text
    _, goals = two_level.step_report({"lightning_ddp": timed(1.0), two_level.HIERARCHICAL: timed(0.5)}, 3, 2, 1, 1.0)
    assert "M not a power of 2" in goals[1].note
