"""From the strategy's options to the objects a run uses: the algorithm, the topology and the communicator.

Each builder is a plain function of the options (testable without a Trainer) that fails with an error
naming the fix: :func:`build_algorithm` at construction, before any process starts; :func:`build_topology`
once the world size is known; :func:`build_communicator` once the process group exists.
"""

from __future__ import annotations

import logging
from collections.abc import Hashable, Sequence
from datetime import timedelta
from typing import Any

import torch

from lightning_decent.algorithms import DDP, Algorithm, all_reduce_baseline, get_algorithm
from lightning_decent.comm import COMMUNICATOR_REGISTRY, Communicator, Compressor, P2PCommunicator, get_compressor
from lightning_decent.comm.collectives import BoundedCollectives
from lightning_decent.comm.headers import RoundHeaders
from lightning_decent.topology import HierarchicalTopology, Topology, get_topology
from lightning_decent.topology.graphs import TOPOLOGIES, check_topology_options, topology_options

log = logging.getLogger(__name__)


def check_strategy_options(
    eval_model: str,
    final_model: str,
    bucket_size_mb: float,
    log_consensus_every: int,
    topology: str | Topology,
    topology_options: dict[str, Any] | None,
) -> None:
    """Refuse, at construction, strategy options out of their range or unknown, naming the valid values."""
    if isinstance(topology, str):
        check_topology_options(topology, topology_options or {})
    for name, value in (("eval_model", eval_model), ("final_model", final_model)):
        if value not in ("average", "local"):
            raise ValueError(f"{name}={value!r} is not one of 'average', 'local'.")
    if bucket_size_mb <= 0:
        raise ValueError(f"bucket_size_mb must be positive, got {bucket_size_mb}.")
    if log_consensus_every < 0:
        raise ValueError(f"log_consensus_every must be >= 0 (0 disables it), got {log_consensus_every}.")


def refuse_sync_batchnorm(layer_sync: object | None) -> None:
    """SyncBatchNorm all-reduces over every rank in each forward pass, which defeats decentralized training."""
    if layer_sync is not None:
        raise ValueError(
            "sync_batchnorm=True is not supported by DecentralizedStrategy: SyncBatchNorm all-reduces "
            "over every rank in each forward pass, which defeats decentralized training. Remove "
            "sync_batchnorm=True (each rank keeps local BatchNorm statistics; evaluation averages them)."
        )


def check_ranks_agree(collectives: BoundedCollectives, topology: Topology, algorithm: str, communicator: str) -> None:
    """Every rank must gossip on the same graph with the same algorithm (one fingerprint exchange)."""
    if collectives.world_size == 1:
        return
    mine = (topology.fingerprint(), algorithm, communicator)
    everyone = collectives.all_gather_object(mine, "set-up check of topology/algorithm/communicator")
    differing = [r for r, theirs in enumerate(everyone) if theirs != mine]
    if differing:
        raise RuntimeError(
            f"rank {collectives.rank}: ranks {differing} use a different topology/algorithm/communicator "
            f"({everyone[differing[0]]} vs {mine}). Launch every rank with the same configuration."
        )


def check_communicator(name: str) -> str:
    """The registered communicator ``name`` (``ValueError`` listing the valid names otherwise)."""
    return COMMUNICATOR_REGISTRY.resolve(name)


def build_algorithm(
    algorithm: str | Algorithm,
    options: dict[str, Any] | None = None,
    compression: str | Compressor | None = None,
    compression_options: dict[str, Any] | None = None,
    overlap: bool = False,
    communicator: str = "p2p",
    check_finite: bool = True,
) -> Algorithm:
    """The algorithm a run executes: built by name with ``options``, given its compressor, switched to its
    overlapped form, and, with ``communicator="allreduce"``, turned into its exact-averaging baseline
    (D-SGD becomes :class:`~lightning_decent.algorithms.DDP`)."""
    communicator = check_communicator(communicator)
    built = get_algorithm(algorithm, **(options or {}))
    if compression is not None or compression_options:
        if compression is None:
            raise ValueError(f"compression_options={compression_options!r} need compression=... (e.g. 'int8', 'topk').")
        built.use_compression(get_compressor(compression, **(compression_options or {})))
    if overlap:
        if communicator != "p2p":
            raise ValueError(
                f"overlap=True overlaps the neighbour exchange of communicator='p2p'; communicator={communicator!r} "
                f"has no background transfer. Use communicator='p2p', or overlap=False."
            )
        built.enable_overlap()
    if communicator == "allreduce":
        built = all_reduce_baseline(built)
    if isinstance(built, DDP):
        built.check_finite = check_finite
    return built


