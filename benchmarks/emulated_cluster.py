"""Gossip vs AllReduce on an emulated cluster: one network namespace per rank, shaped links (needs root).

Builds an N-rank "cluster" with :class:`lightning_decent.emulation.EmulatedCluster`, starts one
process per namespace (gloo bound to the namespace's shaped interface through
``GLOO_SOCKET_IFNAME``; ranks from ``RANK``/``WORLD_SIZE``/``MASTER_ADDR``/``MASTER_PORT``), runs
the measurements of :mod:`benchmarks.cluster.cases` and prints the tables and the step-time goals.
Every namespace and process is removed at the end, also on failure or Ctrl-C. Baselines are always
measured in the same run: this machine is shared and noisy.

Usage (from the repository root)::

    sudo PYTHONPATH=. .venv/bin/python benchmarks/emulated_cluster.py --ranks 8 --bandwidth 1gbit \\
        --model mlp16m --steps 20 --json benchmarks/results/emulated_cluster.json

``--suites`` picks among ``core`` (communication rounds, compute-only, DDP, decent-dp, ours with and
without overlap), ``overhead`` (one rank: the strategy against plain Lightning, no network),
``straggler``, ``scaling`` (extra clusters of ``--scaling-ranks``) and ``accuracy`` (digits, DDP vs
gossip, time to DDP's final accuracy).

Two-level clusters (``--machines M --ranks-per-machine L``, comma lists for several): one namespace per
machine holding its ``L`` ranks (loopback inside), the machines joined by the shaped links, which their
ranks share as they would a NIC; suites ``two_level`` (DDP, decent-dp's alternating exponential ring,
ours flat and hierarchical; :mod:`benchmarks.cluster.two_level`) and ``accuracy``::

    sudo PYTHONPATH=. .venv/bin/python benchmarks/emulated_cluster.py --machines 2,4 --ranks-per-machine 4,2 \
        --bandwidth 1gbit --model mlp16m --steps 20 --json benchmarks/results/two_level.json
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import asdict
from pathlib import Path
from tempfile import TemporaryDirectory
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from benchmarks.cluster import report, ttq_report, two_level  # noqa: E402
from benchmarks.cluster.time_to_quality import TTQ_CASES, Workload, workload_json  # noqa: E402
from benchmarks.cluster.workloads import ModelSpec  # noqa: E402
from lightning_decent.emulation import EmulatedCluster, available  # noqa: E402

SUITES = ("core", "overhead", "straggler", "scaling", "accuracy", "time_to_quality")
TWO_LEVEL_SUITES = ("two_level", "accuracy")  # with --machines: M machines of L ranks
MASTER_PORT = 29731
GOSSIP_ACCURACY = "accuracy:one_peer_exponential:overlap"


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--ranks", type=int, default=8)
    parser.add_argument("--bandwidth", default="1gbit", help="per-link rate in tc units (1gbit, 500mbit, ...)")
    parser.add_argument("--model", default="mlp16m", help="a named model (mlp16m: 4 x 2048^2 + head, 16.8M params)")
    parser.add_argument("--model-mb", type=float, default=None, help="instead of --model: an MLP of about this size")
    parser.add_argument("--steps", type=int, default=20, help="timed steps (or rounds) per case")
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--batch", type=int, default=16, help="per-rank batch size")
    parser.add_argument(
        "--suites",
        default=None,
        help=f"comma-separated, from {', '.join(SUITES)} (default: all); with --machines from "
        f"{', '.join(TWO_LEVEL_SUITES)} (default: both)",
    )
    parser.add_argument(
        "--machines",
        default=None,
        help="two-level clusters: machines per cluster, comma-separated (e.g. 2,4), paired with --ranks-per-machine",
    )
    parser.add_argument("--ranks-per-machine", default=None, help="ranks per machine, e.g. 4,2 (one namespace each)")
    parser.add_argument(
        "--cases", default=None, help="instead of the core suite's cases: these (see benchmarks.cluster.cases)"
    )
    parser.add_argument("--scaling-ranks", default="4,8,16")
    parser.add_argument("--straggler-delays", default="0.1,0.3", help="seconds of extra work per step on one rank")
    parser.add_argument("--epochs", type=int, default=10, help="accuracy suite: epochs of digits for both runs")
    parser.add_argument("--accuracy-hidden", type=int, default=16384, help="accuracy suite: digits_cnn hidden width")
    parser.add_argument("--accuracy-lr", type=float, default=0.05)
    parser.add_argument("--mtu", type=int, default=1500, help="link MTU (1500: Ethernet; 9000: jumbo frames)")
    parser.add_argument("--timeout", type=float, default=3600, help="seconds before a cluster run is stopped")
    parser.add_argument("--cases-per-launch", type=int, default=5, help="cases run by one set of processes")
    parser.add_argument("--ttq-layers", type=int, default=Workload.n_layer, help="time_to_quality: GPT blocks")
    parser.add_argument("--ttq-width", type=int, default=Workload.d_model, help="time_to_quality: GPT width")
    parser.add_argument("--ttq-block", type=int, default=Workload.block, help="time_to_quality: tokens per sequence")
    parser.add_argument("--ttq-batch", type=int, default=Workload.batch, help="time_to_quality: sequences per rank")
    parser.add_argument("--ttq-steps", type=int, default=Workload.steps, help="time_to_quality: steps of every run")
    parser.add_argument("--ttq-eval-every", type=int, default=Workload.eval_every)
    parser.add_argument("--ttq-lr", type=float, default=Workload.lr, help="time_to_quality: AdamW's lr (everyone)")
    parser.add_argument(
        "--ttq-seed", type=int, default=Workload.seed, help="time_to_quality: initial model and data order (everyone)"
    )
    parser.add_argument(
        "--ttq-target",
        type=float,
        default=None,
        help="time_to_quality: the validation loss to reach when DDP is not among the runs (e.g. DDP's final "
        "loss of another invocation, to time runs given more samples)",
    )
    parser.add_argument(
        "--ttq-cases",
        default=",".join(TTQ_CASES),
        help="time_to_quality: the runs, one set of processes each; a+b+c: runs that share one set of processes",
    )
    parser.add_argument(
        "--ttq-repeats",
        type=int,
        default=1,
        help="time_to_quality: run every set of processes this many times in turn (repeat k of a run is named "
        "run#k); the report gives the step times of every repeat and the median ratios to compute-only",
    )
    parser.add_argument("--json", type=Path, default=None, help="also write every number to this JSON file")
    parser.add_argument("--from-json", type=Path, default=None, help="print the report of a saved --json run")
    parser.add_argument("--keep-logs", type=Path, default=None, help="copy the ranks' logs and results here")
    return parser.parse_args()


def core_cases(ranks: int) -> list[str]:
    cases = [
        "raw_exchange",
        "raw_allreduce",
        "comm:one_peer_exponential",
        "comm:ring",
        "comm:alternating_pairs",
        "comm:allreduce",
        "lightning_local",
        "isolated",
        "torch_ddp",
        "lightning_ddp",
        "raw_overlap",
    ]
    power_of_two = ranks & (ranks - 1) == 0
    cases += [f"decent_dp:{t}" for t, ok in [("one-peer-exp", power_of_two), ("ring", ranks % 2 == 0)] if ok]
    cases.append("decent_dp:complete")
    cases += [f"ours:{t}{m}" for t in ("one_peer_exponential", "ring") for m in ("", ":overlap")]
    if ranks % 2 == 0:
        cases.append("ours:alternating_pairs:overlap")
    return cases


#: One rank, no network: plain Lightning against the strategy (blocking and overlapped), interleaved
#: three times so that a drift of the machine's load hits all of them alike.
OVERHEAD_CASES = ["lightning_local", "isolated", "ours:ring:overlap"] * 3


def straggler_cases(delays: list[float]) -> list[str]:
    return [f"{name}@slow={d:g}" for d in delays for name in ("lightning_ddp", "ours:one_peer_exponential:overlap")]


def scaling_cases(ranks: int) -> list[str]:
    """Per cluster size: the rounds, the compute-only step, the raw overlap floor and the three trainers."""
    cases = ["comm:allreduce", "comm:one_peer_exponential", "lightning_local", "raw_overlap", "lightning_ddp"]
    if ranks & (ranks - 1) == 0:
        cases.append("decent_dp:one-peer-exp")
    return [*cases, "ours:one_peer_exponential:overlap"]


def _set_mtu(cluster: EmulatedCluster, mtu: int) -> None:
    for index, host in enumerate(cluster.hosts):
        for namespace, device in ((host.namespace, "eth0"), (cluster.switch, f"p{index}")):
            subprocess.run(["ip", "netns", "exec", namespace, "ip", "link", "set", device, "mtu", str(mtu)], check=True)


def launches(cases: list[str], per_launch: int) -> list[list[str]]:
    """Cases in groups that share one set of processes: memory freed by a case is not always returned
    to the system, so a long list in one process would run out of memory. decent-dp gets its own group."""
    theirs = [c for c in cases if c.startswith("decent_dp")]
    ours = [c for c in cases if not c.startswith("decent_dp")]
    groups = [ours[i : i + per_launch] for i in range(0, len(ours), per_launch)]
    return groups + ([theirs] if theirs else [])


def run_cluster(
    args: argparse.Namespace, ranks: int, cases: list[str], logs: Path, local: int = 1
) -> dict[str, list[dict[str, Any]]]:
    """Run ``cases`` on a fresh cluster of ``ranks / local`` machines (namespaces) of ``local`` ranks each;
    ``{case: [rank 0's result, rank 1's, ...]}``."""
    out = logs / (f"ranks{ranks}" if local == 1 else f"{ranks // local}x{local}")
    out.mkdir(parents=True, exist_ok=True)
    for stale in out.glob("rank*.*"):
        stale.unlink()
    options = ["--out", str(out), "--steps", str(args.steps), "--warmup", str(args.warmup), "--batch", str(args.batch)]
    options += ["--epochs", str(args.epochs), "--accuracy-hidden", str(args.accuracy_hidden)]
    options += ["--accuracy-lr", str(args.accuracy_lr)]
    options += ["--model-mb", str(args.model_mb)] if args.model_mb else ["--model", args.model]
    with EmulatedCluster(ranks // local, args.bandwidth) as cluster:
        if args.mtu != 1500:
            _set_mtu(cluster, args.mtu)
        per_launch = args.cases_per_launch if ranks <= 8 else 1  # 16 processes of ~1 GB each: one case at a time
        for index, group in enumerate(launches(cases, per_launch)):
            print(f"[{time.strftime('%H:%M:%S')}] {out.name}: {', '.join(group)}", flush=True)
            worker = [sys.executable, "-m", "benchmarks.cluster.worker", *options, "--cases", ",".join(group)]
            _launch(cluster, worker, str(MASTER_PORT + index), out, args.timeout, local)
    return _collect(out, ranks)


def _launch(cluster: EmulatedCluster, worker: list[str], port: str, out: Path, timeout: float, local: int) -> None:
    """``local`` processes per host (machine ``m`` runs ranks ``m local .. m local + local - 1``, the layout of
    torchrun) running ``worker``; all of them are stopped when this returns or raises."""
    ranks = len(cluster.hosts) * local
    base = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1", "WORLD_SIZE": str(ranks)}
    base.update(MASTER_ADDR=cluster.hosts[0].address, MASTER_PORT=port, LOCAL_WORLD_SIZE=str(local))
    procs: list[subprocess.Popen] = []
    try:
        for rank in range(ranks):
            machine, local_rank = divmod(rank, local)
            env = {**base, "RANK": str(rank), "NODE_RANK": str(machine), "LOCAL_RANK": str(local_rank),
                   "RANK_ADDRESS": cluster.hosts[machine].address}  # fmt: skip
            with (out / f"rank{rank}.log").open("a") as log:
                procs.append(cluster.popen(machine, worker, env=env, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT))
        _wait_all(procs, timeout, out)
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
                proc.wait()


def _wait_all(procs: list[subprocess.Popen], timeout: float, out: Path) -> None:
    deadline = time.monotonic() + timeout
    while any(p.poll() is None for p in procs):
        failed = [r for r, p in enumerate(procs) if p.poll() not in (None, 0)]
        if failed:
            raise RuntimeError(f"rank {failed[0]} failed; its log ends with:\n{_tail(out / f'rank{failed[0]}.log')}")
        if time.monotonic() > deadline:
            raise TimeoutError(f"the cluster run took more than {timeout:g}s; rank 0's log ends with:\n"
                               f"{_tail(out / 'rank0.log')}")  # fmt: skip
        time.sleep(1)
    failed = [r for r, p in enumerate(procs) if p.returncode != 0]
    if failed:
        raise RuntimeError(f"rank {failed[0]} failed; its log ends with:\n{_tail(out / f'rank{failed[0]}.log')}")


def _tail(path: Path, chars: int = 4000) -> str:
    return path.read_text(errors="replace")[-chars:] if path.exists() else "(no log)"


def _collect(out: Path, ranks: int) -> dict[str, list[dict[str, Any]]]:
    results: dict[str, list[dict[str, Any]]] = {}
    for rank in range(ranks):
        for line in (out / f"rank{rank}.jsonl").read_text().splitlines():
            record = json.loads(line)
            results.setdefault(record["case"], []).append(record)
    return results


def planned_cases(args: argparse.Namespace, suites: list[str], delays: list[float], scaling: list[int]) -> list[str]:
    """The cases of the main ``--ranks`` cluster."""
    cases = []
    if "core" in suites:
        cases += args.cases.split(",") if args.cases else core_cases(args.ranks)
    if "scaling" in suites and args.ranks in scaling:
        cases += [c for c in scaling_cases(args.ranks) if c not in cases]
    if "straggler" in suites:
        cases += straggler_cases(delays)
    if "accuracy" in suites:
        cases += ["accuracy:ddp", GOSSIP_ACCURACY]
    return cases


def measure(args: argparse.Namespace, suites: list[str], delays: list[float], scaling: list[int]) -> dict[str, Any]:
    """Run every cluster: ``{"main": ..., "overhead": ..., "scaling": {ranks: ...}}`` of per-case results."""
    cases = planned_cases(args, suites, delays, scaling)
    with TemporaryDirectory(prefix="emulated_cluster_") as tmp:
        logs = args.keep_logs or Path(tmp)
        main_results = run_cluster(args, args.ranks, cases, logs) if cases else {}
        overhead = run_cluster(args, 1, OVERHEAD_CASES, logs) if "overhead" in suites else {}
        by_ranks = {args.ranks: main_results} if args.ranks in scaling else {}
        for ranks in scaling:
            if ranks != args.ranks:
                by_ranks[ranks] = run_cluster(args, ranks, scaling_cases(ranks), logs)
    return {"main": main_results, "overhead": overhead, "scaling": {str(n): r for n, r in by_ranks.items()}}


def time_to_quality_workload(args: argparse.Namespace) -> Workload:
    return Workload(n_layer=args.ttq_layers, d_model=args.ttq_width, block=args.ttq_block, batch=args.ttq_batch,
                    steps=args.ttq_steps, eval_every=args.ttq_eval_every, lr=args.ttq_lr,
                    seed=args.ttq_seed)  # fmt: skip


def repeated_groups(groups: list[str], repeats: int) -> list[str]:
    """``groups`` (``a+b`` runs share a set of processes) ``repeats`` times in turn, the runs of repeat ``k > 1``
    named ``run#k``: ``["compute+x"], 2 -> ["compute+x", "compute#2+x#2"]``."""
    if repeats < 1:
        raise ValueError(f"--ttq-repeats must be at least 1; got {repeats}.")
    return [
        "+".join(case if k == 1 else f"{case}#{k}" for case in group.split("+"))
        for k in range(1, repeats + 1)
        for group in groups
    ]


