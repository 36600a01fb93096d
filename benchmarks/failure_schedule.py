"""Time to quality under one failure schedule: ours elastic, ours and Lightning DDP with torchrun restarts,
torchft DDP and DiLoCo (issue 22). Needs root (one network namespace per machine, shaped links).

Usage (from the repository root)::

    sudo PYTHONPATH=. .venv/bin/python benchmarks/failure_schedule.py --ranks 8 --bandwidth 1gbit \\
        --json benchmarks/results/failure_schedule_1gbit.json

On one :class:`~lightning_decent.emulation.EmulatedCluster` (a namespace per machine, one process per machine),
every system trains the digits to ``--target`` validation accuracy, evaluated after every epoch (the same cadence
for all, evaluation included in the time), first without failures, then under the schedule. The schedule is
measured first in the same launch: ours elastic's failure-free time to target ``T``; machine ``victims[i]`` is
killed (SIGKILL of every process in its namespace) at ``fractions[i] x T`` seconds after each run's launch and
started again ``--restart-after`` seconds later with the system's own rejoin path:

* ``ours_elastic``: the same command with ``LIGHTNING_DECENT_JOIN=1``;
* ``ours_restart``, ``ddp``: a torchrun agent per machine (``--nnodes N:N``, c10d rendezvous on machine 0): a loss
  ends every worker, the agents wait for the machine to come back and restart the job, which resumes from its
  last checkpoint (``ModelCheckpoint`` every ``--ckpt-every`` steps);
* ``torchft_ddp``, ``torchft_diloco``: one replica group per machine, the Lighthouse beside machine 0 (never
  killed); survivors go on after a quorum change, the restarted replica heals from a live one.

Prints a Markdown table and the goals, writes JSON. Every namespace and process is removed at the end.
"""

from __future__ import annotations

import argparse
import contextlib
import fcntl
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from tempfile import TemporaryDirectory
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from benchmarks.cluster.report import bandwidth_bytes_per_second  # noqa: E402
from benchmarks.failure import report  # noqa: E402
from lightning_decent.emulation import EmulatedCluster, available  # noqa: E402

SYSTEMS = ("ours_elastic", "torchft_ddp", "torchft_diloco", "ours_restart", "ddp")
TORCHRUN = ("ours_restart", "ddp")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--ranks", type=int, default=8)
    parser.add_argument("--bandwidth", default="1gbit")
    parser.add_argument("--systems", default=",".join(SYSTEMS))
    parser.add_argument("--conditions", default="free,schedule", help="free (no failure), schedule, or both")
    parser.add_argument("--victims", default="3,6", help="machines killed in turn (never 0: it hosts the stores)")
    parser.add_argument("--fractions", default="0.25,0.5", help="kill times as fractions of ours' failure-free T")
    parser.add_argument("--restart-after", type=float, default=20.0)
    parser.add_argument("--reference", type=float, default=None, help="T in seconds instead of measuring it")
    parser.add_argument("--target", type=float, default=0.95)
    parser.add_argument("--hidden", type=int, default=2048, help="digits_cnn's hidden width")
    parser.add_argument("--lr", type=float, default=0.05)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--epochs", type=int, default=40, help="the most epochs a run trains")
    parser.add_argument("--topology", default="one_peer_exponential", help="ours: the gossip graph")
    parser.add_argument("--overlap", action="store_true", help="ours: overlapped gossip")
    parser.add_argument("--gossip-timeout", type=float, default=10.0, help="ours; torchft's collective timeout too")
    parser.add_argument("--min-ranks", type=int, default=6, help="ours elastic min_ranks, torchft min replicas")
    parser.add_argument("--ckpt-every", type=int, default=6)
    parser.add_argument("--timeout", type=float, default=900, help="seconds before a run is stopped")
    parser.add_argument("--json", type=Path, default=None)
    parser.add_argument("--from-json", type=Path, default=None, help="print the report of a saved --json run")
    parser.add_argument(
        "--lock", type=Path, default=None, help="a shared machine: hold an exclusive flock on this file during each run"
    )
    parser.add_argument("--keep-logs", type=Path, default=None)
    return parser.parse_args(argv)


