"""What a lost rank and a joining process cost an elastic run (D-SGD on the digits, ring, CPU gloo ranks).

``python benchmarks/elastic.py [--ranks 6] [--epochs 8] [--json benchmarks/results/elastic.json]`` runs
``tests/mp_scripts/elastic.py`` with every rank its own process (as torchrun or SLURM start them), three times:

* ``uninterrupted``: no failure;
* ``kill``: the rank launched as 1 is killed (SIGKILL) after batch 3 of epoch 1;
* ``kill+join``: the same, and a new process joins the job (started when the victim dies, so that its imports
  are done; it asks to join at once).

For each it prints a Markdown table and writes JSON: the wall time of the run, the final validation accuracy of
the network-average model, the seconds from the kill to the survivors' next membership epoch (the time each
failure costs them beyond the lost rank's share of work), the seconds from the joiner's request to its first
epoch, and the bytes of state it received. Run it alone (about 5 minutes on 2 cores for 6 ranks).
"""

from __future__ import annotations

import argparse
import json
import re
import sys
import tempfile
import time
from datetime import datetime
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))
from elastic_launch import finish, free_port, logs, results, start_rank, stop_store  # noqa: E402

_STAMP = r"(\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3})"


def _seconds(stamp: str) -> float:
    return datetime.strptime(stamp, "%Y-%m-%d %H:%M:%S,%f").timestamp()


def run(case: str, ranks: int, epochs: int) -> dict:
    out = Path(tempfile.mkdtemp(prefix=f"elastic-{case}-"))
    port, args = free_port(), ["--epochs", str(epochs)]
    if case != "uninterrupted":
        args += ["--victim", "1", "--at-epoch", "1"]
    started = time.time()
    try:
        procs = {r: start_rank(out, r, ranks, port, *args) for r in range(ranks)}
        if case == "kill+join":
            joining = ("--join", "--join-after", str(out / "victim_time"), "--epochs", str(epochs))
            procs[ranks] = start_rank(out, ranks, ranks, port, *joining)
        codes = finish(procs, timeout=1200)
    finally:
        stop_store(port)
    text, found = logs(out), results(out, list(range(ranks + 1)))
    accuracies = {round(r["val_acc"], 4) for r in found.values() if r["val_acc"] is not None}
    row = {
        "case": case,
        "ranks": ranks,
        "exit_codes": codes,
        "seconds": time.time() - started,
        "val_acc": accuracies.pop() if len(accuracies) == 1 else sorted(accuracies),
        "final_world_size": sorted({r["world_size"] for r in found.values()}),
    }
    if case != "uninterrupted":
        killed = float((out / "victim_time").read_text())
        lost = [_seconds(s) for s in re.findall(_STAMP + r" membership epoch 1: .*lost a00000001", text)]
        row["seconds_lost_per_failure"] = max(lost) - killed if lost else None
    if case == "kill+join":
        asked = re.findall(_STAMP + r" rank \d+: membership change \(processes ask to join\)", text)
        joined = re.findall(_STAMP + r" membership epoch \d+: rank \d+ of \d+ \(member j", text)
        row["seconds_to_admit_joiner"] = _seconds(joined[0]) - min(map(_seconds, asked)) if asked and joined else None
        row["handover_bytes"] = found.get(ranks, {}).get("handover_bytes")
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--ranks", type=int, default=6)
    parser.add_argument("--epochs", type=int, default=8)
    parser.add_argument("--json", type=Path, default=ROOT / "benchmarks" / "results" / "elastic.json")
    args = parser.parse_args()
    rows = [run(case, args.ranks, args.epochs) for case in ("uninterrupted", "kill", "kill+join")]
    print("| case | ranks | run s | val acc | final n | s lost per failure | s to admit joiner | handover bytes |")
    print("|---|---|---|---|---|---|---|---|")
    for r in rows:
        lost, admit = r.get("seconds_lost_per_failure"), r.get("seconds_to_admit_joiner")
        print(
            f"| {r['case']} | {r['ranks']} | {r['seconds']:.0f} | {r['val_acc']} | {r['final_world_size']} | "
            f"{'' if lost is None else f'{lost:.1f}'} | {'' if admit is None else f'{admit:.1f}'} | "
            f"{r.get('handover_bytes') or ''} |"
        )
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps({"date": datetime.now().isoformat(), "rows": rows}, indent=1))


if __name__ == "__main__":
    main()