def measure_time_to_quality(args: argparse.Namespace, save: Callable[[dict[str, Any]], None]) -> dict[str, Any]:
    """The ``time_to_quality`` runs on one cluster of ``--ranks`` namespaces at ``--bandwidth``, one set of
    processes per run (a run that fails or hangs is recorded with its error; the next one still runs);
    ``save`` gets the record so far after every run (a stopped suite keeps what it measured)."""
    from lightning_decent.recipes.text_tokens import default_corpus, prepare

    workload = time_to_quality_workload(args)
    cases = repeated_groups([c for c in args.ttq_cases.split(",") if c], args.ttq_repeats)
    results: dict[str, list[dict[str, Any]]] = {}
    failed: dict[str, str] = {}
    record = {"bandwidth": args.bandwidth, "ranks": args.ranks, "workload": asdict(workload),
              "parameters": workload.parameters, "results": results, "failed": failed,
              "cases": [c for group in cases for c in group.split("+")], "target": args.ttq_target,
              "command": " ".join(sys.argv)}  # fmt: skip
    with TemporaryDirectory(prefix="time_to_quality_") as tmp:
        logs = args.keep_logs or Path(tmp)
        tokens = Path(tmp) / "tokens"
        prepare(Path(default_corpus()), tokens, max_bytes=2_000_000)
        with EmulatedCluster(args.ranks, args.bandwidth) as cluster:
            for index, group in enumerate(cases):
                out = logs / f"ttq_{index:02d}"
                out.mkdir(parents=True, exist_ok=True)
                print(f"[{time.strftime('%H:%M:%S')}] {args.bandwidth}: {group}", flush=True)
                worker = [sys.executable, "-m", "benchmarks.cluster.time_to_quality", "--out", str(out),
                          "--tokens", str(tokens), "--cases", group.replace("+", ","),
                          "--workload", workload_json(workload), "--port", str(29850 + 100 * index)]  # fmt: skip
                try:
                    _launch(cluster, worker, str(MASTER_PORT + index), out, args.timeout, 1)
                except (RuntimeError, TimeoutError) as error:
                    print(f"  {group} failed: {str(error)[-600:]}", flush=True)
                    for case in group.split("+"):
                        failed[case] = str(error)[-3000:]
                done = _collect_done(out, args.ranks)
                results.update(done)
                for case in done:
                    failed.pop(case, None)
                save(record)
    return record


