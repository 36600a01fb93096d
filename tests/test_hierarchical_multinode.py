"""Hierarchical gossip on 2 machines x 2 processes, each machine in its own network namespace (torchrun).

The combined mixing must equal ``W = lazy_ring(2) (x) 11^T/2`` (the same rounds run by the flat
point-to-point communicator give the same result), and the bytes counted on each machine's interface
must be one model per round for hierarchical gossip against ``L^2 = 4`` models for flat gossip on the
same W (each rank sends its whole model to both ranks of the other machine).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from lightning_decent.emulation import EmulatedCluster, available
from lightning_decent.topology import get_topology

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "tests" / "mp_scripts" / "hierarchical.py"
sys.path.insert(0, str(SCRIPT.parent))
from hierarchical import ELEMENTS, STEPS, initial  # noqa: E402

ok, why = available()
pytestmark = [pytest.mark.slow, pytest.mark.netns, pytest.mark.skipif(not ok, reason=why)]
MODEL_BYTES = ELEMENTS * 4


def torchrun(node: int, master: str, out: Path) -> list[str]:
    nodes = ["--nnodes", "2", "--nproc-per-node", "2", "--node-rank", str(node)]
    rendezvous = ["--master-addr", master, "--master-port", "29613"]
    return [sys.executable, "-m", "torch.distributed.run", *nodes, *rendezvous, str(SCRIPT), str(out)]


@pytest.fixture(scope="module")
def ranks(tmp_path_factory: pytest.TempPathFactory) -> list[dict]:
    out = tmp_path_factory.mktemp("hierarchical")
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    with EmulatedCluster(2) as cluster:
        procs = [
            cluster.popen(node, torchrun(node, cluster.hosts[0].address, out), env=env, cwd=out,
                          stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
            for node in (0, 1)
        ]  # fmt: skip
        outputs = [p.communicate(timeout=600)[0] for p in procs]
    assert [p.returncode for p in procs] == [0, 0], outputs[0][-3000:] + outputs[1][-3000:]
    return [{**json.loads((out / f"rank{r}.json").read_text()), **torch.load(out / f"rank{r}.pt")} for r in range(4)]


def test_combined_mixing_equals_the_kronecker_matrix(ranks: list[dict]) -> None:
    w = get_topology("hierarchical", 4, local_world_size=2, machines="lazy_ring").weights(0)
    by_hand = torch.kron(torch.tensor([[0.75, 0.25], [0.25, 0.75]], dtype=torch.float64), torch.full((2, 2), 0.5))
    torch.testing.assert_close(w, by_hand)
    expected = torch.stack([initial(r) for r in range(4)]).double()
    for _ in range(STEPS):
        expected = w @ expected
    for r, rank in enumerate(ranks):
        torch.testing.assert_close(rank["hierarchical"].double(), expected[r], rtol=0, atol=1e-5)
        torch.testing.assert_close(rank["flat"].double(), expected[r], rtol=0, atol=1e-5)


def test_a_machine_link_carries_one_model_per_round_instead_of_four(ranks: list[dict]) -> None:
    for r, rank in enumerate(ranks):
        assert rank["local_rank"] == r % 2
        assert rank["counted"]["between_machines"] == STEPS * MODEL_BYTES // 2  # its shard, to one peer machine
        assert rank["counted"]["flat"] == STEPS * 3 * MODEL_BYTES  # to its machine peer and both remote ranks
    for machine in (0, 1):
        measured = ranks[2 * machine]["interface_bytes"]  # local rank 0 read its machine's eth0 counter
        assert STEPS * MODEL_BYTES <= measured["hierarchical"] <= 1.1 * STEPS * MODEL_BYTES, measured
        assert 4 * STEPS * MODEL_BYTES <= measured["flat"] <= 1.1 * 4 * STEPS * MODEL_BYTES, measured
