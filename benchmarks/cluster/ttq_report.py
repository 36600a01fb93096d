"""Tables, goals and the plot of the ``time_to_quality`` suite, from the ranks' records of each link speed."""

from __future__ import annotations

import math
import statistics
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from benchmarks.cluster.report import Goal, bandwidth_bytes_per_second, goals_table, table
from benchmarks.cluster.time_to_quality import DELAY, FRAGMENTS, TTQ_CASES, time_to_target

#: Time-to-quality goals (ratios from one run).
VERSUS_DDP_TIME = 0.2
VERSUS_TORCHFT_TIME = 0.7
STREAMING_STEP = 1.05
COMM_OVER_COMPUTE = 3.0  # the workload's premise: DDP at 100 Mbit/s spends >= 3x its compute on the network


@dataclass
class Run:
    """One run over all ranks: the slowest rank's training time, the mean bytes, the averaged model's curve."""

    name: str
    steps: int
    seconds: float
    bytes_per_step: float
    curve: list[tuple[float, float]]
    note: str = ""
    step_seconds: list[float] = field(default_factory=list)  # every step's time, mean over ranks

    @classmethod
    def of(cls, name: str, records: list[dict[str, Any]]) -> Run:
        steps = records[0]["steps"]
        evals = min(len(r["curve"]) for r in records)
        curve = [(max(r["curve"][e][0] for r in records), statistics.fmean(r["curve"][e][1] for r in records))
                 for e in range(evals)]  # fmt: skip
        note = next((r["error"] for r in records if "error" in r), "")
        if "syncs_committed" in records[0]:
            note = note or f"{records[0]['syncs_committed']}/{records[0]['syncs_expected']} syncs committed"
        timed = [r["step_seconds"] for r in records if "step_seconds" in r]
        step_seconds = [statistics.fmean(step) for step in zip(*timed)] if len(timed) == len(records) else []
        return cls(name, steps, max(r["seconds"] for r in records),
                   statistics.fmean(r["bytes"] for r in records) / steps, curve, note, step_seconds)  # fmt: skip

    @property
    def mean_step(self) -> float:
        return self.seconds / self.steps

    @property
    def final_loss(self) -> float | None:
        return self.curve[-1][1] if self.curve else None


def _fmt(value: float | None, spec: str) -> str:
    return "-" if value is None else format(value, spec)


def _div(a: float | None, b: float | None) -> float | None:
    return None if a is None or b is None or b == 0 else a / b


def repeat_of(name: str) -> tuple[str, int]:
    """``("compute", 2)`` for ``compute#2`` (a repeat of the run, ``--ttq-repeats``); ``(name, 1)`` otherwise."""
    base, _, repeat = name.partition("#")
    return base, int(repeat) if repeat else 1


def repeats(runs: dict[str, Run], name: str) -> dict[int, Run]:
    """Every repeat of the run ``name``, by repeat number."""
    return {repeat_of(n)[1]: r for n, r in runs.items() if repeat_of(n)[0] == name}


def first_repeats(runs: dict[str, Run]) -> dict[str, Run]:
    """The runs of the first repeat (the main table, the curves and the loss goals use these)."""
    return {n: r for n, r in runs.items() if repeat_of(n)[1] == 1}


def step_ratios(runs: dict[str, Run], name: str) -> list[float]:
    """``name``'s mean step over compute-only's, one ratio per repeat that has both (repeats that ran back
    to back in one set of processes, so each ratio is within one launch)."""
    mine, compute = repeats(runs, name), repeats(runs, "compute")
    return [mine[k].mean_step / compute[k].mean_step for k in sorted(mine) if k in compute]


def phase_excess(step_seconds: list[float], stride: int, affected: set[int]) -> float | None:
    """Seconds per step by which the steps at the ``affected`` phases (step index mod ``stride``) exceed the
    run's other steps, spread over the ``stride`` steps of a period (``None``: no other phase to compare)."""
    phases = [statistics.fmean(step_seconds[k::stride]) for k in range(stride)]
    others = [phases[k] for k in range(stride) if k not in affected]
    if not others:
        return None
    base = statistics.fmean(others)
    return sum(phases[k] - base for k in affected) / stride


def sync_excess(run: Run, compute: Run, stride: int, delay: int) -> float | None:
    """A streaming run's cost of its synchronisations per step, measured inside the run: a fragment starts
    after every ``stride``-th step (phase ``stride - 1``) and finishes ``delay`` steps later, so those
    phases' excess over the run's other steps, less compute-only's excess at the same phases (its
    evaluations every ``eval_every`` steps fall on them too). Within one run, so the machine's slow
    drift between runs (several % here) cancels; ``None`` without per-step times or without a phase
    free of synchronisation work."""
    affected = {(stride - 1 + d) % stride for d in range(delay + 1)}
    if not run.step_seconds or not compute.step_seconds:
        return None
    mine = phase_excess(run.step_seconds, stride, affected)
    theirs = phase_excess(compute.step_seconds, stride, affected)
    return None if mine is None or theirs is None else mine - theirs