def _collect_done(out: Path, ranks: int) -> dict[str, list[dict[str, Any]]]:
    """The runs of a launch for which every rank wrote its numbers (a failed launch keeps the runs before it)."""
    results: dict[str, list[dict[str, Any]]] = {}
    for rank in range(ranks):
        path = out / f"rank{rank}.jsonl"
        for line in path.read_text().splitlines() if path.exists() else []:
            record = json.loads(line)
            if "error" not in record:
                results.setdefault(record["case"], []).append(record)
    return {case: records for case, records in results.items() if len(records) == ranks}


def time_to_quality_main(args: argparse.Namespace) -> None:
    """Measure at ``--bandwidth`` (unless ``--from-json``), merge into ``--json`` by bandwidth, print the report
    of every bandwidth the file holds and draw its plot."""
    saved = json.loads(args.json.read_text()) if args.json and args.json.exists() else {}
    if args.from_json:
        saved = json.loads(args.from_json.read_text())
    else:
        ok, why = available()
        if not ok:
            sys.exit(f"The emulated cluster {why}.")
        started = time.time()

        earlier = saved.setdefault("runs", {}).get(args.bandwidth)

        def save(run: dict[str, Any]) -> None:
            """Write ``run`` into ``--json``; runs of an earlier invocation at this bandwidth stay unless redone."""
            run["measured_seconds"] = time.time() - started
            if earlier:
                run = {**run, "results": {**earlier["results"], **run["results"]},
                       "failed": {**{k: v for k, v in earlier["failed"].items() if k not in run["results"]},
                                  **run["failed"]},
                       "cases": list(dict.fromkeys([*earlier.get("cases", TTQ_CASES), *run["cases"]])),
                       "command": f"{earlier['command']} ; then {run['command']}"}  # fmt: skip
            saved["runs"][args.bandwidth] = run
            if args.json:
                args.json.parent.mkdir(parents=True, exist_ok=True)
                args.json.write_text(json.dumps(saved, indent=1))

        measure_time_to_quality(args, save)
    named = args.from_json or args.json  # the plot is docs/<name of the JSON>.png
    plot = ROOT / "docs" / f"{named.stem if named else 'time_to_quality'}.png"
    text, summary = ttq_report.render(saved["runs"], plot)
    print(text, flush=True)
    if args.json and not args.from_json:
        saved["summary"] = summary
        args.json.write_text(json.dumps(saved, indent=1))