class Run:
    """One system's run on ``cluster``: launches, kills and restarts machines, follows the events."""

    def __init__(self, args: argparse.Namespace, cluster: EmulatedCluster, system: str, out: Path, port: int) -> None:
        self.args, self.cluster, self.system, self.out, self.port = args, cluster, system, out, port
        self.procs: list[subprocess.Popen] = []  # the machines' processes (not the Lighthouse)
        self.services: list[subprocess.Popen] = []
        self.launched = 0.0
        out.mkdir(parents=True, exist_ok=True)

    def _address(self, machine: int) -> str:
        return self.cluster.hosts[machine].address

    def _worker_options(self) -> list[str]:
        a = self.args
        return ["--out", str(self.out), "--hidden", str(a.hidden), "--lr", str(a.lr), "--batch", str(a.batch),
                "--epochs", str(a.epochs)]  # fmt: skip

    def command(self, machine: int, restarted: bool) -> tuple[list[str], dict[str, str]]:
        """The argv and extra environment of ``machine`` (``restarted``: its rejoin after a kill)."""
        a, python = self.args, sys.executable
        env = {"PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1", "RUST_LOG": "warn"}  # torchft: no per-step lines
        lightning = ["-m", "benchmarks.failure.lightning_worker", "--system", self.system, "--machine", str(machine),
                     *self._worker_options(), "--topology", a.topology, "--gossip-timeout", str(a.gossip_timeout),
                     "--min-ranks", str(a.min_ranks), "--ckpt-every", str(a.ckpt_every),
                     *(["--overlap"] if a.overlap else [])]  # fmt: skip
        if self.system == "ours_elastic":
            env.update(MASTER_ADDR=self._address(0), MASTER_PORT=str(self.port), NODE_RANK=str(machine),
                       LOCAL_RANK="0", WORLD_SIZE=str(a.ranks))  # fmt: skip
            if restarted:
                env["LIGHTNING_DECENT_JOIN"] = "1"
            return [python, *lightning], env
        if self.system in TORCHRUN:
            torchrun = [python, "-m", "torch.distributed.run", f"--nnodes={a.ranks}:{a.ranks}", "--nproc-per-node=1",
                        "--rdzv-backend=c10d", f"--rdzv-endpoint={self._address(0)}:{self.port}",
                        f"--rdzv-id={self.out.name}", "--max-restarts=20", "--monitor-interval=1",
                        f"--local-addr={self._address(machine)}",
                        f"--rdzv-conf=is_host={str(machine == 0).lower()}"]  # fmt: skip
            return [*torchrun, *lightning], env
        torchft = ["-m", "benchmarks.failure.torchft_worker", "--system", self.system, "--machine", str(machine),
                   "--machines", str(a.ranks), "--address", self._address(machine), "--port", str(self.port + 10),
                   "--lighthouse", f"http://{self._address(0)}:{self.port}", "--min-replicas", str(a.min_ranks),
                   "--timeout", str(a.gossip_timeout), *self._worker_options(),
                   *(["--restarted"] if restarted else [])]  # fmt: skip
        return [python, *torchft], env

    def start(self, machine: int, restarted: bool = False) -> None:
        argv, extra = self.command(machine, restarted)
        env = {**os.environ, **extra}
        if not restarted:
            env.pop("LIGHTNING_DECENT_JOIN", None)
        with (self.out / f"machine{machine}.log").open("a") as log:
            self.procs.append(self.cluster.popen(machine, argv, env=env, cwd=ROOT, stdout=log,
                                                 stderr=subprocess.STDOUT, start_new_session=True))  # fmt: skip

    def launch(self) -> None:
        if self.system.startswith("torchft"):
            lighthouse = [str(Path(sys.executable).parent / "torchft_lighthouse"), "--min_replicas",
                          str(self.args.min_ranks), "--bind", f"{self._address(0)}:{self.port}"]  # fmt: skip
            with (self.out / "lighthouse.log").open("a") as log:
                self.services.append(self.cluster.popen(0, lighthouse, stdout=log, stderr=subprocess.STDOUT,
                                                     start_new_session=True))  # fmt: skip
        self.launched = time.time()
        for machine in range(self.args.ranks):
            self.start(machine)

    def kill_machine(self, machine: int) -> None:
        """SIGKILL every process in the machine's namespace (the machine is gone)."""
        kill_namespace(self.cluster.hosts[machine].namespace)

    def stop(self) -> None:
        for host in self.cluster.hosts:
            kill_namespace(host.namespace)
        for proc in self.procs + self.services:
            if proc.poll() is None:
                proc.kill()
            proc.wait()

    def alive(self) -> bool:
        return any(p.poll() is None for p in self.procs)


def kill_namespace(namespace: str) -> None:
    """SIGKILL every process in ``namespace`` (``ip netns pids``: only the processes this benchmark started)."""
    found = subprocess.run(["ip", "netns", "pids", namespace], capture_output=True, text=True).stdout.split()
    for pid in found:
        try:
            os.kill(int(pid), signal.SIGKILL)
        except ProcessLookupError:
            continue


