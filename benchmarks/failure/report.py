"""The pure pieces of the failure-schedule benchmark: the schedule, what a run's events say, the table and goals.

A run's events (:mod:`benchmarks.failure.events`) are read against the times the launcher killed and restarted
machines; every number here is computed from them, so it is the same for every system.
"""

from __future__ import annotations

import json
import statistics
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass
from itertools import pairwise
from pathlib import Path
from typing import Any


@dataclass(frozen=True)
class Kill:
    """Machine ``machine`` is killed ``at`` seconds after the launch and started again ``restart_at``."""

    machine: int
    at: float
    restart_at: float


def failure_schedule(
    reference: float, victims: Sequence[int], fractions: Sequence[float], restart_after: float
) -> list[Kill]:
    """Kill ``victims[i]`` at ``fractions[i] x reference`` seconds (the failure-free run's time to target),
    restart it ``restart_after`` seconds later."""
    if len(victims) != len(fractions):
        raise ValueError(f"{len(victims)} victims but {len(fractions)} kill times.")
    if reference <= 0:
        raise ValueError(f"The reference time must be positive, got {reference}.")
    return [Kill(m, f * reference, f * reference + restart_after) for m, f in zip(victims, fractions)]


def read_events(path: Path) -> list[dict[str, Any]]:
    """Every complete event line of ``path`` (a line being written is skipped)."""
    if not path.exists():
        return []
    events = []
    for line in path.read_text().splitlines():
        try:
            events.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return events


def time_to_target(events: Iterable[dict[str, Any]], launched: float, target: float) -> float | None:
    """Seconds from the launch to the first evaluation at ``target`` accuracy or above (``None``: never)."""
    hits = [e["t"] for e in events if e["kind"] == "eval" and e["acc"] >= target]
    return min(hits) - launched if hits else None


def _steps_by_machine(events: Iterable[dict[str, Any]]) -> dict[int, list[float]]:
    steps: dict[int, list[float]] = {}
    for e in events:
        if e["kind"] == "step":
            steps.setdefault(e["m"], []).append(e["t"])
    return {m: sorted(ts) for m, ts in steps.items()}


def survivor_stall(events: Sequence[dict[str, Any]], launched: float, kill: Kill) -> float | None:
    """Seconds from the kill to the moment every other machine that was training has taken a step again
    (``None``: one of them never did)."""
    killed_at = launched + kill.at
    resumed = []
    for machine, times in _steps_by_machine(events).items():
        if machine == kill.machine or not any(t < killed_at for t in times):
            continue
        after = [t for t in times if t > killed_at]
        if not after:
            return None
        resumed.append(after[0] - killed_at)
    return max(resumed) if resumed else None


def rejoin(events: Sequence[dict[str, Any]], launched: float, kill: Kill) -> dict[str, Any]:
    """The restarted machine's first step: seconds after its restart, the seconds of it spent before the
    process's ``start`` event (interpreter and imports), the bytes it received before it and the state handed
    over or loaded; and the longest pause of the other machines' steps around it beyond their median step."""
    restarted = launched + kill.restart_at
    mine = [e for e in events if e["m"] == kill.machine and e["t"] >= restarted]
    first = next((e for e in mine if e["kind"] == "first_step"), None)
    start = next((e for e in mine if e["kind"] == "start"), None)
    resumed = next((e for e in mine if e["kind"] == "resume"), None)
    row: dict[str, Any] = {
        "first_step_s": first["t"] - restarted if first else None,
        "start_s": start["t"] - restarted if start else None,
        "rx_bytes": first.get("rx_bytes") if first else None,
        "handover_bytes": first.get("handover_bytes") if first else None,
        "checkpoint_bytes": resumed.get("checkpoint_bytes") if resumed else None,
    }
    if first is None:
        row["survivor_pause_s"] = None
        return row
    pauses = []
    for machine, times in _steps_by_machine(events).items():
        if machine == kill.machine or len(times) < 3:
            continue
        median = statistics.median(b - a for a, b in pairwise(times))
        gaps = [b - a for a, b in pairwise(times) if b > restarted and a < first["t"] + 1.0]
        pauses.append(max(gaps, default=median) - median)
    row["survivor_pause_s"] = max(pauses) if pauses else None
    return row