def two_level_clusters(args: argparse.Namespace) -> list[tuple[int, int]]:
    """``(machines, ranks per machine)`` of each two-level cluster of ``--machines``/``--ranks-per-machine``."""
    machines = [int(m) for m in args.machines.split(",")]
    local = [int(x) for x in (args.ranks_per_machine or "").split(",") if x.strip()]
    if len(local) != len(machines) or min(machines + local) < 1:
        sys.exit("--machines and --ranks-per-machine take as many positive numbers each, e.g. 2,4 and 4,2.")
    return list(zip(machines, local))


def measure_two_level(args: argparse.Namespace, suites: list[str]) -> dict[str, Any]:
    """``{"two_level": {"MxL": per-case results}}`` for every two-level cluster."""
    results = {}
    with TemporaryDirectory(prefix="emulated_cluster_") as tmp:
        logs = args.keep_logs or Path(tmp)
        for machines, local in two_level_clusters(args):
            cases = two_level.two_level_cases(machines) if "two_level" in suites else []
            cases += two_level.accuracy_cases() if "accuracy" in suites else []
            results[f"{machines}x{local}"] = run_cluster(args, machines * local, cases, logs, local)
    return {"two_level": results}


def render_two_level(
    args: argparse.Namespace, suites: list[str], spec: ModelSpec, raw: dict[str, Any]
) -> tuple[str, list[report.Goal], dict[str, Any]]:
    """The tables and goals of the two-level clusters."""
    bandwidth = report.bandwidth_bytes_per_second(args.bandwidth)
    model_bytes = spec.parameters * 4
    sections = [
        f"# Emulated two-level clusters: machines joined by {args.bandwidth} links (MTU {args.mtu}), ranks of a "
        f"machine on its loopback; model {spec.parameters / 1e6:.1f}M parameters ({model_bytes / 1e6:.1f} MB), "
        f"batch {args.batch} per rank, {args.steps} timed steps after {args.warmup} warm-up, one thread per rank\n"
        f"# command: {' '.join(sys.argv)}\n"
    ]
    goals: list[report.Goal] = []
    for name, results in raw["two_level"].items():
        machines, local = (int(x) for x in name.split("x"))
        if "two_level" in suites:
            text, cluster_goals = two_level.step_report(results, machines, local, model_bytes, bandwidth)
            sections.append(text)
            goals += cluster_goals
        for gossip in two_level.ACCURACY_RUNS if "accuracy" in suites else ():
            text, goal = report.accuracy_report(results, gossip)
            goal.name = f"{name}: {gossip.split(':')[1]}: {goal.name}"
            sections.append(f"{name}, {gossip}:\n{text}")
            goals.append(goal)
    sections.append(report.goals_table(goals, "Goals (two-level cluster)"))
    summary = {name: {case: t.mean for case, t in report.timings(r).items()} for name, r in raw["two_level"].items()}
    return "\n".join(sections), goals, summary