def streaming_schedule(name: str) -> tuple[int, int]:
    """``(stride, delay)`` of a streaming run of the suite, ``ours:<config>:H[:tau]``."""
    parts = name.split(":")
    return int(parts[2]) // FRAGMENTS, int(parts[3]) if len(parts) > 3 else DELAY


def within_run_ratios(runs: dict[str, Run], name: str) -> list[float]:
    """Per repeat: the streaming run's mean step over the same run's step without its synchronisations'
    excess (:func:`sync_excess`)."""
    stride, delay = streaming_schedule(name)
    mine, compute = repeats(runs, name), repeats(runs, "compute")
    ratios = []
    for k in sorted(mine):
        excess = sync_excess(mine[k], compute[k], stride, delay) if k in compute else None
        if excess is not None:
            step = statistics.fmean(mine[k].step_seconds)
            ratios.append(step / (step - excess))
    return ratios


def repeats_table(bandwidth: str, runs: dict[str, Run]) -> str:
    """Mean step of every run measured more than once, per repeat, with the ratios to compute-only."""
    rows = []
    for base in dict.fromkeys(repeat_of(name)[0] for name in runs):
        repeated = repeats(runs, base)
        if len(repeated) < 2:
            continue
        ms = [repeated[k].mean_step * 1e3 for k in sorted(repeated)]
        ratios = step_ratios(runs, base)
        rows.append([
            base, str(len(ms)), " / ".join(f"{m:.0f}" for m in ms), f"{statistics.median(ms):.0f}",
            _fmt(statistics.median(ratios) if ratios else None, ".3f"),
            f"{min(ratios):.3f} - {max(ratios):.3f}" if ratios else "-",
        ])  # fmt: skip
    if not rows:
        return ""
    return table(
        f"{bandwidth}: mean step of the repeated runs (each repeat: the runs back to back in one set of processes)",
        ["run", "repeats", "mean step ms per repeat", "median ms", "x compute (median of repeats)", "x compute range"],
        rows,
    )


