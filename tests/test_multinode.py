"""2 "nodes" x 2 processes, each node in its own network namespace, launched with torchrun.

Gossip on a ring of 4 ranks crosses the nodes (rank 1 <-> 2 and 3 <-> 0); the test checks that
the run trains, that Lightning sees 2 nodes, and that the gossip bytes really went over the
namespaces' links (interface counters).
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from mp_launch import SCRIPTS, torchrun_on_two_machines

from lightning_decent.emulation import available

ok, why = available()
pytestmark = [pytest.mark.netns, pytest.mark.skipif(not ok, reason=why)]


def test_two_nodes_in_separate_namespaces_gossip_across_the_link(tmp_path: Path) -> None:
    sent_over_links = torchrun_on_two_machines(SCRIPTS / "multinode.py", tmp_path, port=29611, timeout=300)

    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(4)]
    assert [r["node_rank"] for r in ranks] == [0, 0, 1, 1]
    assert {r["cluster_environment"] for r in ranks} == {"TorchElasticEnvironment"}
    assert all(r["world_size"] == 4 for r in ranks), ranks
    assert all(r["val_acc"] > 0.85 for r in ranks), [r["val_acc"] for r in ranks]
    # Each node has exactly one rank with a cross-node neighbour (1 -> 2 and 3 -> 0 on the ring).
    cross_node_bytes = ranks[1]["gossip_step"] * ranks[1]["param_bytes"]
    for host in (0, 1):
        assert sent_over_links[host] >= cross_node_bytes