def render(
    args: argparse.Namespace, suites: list[str], delays: list[float], spec: ModelSpec, raw: dict[str, Any]
) -> tuple[str, list[report.Goal], dict[str, Any]]:
    """The tables and goals of a run's results."""
    bandwidth = report.bandwidth_bytes_per_second(args.bandwidth)
    model_bytes = spec.parameters * 4
    main_results, overhead = raw["main"], raw["overhead"]
    by_ranks = {int(n): r for n, r in raw["scaling"].items()}
    header = (
        f"# Emulated cluster: {args.ranks} ranks, {args.bandwidth} links (MTU {args.mtu}), "
        f"model {spec.parameters / 1e6:.1f}M parameters ({model_bytes / 1e6:.1f} MB), batch {args.batch} per rank, "
        f"{args.steps} timed steps after {args.warmup} warm-up, one thread per rank\n"
        f"# command: {' '.join(sys.argv)}\n"
    )
    sections, goals, summary = [header], [], {}
    if "core" in suites:
        text, goals, summary = report.core_report(main_results, args.ranks, model_bytes, bandwidth, args.mtu)
        sections.append(text)
    if overhead:
        text, overhead_goals = report.overhead_report(overhead)
        sections.append(text)
        goals += overhead_goals
    if by_ranks:
        sections.append(report.scaling_report(by_ranks, model_bytes, bandwidth))
    if "straggler" in suites:
        sections.append(report.straggler_report(main_results, delays, args.batch))
    if "accuracy" in suites:
        text, goal = report.accuracy_report(main_results, GOSSIP_ACCURACY)
        sections.append(text)
        goals.append(goal)
    if goals:
        sections.append(report.goals_table(goals))
    return "\n".join(sections), goals, summary


