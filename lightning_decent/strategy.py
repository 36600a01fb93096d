"""``DecentralizedStrategy``: neighbour-only gossip training inside Lightning.

The class holds Lightning's hooks and the wiring only; each job it delegates lives in its own module:
:mod:`~lightning_decent.assembly` (algorithm, topology and communicator from the options),
:mod:`~lightning_decent.uneven` (epoch lengths and empty steps), :mod:`~lightning_decent.evaluation` (the
network-average model), :mod:`~lightning_decent.sharded_checkpoints` (saving and resuming),
:mod:`~lightning_decent.comm.collectives` (bounded world-wide collectives) and
:mod:`~lightning_decent._lightning_private` (every private Lightning name).
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Callable
from datetime import timedelta
from typing import Any, Literal

import lightning.pytorch as pl
import torch
from lightning.fabric.plugins import CheckpointIO, ClusterEnvironment
from lightning.fabric.plugins.collectives.torch_collective import default_pg_timeout
from lightning.pytorch.plugins.precision import Precision
from lightning.pytorch.strategies import StrategyRegistry
from lightning.pytorch.trainer.states import TrainerFn
from torch.optim import Optimizer
from typing_extensions import override

from lightning_decent import checkpoint as ckpt
from lightning_decent import sharded_checkpoints
from lightning_decent._lightning_private import (
    _optimizers_to_device,
    current_hook,
    live_checkpoint,
    loggers_write_this_step,
    make_sigterm_check_local,
    resume_from_checkpoint_in_memory,
    stop_launched_ranks,
    trainer_of,
)
from lightning_decent.algorithms import Algorithm, Bucket
from lightning_decent.assembly import (
    build_algorithm,
    build_communicator,
    build_topology,
    check_ranks_agree,
    check_strategy_options,
    refuse_sync_batchnorm,
)
from lightning_decent.buckets import ParamBucket, bucket_optimizers, with_gradient_transform
from lightning_decent.comm import CommStats, Communicator, Compressor
from lightning_decent.comm.base import MeanPerStep
from lightning_decent.comm.collectives import check_timeout
from lightning_decent.evaluation import AveragedReplica, consensus_distance, replace_by_average
from lightning_decent.membership import ElasticOptions, elastic_options
from lightning_decent.membership.elastic_strategy import ElasticDDPStrategy
from lightning_decent.membership.handover import hand_over
from lightning_decent.sharded_checkpoints import RunIdentity
from lightning_decent.topology import Topology
from lightning_decent.topology.graphs import topology_options
from lightning_decent.uneven import EpochAlignment, empty_step

_CHILD_GRACE_SECONDS = 10.0

EvalModel = Literal["average", "local"]


class DecentralizedStrategy(ElasticDDPStrategy):
    """Data-parallel training where every rank keeps its own replica and gossips with its neighbours.

    Process management (launchers, process group, samplers, ``sync_dist``) is Lightning's DDP; the model is
    never wrapped in ``DistributedDataParallel`` and gradients are never all-reduced. After every real
    optimizer step the algorithm mixes the parameters with the neighbours the topology gives at the current
    gossip step. Every argument, with its default, is in the table of docs/strategy.md.

    Args:
        topology: a name from :data:`lightning_decent.topology.TOPOLOGIES` or a built ``Topology`` (a name is
            built for the world size at set-up).
        algorithm: a name from :data:`lightning_decent.algorithms.ALGORITHMS` or an ``Algorithm``.
        communicator: a name from :data:`lightning_decent.comm.COMMUNICATORS`: ``"p2p"`` (neighbours only;
            machine average first on a two-level topology) or ``"allreduce"`` (exact averaging; with ``dsgd``
            the DDP-equivalent baseline).
        topology_options: keyword arguments of the topology builder (e.g. ``{"p": 0.3}``).
        algorithm_options: keyword arguments of the algorithm.
        bucket_size_mb: parameters are packed into contiguous buckets of at most this size.
        eval_model: ``"average"`` evaluates the network-average model, ``"local"`` each rank's replica.
        final_model: ``"average"`` makes every replica the network average when ``fit`` ends; ``"local"`` not.
        log_consensus_every: log the consensus distance every this many gossip steps (0: never; an all-reduce).
        log_comm_stats: log ``gossip/bytes_sent`` per optimizer step at the steps the loggers write.
        gossip_timeout: seconds to wait for a neighbour before failing with its rank named.
        collective_timeout: seconds a world-wide collective (evaluation, checkpoints, set-up, global averaging,
            Lightning's barriers and ``sync_dist``) waits before failing with the missing ranks named.
        check_finite: stop with the rank named instead of sending NaN/Inf to the neighbours.
        resume_from_average: resume a checkpoint saved with another world size, topology or algorithm from its
            network average (fresh optimizer and algorithm state) instead of refusing.
        overlap: run each step's exchange during the next step's forward and backward (the one-step-delayed
            form of ``dsgd``, ``choco``, ``gradient_tracking`` or ``exact_diffusion``; completed inside
            :meth:`optimizer_step`; the other algorithms refuse it).
        compression: a name from :data:`lightning_decent.comm.COMPRESSORS` or a ``Compressor``, handed to the
            algorithm (``choco`` and the local-steps family use it; the others refuse a lossy one).
        compression_options: keyword arguments of the compressor (``block``, ``fraction``, ``seed``).
        elastic: ``True`` or :class:`~lightning_decent.membership.ElasticOptions` (a dict of them from Hydra):
            a lost rank changes the membership and the others go on; a process started with
            ``elastic.join=true`` joins the running job (docs/elastic.md). Off by default.

    The remaining arguments are Lightning's, as for ``DDPStrategy`` (``timeout`` bounds the start-up
    rendezvous and collectives the strategy does not see, such as torchmetrics' own synchronisation).
    """

    strategy_name = "decentralized"
    #: The graph, the communicator and the gossip step counter of the run (set up in ``setup_environment``).
    topology: Topology | None = None
    communicator: Communicator | None = None
    gossip_step: int = 0
    _epochs: EpochAlignment | None = None
    _prepared_step: int | None = None  # gossip step whose before_step ran at the batch start
    _resumed_from_average: bool = False
    #: Bytes of live state this rank received from a neighbour when it joined a running job (elastic).
    handover_bytes: int = 0
    _joined_this_epoch: bool = False
    _new_world_size: bool = False  # a membership change to log as ``membership/world_size``

    def __init__(
        self,
        topology: str | Topology = "ring",
        algorithm: str | Algorithm = "dsgd",
        communicator: Literal["p2p", "allreduce"] = "p2p",
        *,
        topology_options: dict[str, Any] | None = None,
        algorithm_options: dict[str, Any] | None = None,
        bucket_size_mb: float = 25.0,
        eval_model: EvalModel = "average",
        final_model: EvalModel = "average",
        log_consensus_every: int = 0,
        log_comm_stats: bool = True,
        gossip_timeout: float = 60.0,
        collective_timeout: float = 300.0,
        check_finite: bool = True,
        resume_from_average: bool = False,
        overlap: bool = False,
        compression: str | Compressor | None = None,
        compression_options: dict[str, Any] | None = None,
        elastic: bool | dict[str, Any] | ElasticOptions | None = False,
        accelerator: pl.accelerators.Accelerator | None = None,
        parallel_devices: list[torch.device] | None = None,
        cluster_environment: ClusterEnvironment | None = None,
        checkpoint_io: CheckpointIO | None = None,
        precision_plugin: Precision | None = None,
        process_group_backend: str | None = None,
        timeout: timedelta | None = default_pg_timeout,
        start_method: Literal["popen", "spawn", "fork", "forkserver"] = "popen",
    ) -> None:
        super().__init__(
            accelerator=accelerator,
            parallel_devices=parallel_devices,
            cluster_environment=cluster_environment,
            checkpoint_io=checkpoint_io,
            precision_plugin=precision_plugin,
            process_group_backend=process_group_backend,
            timeout=timeout,
            start_method=start_method,
        )
        check_strategy_options(eval_model, final_model, bucket_size_mb, log_consensus_every, topology, topology_options)
        self.algorithm = build_algorithm(
            algorithm, algorithm_options, compression, compression_options, overlap, communicator, check_finite
        )
        self._topology_spec, self._topology_options = topology, dict(topology_options or {})
        self._communicator_name, self._bucket_bytes = communicator, int(bucket_size_mb * 2**20)
        self.eval_model, self.final_model = eval_model, final_model
        self.log_consensus_every, self.log_comm_stats = log_consensus_every, log_comm_stats
        self.gossip_timeout = check_timeout("gossip_timeout", gossip_timeout)
        self.collective_timeout = check_timeout("collective_timeout", collective_timeout)
        self.check_finite, self.resume_from_average = check_finite, resume_from_average
        self.elastic = elastic_options(elastic)
        self._buckets: dict[Optimizer, tuple[list[ParamBucket], list[Bucket]]] = {}
        self._averaged_replica = AveragedReplica()
        self._bytes_per_step = MeanPerStep()

    # ---- public state -------------------------------------------------------------------------
    @property
    def comm_stats(self) -> CommStats:
        """Messages and bytes this rank sent and received through the communicator so far."""
        return self.communicator.stats if self.communicator is not None else CommStats()

    @property
    def overlap(self) -> bool:
        """Whether the neighbour exchange overlaps the next step's computation."""
        return self.algorithm.overlap

    @property
    @override
    def restore_checkpoint_after_setup(self) -> bool:
        # Restore after the initial broadcast in ``setup``, or it would overwrite restored ranks.
        return True

    # ---- set-up ----------------------------------------------------------------------------------
    @override
    def setup_environment(self) -> None:
        refuse_sync_batchnorm(self._layer_sync)
        if self.elastic is None:  # fail before any process-group traffic
            self.topology = self._build_topology(self.num_nodes * self.num_processes)
        super().setup_environment()  # the process group (elastic: the first membership epoch), bounded collectives
        if self._epochs is None:
            self._epochs = EpochAlignment(self.global_rank)
        self._epochs.agreement.reset()
        self._set_up_gossip()
        if self._joining:  # the members realign their gossip steps at this point of their change
            self._epochs.realign(self.gossip_step, self.collectives, joining=True)

    def _set_up_gossip(self) -> None:
        """The topology for this world, the ranks' agreement on it, and its communicator (kept when the graph
        is the same and it is still open: its counts continue over fit/validate calls)."""
        self.topology = self._build_topology(self.world_size)
        check_ranks_agree(self.collectives, self.topology, self.algorithm.name, self._communicator_name)
        assert self._epochs is not None
        previous = self.communicator
        same_graph = previous is not None and previous.topology.fingerprint() == self.topology.fingerprint()
        if not same_graph or previous.closed:
            self.communicator = build_communicator(
                self._communicator_name,
                self.topology,
                self.global_rank,
                self.algorithm,
                gossip_timeout=self.gossip_timeout,
                check_finite=self.check_finite,
                collectives=self.collectives,
                headers=self._epochs.agreement,
            )
            if same_graph:
                self.communicator.stats = previous.stats

    @override
    def setup(self, trainer: pl.Trainer) -> None:
        refuse_sync_batchnorm(self._layer_sync)
        assert self.accelerator is not None and self.model is not None
        self.accelerator.setup(trainer)
        self.model = self.precision_plugin.convert_module(self.model)
        self.model_to_device()
        if self.elastic is not None:
            self._route_metric_synchronisation(self.lightning_module)
        if trainer.state.fn == TrainerFn.FITTING:
            if not self._joining:  # replicas start identical: rank 0's parameters and buffers
                self.collectives.broadcast_tensors(list(self.lightning_module.state_dict().values()), 0)
            self.setup_optimizers(trainer)
            _optimizers_to_device(self.optimizers, self.root_device)
            self._buckets = bucket_optimizers(self.optimizers, self.algorithm, self._bucket_bytes)
            self._prepared_step = None
            make_sigterm_check_local(trainer)
            if self._joining:  # a joiner resumes from its donor's live checkpoint, as from a checkpoint file
                checkpoint = self._hand_over()
                self.gossip_step = sharded_checkpoints.restore_rank_state(
                    checkpoint.pop(sharded_checkpoints.DECENTRALIZED_KEY), self.algorithm, self._bucket_groups
                )
                resume_from_checkpoint_in_memory(trainer, checkpoint)
        self.setup_precision_plugin()

    def _build_topology(self, world_size: int) -> Topology:
        """The graph for ``world_size`` ranks; a two-level topology's machines hold the ranks Lightning runs on one."""
        options, spec = self._topology_options, self._topology_spec
        two_level = isinstance(spec, str) and "local_world_size" in topology_options(spec)
        machines = self._machines_of_members() if two_level else None
        return build_topology(spec, world_size, options, self.algorithm, self.num_processes, machines)

    @property
    def _bucket_groups(self) -> list[list[Bucket]]:
        """The algorithm's buckets, one list per optimizer."""
        return [buckets for _, buckets in self._buckets.values()]

    # ---- elastic membership (see lightning_decent.membership) ---------------------------------------------
    @override
    def _leave_epoch(self) -> None:
        for buckets in self._bucket_groups:
            self.algorithm.cancel_pending(buckets)
        self.communicator = None  # its groups end with the epoch's process group
        super()._leave_epoch()

    @override
    def _enter_epoch(self) -> None:
        """The new epoch's graph and communicator, the gossip step, the joiners' state, the algorithm's invariants
        (``Algorithm.change_membership``) and the epoch lengths."""
        assert self._elastic is not None and self._epochs is not None
        self._set_up_gossip()
        self.gossip_step = self._epochs.realign(self.gossip_step, self.collectives)
        self._hand_over()
        self._restore_invariants()
        trainer = trainer_of(self.lightning_module)
        if trainer is not None and trainer.state.fn == TrainerFn.FITTING:  # also in fit's validation
            self._epochs.gather_lengths(trainer, self.collectives)
        self._new_world_size = True  # logged at the next step (a change may come in a hook that cannot log)

    def _hand_over(self) -> dict[str, Any]:
        """Donors send their live checkpoint to this epoch's joiners; a joiner returns what it received."""
        assert self._elastic is not None and self.topology is not None
        step, algorithm, groups = self.gossip_step, self.algorithm, self._bucket_groups

        def live_state() -> dict[str, Any]:
            state = sharded_checkpoints.rank_state(step, algorithm, groups)
            return {**live_checkpoint(self.lightning_module.trainer), sharded_checkpoints.DECENTRALIZED_KEY: state}

        received, size = hand_over(self._elastic.joined, self.topology, self.global_rank, step, live_state)
        self.handover_bytes = size or self.handover_bytes
        return received

    def _restore_invariants(self) -> None:
        assert self._elastic is not None
        joined = torch.tensor([self.global_rank in self._elastic.joined])
        for buckets in self._bucket_groups:
            self.algorithm.change_membership(buckets, self._comm, self.gossip_step, joined)

    @property
    def _comm(self) -> Communicator:
        assert self.communicator is not None
        return self.communicator

    # ---- the gossip step -------------------------------------------------------------------------
    @override
    def optimizer_step(
        self,
        optimizer: Optimizer,
        closure: Callable[[], Any],
        model: pl.LightningModule | torch.nn.Module | None = None,
        **kwargs: Any,
    ) -> Any:
        entry = self._buckets.get(optimizer)
        if entry is None or self.communicator is None:
            return super().optimizer_step(optimizer, closure, model, **kwargs)
        param_buckets, buckets = entry
        step, trainer = self.gossip_step, trainer_of(self.lightning_module)
        last_real = self._epochs.begin_real_step(trainer, step) if self._epochs is not None else False
        if self._prepared_step != step:
            self._survive(lambda: self.algorithm.before_step(buckets, self._comm, step))
        self._prepared_step = None
        if self.algorithm.transforms_gradients:
            closure = with_gradient_transform(closure, self.algorithm, self._comm, param_buckets, buckets, step)
        local_step = super().optimizer_step  # the closure (forward, backward, clipping) and the optimizer update
        output = self._survive(lambda: local_step(optimizer, closure, model, **kwargs))
        if isinstance(output, torch.Tensor):  # the training loss, for adaptive global averaging
            self.algorithm.observe_loss(output.detach())
        self._survive(lambda: self.algorithm.after_step(buckets, self._comm, step))
        self.gossip_step += 1
        if self._epochs is not None:
            self.gossip_step = self._epochs.end_real_step(
                last_real,
                self.gossip_step,
                lambda k: self._survive(lambda: empty_step(self.algorithm, buckets, self._comm, k)),
            )
        self._log_gossip_metrics(trainer, self._comm)
        return output

    def _log_gossip_metrics(self, trainer: pl.Trainer | None, comm: Communicator) -> None:
        """Bytes sent per step at the steps the loggers write; the consensus distance every
        ``log_consensus_every`` steps."""
        if self._new_world_size:
            self._log("membership/world_size", self.world_size)
            self._new_world_size = False
        if self.log_comm_stats and trainer is not None and loggers_write_this_step(trainer):
            self._log("gossip/bytes_sent", self._bytes_per_step.report(self.gossip_step, comm.stats.bytes_sent))
        if self.log_consensus_every and self.gossip_step % self.log_consensus_every == 0:
            distance, relative = self.consensus_distance()
            self._log("gossip/consensus_distance", distance)
            self._log("gossip/consensus_relative", relative)

    @override
    def on_train_batch_start(self, batch: Any, batch_idx: int) -> None:
        """Admit joiners at an epoch's start (elastic); run the algorithm's ``before_step`` before the first
        forward of an optimizer step, also of gradient-accumulation micro-batches and manual optimization
        (GUT moves the parameters there). Done when one optimizer has parameters; with several, ``before_step``
        stays inside ``optimizer_step``."""
        trainer = self.lightning_module.trainer
        new_epoch = self._epochs is not None and self._epochs.start_epoch_if_new(trainer, self.collectives)
        joins_here = new_epoch and self._elastic is not None and not self._joined_this_epoch  # an epoch's start
        admit = self._elastic.admit_joiners if self._elastic is not None else None
        if joins_here and admit is not None and self._retry_after_loss(lambda: admit(self.collectives)):
            self._change_membership("processes ask to join")
        self._joined_this_epoch = False
        if len(self._buckets) != 1 or self.communicator is None or self._prepared_step == self.gossip_step:
            return
        (buckets,) = self._bucket_groups
        if self._epochs is not None:
            self._epochs.begin_real_step(trainer, self.gossip_step)
        self._survive(lambda: self.algorithm.before_step(buckets, self._comm, self.gossip_step))
        self._prepared_step = self.gossip_step

    @override
    def on_train_start(self) -> None:
        """Every rank's number of optimizer steps per epoch (uneven inputs, see :mod:`lightning_decent.uneven`;
        one small bounded all-gather per ``fit``); the logged bytes per step count from here."""
        super().on_train_start()
        if self._joining:  # restored: the joiner's side of the members' change (same collectives, same order)
            self._restore_invariants()
            self._joining = self._local_collectives = False
            self._joined_this_epoch = True  # the members admitted it at this epoch's start already
        if self._epochs is not None:
            self._epochs.gather_lengths(self.lightning_module.trainer, self.collectives)
        self._bytes_per_step = MeanPerStep(self.gossip_step, self.comm_stats.bytes_sent)

    def _log(self, name: str, value: float) -> None:
        module = self.lightning_module
        if module is not None and current_hook(module) is not None:
            module.log(name, float(value), on_step=True, on_epoch=False, batch_size=1)

    def consensus_distance(self) -> tuple[float, float]:
        """``(1/n) sum_i ||x_i - x_bar||^2`` and its ratio to ``||x_bar||^2`` (a global collective)."""
        self._survive(self.algorithm.wait_pending)
        flats = [b.params for group in self._bucket_groups for b in group]
        return self._retry_after_loss(lambda: consensus_distance(flats, self.collectives))

    # ---- evaluation and the final model on the network average (see lightning_decent.evaluation) ----------
    def _average_weight(self) -> float:
        """This rank's weight in the network average (push-sum: ``v_i``; otherwise 1)."""
        return self.algorithm.average_weight([b for group in self._bucket_groups for b in group])

    def _evaluate_the_average(self) -> None:
        self._survive(self.algorithm.wait_pending)
        if self.eval_model == "average":
            module, replica = self.lightning_module, self._averaged_replica
            self._retry_after_loss(lambda: replica.swap_in(module, self._average_weight(), self.collectives))

    @override
    def on_train_end(self) -> None:
        """Apply the exchange still in flight (overlap): it was sent already, and it brings the replicas
        closer; then, with ``final_model="average"``, make every replica the network average."""
        for buckets in self._bucket_groups:
            self.algorithm.finish_pending(buckets)
        if self.final_model == "average":
            module = self.lightning_module
            self._retry_after_loss(lambda: replace_by_average(module, self._average_weight(), self.collectives))
        super().on_train_end()

    @override
    def teardown(self) -> None:
        """Release the communicator's process groups (a later ``fit``/``validate`` builds a new one,
        which keeps counting ``comm_stats``)."""
        if self.communicator is not None:
            self.communicator.close()
        super().teardown()

    def _restore_local_replica(self) -> None:
        self._averaged_replica.restore()

    # Validation, test and predict see the network average; the local replicas come back afterwards.
    on_validation_start = on_test_start = on_predict_start = _evaluate_the_average
    on_validation_end = on_test_end = on_predict_end = _restore_local_replica

    @override
    def on_exception(self, exception: BaseException) -> None:
        """Stop this node's other ranks too: a failed decentralized run must not leave hung processes."""
        super().on_exception(exception)
        stop_launched_ranks(self.launcher, grace_seconds=_CHILD_GRACE_SECONDS)

    # ---- checkpoints (see lightning_decent.sharded_checkpoints) -------------------------------------------
    @property
    @override
    def lightning_restore_optimizer(self) -> bool:
        # A resume from the network average starts with fresh optimizer state.
        return not self._resumed_from_average

    def _identity(self) -> RunIdentity:
        assert self.topology is not None
        return RunIdentity.of(self.world_size, self.topology, self.algorithm, self._communicator_name)

    @override
    def save_checkpoint(
        self, checkpoint: dict[str, Any], filepath: str | os.PathLike, storage_options: Any | None = None
    ) -> None:
        """Write ``filepath`` with the network average and every rank's shard beside it (every rank calls
        this; see :mod:`lightning_decent.checkpoint`)."""
        if storage_options is not None:
            raise TypeError("DecentralizedStrategy.save_checkpoint does not accept storage_options.")
        self._survive(self.algorithm.wait_pending)
        self._retry_after_loss(  # elastic: a save a loss interrupted is staged only; the survivors save anew
            lambda: sharded_checkpoints.save(
                checkpoint,
                filepath,
                io=self.checkpoint_io,
                collectives=self.collectives,
                identity=self._identity(),
                own_state=sharded_checkpoints.rank_state(self.gossip_step, self.algorithm, self._bucket_groups),
                average_weight=self._average_weight(),
            )
        )

    @override
    def remove_checkpoint(self, filepath: str | os.PathLike) -> None:
        """Remove a checkpoint file and its shard directory (``ModelCheckpoint`` keeping its top k)."""
        super().remove_checkpoint(filepath)
        shards = ckpt.shard_dir(filepath)
        if self.is_global_zero and shards.is_dir():
            shutil.rmtree(shards, ignore_errors=True)

    @override
    def load_checkpoint(self, checkpoint_path: str | os.PathLike, weights_only: bool | None = None) -> dict[str, Any]:
        """Resuming ``fit``: each rank reads its own shard (bitwise resume). Evaluating: every rank reads the
        network average (the top-level file). A plain Lightning checkpoint is read as is on every rank."""
        module = self.lightning_module
        fitting = module is not None and module.trainer.state.fn == TrainerFn.FITTING
        loaded = sharded_checkpoints.load(
            checkpoint_path,
            io=self.checkpoint_io,
            rank=self.global_rank,
            identity=self._identity() if fitting else None,
            weights_only=True if weights_only is None else weights_only,
            resume_from_average=self.resume_from_average,
        )
        self._resumed_from_average = loaded.from_average
        if loaded.rank_state is not None:
            self.gossip_step = sharded_checkpoints.restore_rank_state(
                loaded.rank_state, self.algorithm, self._bucket_groups
            )
        return loaded.checkpoint

    @classmethod
    @override
    def register_strategies(cls, strategy_registry: Any) -> None:
        for name, launcher in (("decentralized", "popen"), ("decentralized_spawn", "spawn")):
            description = f"Decentralized (gossip) data parallel, {launcher} launcher"
            strategy_registry.register(name, cls, description=description, start_method=launcher)


if "decentralized" not in StrategyRegistry:
    DecentralizedStrategy.register_strategies(StrategyRegistry)