def summarize(
    events: Sequence[dict[str, Any]], launched: float, target: float, kills: Sequence[Kill]
) -> dict[str, Any]:
    """One run's numbers: time to target, the evaluations, the final world size, and per failure the survivors'
    stall after the kill and the rejoin (:func:`rejoin`)."""
    evals = [e for e in events if e["kind"] == "eval"]
    return {
        "time_to_target_s": time_to_target(events, launched, target),
        "evals": [{"s": round(e["t"] - launched, 2), "acc": e["acc"], "world": e.get("world")} for e in evals],
        "final_world": evals[-1].get("world") if evals else None,
        "failures": [
            {**asdict(k), "survivor_stall_s": survivor_stall(events, launched, k), **rejoin(events, launched, k)}
            for k in kills
        ],
    }


@dataclass
class Goal:
    name: str
    value: float | None
    limit: float

    @property
    def status(self) -> str:
        if self.value is None:
            return "not measured"
        return "met" if self.value <= self.limit else "missed"


def goals(runs: dict[str, dict[str, Any]], gossip_timeout: float, bandwidth_bytes: float) -> list[Goal]:
    """The issue's goals from ``{"<system>/<condition>": summary}``: ours under the schedule against ours
    failure-free and against the best torchft under the schedule; the survivors' stall per failure; the
    joiner's first step (10 s plus its state at the link's rate)."""

    def ttq(name: str) -> float | None:
        return runs.get(name, {}).get("time_to_target_s")

    ours_schedule, ours_free = ttq("ours_elastic/schedule"), ttq("ours_elastic/free")
    torchft = [t for t in (ttq("torchft_ddp/schedule"), ttq("torchft_diloco/schedule")) if t is not None]
    failures = runs.get("ours_elastic/schedule", {}).get("failures", [])
    stalls = [f["survivor_stall_s"] for f in failures]
    joins = [f for f in failures if f["first_step_s"] is not None]
    join_value = max((f["first_step_s"] - (f["handover_bytes"] or 0) / bandwidth_bytes for f in joins), default=None)
    best_torchft = min(torchft, default=None)
    stall = None if not stalls or None in stalls else max(stalls)
    return [
        Goal("ours elastic: schedule / failure-free", _ratio(ours_schedule, ours_free), 1.1),
        Goal("ours elastic / best torchft, both under the schedule", _ratio(ours_schedule, best_torchft), 0.7),
        Goal(f"survivors' stall per failure (s; gossip_timeout {gossip_timeout:g} + 5)", stall, gossip_timeout + 5),
        Goal(
            "joiner: restart to first step minus its state at link rate (s)",
            join_value if len(joins) == len(failures) else None,
            10.0,
        ),
    ]


def _ratio(a: float | None, b: float | None) -> float | None:
    return a / b if a is not None and b else None


def _fmt(value: float | None, digits: int = 1) -> str:
    return "" if value is None else f"{value:.{digits}f}"


def _bytes(value: int | None) -> str:
    return "" if not value else f"{value / 1e6:.1f} MB"


def table(runs: dict[str, dict[str, Any]]) -> str:
    """A Markdown table of every run, one row each, failures joined with ``/``."""
    lines = [
        "| system | condition | time to target s | x failure-free | final n | survivors' stall after kill s | "
        "restart to first step s (imports) | survivors' pause at rejoin s | state received |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for name, run in runs.items():
        system, condition = name.split("/")
        free = runs.get(f"{system}/free", {}).get("time_to_target_s")
        fails = run.get("failures", [])
        stall = " / ".join(_fmt(f["survivor_stall_s"]) or "never" for f in fails)
        first = " / ".join(f"{_fmt(f['first_step_s']) or 'never'} ({_fmt(f['start_s'])})" for f in fails)
        pause = " / ".join(_fmt(f["survivor_pause_s"]) for f in fails)
        state = " / ".join(_bytes(f["handover_bytes"] or f["checkpoint_bytes"] or f["rx_bytes"]) for f in fails)
        ttq = run.get("time_to_target_s")
        shown = _fmt(ttq) if ttq is not None else f"not reached ({run.get('error', 'stopped')})"
        ratio = _fmt(_ratio(ttq, free), 2) if condition != "free" else ""
        lines.append(f"| {system} | {condition} | {shown} | {ratio} | {run.get('final_world') or ''} | {stall} | "
                     f"{first} | {pause} | {state} |")  # fmt: skip
    return "\n".join(lines)


def goals_table(found: list[Goal]) -> str:
    lines = ["| goal | value | limit | status |", "|---|---|---|---|"]
    lines += [f"| {g.name} | {_fmt(g.value, 2)} | {g.limit:g} | {g.status} |" for g in found]
    return "\n".join(lines)
