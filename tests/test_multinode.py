"""2 "nodes" x 2 processes, each node in its own network namespace, launched with torchrun.

Gossip on a ring of 4 ranks crosses the nodes (rank 1 <-> 2 and 3 <-> 0); the test checks that
the run trains, that Lightning sees 2 nodes, and that the gossip bytes really went over the
namespaces' links (interface counters).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from lightning_decent.emulation import EmulatedCluster, available

ROOT = Path(__file__).resolve().parents[1]
ok, why = available()
pytestmark = [pytest.mark.netns, pytest.mark.skipif(not ok, reason=why)]


def tx_bytes(cluster: EmulatedCluster, host: int) -> int:
    cmd = ["ip", "netns", "exec", cluster.hosts[host].namespace, "cat", "/sys/class/net/eth0/statistics/tx_bytes"]
    return int(subprocess.run(cmd, capture_output=True, text=True, check=True).stdout)


def torchrun(node: int, master: str, out: Path) -> list[str]:
    script = ROOT / "tests" / "mp_scripts" / "multinode.py"
    nodes = ["--nnodes", "2", "--nproc-per-node", "2", "--node-rank", str(node)]
    rendezvous = ["--master-addr", master, "--master-port", "29611"]
    return [sys.executable, "-m", "torch.distributed.run", *nodes, *rendezvous, str(script), str(out)]


def test_two_nodes_in_separate_namespaces_gossip_across_the_link(tmp_path: Path) -> None:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    with EmulatedCluster(2) as cluster:
        master = cluster.hosts[0].address
        nodes = [
            cluster.popen(
                node,
                [
                    sys.executable,
                    "-m",
                    "torch.distributed.run",
                    "--nnodes",
                    "2",
                    "--nproc-per-node",
                    "2",
                    "--node-rank",
                    str(node),
                    "--master-addr",
                    master,
                    "--master-port",
                    "29611",
                    str(ROOT / "tests" / "mp_scripts" / "multinode.py"),
                    str(tmp_path),
                ],
                env=env,
                cwd=tmp_path,
                stdout=subprocess.PIPE,
                stderr=subprocess.STDOUT,
                text=True,
            )
            for node in (0, 1)
        ]
        outputs = [p.communicate(timeout=300)[0] for p in nodes]
        assert [p.returncode for p in nodes] == [0, 0], outputs[0][-3000:] + outputs[1][-3000:]
        sent_over_links = [tx_bytes(cluster, host) for host in (0, 1)]

    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(4)]
    assert [r["node_rank"] for r in ranks] == [0, 0, 1, 1]
    assert {r["cluster_environment"] for r in ranks} == {"TorchElasticEnvironment"}
    assert all(r["world_size"] == 4 for r in ranks), ranks
    assert all(r["val_acc"] > 0.85 for r in ranks), [r["val_acc"] for r in ranks]
    # Each node has exactly one rank with a cross-node neighbour (1 -> 2 and 3 -> 0 on the ring).
    cross_node_bytes = ranks[1]["gossip_step"] * ranks[1]["param_bytes"]
    for host in (0, 1):
        assert sent_over_links[host] >= cross_node_bytes
