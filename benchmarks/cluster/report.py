"""Tables and goal checks of the emulated-cluster benchmark, from the ranks' per-case results.

Bounds: a link of ``B`` bytes/s moves a model of ``M`` bytes in ``M/B`` per direction. One round
with ``d`` peers needs ``d M/B`` (each rank sends ``d`` models through its uplink), a ring
all-reduce ``2 (n - 1)/n M/B``. TCP/IPv4 over Ethernet carries 1448 payload bytes in a 1514-byte
frame at MTU 1500, so even a perfect transfer takes ``1.046 M/B`` on the shaped links.
"""

from __future__ import annotations

import re
import statistics
from dataclasses import dataclass
from functools import partial
from typing import Any

#: Step-time goals of the flat cluster (ratios measured in the same run).
ONE_PEER_ROUND = 1.05
D_PEER_ROUND = 1.10
OVERLAP_STEP = 1.03
VERSUS_DDP = 0.5
VERSUS_DECENT_DP = 0.85
OVERHEAD = 1.02
TIME_TO_ACCURACY = 0.6

_UNITS = {"bit": 1, "kbit": 1e3, "mbit": 1e6, "gbit": 1e9, "tbit": 1e12}


def bandwidth_bytes_per_second(text: str) -> float:
    """``"1gbit"`` -> 1.25e8 (tc's rate units, bits per second)."""
    match = re.fullmatch(r"\s*([0-9.]+)\s*([kmgt]?bit)\s*", text.lower())
    if not match:
        raise ValueError(f"Cannot read bandwidth {text!r}; write e.g. 1gbit, 500mbit, 10gbit.")
    return float(match.group(1)) * _UNITS[match.group(2)] / 8


def header_overhead(mtu: int) -> float:
    """Bytes on the wire per payload byte for bulk TCP/IPv4 over Ethernet (timestamps on)."""
    return (mtu + 14) / (mtu - 52)


@dataclass
class Timing:
    """One case over all ranks: median step (or round) and throughput."""

    median: float
    mean: float
    per_rank_mean: list[float]

    @classmethod
    def of(cls, records: list[dict[str, Any]]) -> Timing:
        steps = [s for r in records for s in r["steps"]]
        return cls(statistics.median(steps), statistics.fmean(steps), [r["mean"] for r in records])

    def samples_per_second(self, batch: int) -> float:
        return sum(batch / m for m in self.per_rank_mean)


def timings(results: dict[str, list[dict[str, Any]]]) -> dict[str, Timing]:
    return {name: Timing.of(records) for name, records in results.items() if records and "median" in records[0]}


def _ms(seconds: float | None) -> str:
    return "-" if seconds is None else f"{seconds * 1000:.0f}"


def _ratio(value: float | None) -> str:
    return "-" if value is None else f"{value:.3f}"


def table(title: str, header: list[str], rows: list[list[str]]) -> str:
    widths = [max([len(h), *(len(r[i]) for r in rows)]) for i, h in enumerate(header)]
    lines = [f"## {title}", "", "| " + " | ".join(h.ljust(w) for h, w in zip(header, widths)) + " |"]
    lines.append("|" + "|".join("-" * (w + 2) for w in widths) + "|")
    lines += ["| " + " | ".join(c.ljust(w) for c, w in zip(r, widths)) + " |" for r in rows]
    return "\n".join(lines) + "\n"


@dataclass
class Goal:
    name: str
    value: float | None
    limit: float
    note: str = ""

    @property
    def status(self) -> str:
        if self.value is None:
            return "not measured"
        return "met" if self.value <= self.limit else "NOT met"

    def row(self) -> list[str]:
        return [self.name, _ratio(self.value), f"<= {self.limit:g}", self.status, self.note]


def _timing_of(t: dict[str, Timing], name: str, median: bool = False) -> float | None:
    """A case's median (rounds) or mean (steps; the throughput), ``None`` if it did not run."""
    return None if name not in t else (t[name].median if median else t[name].mean)


