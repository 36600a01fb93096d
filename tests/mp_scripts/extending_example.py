"""Registers the extension guide's example (docs/extending.md) as the guide says and reports what it does.

Run by ``tests/test_extending.py`` in its own process, so that the example's names stay out of the registries
of the test session. Usage: ``extending_example.py DIR`` with the guide's files written under ``DIR``
(``relaxed_dsgd.py``, ``band_ring.py``, ``relaxed_dsgd.yaml``, ``band_ring.yaml``); prints one JSON object.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch
from omegaconf import OmegaConf

from lightning_decent import DecentralizedStrategy
from lightning_decent.algorithms import ALGORITHMS, Bucket, get_algorithm
from lightning_decent.comm.schedule import gossip_rounds
from lightning_decent.sim import Quadratic, simulate
from lightning_decent.topology import TOPOLOGIES, get_topology, topology_options


def error(build) -> str:
    try:
        build()
    except ValueError as e:
        return str(e)
    return ""


def main(folder: Path) -> dict:
    sys.path.insert(0, str(folder))
    from band_ring import band_ring
    from relaxed_dsgd import RelaxedDSGD

    ALGORITHMS.register("relaxed_dsgd", RelaxedDSGD)
    TOPOLOGIES.register("band_ring", band_ring)

    configs = {name: OmegaConf.load(folder / f"{name}.yaml") for name in ("relaxed_dsgd", "band_ring")}
    algorithm = get_algorithm(configs["relaxed_dsgd"].name, **configs["relaxed_dsgd"].options)
    topology = get_topology(configs["band_ring"].name, 8, **configs["band_ring"].options)
    bucket = Bucket(torch.zeros(4, 10), torch.zeros(4, 10))
    algorithm.init_state(bucket)

    problem, run = Quadratic(n=8), {"steps": 300, "lr": 0.1, "eval_every": 300}
    dsgd = simulate(problem, "dsgd", "band_ring", **run)
    gamma_one = simulate(problem, "relaxed_dsgd", "band_ring", gamma=1.0, **run)
    relaxed = simulate(problem, "relaxed_dsgd", "band_ring", gamma=0.5, **run)
    lazy_dsgd = simulate(problem, "dsgd", "lazy_band_ring", **run)
    on_ring = simulate(problem, "relaxed_dsgd", "ring", gamma=0.5, **run)
    strategy = DecentralizedStrategy(topology="band_ring", algorithm="relaxed_dsgd", algorithm_options={"gamma": 0.8})
    return {
        "algorithm_options": list(ALGORITHMS.options("relaxed_dsgd")),
        "topology_options": list(topology_options("band_ring")),
        "gamma": algorithm.gamma,
        "persistent_state": len(bucket.state),
        "topology_name": topology.name,
        "row": topology.matrix(0)[0].tolist(),
        "doubly_stochastic": topology.doubly_stochastic,
        "gossip_rounds": len(gossip_rounds(topology.matrix(0))),
        "lazy_name": get_topology("lazy_band_ring", 8).name,
        "small_n_rows": {n: get_topology("band_ring", n).matrix(0)[0].tolist() for n in (1, 2, 3)},
        "gamma_one_vs_dsgd": float((gamma_one.params - dsgd.params).abs().max()),
        "half_vs_lazy_dsgd": float((relaxed.params - lazy_dsgd.params).abs().max()),
        "bytes": [dsgd.bytes_sent_per_node_step, relaxed.bytes_sent_per_node_step, on_ring.bytes_sent_per_node_step],
        "consensus": [dsgd.final("consensus"), relaxed.final("consensus")],
        "strategy": [strategy.algorithm.name, strategy.algorithm.gamma],
        "bad_gamma": error(lambda: get_algorithm("relaxed_dsgd", gamma=0.0)),
        "bad_option": error(lambda: get_algorithm("relaxed_dsgd", gama=0.5)),
        "bad_hops": error(lambda: get_topology("band_ring", 8, hops=0)),
        "overlap": error(lambda: DecentralizedStrategy(algorithm="relaxed_dsgd", overlap=True)),
    }


if __name__ == "__main__":
    print(json.dumps(main(Path(sys.argv[1]))))