def bandwidth_report(run: dict[str, Any]) -> tuple[str, list[Goal], dict[str, Any], dict[str, Run]]:
    """The table and goals of one link speed."""
    bandwidth = run["bandwidth"]
    link = bandwidth_bytes_per_second(bandwidth)
    measured = {name: Run.of(name, records) for name, records in run["results"].items()}
    runs = first_repeats(measured)
    compute, ddp = runs.get("compute"), runs.get("ddp")
    target = ddp.final_loss if ddp else run.get("target")
    ddp_time = time_to_target(ddp.curve, target) if ddp and target is not None else None
    # A looser target too: DDP's loss at half its steps (local steps trade samples for bytes).
    ddp_mid_time, mid = ddp.curve[len(ddp.curve) // 2 - 1] if ddp and len(ddp.curve) >= 2 else (None, None)
    rows, summary = [], {}
    for name, r in runs.items():
        if name == "compute":
            continue
        reached = time_to_target(r.curve, target) if target is not None else None
        reached_mid = time_to_target(r.curve, mid) if mid is not None else None
        rows.append([
            name, f"{r.bytes_per_step / 1e3:.1f}", f"{r.mean_step * 1e3:.0f}",
            _fmt(_div(r.mean_step, compute.mean_step if compute else None), ".2f"), _fmt(r.final_loss, ".4f"),
            _fmt(reached, ".1f") if reached is not None else "not reached", _fmt(_div(reached, ddp_time), ".3f"),
            _fmt(reached_mid, ".1f") if reached_mid is not None else "not reached",
            _fmt(_div(reached_mid, ddp_mid_time), ".3f"), f"{r.bytes_per_step * r.steps / link:.1f}",
            r.note.strip().splitlines()[-1][:90] if r.note else "",
        ])  # fmt: skip
        summary[name] = {"bytes_per_rank_step": r.bytes_per_step, "mean_step_s": r.mean_step,
                         "final_val_loss": r.final_loss, "time_to_ddp_loss_s": reached,
                         "time_to_ddp_mid_loss_s": reached_mid, "curve": r.curve, "note": r.note}  # fmt: skip
    for name, error in run.get("failed", {}).items():
        if name not in runs:
            rows.append([name, "-", "-", "-", "-", "failed", "-", "-", "-", "-", error.strip().splitlines()[-1][:90]])
            summary[name] = {"error": error}
    for name in run.get("cases", TTQ_CASES):  # asked for, neither measured nor failed
        if name not in measured and name not in run.get("failed", {}):
            rows.append([name, "-", "-", "-", "-", "not run", "-", "-", "-", "-", "suite stopped at its time limit"])
            summary[name] = {"error": "not run: the suite stopped at its time limit first"}
    w = run["workload"]
    millions = run["parameters"] / 1e6
    header = (
        f"{bandwidth}, {run['ranks']} ranks: GPT {w['n_layer']} x {w['d_model']} ({millions:.2f}M "
        f"parameters), {w['batch']} x {w['block']} tokens per rank and step, {w['steps']} steps, AdamW lr {w['lr']}; "
        f"target = {'DDP' if ddp else 'given'} final validation loss {_fmt(target, '.4f')}; "
        f"mid = DDP's loss at half its steps "
        f"{_fmt(mid, '.4f')} (DDP: {_fmt(ddp_mid_time, '.1f')} s)"
    )
    text = table(
        header,
        ["run", "kB/rank/step", "mean step ms", "x compute", "final val loss", "time to target s", "x DDP time",
         "time to mid s", "x DDP time to mid", "link time of bytes s", "note"],
        rows,
    )  # fmt: skip
    goals, floors = _goals(bandwidth, measured, compute, ddp, ddp_time, target)
    if bandwidth.lower() == "100mbit" and mid is not None:
        looser, _ = _goals(bandwidth, measured, None, ddp, ddp_mid_time, mid)
        goals += [Goal(f"(looser target) {g.name.replace('DDP loss', 'DDP mid-run loss')}", g.value, g.limit,
                       g.note.replace("final loss", "mid-run loss")) for g in looser]  # fmt: skip
    if compute:
        text += (
            f"\ncompute-only step {compute.mean_step * 1e3:.0f} ms (plain Lightning, no network, all ranks at once); "
            f"floor for {w['steps']} steps: {compute.mean_step * w['steps']:.1f} s"
        )
        if ddp:
            comm = ddp.mean_step - compute.mean_step
            text += (f"; Lightning DDP step {ddp.mean_step * 1e3:.0f} ms = compute + {comm * 1e3:.0f} ms of "
                     f"communication ({comm / compute.mean_step:.2f}x compute)")  # fmt: skip
        text += "\n"
    repeated = repeats_table(bandwidth, measured)
    if repeated:
        text += "\n" + repeated
        summary["_repeats"] = {n: r.mean_step for n, r in measured.items() if n not in runs}
    summary["_floors"] = floors
    return text, goals, summary, runs


def _goals(
    bandwidth: str, measured: dict[str, Run], compute: Run | None, ddp: Run | None, ddp_time: float | None,
    target: float | None,
) -> tuple[list[Goal], dict[str, Any]]:  # fmt: skip
    """The goals of one link speed from every run ``measured`` (repeats included)."""
    goals: list[Goal] = []
    floors: dict[str, Any] = {}
    runs = first_repeats(measured)
    reached = {n: time_to_target(r.curve, target) for n, r in runs.items() if target is not None and n != "compute"}
    ours = {n: t for n, t in reached.items() if n.startswith("ours:") and t is not None}
    torchft = {n: t for n, t in reached.items() if n.startswith("torchft:") and t is not None}
    best = min(ours, key=ours.get) if ours else None
    if compute and ddp:
        floors["comm_over_compute_ddp"] = (ddp.mean_step - compute.mean_step) / compute.mean_step
        floors["compute_floor_s"] = compute.mean_step * ddp.steps
        floors["compute_floor_over_ddp_time"] = _div(floors["compute_floor_s"], ddp_time)
    if bandwidth.lower() == "100mbit":
        if compute and ddp:
            comm = floors["comm_over_compute_ddp"]
            goals.append(Goal("premise: compute / DDP's communication", _div(1.0, comm), 1 / COMM_OVER_COMPUTE,
                              f"DDP communicates {comm:.2f}x its compute"))  # fmt: skip
        note = f"best ours: {best}" if best else "no run of ours reached DDP's final loss"
        if "compute_floor_over_ddp_time" in floors:
            note += f"; floor (compute only, same steps) {floors['compute_floor_over_ddp_time']:.3f}x"
        never = math.inf if ddp_time is not None else None  # not reached: the goal is not met
        ours_time = ours[best] if best else never
        goals.append(Goal("ours best time to DDP loss / DDP time", _div(ours_time, ddp_time), VERSUS_DDP_TIME,
                          note))  # fmt: skip
        best_ft = min(torchft, key=torchft.get) if torchft else None
        ran_ft = {n: r.seconds for n, r in runs.items() if n.startswith("torchft:")}
        if best_ft:
            versus, ft_note = _div(ours_time, torchft[best_ft]), f"best torchft: {best_ft}"
        elif best and ran_ft:  # torchft's time to the target is beyond its whole run: an upper bound
            fastest = min(ran_ft, key=ran_ft.get)
            versus = _div(ours_time, ran_ft[fastest])
            ft_note = (f"no torchft run reached DDP's final loss; upper bound: ours over the shortest torchft "
                       f"run's whole time ({fastest}, {ran_ft[fastest]:.1f} s)")  # fmt: skip
        else:
            versus, ft_note = never, "neither ours nor torchft reached DDP's final loss"
        goals.append(Goal("ours best time to DDP loss / best torchft", versus, VERSUS_TORCHFT_TIME, ft_note))
    if bandwidth.lower() == "1gbit" and compute:
        for name in runs:
            if "streaming" in name and name.startswith("ours:"):
                goals.append(_streaming_goal(measured, name))
    return goals, floors


def _streaming_goal(runs: dict[str, Run], name: str) -> Goal:
    """Outer sync hidden: measured inside each run (:func:`within_run_ratios`) when the runs have per-step
    times, else end to end against compute-only (:func:`step_ratios`); the median over repeats."""
    end_to_end, inside = step_ratios(runs, name), within_run_ratios(runs, name)

    def spread(ratios: list[float]) -> str:
        many = f"median of {len(ratios)} repeats, range {min(ratios):.3f} - {max(ratios):.3f}"
        return many if len(ratios) > 1 else f"{ratios[0]:.3f}"

    if inside:
        return Goal(f"{name} mean step / same run without its syncs' excess", statistics.median(inside),
                    STREAMING_STEP, f"{spread(inside)}; end to end / compute-only: {spread(end_to_end)}")  # fmt: skip
    return Goal(f"{name} mean step / compute step", statistics.median(end_to_end), STREAMING_STEP,
                spread(end_to_end) if len(end_to_end) > 1 else "")  # fmt: skip


def plot(runs_by_bandwidth: dict[str, dict[str, Run]], targets: dict[str, float | None], path: Path) -> None:
    """One figure: a panel per link speed, validation loss against training seconds for every run."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(runs_by_bandwidth), figsize=(7 * len(runs_by_bandwidth), 5), squeeze=False)
    hidden = ("compute", "loop", "ours:no_sync")  # no network average to speak of
    names = sorted({n for runs in runs_by_bandwidth.values() for n in runs if n not in hidden and n != "ddp"})
    palette = plt.get_cmap("tab20")
    colors = {name: palette(k % 20) for k, name in enumerate(names)} | {"ddp": "black"}  # one colour per run
    for ax, (bandwidth, runs) in zip(axes[0], runs_by_bandwidth.items()):
        for name, r in sorted(runs.items()):
            if r.curve and name not in hidden:
                style = "-" if name.startswith("ours:") or name == "ddp" else "--"
                width = 2.5 if name == "ddp" else 1.3
                ax.plot(*zip(*r.curve), style, lw=width, marker=".", ms=3, label=name, color=colors[name])
        if targets.get(bandwidth) is not None:
            ax.axhline(targets[bandwidth], color="grey", lw=0.8, ls=":", label="DDP's final loss")
        ax.set_xscale("log")
        ax.set_title(f"{bandwidth} links, 8 ranks")
        ax.set_xlabel("training wall-clock (s, evaluation excluded, log)")
        ax.set_ylabel("validation loss (network average)")
        ax.grid(alpha=0.3)
    axes[0][-1].legend(fontsize=7, loc="upper right")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def render(runs: dict[str, dict[str, Any]], plot_path: Path | None = None) -> tuple[str, dict[str, Any]]:
    """The report of every link speed measured (``{bandwidth: run}``), its goals, and the plot."""
    sections, goals, summary, curves, targets = [], [], {}, {}, {}
    for bandwidth in sorted(runs, key=bandwidth_bytes_per_second):
        run = runs[bandwidth]
        text, run_goals, summary[bandwidth], curves[bandwidth] = bandwidth_report(run)
        ddp = curves[bandwidth].get("ddp")
        targets[bandwidth] = ddp.final_loss if ddp else None
        sections.append(f"# command: {run.get('command', '?')}\n\n{text}")
        goals += [Goal(f"{bandwidth}: {g.name}", g.value, g.limit, g.note) for g in run_goals]
    sections.append(goals_table(goals, "Goals (time to quality)"))
    summary["goals"] = [{"goal": g.name, "value": g.value, "limit": g.limit, "status": g.status, "note": g.note}
                        for g in goals]  # fmt: skip
    if plot_path is not None:
        plot(curves, targets, plot_path)
    return "\n".join(sections), summary