def core_report(
    results: dict[str, list[dict[str, Any]]], ranks: int, model_bytes: int, bandwidth: float, mtu: int
) -> tuple[str, list[Goal], dict[str, Any]]:
    """Communication, training-step and overhead tables and the goals they decide."""
    t = timings(results)
    link = model_bytes / bandwidth

    med = partial(_timing_of, t, median=True)  # rounds: the median of isolated rounds
    step = partial(_timing_of, t)  # training: the mean step, i.e. the throughput

    def div(a: float | None, b: float | None) -> float | None:
        return None if a is None or b is None else a / b

    comm_rows = []
    for name, peers, label in [
        ("raw_exchange", 1, "raw gloo isend/irecv, one peer"),
        ("comm:one_peer_exponential", 1, "communicator, one_peer_exponential (1 peer)"),
        ("comm:ring", 2, "communicator, ring (2 peers, 2 scheduled rounds)"),
        ("comm:alternating_pairs", 1, "communicator, alternating pairs (1 peer, both ways)"),
        ("raw_allreduce", None, "raw gloo all_reduce"),
        ("comm:allreduce", None, "communicator all-reduce (per bucket)"),
    ]:
        bound = link * (peers if peers else 2 * (ranks - 1) / ranks)
        comm_rows.append([label, _ms(med(name)), _ms(bound), _ratio(div(med(name), bound))])
    text = table(
        f"Communication only: one round, {ranks} ranks, model {model_bytes / 1e6:.1f} MB, M/B = {link * 1000:.0f} ms "
        f"(TCP/IP headers at MTU {mtu}: floor {header_overhead(mtu):.3f} x bound)",
        ["round", "median ms", "bound ms", "ratio"],
        comm_rows,
    )

    compute = step("lightning_local")
    ddp = step("lightning_ddp")
    step_rows = []
    for name, label in [
        ("lightning_local", "compute only: plain Lightning, one device per rank"),
        ("isolated", "DecentralizedStrategy, graph without edges (no network)"),
        ("torch_ddp", "torch DDP (AllReduce)"),
        ("lightning_ddp", "Lightning DDPStrategy (AllReduce)"),
        ("raw_overlap", "floor: plain torch + raw one-peer exchange, overlapped"),
        ("decent_dp:one-peer-exp", "decent-dp one-peer-exp"),
        ("decent_dp:ring", "decent-dp ring"),
        ("decent_dp:complete", "decent-dp complete (all-reduce)"),
        ("ours:one_peer_exponential", "ours one_peer_exponential, blocking"),
        ("ours:one_peer_exponential:overlap", "ours one_peer_exponential, overlap"),
        ("ours:ring", "ours ring, blocking"),
        ("ours:ring:overlap", "ours ring, overlap"),
        ("ours:alternating_pairs:overlap", "ours alternating pairs (= decent-dp ring), overlap"),
    ]:
        if name in results and results[name] and "skipped" in results[name][0]:
            step_rows.append([label, "skipped", "-", "-", "-", results[name][0]["skipped"]])
            continue
        mean = step(name)
        step_rows.append([label, _ms(mean), _ms(med(name)), _ratio(div(mean, compute)), _ratio(div(mean, ddp)), ""])
    text += "\n" + table(
        f"Training step, {ranks} ranks: mean step (= throughput; ratios use it) and median, over ranks and steps",
        ["run", "mean ms", "median ms", "x compute", "x Lightning DDP", "note"],
        step_rows,
    )

    floor = header_overhead(mtu)
    goals = [
        Goal(
            "one-peer round / (M/B)",
            div(med("comm:one_peer_exponential"), link),
            ONE_PEER_ROUND,
            f"wire floor at MTU {mtu}: {floor:.3f}",
        ),
        Goal("ring round / (2 M/B)", div(med("comm:ring"), 2 * link), D_PEER_ROUND),
    ]
    for topology in ("one_peer_exponential", "ring"):
        slowest = max((v for v in (compute, med(f"comm:{topology}")) if v is not None), default=None)
        goals.append(
            Goal(
                f"{topology} overlap step / max(compute, round)",
                div(step(f"ours:{topology}:overlap"), slowest),
                OVERLAP_STEP,
            )
        )
    goals.append(
        Goal("one_peer overlap step / Lightning DDP", div(step("ours:one_peer_exponential:overlap"), ddp), VERSUS_DDP)
    )
    goals.append(Goal("ring overlap step / Lightning DDP", div(step("ours:ring:overlap"), ddp), VERSUS_DDP))
    for ours, theirs in [
        ("ours:one_peer_exponential:overlap", "decent_dp:one-peer-exp"),
        ("ours:alternating_pairs:overlap", "decent_dp:ring"),
        ("ours:ring:overlap", "decent_dp:ring"),
    ]:
        if theirs in results and "skipped" in results[theirs][0]:
            note = results[theirs][0]["skipped"]
        else:
            note = "" if theirs in t else "decent-dp not run (world size unsupported)"
        if ours == "ours:ring:overlap":
            note = note or "ours sends 2 models per step, decent-dp's ring 1"
        label = f"{ours.split(':')[1]} overlap / decent-dp {theirs.split(':')[1]}"
        goals.append(Goal(label, div(step(ours), step(theirs)), VERSUS_DECENT_DP, note))
    summary = {name: {"median_s": v.median, "mean_s": v.mean} for name, v in t.items()}
    return text, goals, summary


def overhead_report(results: dict[str, list[dict[str, Any]]]) -> tuple[str, list[Goal]]:
    """One rank, no network: the strategy's cost over plain Lightning."""
    t = timings(results)
    local = t["lightning_local"].mean
    rows = [
        [label, _ms(t[name].mean), _ratio(t[name].mean / local)]
        for name, label in [
            ("lightning_local", "plain Lightning, one device"),
            ("isolated", "DecentralizedStrategy (one rank)"),
            ("ours:ring:overlap", "DecentralizedStrategy, overlap=True (one rank)"),
        ]
    ]
    goals = [
        Goal("overhead without network / plain Lightning", t["isolated"].mean / local, OVERHEAD),
        Goal("overhead without network, overlap / plain Lightning", t["ours:ring:overlap"].mean / local, OVERHEAD),
    ]
    return table("Overhead without network cost (1 rank, mean step)", ["run", "mean ms", "ratio"], rows), goals


