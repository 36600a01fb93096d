"""Hierarchical gossip on 2 machines x 2 processes, each machine in its own network namespace (torchrun).

The combined mixing must equal ``W = lazy_ring(2) (x) 11^T/2`` (the same rounds run by the flat
point-to-point communicator give the same result), and the bytes counted on each machine's interface
must be one model per round for hierarchical gossip against ``L^2 = 4`` models for flat gossip on the
same W (each rank sends its whole model to both ranks of the other machine).
"""

from __future__ import annotations

import json
import sys

import pytest
import torch
from mp_launch import SCRIPTS, torchrun_on_two_machines

from lightning_decent.emulation import available
from lightning_decent.topology import get_topology

SCRIPT = SCRIPTS / "hierarchical.py"
sys.path.insert(0, str(SCRIPTS))
from hierarchical import ELEMENTS, STEPS, initial  # noqa: E402

ok, why = available()
pytestmark = [pytest.mark.slow, pytest.mark.netns, pytest.mark.skipif(not ok, reason=why)]
MODEL_BYTES = ELEMENTS * 4


@pytest.fixture(scope="module")
def ranks(tmp_path_factory: pytest.TempPathFactory) -> list[dict]:
    out = tmp_path_factory.mktemp("hierarchical")
    torchrun_on_two_machines(SCRIPT, out, port=29613)
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
