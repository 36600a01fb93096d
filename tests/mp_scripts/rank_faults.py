"""Faults in the paths of local steps, streaming syncs and hierarchical gossip, with every rank its own process.

``python rank_faults.py OUT --case NAME [--ranks 4] [--deadline 150]`` starts ``--ranks`` processes of this
script, each given its rank in the environment as torchrun does (no parent that stops the others when one
fails), waits for all of them up to ``--deadline`` seconds (then kills the ones left and records them as
hung), and writes ``OUT/ranks.json``: per rank its exit code, the seconds from the fault to its exit, and
its stderr's last lines. The victim is rank 2 (on the second machine of the hierarchical cases, local rank
0 there, so it is the rank that creates that machine's shared-memory segments); it writes ``OUT/victim_time``
just before its signal. Shared-memory segments go to a directory of their own under ``/dev/shm``
(``OUT/shm_dir`` names it) so that what a case leaves behind can be counted.

Cases (:data:`CASES`): what fails, where, and the options of the run.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path
from typing import Any

VICTIM = 2
HIERARCHICAL = {"topology": "hierarchical", "topology_options": {"local_world_size": 2}}

#: name -> (how the victim fails, where, strategy options). Where: ``step`` (after optimizer step 5, when the
#: next synchronisation is the one that waits), ``machine-before`` / ``machine-during`` / ``machine-after``
#: (entering its first shared-memory set-up / after creating the segment / after its first machine round),
#: ``reduce-scatter`` (inside a later machine round, before writing its row).
CASES: dict[str, tuple[str, str, dict[str, Any]]] = {
    "hier-diloco-stop-sync": ("hang", "step", {**HIERARCHICAL, "algorithm": "diloco", "algorithm_options": {"H": 2}}),
    "hier-stop-reduce-scatter": ("hang", "reduce-scatter", HIERARCHICAL),
    "hier-kill-reduce-scatter": ("kill", "reduce-scatter", HIERARCHICAL),
    "hier-kill-machine-before": ("kill", "machine-before", HIERARCHICAL),
    "hier-stop-machine-before": ("hang", "machine-before", HIERARCHICAL),
    "hier-kill-machine-during": ("kill", "machine-during", HIERARCHICAL),
    "hier-kill-machine-after": ("kill", "machine-after", HIERARCHICAL),
    "diloco-nan": ("nan", "step", {"algorithm": "diloco", "algorithm_options": {"H": 2}}),
    "diloco-int8-nan": (
        "nan",
        "step",
        {"algorithm": "diloco", "algorithm_options": {"H": 2}, "compression": "int8"},
    ),
    "streaming-local-sgd-nan": (
        "nan",
        "step",
        {"algorithm": "local_sgd", "algorithm_options": {"H": 4, "fragments": 2, "delay": 1}},
    ),
    "streaming-diloco-kill": (
        "kill",
        "step",
        {"algorithm": "diloco", "algorithm_options": {"H": 4, "fragments": 2, "delay": 1}},
    ),
    "streaming-diloco-stop": (
        "hang",
        "step",
        {"algorithm": "diloco", "algorithm_options": {"H": 4, "fragments": 2, "delay": 1}},
    ),
    "streaming-gasloc-stop": (
        "hang",
        "step",
        {"algorithm": "gasloc", "algorithm_options": {"H": 4, "fragments": 2, "delay": 1}},
    ),
    "diloco-kill-sync-timeout-60": (
        "kill",
        "step",
        {"algorithm": "diloco", "algorithm_options": {"H": 2}, "collective_timeout": 60, "gossip_timeout": 60},
    ),
    "choco-kill": ("kill", "step", {"algorithm": "choco"}),
}
TIMEOUTS = {"gossip_timeout": 10, "collective_timeout": 10}
AT_STEP = 5


# ---- the parent: one process per rank ------------------------------------------------------------------
def launch(out: Path, case: str, ranks: int, deadline: float) -> int:
    port = _free_port()
    shm = Path("/dev/shm") / f"ld_faults_{uuid.uuid4().hex[:8]}"
    shm.mkdir()
    (out / "shm_dir").write_text(str(shm))
    started = time.time()
    procs = []
    for rank in range(ranks):
        env = {
            **os.environ,
            "MASTER_ADDR": "127.0.0.1",
            "MASTER_PORT": str(port),
            "WORLD_SIZE": str(ranks),
            "RANK": str(rank),
            "LOCAL_RANK": str(rank),
            "LOCAL_WORLD_SIZE": str(ranks),
            "GROUP_RANK": "0",
            "NODE_RANK": "0",
            "TORCHELASTIC_RUN_ID": "rank_faults",
            "OMP_NUM_THREADS": "1",
            "LD_FAULTS_SHM": str(shm),
        }
        err = open(out / f"rank{rank}.err", "w")  # noqa: SIM115 (closed after the wait)
        argv = [sys.executable, __file__, str(out), "--case", case]
        procs.append((subprocess.Popen(argv, env=env, stdout=subprocess.DEVNULL, stderr=err), err))
    exits: dict[int, float | None] = {}
    while len(exits) < ranks and time.time() - started < deadline:
        for rank, (proc, _) in enumerate(procs):
            if rank not in exits and proc.poll() is not None:
                exits[rank] = time.time()
        time.sleep(0.05)
    report = []
    for rank, (proc, err) in enumerate(procs):
        if proc.poll() is None:  # hung (or the stopped victim): ends here
            proc.send_signal(signal.SIGCONT)
            proc.kill()
            proc.wait()
        err.close()
        victim = out / "victim_time"
        since = float(victim.read_text()) if victim.exists() else started
        text = (out / f"rank{rank}.err").read_text()
        report.append(
            {
                "rank": rank,
                "returncode": proc.returncode,
                "seconds": None if exits.get(rank) is None else exits[rank] - since,
                "stderr": text[-6000:],
            }
        )
    leftovers = sorted(p.name for p in shm.iterdir())
    for path in shm.iterdir():
        path.unlink()
    shm.rmdir()
    (out / "ranks.json").write_text(json.dumps({"ranks": report, "segments_left": leftovers}, indent=1))
    return 0


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# ---- a rank --------------------------------------------------------------------------------------------
def strike(out: Path, mode: str, module: Any = None) -> None:
    (out / "victim_time").write_text(repr(time.time()))
    if mode == "nan":
        import torch

        with torch.no_grad():
            next(module.parameters()).view(-1)[0] = float("nan")
    else:
        os.kill(os.getpid(), signal.SIGKILL if mode == "kill" else signal.SIGSTOP)


def patch_machine(out: Path, mode: str, where: str) -> None:
    """Make this rank fail at ``where`` inside the shared-memory collectives."""
    from lightning_decent.comm import machine_collectives
    from lightning_decent.comm.machine_collectives import SharedMemoryMachine

    machine_collectives.SHM_DIR = os.environ["LD_FAULTS_SHM"]
    original_map, original_create, original_reduce = (
        SharedMemoryMachine._map,
        SharedMemoryMachine._create,
        SharedMemoryMachine.reduce_scatter,
    )
    rounds = [0]

    def map_segment(self: SharedMemoryMachine, *args: Any) -> Any:
        if where == "machine-before":
            strike(out, mode)
        return original_map(self, *args)

    def create(path: str, nbytes: int) -> str:
        result = original_create(path, nbytes)
        if where == "machine-during":
            strike(out, mode)
        return result

    def reduce_scatter(self: SharedMemoryMachine, *args: Any) -> None:
        rounds[0] += 1
        if where == "reduce-scatter" and rounds[0] == 2 * AT_STEP:
            strike(out, mode)
        original_reduce(self, *args)
        if where == "machine-after" and rounds[0] == 1:
            strike(out, mode)

    SharedMemoryMachine._map = map_segment  # type: ignore[method-assign]
    SharedMemoryMachine._create = staticmethod(create)  # type: ignore[method-assign]
    SharedMemoryMachine.reduce_scatter = reduce_scatter  # type: ignore[method-assign]


def run_rank(out: Path, case: str) -> None:
    import lightning.pytorch as pl
    from tiny_model import TinyClassifier

    from lightning_decent import DecentralizedStrategy
    from lightning_decent.recipes.digits import DigitsDataModule

    mode, where, options = CASES[case]
    rank = int(os.environ["RANK"])
    os.environ["LD_FAULTS_SHM"] = os.environ.get("LD_FAULTS_SHM", "/dev/shm")
    from lightning_decent.comm import machine_collectives

    machine_collectives.SHM_DIR = os.environ["LD_FAULTS_SHM"]
    if rank == VICTIM and where.startswith(("machine", "reduce")):
        patch_machine(out, mode, where)

    class Victim(pl.Callback):
        def on_train_batch_end(self, trainer: pl.Trainer, module: pl.LightningModule, *args: Any) -> None:
            if where == "step" and rank == VICTIM and trainer.global_step == AT_STEP:
                strike(out, mode, module)

    strategy = DecentralizedStrategy(**{"topology": "ring", **TIMEOUTS, **options})
    trainer = pl.Trainer(
        accelerator="cpu",
        devices=int(os.environ["WORLD_SIZE"]),
        strategy=strategy,
        max_epochs=3,
        limit_train_batches=8,
        limit_val_batches=0,
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        enable_checkpointing=False,
        num_sanity_val_steps=0,
        callbacks=[Victim()],
    )
    trainer.fit(TinyClassifier(), DigitsDataModule())


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("out", type=Path)
    parser.add_argument("--case", choices=sorted(CASES), required=True)
    parser.add_argument("--ranks", type=int, default=4)
    parser.add_argument("--deadline", type=float, default=150.0)
    args = parser.parse_args()
    if "RANK" in os.environ:
        run_rank(args.out, args.case)
    else:
        sys.exit(launch(args.out, args.case, args.ranks, args.deadline))


if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    main()