def main() -> None:
    # A kill (SIGTERM) unwinds like Ctrl-C, so the ranks are stopped and the namespaces removed.
    signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(128 + signum))
    args = parse_args()
    offered = TWO_LEVEL_SUITES if args.machines else SUITES
    default = [s for s in offered if s != "time_to_quality"]  # 20 minutes per link speed: only when asked for
    suites = [s.strip() for s in args.suites.split(",") if s.strip()] if args.suites else default
    unknown = sorted(set(suites) - set(offered))
    if unknown:
        sys.exit(f"Unknown suite(s) {unknown}; choose from {', '.join(offered)}.")
    if "time_to_quality" in suites:
        if suites != ["time_to_quality"]:
            sys.exit("Run --suites time_to_quality on its own (it has its own cluster per link speed).")
        time_to_quality_main(args)
        return
    spec = ModelSpec.of_size(args.model_mb) if args.model_mb else ModelSpec.named(args.model)
    delays = [float(d) for d in args.straggler_delays.split(",") if d.strip()]
    scaling = sorted({int(n) for n in args.scaling_ranks.split(",")}) if "scaling" in suites else []
    if args.from_json:
        raw = json.loads(args.from_json.read_text())["results"]
    else:
        ok, why = available()
        if not ok:
            sys.exit(f"The emulated cluster {why}.")
        started = time.time()
        raw = measure_two_level(args, suites) if args.machines else measure(args, suites, delays, scaling)
        print(f"(measured in {time.time() - started:.0f}s)", flush=True)
    payload: dict[str, Any] = {
        "args": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
        "model_parameters": spec.parameters,
        "results": raw,
    }
    if args.json:  # the raw numbers first: a report that fails to render loses nothing
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(payload, indent=1))
    if "two_level" in raw:
        text, goals, summary = render_two_level(args, suites, spec, raw)
    else:
        text, goals, summary = render(args, suites, delays, spec, raw)
    print(text, flush=True)
    if args.json:
        payload["summary"] = summary
        payload["goals"] = [{"goal": g.name, "value": g.value, "limit": g.limit, "status": g.status} for g in goals]
        args.json.write_text(json.dumps(payload, indent=1))


if __name__ == "__main__":
    main()