def run_system(args: argparse.Namespace, cluster: EmulatedCluster, system: str, kills: list[report.Kill],
               out: Path, port: int) -> dict[str, Any]:  # fmt: skip
    """One run to the target or the end; its summary (:func:`report.summarize`)."""
    run = Run(args, cluster, system, out, port)
    events_path = out / "events.jsonl"
    pending = sorted(kills, key=lambda k: k.at)
    restarts: list[report.Kill] = []
    error = None
    try:
        run.launch()
        gate = system.startswith("torchft")
        while True:
            time.sleep(0.25)
            now = time.time() - run.launched
            events = report.read_events(events_path)
            if gate and len({e["m"] for e in events if e["kind"] == "start"}) == args.ranks:
                (out / "go").write_text("")
                gate = False
            if report.time_to_target(events, run.launched, args.target) is not None:
                break
            while pending and now >= pending[0].at:
                kill = pending.pop(0)
                run.kill_machine(kill.machine)
                print(f"  {now:6.1f}s killed machine {kill.machine}", flush=True)
                restarts.append(kill)
            while restarts and now >= restarts[0].restart_at:
                kill = restarts.pop(0)
                run.start(kill.machine, restarted=True)
                print(f"  {now:6.1f}s restarted machine {kill.machine}", flush=True)
            if not run.alive() and not restarts:
                error = "every process ended before the target"
                break
            if now > args.timeout:
                error = f"stopped after {args.timeout:g}s"
                break
    finally:
        run.stop()
    summary = report.summarize(report.read_events(events_path), run.launched, args.target, kills)
    if error:
        summary["error"] = error
    return summary


@contextlib.contextmanager
def held(lock: Path | None) -> Iterator[None]:
    """An exclusive ``flock`` on ``lock`` (nothing when ``None``) while the block runs."""
    if lock is None:
        yield
        return
    with lock.open("a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def measure(args: argparse.Namespace, logs: Path, save: Any) -> dict[str, Any]:
    systems = [s for s in args.systems.split(",") if s]
    conditions = [c for c in args.conditions.split(",") if c]
    victims = [int(v) for v in args.victims.split(",")]
    fractions = [float(f) for f in args.fractions.split(",")]
    if 0 in victims:
        sys.exit("Machine 0 hosts the rendezvous, the membership store and the Lighthouse: choose other victims.")
    record: dict[str, Any] = {"args": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
                              "command": " ".join(sys.argv), "runs": {}}  # fmt: skip
    # ours elastic failure-free first (it fixes the schedule), then every run under the schedule (the goals'
    # runs first: a launch stopped early keeps them), then the other systems' failure-free runs
    plan = [(s, c) for c in ("free", "schedule") for s in systems if c in conditions]
    plan.sort(key=lambda run: run != ("ours_elastic", "free") and run[1] == "free")
    reference = args.reference
    with EmulatedCluster(args.ranks, args.bandwidth) as cluster:
        for index, (system, condition) in enumerate(plan):
            kills = [] if condition == "free" else report.failure_schedule(reference, victims, fractions,
                                                                            args.restart_after)  # fmt: skip
            print(f"[{time.strftime('%H:%M:%S')}] {args.bandwidth}: {system} {condition}", flush=True)
            with held(args.lock):
                summary = run_system(args, cluster, system, kills, logs / f"{index:02d}_{system}_{condition}",
                                     30100 + 40 * index)  # fmt: skip
            print(f"  time to target: {summary['time_to_target_s']} {summary.get('error', '')}", flush=True)
            record["runs"][f"{system}/{condition}"] = summary
            if reference is None and (system, condition) == ("ours_elastic", "free"):
                reference = summary["time_to_target_s"]
                if reference is None:
                    sys.exit("ours elastic did not reach the target without failures: no schedule to run.")
            record["reference_s"] = reference
            record["schedule"] = [vars(k) for k in report.failure_schedule(reference, victims, fractions,
                                                                           args.restart_after)]  # fmt: skip
            save(record)
    return record


def main() -> None:
    signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(128 + signum))
    args = parse_args()

    def save(record: dict[str, Any]) -> None:
        if args.json:
            args.json.parent.mkdir(parents=True, exist_ok=True)
            args.json.write_text(json.dumps(record, indent=1))

    if args.from_json:
        record = json.loads(args.from_json.read_text())
        args = argparse.Namespace(**{**vars(args), **record["args"], "from_json": args.from_json, "json": None})
    else:
        ok, why = available()
        if not ok:
            sys.exit(f"The emulated cluster {why}.")
        with TemporaryDirectory(prefix="failure_schedule_") as tmp:
            record = measure(args, args.keep_logs or Path(tmp), save)
    found = report.goals(record["runs"], args.gossip_timeout, bandwidth_bytes_per_second(args.bandwidth))
    record["goals"] = [{"goal": g.name, "value": g.value, "limit": g.limit, "status": g.status} for g in found]
    save(record)
    schedule = ", ".join(f"machine {k['machine']} at {k['at']:.0f}s (back at {k['restart_at']:.0f}s)"
                         for k in record["schedule"])  # fmt: skip
    print(f"\n#### {args.ranks} machines, {args.bandwidth}: digits to {args.target:.0%} validation accuracy; "
          f"schedule from ours' failure-free {record['reference_s']:.1f}s: {schedule}\n")  # fmt: skip
    print(report.table(record["runs"]))
    print()
    print(report.goals_table(found), flush=True)


if __name__ == "__main__":
    main()
