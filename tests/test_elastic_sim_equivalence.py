"""The simulator replays a real elastic run across membership changes: a rank killed in a step, a joiner admitted.

Four gloo ranks, each its own process, train their nodes' objectives of the simulator's logistic problem
(``tests/mp_scripts/elastic_sim_equivalence.py``): the rank launched last is killed at the start of step 3, so
the survivors lose that step's exchange and change membership inside it; at the start of epoch 1 (step 6) a new
process joins from a neighbour's live state. The simulator runs the same schedule (``during_exchange`` for the
kill, ``join_from`` the donor the strategy picks) with the same algorithm code; every member's parameters must
equal its row.
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch
from elastic_launch import finish, free_port, logs, results, start_rank, stop_store

from lightning_decent.algorithms import get_algorithm
from lightning_decent.membership.handover import donor_of
from lightning_decent.sim import simulate
from lightning_decent.topology import get_topology

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests" / "mp_scripts"))
from elastic_sim_equivalence import EPOCHS, KILLED_AT, MOMENTUM, STEPS_PER_EPOCH, TOPOLOGY  # noqa: E402
from sim_equivalence import LR, build_problem  # noqa: E402

pytestmark = pytest.mark.slow

SCRIPT = ROOT / "tests" / "mp_scripts" / "elastic_sim_equivalence.py"
WORLD = 4


def run_elastic_job(out: Path, algorithm: str) -> dict:
    port = free_port()
    try:
        args = ("--algorithm", algorithm)
        procs = {r: start_rank(out, r, WORLD, port, *args, script=SCRIPT) for r in range(WORLD)}
        procs[WORLD] = start_rank(out, WORLD, WORLD, port, *args, "--join", script=SCRIPT)
        codes = finish(procs, timeout=300)
    finally:
        stop_store(port)
    return {"codes": codes, "results": results(out, list(procs)), "logs": logs(out)}


@pytest.mark.parametrize("algorithm", sorted(MOMENTUM))
def test_a_real_elastic_run_ends_where_the_simulator_ends(tmp_path: Path, algorithm: str) -> None:
    job = run_elastic_job(tmp_path, algorithm)
    victim = WORLD - 1
    assert job["codes"][victim] is None or job["codes"][victim] < 0, job["logs"]  # killed
    finished = {r: res for r, res in job["results"].items() if r != victim}
    assert sorted(finished) == [0, 1, 2, WORLD] and all(job["codes"][r] == 0 for r in finished), job["logs"]
    assert sorted(res["rank"] for res in finished.values()) == [0, 1, 2, 3]  # the joiner took the free rank 3
    assert finished[WORLD]["handover_bytes"] > 0

    join_at = STEPS_PER_EPOCH  # the start of epoch 1
    prepared = get_algorithm(algorithm).prepare_topology(get_topology(TOPOLOGY, WORLD))
    donor = donor_of(victim, [victim], prepared, join_at)
    schedule = [
        (KILLED_AT + 1, {"leave": [victim], "during_exchange": True}),  # step 3's exchange lost, then n = 3
        (join_at, {"join_from": [donor]}),  # n = 4 again; the joiner takes the free shard 3
    ]
    steps = STEPS_PER_EPOCH * EPOCHS
    problem = build_problem("logistic", WORLD)
    simulated = simulate(
        problem, algorithm, TOPOLOGY, steps=steps, lr=LR, momentum=MOMENTUM[algorithm], membership=schedule
    )
    assert simulated.members == [0, 1, 2, 3]
    uninterrupted = simulate(problem, algorithm, TOPOLOGY, steps=steps, lr=LR, momentum=MOMENTUM[algorithm])
    for res in finished.values():
        assert res["gossip_step"] == steps
        row = simulated.params[res["rank"]]
        real = torch.tensor(res["params"], dtype=row.dtype)
        assert (real - row).abs().max().item() < 1e-6, (res["rank"], job["logs"])
        # the changes matter: an uninterrupted run ends elsewhere
        assert (real - uninterrupted.params[res["rank"]]).abs().max().item() > 1e-4