def build_topology(
    spec: str | Topology,
    world_size: int,
    options: dict[str, Any],
    algorithm: Algorithm,
    ranks_per_machine: int,
    machines: Sequence[Hashable] | None = None,
) -> Topology:
    """The graph ``algorithm`` gossips on for ``world_size`` ranks. A two-level topology's ``local_world_size``
    defaults to ``ranks_per_machine`` (the ranks the launcher runs on each machine).

    ``machines`` (elastic runs: the machine of every member, in rank order) decides whether a two-level topology
    can run: its machine ``m`` is ranks ``mL .. mL + L - 1``, which must be ``L`` members of one machine, each
    machine once. When a membership change broke that (a machine lost some of its ranks, a joiner started on
    another machine) the members gossip on the family's flat form over the ranks (:func:`flat_form`) until the
    machines are whole again; every member takes the same decision from the same list."""
    if world_size == 1:
        return Topology([torch.ones(1, 1, dtype=torch.float64)], name="single")
    options = dict(options)
    two_level = isinstance(spec, str) and "local_world_size" in topology_options(spec)
    if two_level and not options.get("local_world_size"):
        options["local_world_size"] = ranks_per_machine
    if not two_level or machines is None:
        return algorithm.prepare_topology(get_topology(spec, world_size, **options))
    assert isinstance(spec, str)
    local = int(options["local_world_size"])
    try:
        if not machines_are_whole(machines, local):
            raise ValueError(f"the members' machines are {list(machines)}")
        topology = algorithm.prepare_topology(get_topology(spec, world_size, **options))
    except ValueError as error:
        name, flat_options = flat_form(spec, options)
        log.warning(
            f"{spec} needs whole machines of {local} ranks, which the {world_size} members are not ({error}); the "
            f"members gossip on {name} over the ranks until the machines are whole again"
        )
        return algorithm.prepare_topology(get_topology(name, world_size, **flat_options))
    if isinstance(topology, HierarchicalTopology):
        topology.layout_checked = True  # by the members' machines: each rank's LOCAL_RANK does not apply
    return topology


def machines_are_whole(machines: Sequence[Hashable], local_world_size: int) -> bool:
    """Whether ranks ``mL .. mL + L - 1`` are ``L`` members of one machine for every ``m``, each machine once."""
    if len(machines) % local_world_size:
        return False
    groups = [machines[m : m + local_world_size] for m in range(0, len(machines), local_world_size)]
    return all(len(set(group)) == 1 for group in groups) and len({group[0] for group in groups}) == len(groups)


def flat_form(spec: str, options: dict[str, Any]) -> tuple[str, dict[str, Any]]:
    """The flat topology a two-level one stands in for while its machines are not whole: ``hierarchical``'s
    machine family (with its ``machine_options``) over the ranks; otherwise the one-peer exponential graph (the
    flat form of decent-dp's alternating exponential ring), which exists for every ``n``."""
    if TOPOLOGIES.resolve(spec) == "hierarchical":
        return str(options.get("machines", "one_peer_exponential")), dict(options.get("machine_options") or {})
    return "one_peer_exponential", {}


def refuse_compression_unsupported_by(algorithm: Algorithm, communicator: type[Communicator]) -> None:
    """Refuse, before training starts, an algorithm that sends compressed payloads through a communicator
    that cannot (rather than failing at its first synchronisation, possibly ``H`` steps later)."""
    if algorithm.sends_compressed and not communicator.sends_compressed:
        raise ValueError(
            f"algorithm={algorithm.name!r} sends compressed payloads, which {communicator.__name__} cannot "
            f"(hierarchical topologies average exactly inside a machine); use a flat topology with the 'p2p' or "
            f"'allreduce' communicator, or drop compression."
        )


def build_communicator(
    name: str,
    topology: Topology,
    rank: int,
    algorithm: Algorithm,
    *,
    gossip_timeout: timedelta,
    check_finite: bool,
    collectives: BoundedCollectives,
    headers: RoundHeaders,
) -> Communicator:
    """The registered communicator ``name`` for ``topology`` (:mod:`lightning_decent.comm.registry`), refused
    before training when it cannot send the algorithm's compressed payloads. Point-to-point rounds carry
    ``headers`` (uneven inputs, steps out of line) when the algorithm gossips every step."""
    communicator = COMMUNICATOR_REGISTRY.build(
        name, topology, rank, timeout=gossip_timeout, check_finite=check_finite, collectives=collectives
    )
    refuse_compression_unsupported_by(algorithm, type(communicator))
    if isinstance(communicator, P2PCommunicator) and algorithm.rounds_per_step > 0:
        communicator.headers = headers
    return communicator