def scaling_report(by_ranks: dict[int, dict[str, list[dict[str, Any]]]], model_bytes: int, bandwidth: float) -> str:
    """Rounds (median) and steps (mean) per cluster size, and the overlap step's ratios in each."""
    link = model_bytes / bandwidth
    rows = []
    for ranks in sorted(by_ranks):
        get = partial(_timing_of, timings(by_ranks[ranks]))

        ours, round_ = get("ours:one_peer_exponential:overlap"), get("comm:one_peer_exponential", median=True)
        slowest = max((v for v in (get("lightning_local"), round_) if v is not None), default=None)
        ratios = [(ours, slowest), (ours, get("lightning_ddp")), (ours, get("decent_dp:one-peer-exp"))]
        rows.append(
            [str(ranks), _ms(link * 2 * (ranks - 1) / ranks), _ms(get("comm:allreduce", median=True)), _ms(round_)]
            + [_ms(get(n)) for n in ("lightning_local", "raw_overlap", "lightning_ddp", "decent_dp:one-peer-exp")]
            + [_ms(ours)]
            + [_ratio(None if a is None or b is None else a / b) for a, b in ratios]
        )
    return table(
        "Scaling: AllReduce grows with n, one-peer gossip stays flat (rounds: median ms; steps: mean ms)",
        [
            "ranks",
            "all-reduce bound",
            "all-reduce round",
            "one-peer round",
            "compute step",
            "raw overlap floor",
            "Lightning DDP",
            "decent-dp one-peer",
            "ours one-peer overlap",
            "ours / max(compute, round)",
            "ours / DDP",
            "ours / decent-dp",
        ],
        rows,
    )


def straggler_report(results: dict[str, list[dict[str, Any]]], delays: list[float], batch: int) -> str:
    t = timings(results)
    rows = []
    for delay in [0.0, *delays]:
        suffix = f"@slow={delay:g}" if delay else ""
        cells = [f"{delay * 1000:.0f}"]
        for name in ("lightning_ddp", "ours:one_peer_exponential:overlap"):
            timing = t.get(name + suffix)
            cells += ["-", "-"] if timing is None else [_ms(timing.mean), f"{timing.samples_per_second(batch):.0f}"]
        rows.append(cells)
    return table(
        "Straggler: the last rank does extra work every step (mean step, cluster throughput)",
        ["delay ms", "DDP step ms", "DDP samples/s", "gossip step ms", "gossip samples/s"],
        rows,
    )


def accuracy_report(results: dict[str, list[dict[str, Any]]], gossip: str) -> tuple[str, Goal]:
    ddp, ours = results.get("accuracy:ddp"), results.get(gossip)
    if not ddp or not ours:
        return "", Goal("time to DDP's accuracy / DDP time", None, TIME_TO_ACCURACY)
    ddp_curve = _mean_curve(ddp)
    ours_curve = _mean_curve(ours)
    target_time, target = ddp_curve[-1]
    reached = next((time for time, acc in ours_curve if acc >= target), None)
    rows = [
        [f"{epoch + 1}", _ms(d[0]), f"{d[1]:.4f}", _ms(o[0]) if o else "-", f"{o[1]:.4f}" if o else "-"]
        for epoch, (d, o) in enumerate(zip(ddp_curve, ours_curve + [None] * len(ddp_curve)))
    ]
    text = table(
        f"Time to accuracy: digits, {ddp[0]['parameters'] / 1e6:.1f}M-parameter CNN; training time in ms "
        f"(evaluation excluded); validation accuracy of DDP and of the gossip network average",
        ["epoch", "DDP time ms", "DDP acc", "gossip time ms", "gossip acc"],
        rows,
    )
    value = None if reached is None else reached / target_time
    note = f"DDP final accuracy {target:.4f} at {target_time:.1f}s; gossip " + (
        "never reached it" if reached is None else f"reached it at {reached:.1f}s"
    )
    return text, Goal("time to DDP's final accuracy / DDP time", value, TIME_TO_ACCURACY, note)


def _mean_curve(records: list[dict[str, Any]]) -> list[tuple[float, float]]:
    """The epochs' (training time, accuracy): time is the slowest rank's, accuracy is global already."""
    epochs = min(len(r["curve"]) for r in records)
    return [
        (max(r["curve"][e][0] for r in records), statistics.fmean(r["curve"][e][1] for r in records))
        for e in range(epochs)
    ]


def goals_table(goals: list[Goal], title: str = "Goals (flat cluster)") -> str:
    return table(title, ["goal", "measured", "target", "status", "note"], [g.row() for g in goals])
