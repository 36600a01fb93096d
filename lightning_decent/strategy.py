"""``DecentralizedStrategy``: neighbour-only gossip training inside Lightning."""

from __future__ import annotations

import contextlib
import logging
import math
import os
import pickle
import shutil
import signal
import subprocess
import time
import uuid
from collections.abc import Callable
from datetime import timedelta
from pathlib import Path
from typing import Any, Literal

import lightning.pytorch as pl
import torch
import torch.distributed as dist
from lightning.fabric.plugins import CheckpointIO, ClusterEnvironment
from lightning.fabric.plugins.collectives.torch_collective import default_pg_timeout
from lightning.pytorch.plugins.precision import Precision
from lightning.pytorch.strategies import DDPStrategy, StrategyRegistry
from lightning.pytorch.trainer.states import TrainerFn
from lightning.pytorch.utilities.exceptions import SIGTERMException
from lightning.pytorch.utilities.rank_zero import rank_zero_warn
from torch.optim import Optimizer
from typing_extensions import override

from lightning_decent import checkpoint as ckpt
from lightning_decent import rng
from lightning_decent._lightning_private import (
    _all_gather_ddp_if_available,
    _optimizers_to_device,
    _SubprocessScriptLauncher,
    _sync_ddp_if_available,
)
from lightning_decent._version import __version__
from lightning_decent.algorithms import DDP, Algorithm, Bucket, all_reduce_baseline, get_algorithm
from lightning_decent.buckets import ParamBucket, build_buckets
from lightning_decent.comm import (
    AllReduceCommunicator,
    CommStats,
    Communicator,
    Compressor,
    HierarchicalCommunicator,
    P2PCommunicator,
    get_compressor,
)
from lightning_decent.comm.base import MeanPerStep
from lightning_decent.comm.collectives import BoundedCollectives
from lightning_decent.comm.p2p import average_all_reduce
from lightning_decent.topology import HierarchicalTopology, Topology, get_topology
from lightning_decent.topology.graphs import topology_options
from lightning_decent.uneven import EpochAgreement

log = logging.getLogger(__name__)

DECENTRALIZED_KEY = "decentralized"
_CHILD_GRACE_SECONDS = 10.0

EvalModel = Literal["average", "local"]


class DecentralizedStrategy(DDPStrategy):
    """Data-parallel training where every rank keeps its own replica and gossips with its neighbours.

    Process management (launchers, process group, samplers, ``sync_dist``) is Lightning's DDP; the
    model is never wrapped in ``DistributedDataParallel`` and gradients are never all-reduced.
    After every real optimizer step the algorithm mixes the parameters with the neighbours given by
    the topology at the current gossip step.

    With ``overlap=True`` (D-SGD only) that exchange runs during the next step's data loading,
    forward and backward instead: ``x^{k+1} = W x^k - lr d^k`` with the gradient taken at the
    un-mixed ``x^k`` (see :class:`~lightning_decent.algorithms.DSGD`). The exchange is completed
    inside :meth:`optimizer_step`, after the closure (forward, backward, clipping) and the optimizer
    update, never in gradient hooks, so clipping, AMP scaling, LR schedulers and optimizer state
    behave as without overlap. Evaluation, consensus measurement and checkpoints first wait for the
    transfer in flight (parameters unchanged: a checkpoint holds ``x^k`` and a resumed run restarts
    the exchange of ``x^k``, which continues exactly); at the end of ``fit`` the last exchange is
    applied, so every replica ends as ``(W x^K)_i``.

    Args:
        topology: a name from :data:`lightning_decent.topology.TOPOLOGIES` or a built ``Topology``;
            a name is built for the world size at setup.
        algorithm: a name from :data:`lightning_decent.algorithms.ALGORITHMS` or an ``Algorithm``.
        communicator: ``"p2p"`` (neighbour-only point-to-point messages) or ``"allreduce"`` (exact
            averaging: with ``algorithm="dsgd"`` this is the DDP-equivalent baseline
            :class:`~lightning_decent.algorithms.DDP`, gradients averaged before one optimizer step; any
            other algorithm's ``mix`` becomes an exact average of what it mixes). With
            ``topology="hierarchical"``, ``"p2p"`` runs :class:`~lightning_decent.comm.HierarchicalCommunicator`
            (machine average, then ``1/L`` of the model per rank between machines).
        topology_options: keyword arguments for the topology builder (e.g. ``{"p": 0.3}``).
        algorithm_options: keyword arguments for the algorithm.
        bucket_size_mb: parameters are packed into contiguous buckets of at most this size.
        eval_model: ``"average"`` evaluates the network-average model (one all-reduce before
            validation/test/predict, local replicas restored afterwards); ``"local"`` evaluates
            each rank's own replica.
        final_model: ``"average"`` replaces every replica by the network average when ``fit``
            ends (one all-reduce), so the model ``fit`` leaves behind, on every rank and in the
            process that called a spawn launcher, is the one validation reported on; ``"local"``
            leaves each rank its own replica.
        log_consensus_every: log the consensus distance every this many gossip steps (0 = never;
            it costs a global all-reduce).
        log_comm_stats: log ``gossip/bytes_sent``, the bytes this rank sent per optimizer step averaged since
            the previous point, at the steps the trainer's loggers write (every ``log_every_n_steps``).
        gossip_timeout: seconds to wait for a neighbour before failing with its rank named (positive).
        collective_timeout: seconds a world-wide collective waits for the slowest rank before failing with
            the missing ranks named (positive): the evaluation, consensus and final averages, checkpoint
            saves, set-up, global averaging, and Lightning's barriers, broadcasts and ``sync_dist``
            reductions all run through :class:`~lightning_decent.comm.collectives.BoundedCollectives`.
        check_finite: stop with an error naming the rank when a value about to be sent is NaN/Inf,
            instead of spreading it to the neighbours (one reduction per bucket and step).
        resume_from_average: when resuming from a sharded checkpoint saved with another world size,
            topology or algorithm, start every rank from its network-average model (fresh optimizer
            and algorithm state) instead of refusing.
        overlap: overlap each step's neighbour exchange with the next step's computation (one-step
            delayed mixing; D-SGD with the ``"p2p"`` communicator; one extra model of memory).
        compression: what goes on the wire: a name from :data:`lightning_decent.comm.COMPRESSORS`
            (``"int8"``, ``"topk"``, ...) or a built ``Compressor``, handed to the algorithm. Per-step
            gossip compresses through ``algorithm="choco"`` (CHOCO-SGD); ``local_sgd``, ``diloco`` and
            ``gasloc`` compress their synchronisations with error feedback; other algorithms refuse a lossy
            compressor with an error naming it. ``None`` keeps the algorithm's own setting.
        compression_options: keyword arguments for the compressor (``block``, ``fraction``, ``seed``).

    The remaining arguments are Lightning's, as for ``DDPStrategy`` (``timeout`` bounds the start-up
    rendezvous and collectives the strategy does not see, such as torchmetrics' own synchronisation).
    """

    strategy_name = "decentralized"

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
        if communicator not in ("p2p", "allreduce"):
            raise ValueError(f"communicator={communicator!r} is not one of 'p2p', 'allreduce'.")
        for name, value in (("eval_model", eval_model), ("final_model", final_model)):
            if value not in ("average", "local"):
                raise ValueError(f"{name}={value!r} is not one of 'average', 'local'.")
        if bucket_size_mb <= 0:
            raise ValueError(f"bucket_size_mb must be positive, got {bucket_size_mb}.")
        if log_consensus_every < 0:
            raise ValueError(f"log_consensus_every must be >= 0 (0 disables it), got {log_consensus_every}.")
        for name, seconds in (("gossip_timeout", gossip_timeout), ("collective_timeout", collective_timeout)):
            if not seconds > 0:
                raise ValueError(
                    f"{name} must be a positive number of seconds, got {seconds!r}; it bounds every wait for "
                    f"another rank (e.g. {name}=60)."
                )
        self.algorithm = get_algorithm(algorithm, **(algorithm_options or {}))
        if compression is not None or compression_options:
            self.algorithm.use_compression(_compressor(compression, compression_options))
        if overlap:
            _enable_overlap(self.algorithm, communicator)
        if communicator == "allreduce":
            self.algorithm = all_reduce_baseline(self.algorithm)
        if isinstance(self.algorithm, DDP):
            self.algorithm.check_finite = check_finite
        if isinstance(topology, str):
            _check_topology_options(topology, topology_options or {})
        self._topology_spec = topology
        self._topology_options = dict(topology_options or {})
        self._communicator_name = communicator
        self._bucket_bytes = int(bucket_size_mb * 2**20)
        self.eval_model = eval_model
        self.final_model = final_model
        self.log_consensus_every = log_consensus_every
        self.log_comm_stats = log_comm_stats
        self.gossip_timeout = timedelta(seconds=gossip_timeout)
        self.collective_timeout = timedelta(seconds=collective_timeout)
        self.check_finite = check_finite
        self.resume_from_average = resume_from_average
        self._resumed_from_average = False
        self.topology: Topology | None = None
        self.communicator: Communicator | None = None
        self.gossip_step = 0
        self._buckets: dict[Optimizer, tuple[list[ParamBucket], list[Bucket]]] = {}
        self._eval_backup: list[tuple[torch.Tensor, torch.Tensor]] | None = None
        self._collectives: BoundedCollectives | None = None
        self._prepared_step: int | None = None  # gossip step whose before_step ran at the batch start
        self._agreement: EpochAgreement | None = None
        self._epoch_lengths: list[int | None] = []
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
        self._refuse_sync_batchnorm()
        world_size = self.num_nodes * self.num_processes
        self.topology = self._build_topology(world_size)  # fail before any process-group traffic
        super().setup_environment()
        self._collectives = BoundedCollectives(self.global_rank, self.world_size, self.collective_timeout)
        self._check_ranks_agree()
        previous = self.communicator
        same_graph = previous is not None and previous.topology.fingerprint() == self.topology.fingerprint()
        if not same_graph or previous.closed:
            self.communicator = self._build_communicator()
            if same_graph:
                self.communicator.stats = previous.stats  # counts continue over fit/validate calls
        self._agreement = EpochAgreement(self.global_rank)
        if self._headers_flow:
            assert isinstance(self.communicator, P2PCommunicator)
            self.communicator.headers = self._agreement

    def _build_topology(self, world_size: int) -> Topology:
        if world_size == 1:
            return Topology([torch.ones(1, 1, dtype=torch.float64)], name="single")
        options, spec = dict(self._topology_options), self._topology_spec
        two_level = isinstance(spec, str) and "local_world_size" in topology_options(spec)
        if two_level and not options.get("local_world_size"):
            options["local_world_size"] = self.num_processes  # the ranks Lightning runs on each machine
        topology = get_topology(spec, world_size, **options)
        return self.algorithm.prepare_topology(topology)

    def _check_ranks_agree(self) -> None:
        """Every rank must gossip on the same graph with the same algorithm (one fingerprint exchange)."""
        assert self.topology is not None
        if self.world_size == 1:
            return
        mine = (self.topology.fingerprint(), self.algorithm.name, self._communicator_name)
        everyone = self._guard.all_gather_object(mine, "set-up check of topology/algorithm/communicator")
        differing = [r for r, theirs in enumerate(everyone) if theirs != mine]
        if differing:
            raise RuntimeError(
                f"rank {self.global_rank}: ranks {differing} use a different topology/algorithm/communicator "
                f"({everyone[differing[0]]} vs {mine}). Launch every rank with the same configuration."
            )

    def _build_communicator(self) -> Communicator:
        assert self.topology is not None
        if self._communicator_name == "allreduce":
            return AllReduceCommunicator(
                self.topology, rank=self.global_rank, check_finite=self.check_finite, collectives=self._collectives
            )
        if isinstance(self.topology, HierarchicalTopology):  # W_M (x) 11^T/L: 1/L of the model across machines
            refuse_compression_unsupported_by(self.algorithm, HierarchicalCommunicator)
            return HierarchicalCommunicator(
                self.topology, self.global_rank, timeout=self.gossip_timeout, check_finite=self.check_finite
            )
        return P2PCommunicator(
            self.topology,
            self.global_rank,
            timeout=self.gossip_timeout,
            check_finite=self.check_finite,
            collectives=self._collectives,
        )

    @property
    def _guard(self) -> BoundedCollectives:
        """The bounded world-wide collectives (built in ``setup_environment``)."""
        if self._collectives is None:
            self._collectives = BoundedCollectives(self.global_rank, self.world_size, self.collective_timeout)
        return self._collectives

    # ---- Lightning's collectives, bounded (see comm.collectives) -------------------------------------------
    @override
    def barrier(self, name: str | None = None) -> None:
        if self._collectives is None:
            return super().barrier(name)
        self._collectives.barrier(f"barrier {name!r}" if name else "barrier")

    @override
    def broadcast(self, obj: Any, src: int = 0) -> Any:
        if self._collectives is None:
            return super().broadcast(obj, src)
        return self._collectives.broadcast_object(obj, src, f"broadcast from rank {src}")

    @override
    def reduce(self, tensor: Any, group: Any | None = None, reduce_op: Any | None = "mean") -> Any:
        if self._collectives is None or group is not None or not isinstance(tensor, torch.Tensor):
            return super().reduce(tensor, group, reduce_op)
        group = self._collectives.group
        return self._collectives.run(
            "metric reduction (sync_dist, ModelCheckpoint)", lambda: _sync_ddp_if_available(tensor, group, reduce_op)
        )

    @override
    def all_gather(self, tensor: torch.Tensor, group: Any | None = None, sync_grads: bool = False) -> torch.Tensor:
        if self._collectives is None or group is not None:
            return super().all_gather(tensor, group, sync_grads)
        group = self._collectives.group
        return self._collectives.run("all_gather", lambda: _all_gather_ddp_if_available(tensor, group, sync_grads))

    def _refuse_sync_batchnorm(self) -> None:
        if self._layer_sync is not None:
            raise ValueError(
                "sync_batchnorm=True is not supported by DecentralizedStrategy: SyncBatchNorm all-reduces "
                "over every rank in each forward pass, which defeats decentralized training. Remove "
                "sync_batchnorm=True (each rank keeps local BatchNorm statistics; evaluation averages them)."
            )

    @override
    def setup(self, trainer: pl.Trainer) -> None:
        self._refuse_sync_batchnorm()
        assert self.accelerator is not None and self.model is not None
        self.accelerator.setup(trainer)
        self.model = self.precision_plugin.convert_module(self.model)
        self.model_to_device()
        if trainer.state.fn == TrainerFn.FITTING:
            self._broadcast_initial_state()
            self.setup_optimizers(trainer)
            _optimizers_to_device(self.optimizers, self.root_device)
            self._build_buckets()
            _make_sigterm_check_local(trainer)
        self.setup_precision_plugin()

    @torch.no_grad()
    def _broadcast_initial_state(self) -> None:
        """Replicas start identical: rank 0's parameters and buffers, broadcast once."""
        if self.world_size == 1:
            return
        tensors, group = list(self.lightning_module.state_dict().values()), self._guard.group
        self._guard.run("initial broadcast of rank 0's model", lambda: [dist.broadcast(t, 0, group) for t in tensors])

    def _build_buckets(self) -> None:
        self._buckets = {}
        self._prepared_step = None
        seen: set[int] = set()
        for optimizer in self.optimizers:
            params = [p for group in optimizer.param_groups for p in group["params"] if id(p) not in seen]
            seen.update(id(p) for p in params)
            self.algorithm.check_optimizer(optimizer)
            param_buckets = build_buckets(params, self._bucket_bytes) if params else []
            algo_buckets = []
            for pb in param_buckets:
                if self.algorithm.transforms_gradients:
                    pb.enable_flat_grad()
                bucket = Bucket(pb.flat, pb.grad)
                self.algorithm.init_state(bucket)
                algo_buckets.append(bucket)
            self._buckets[optimizer] = (param_buckets, algo_buckets)

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
        comm, step = self.communicator, self.gossip_step
        epoch_ends = self._epoch_ends_after_this_batch()
        if self._agreement is not None:
            self._agreement.begin_step(step, real=True, last_real=epoch_ends, batch=self._batch_in_epoch())
        if self._prepared_step != step:
            self.algorithm.before_step(buckets, comm, step)
        self._prepared_step = None
        if self.algorithm.transforms_gradients:
            closure = self._closure_with_gradient_transform(closure, param_buckets, buckets, step)
        output = super().optimizer_step(optimizer, closure, model, **kwargs)
        if isinstance(output, torch.Tensor):  # the training loss, for adaptive global averaging
            self.algorithm.observe_loss(output.detach())
        self.algorithm.after_step(buckets, comm, step)
        self.gossip_step += 1
        if self._agreement is not None:
            self._agreement.end_step(real=True)
            if epoch_ends:
                self._end_epoch_with_the_others(buckets)
        if self.log_comm_stats and self._loggers_write_this_step():
            self._log("gossip/bytes_sent", self._bytes_per_step.report(self.gossip_step, comm.stats.bytes_sent))
        if self.log_consensus_every and self.gossip_step % self.log_consensus_every == 0:
            distance, relative = self.consensus_distance()
            self._log("gossip/consensus_distance", distance)
            self._log("gossip/consensus_relative", relative)
        return output

    @override
    def on_train_batch_start(self, batch: Any, batch_idx: int) -> None:
        """Run the algorithm's ``before_step`` before the first forward of an optimizer step.

        With gradient accumulation, Lightning runs the first ``k - 1`` micro-batches outside
        ``optimizer_step``; an algorithm that moves the parameters in ``before_step`` (GUT places them
        at the gossiped model ``M^t``) must do so before their forward passes too, or their gradients are
        taken at the wrong point. The same holds for manual optimization, whose forward runs before
        ``optimizer.step()``. Done for the single optimizer of automatic optimization, or when only one
        optimizer has parameters; with several, ``before_step`` stays inside ``optimizer_step``.
        """
        trainer = self.lightning_module.trainer
        if self._agreement is not None and self._agreement.epoch != trainer.current_epoch:
            self._start_epoch(trainer)
        if len(self._buckets) != 1 or self.communicator is None or self._prepared_step == self.gossip_step:
            return
        ((_, buckets),) = self._buckets.values()
        if self._agreement is not None:
            last_real, batch = self._epoch_ends_after_this_batch(), self._batch_in_epoch()
            self._agreement.begin_step(self.gossip_step, real=True, last_real=last_real, batch=batch)
        self.algorithm.before_step(buckets, self.communicator, self.gossip_step)
        self._prepared_step = self.gossip_step

    # ---- uneven inputs (see lightning_decent.uneven) -----------------------------------------------------
    @override
    def on_train_start(self) -> None:
        """Every rank's number of optimizer steps per epoch (one small bounded all-gather per ``fit``); the
        logged bytes per step count from here."""
        super().on_train_start()
        self._epoch_lengths = self._gather_epoch_lengths()
        self._bytes_per_step = MeanPerStep(self.gossip_step, self.comm_stats.bytes_sent)

    def _gather_epoch_lengths(self) -> list[int | None]:
        trainer = self.lightning_module.trainer
        batches = trainer.num_training_batches
        known = self.lightning_module.automatic_optimization and math.isfinite(batches)
        length = math.ceil(batches / trainer.accumulate_grad_batches) if known else None
        if self.world_size == 1:
            return [length]
        return self._guard.all_gather_object(length, "exchange of epoch lengths (uneven inputs)")

    def _start_epoch(self, trainer: pl.Trainer) -> None:
        assert self._agreement is not None
        if trainer.reload_dataloaders_every_n_epochs and self._agreement.epoch >= 0:  # lengths may change
            self._epoch_lengths = self._gather_epoch_lengths()
        steps_done = (self._batch_in_epoch() - 1) // trainer.accumulate_grad_batches  # > 0 in a resumed epoch
        self._agreement.start_epoch(trainer.current_epoch, self._epoch_lengths, steps_done)

    @property
    def _headers_flow(self) -> bool:
        """Whether every step's gossip carries round headers (point-to-point rounds)."""
        return isinstance(self.communicator, P2PCommunicator) and self.algorithm.rounds_per_step > 0

    def _batch_in_epoch(self) -> int:
        """The current training batch, counted from 1 in its epoch (-1 outside ``fit``)."""
        module = self.lightning_module
        if module is None or module._trainer is None or not module.trainer.training:
            return -1
        return module.trainer.fit_loop.epoch_loop.batch_progress.current.ready

    def _epoch_ends_after_this_batch(self) -> bool:
        module = self.lightning_module
        if module is None or module._trainer is None or not module.trainer.training:
            return False
        trainer = module.trainer
        progress = trainer.fit_loop.epoch_loop.batch_progress
        return progress.is_last_batch or progress.current.ready >= trainer.num_training_batches

    def _end_epoch_with_the_others(self, buckets: list[Bucket]) -> None:
        """After this rank's last real step of the epoch: empty steps until every rank has ended it."""
        assert self._agreement is not None and self.communicator is not None
        while self._agreement.wants_empty_step():
            self._agreement.begin_step(self.gossip_step, real=False)
            self._empty_step(buckets, self.communicator, self.gossip_step)
            self.gossip_step += 1
            self._agreement.end_step(real=False)

    @torch.no_grad()
    def _empty_step(self, buckets: list[Bucket], comm: Communicator, step: int) -> None:
        """The algorithm's step with a zero local gradient and no optimizer update (D-SGD: gossip only)."""
        self.algorithm.before_step(buckets, comm, step)
        if self.algorithm.transforms_gradients:
            for bucket in buckets:
                assert bucket.grads is not None
                bucket.grads.zero_()
            self.algorithm.transform_gradients(buckets, comm, step)
        self.algorithm.after_step(buckets, comm, step)

    def _closure_with_gradient_transform(
        self, closure: Callable[[], Any], param_buckets: list[ParamBucket], buckets: list[Bucket], step: int
    ) -> Callable[[], Any]:
        def run() -> Any:
            output = closure()
            for pb in param_buckets:
                pb.gather_grads()
            assert self.communicator is not None
            self.algorithm.transform_gradients(buckets, self.communicator, step)
            for pb in param_buckets:
                pb.scatter_grads()
            return output

        return run

    def _loggers_write_this_step(self) -> bool:
        """Whether Lightning writes this step's ``on_step`` metrics to its loggers (``log_every_n_steps``):
        a metric logged at any other step only costs ``self.log``'s bookkeeping."""
        module = self.lightning_module
        return (
            module is not None and module._trainer is not None and module.trainer._logger_connector.should_update_logs
        )

    def _log(self, name: str, value: float) -> None:
        module = self.lightning_module
        if module is not None and module._current_fx_name is not None:
            module.log(name, float(value), on_step=True, on_epoch=False, batch_size=1)

    @torch.no_grad()
    def consensus_distance(self) -> tuple[float, float]:
        """``(1/n) sum_i ||x_i - x_bar||^2`` and its ratio to ``||x_bar||^2`` (a global collective)."""
        self.algorithm.wait_pending()
        flats = [b.params for _, buckets in self._buckets.values() for b in buckets]
        if self.world_size == 1 or not flats:
            return 0.0, 0.0
        means = [x.clone() for x in flats]
        sums = torch.zeros(2, dtype=torch.float64, device=flats[0].device)

        def measure() -> None:
            average_all_reduce(means, self._guard.group)
            for x, mean in zip(flats, means):
                sums[0] += (x - mean).double().pow(2).sum()
                sums[1] += mean.double().pow(2).sum() / self.world_size
            dist.all_reduce(sums, group=self._guard.group)

        self._guard.run("consensus measurement", measure)
        distance = sums[0].item() / self.world_size
        return distance, distance / max(sums[1].item(), torch.finfo(torch.float64).tiny)

    # ---- evaluation on the network average -------------------------------------------------------
    def _average_module_in_place(self) -> None:
        """Replace parameters and floating-point buffers by their network average; keep a backup."""
        self.algorithm.wait_pending()
        if self.world_size == 1 or self.eval_model != "average" or self._eval_backup is not None:
            return
        tensors, averaged = self._module_average()
        with torch.no_grad():
            self._eval_backup = [(t, t.clone()) for t in tensors]
            torch._foreach_copy_(tensors, averaged)

    def _module_average(self) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        """The module's parameters and floating-point buffers, and their network average (new tensors)."""
        tensors = _floating_tensors(self.lightning_module.state_dict())
        return tensors, network_average(tensors, self._average_weight(), self._guard, "network average of the model")

    def _restore_local_replica(self) -> None:
        if self._eval_backup is None:
            return
        with torch.no_grad():
            targets, backups = zip(*self._eval_backup)
            torch._foreach_copy_(list(targets), list(backups))
        self._eval_backup = None

    @override
    def on_train_end(self) -> None:
        """Apply the exchange still in flight (overlap): it was sent already, and it brings the replicas
        closer; then, with ``final_model="average"``, make every replica the network average."""
        for _, buckets in self._buckets.values():
            self.algorithm.finish_pending(buckets)
        if self.final_model == "average" and self.world_size > 1:
            with torch.no_grad():
                torch._foreach_copy_(*self._module_average())
        super().on_train_end()

    @override
    def teardown(self) -> None:
        """Release the communicator's process groups (a later ``fit``/``validate`` builds a new one,
        which keeps counting ``comm_stats``)."""
        if self.communicator is not None:
            self.communicator.close()
        if self._collectives is not None:
            self._collectives.close()
            self._collectives = None
        super().teardown()

    @override
    def on_validation_start(self) -> None:
        self._average_module_in_place()

    @override
    def on_validation_end(self) -> None:
        self._restore_local_replica()

    @override
    def on_test_start(self) -> None:
        self._average_module_in_place()

    @override
    def on_test_end(self) -> None:
        self._restore_local_replica()

    @override
    def on_predict_start(self) -> None:
        self._average_module_in_place()

    @override
    def on_predict_end(self) -> None:
        self._restore_local_replica()

    # ---- checkpoints -----------------------------------------------------------------------------
    @override
    def on_exception(self, exception: BaseException) -> None:
        """Stop this node's other ranks too: a failed decentralized run must not leave hung processes.

        Lightning leaves the processes it launched running when the launching rank fails; with
        gossip, a hung neighbour (the usual cause of a ``PeerTimeoutError``) would then never exit.
        """
        super().on_exception(exception)
        launcher = self.launcher
        if isinstance(launcher, _SubprocessScriptLauncher) and getattr(launcher, "procs", None):
            _give_children_time_to_report(launcher.procs, seconds=_CHILD_GRACE_SECONDS)
            launcher.kill(signal.SIGKILL)

    @property
    @override
    def lightning_restore_optimizer(self) -> bool:
        # A resume from the network average starts with fresh optimizer state.
        return not self._resumed_from_average

    @override
    def save_checkpoint(
        self, checkpoint: dict[str, Any], filepath: str | os.PathLike, storage_options: Any | None = None
    ) -> None:
        """Write ``filepath`` with the network average and every rank's shard beside it (every rank calls
        this; see :mod:`lightning_decent.checkpoint`)."""
        if storage_options is not None:
            raise TypeError("DecentralizedStrategy.save_checkpoint does not accept storage_options.")
        self.algorithm.wait_pending()
        final = Path(self.broadcast(str(filepath)))
        token = self.broadcast(uuid.uuid4().hex[:12])
        shards = ckpt.shard_dir(final)
        staging = ckpt.staging_path(shards, token)
        if self.is_global_zero:
            staging.mkdir(parents=True)
        self.barrier("checkpoint save: staging directory")
        own = staging / ckpt.rank_file(self.global_rank)
        self.checkpoint_io.save_checkpoint({**checkpoint, DECENTRALIZED_KEY: self._decentralized_state()}, own)
        hashes = dict(self._guard.all_gather_object((own.name, ckpt.sha256(own)), "checkpoint save: shard hashes"))
        average = self._average_state_dict(checkpoint["state_dict"])
        if self.is_global_zero:
            top = ckpt.staging_path(final, token)
            record = ckpt.record(shards, token, self.world_size)
            self.checkpoint_io.save_checkpoint({**checkpoint, "state_dict": average, ckpt.RECORD_KEY: record}, top)
            ckpt.write_meta(staging, self._checkpoint_meta(token), hashes)
            ckpt.commit(staging, shards)
            ckpt.commit(top, final)
            ckpt.remove_stale_staging(final.parent, token)
        self.barrier("checkpoint save: commit")

    @override
    def remove_checkpoint(self, filepath: str | os.PathLike) -> None:
        """Remove a checkpoint file and its shard directory (``ModelCheckpoint`` keeping its top k)."""
        super().remove_checkpoint(filepath)
        shards = ckpt.shard_dir(filepath)
        if self.is_global_zero and shards.is_dir():
            shutil.rmtree(shards, ignore_errors=True)

    def _average_state_dict(self, state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        if self.world_size == 1:
            return state
        keys = [k for k, t in state.items() if t.is_floating_point()]
        average = network_average([state[k] for k in keys], self._average_weight(), self._guard, "checkpoint average")
        return {**state, **dict(zip(keys, average))}

    def _average_weight(self) -> float:
        """This rank's weight in the network average (push-sum: ``v_i``; otherwise 1)."""
        return self.algorithm.average_weight([b for _, buckets in self._buckets.values() for b in buckets])

    def _checkpoint_meta(self, token: str) -> ckpt.CheckpointMeta:
        assert self.topology is not None
        return ckpt.CheckpointMeta(
            world_size=self.world_size,
            topology=self.topology.name,
            topology_fingerprint=self.topology.fingerprint(),
            algorithm=self.algorithm.name,
            communicator=self._communicator_name,
            gossip_step=self.gossip_step,
            library_version=__version__,
            token=token,
        )

    def _decentralized_state(self) -> dict[str, Any]:
        return {
            "gossip_step": self.gossip_step,
            "algorithm": self.algorithm.state_dict(),
            "buckets": [[self.algorithm.bucket_state_dict(b) for b in group] for _, group in self._buckets.values()],
            "rng": rng.collect_states(),
        }

    def _restore_decentralized_state(self, state: dict[str, Any]) -> None:
        self.gossip_step = int(state["gossip_step"])
        self.algorithm.load_state_dict(state["algorithm"])
        saved = state["buckets"]
        current = [buckets for _, buckets in self._buckets.values()]
        if [len(b) for b in saved] != [len(b) for b in current]:
            raise ValueError(
                "The checkpoint's parameter buckets do not match this run's (different model, optimizers or "
                "bucket_size_mb). Resume with the same bucket_size_mb, or use resume_from_average=True "
                "(training application: strategy.resume_from_average=true)."
            )
        for saved_group, buckets in zip(saved, current):
            for saved_state, bucket in zip(saved_group, buckets):
                self.algorithm.load_bucket_state_dict(bucket, saved_state)
        rng.restore_states(state["rng"])

    @override
    def load_checkpoint(self, checkpoint_path: str | os.PathLike, weights_only: bool | None = None) -> dict[str, Any]:
        """Resuming ``fit``: each rank reads its own shard (bitwise resume). Evaluating: every rank reads the
        network average (the top-level file). A plain Lightning checkpoint is read as is on every rank."""
        path = Path(checkpoint_path)
        self._resumed_from_average = False
        weights_only = True if weights_only is None else weights_only
        try:
            if ckpt.is_v1_directory(path):
                return self._load_v1_directory(path, weights_only)
            if path.is_dir():
                if not path.name.endswith(ckpt.SHARDS_SUFFIX):
                    ckpt.read_meta(path)  # raises: an incomplete or foreign directory
                path = ckpt.file_of_shard_dir(path)
            return self._load_checkpoint(path, weights_only)
        except pickle.UnpicklingError as err:
            raise pickle.UnpicklingError(
                f"{path} holds objects that torch.load(weights_only=True) refuses (e.g. hyper-parameters that "
                f"are not plain data). If you trust this checkpoint, pass weights_only=False to fit/validate/test. "
                f"{err}"
            ) from err

    @property
    def _fitting(self) -> bool:
        return self.lightning_module is not None and self.lightning_module.trainer.state.fn == TrainerFn.FITTING

    def _load_checkpoint(self, path: Path, weights_only: bool) -> dict[str, Any]:
        record = ckpt.read_record(path, weights_only) if self._fitting else None
        if record is None:  # evaluation, or a plain Lightning checkpoint (DDP's, say): the file itself
            return super().load_checkpoint(path, weights_only=weights_only)
        assert self.topology is not None
        shards = ckpt.shard_dir(path)
        problems = ckpt.shard_problems(
            shards, record, self.world_size, self.topology.fingerprint(), self.algorithm.name
        )
        if problems:
            return self._resume_from_average(path, super().load_checkpoint(path, weights_only=weights_only), problems)
        meta = ckpt.read_meta(shards)
        own = ckpt.rank_file(self.global_rank)
        ckpt.verify(shards, own, meta)
        loaded = self.checkpoint_io.load_checkpoint(shards / own, weights_only=weights_only)
        self._restore_decentralized_state(loaded.pop(DECENTRALIZED_KEY))
        return loaded

    def _resume_from_average(self, path: Path, average: dict[str, Any], problems: list[str]) -> dict[str, Any]:
        """Every rank starts from ``average`` (the network average, loops continued, fresh optimizer and
        algorithm state) if ``resume_from_average``; else refuse naming ``problems``."""
        if not self.resume_from_average:
            raise ValueError(
                f"Cannot resume {path} exactly: {'; '.join(problems)}. Resume with the same configuration, or pass "
                f"DecentralizedStrategy(resume_from_average=True) to start every rank from the checkpoint's "
                f"network-average model (training application: strategy.resume_from_average=true)."
            )
        rank_zero_warn(f"Resuming every rank from the network-average model of {path} (fresh optimizer state).")
        average.pop(ckpt.RECORD_KEY, None)
        average.pop(DECENTRALIZED_KEY, None)
        average.pop("optimizer_states", None)
        self._resumed_from_average = True
        return average

    def _load_v1_directory(self, path: Path, weights_only: bool) -> dict[str, Any]:
        """Format v1: a directory with the rank files, ``average.ckpt`` and ``meta.json``."""
        meta = ckpt.read_meta(path)
        assert self.topology is not None
        problems = meta.incompatibilities(self.world_size, self.topology.fingerprint(), self.algorithm.name)
        if self._fitting and not problems:
            loaded = self.checkpoint_io.load_checkpoint(
                path / ckpt.rank_file(self.global_rank), weights_only=weights_only
            )
            self._restore_decentralized_state(loaded.pop(DECENTRALIZED_KEY))
            return loaded
        loaded = self.checkpoint_io.load_checkpoint(path / ckpt.rank_file(0), weights_only=weights_only)
        average = self.checkpoint_io.load_checkpoint(path / ckpt.AVERAGE_FILE, weights_only=weights_only)
        loaded["state_dict"] = average["state_dict"]
        if not self._fitting:  # evaluation: the network average
            loaded.pop(DECENTRALIZED_KEY, None)
            return loaded
        return self._resume_from_average(path, loaded, [f"it was saved with {', '.join(problems)}"])

    @classmethod
    @override
    def register_strategies(cls, strategy_registry: Any) -> None:
        strategy_registry.register(
            "decentralized", cls, description="Decentralized (gossip) data parallel", start_method="popen"
        )
        strategy_registry.register(
            "decentralized_spawn",
            cls,
            description="Decentralized (gossip) data parallel, spawn launcher",
            start_method="spawn",
        )


def _give_children_time_to_report(procs: list[subprocess.Popen], seconds: float) -> None:
    """Let ranks that are failing too print their own error (naming their lost peer) before the kill."""
    deadline = time.monotonic() + seconds
    for proc in procs:
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(timeout=max(0.0, deadline - time.monotonic()))


def _enable_overlap(algorithm: Algorithm, communicator: str) -> None:
    """Switch ``algorithm`` to its overlapped form, or fail at construction naming the fix."""
    if communicator != "p2p":
        raise ValueError(
            f"overlap=True overlaps the neighbour exchange of communicator='p2p'; communicator={communicator!r} "
            f"has no background transfer. Use communicator='p2p', or overlap=False."
        )
    algorithm.enable_overlap()


def refuse_compression_unsupported_by(algorithm: Algorithm, communicator: type[Communicator]) -> None:
    """Refuse, before training starts, an algorithm that sends compressed payloads through a communicator
    that cannot (rather than failing at its first synchronisation, possibly ``H`` steps later)."""
    if algorithm.sends_compressed and not communicator.sends_compressed:
        raise ValueError(
            f"algorithm={algorithm.name!r} sends compressed payloads, which {communicator.__name__} cannot "
            f"(hierarchical topologies average exactly inside a machine); use a flat topology with the 'p2p' or "
            f"'allreduce' communicator, or drop compression."
        )


def _compressor(compression: str | Compressor | None, options: dict[str, Any] | None) -> Compressor:
    if compression is None:
        raise ValueError(f"compression_options={options!r} need compression=... (e.g. 'int8', 'topk').")
    return get_compressor(compression, **(options or {}))


def _check_topology_options(name: str, options: dict[str, Any]) -> None:
    """Fail at construction, before any process starts, on an unknown topology name or option."""
    accepted = topology_options(name)  # raises for an unknown name, listing the valid ones
    unknown = sorted(set(options) - set(accepted))
    if unknown:
        raise ValueError(
            f"topology {name!r} does not take option(s) {unknown}; its options are: {', '.join(accepted) or 'none'}."
        )


def _make_sigterm_check_local(trainer: pl.Trainer) -> None:
    """Replace the per-step world broadcast of Lightning's SIGTERM flag by a local check.

    Lightning (>= 2.5) broadcasts a SIGTERM flag from rank 0 before every training batch: a
    world-wide synchronisation per step that ties every rank to the slowest one and, when a rank
    hangs, blocks for the whole process-group timeout. Here each rank stops on its own SIGTERM;
    its neighbours then stop with an error naming it.
    """
    epoch_loop = trainer.fit_loop.epoch_loop
    if not hasattr(epoch_loop, "_broadcast_sigterm_tensor"):
        return

    def check_local_sigterm() -> None:
        if getattr(trainer, "received_sigterm", False):
            raise SIGTERMException()

    epoch_loop._broadcast_sigterm_tensor = check_local_sigterm


def _floating_tensors(state: dict[str, torch.Tensor]) -> list[torch.Tensor]:
    return [t for t in state.values() if t.is_floating_point()]


@torch.no_grad()
def network_average(
    tensors: list[torch.Tensor],
    weight: float = 1.0,
    collectives: BoundedCollectives | None = None,
    what: str = "network average",
) -> list[torch.Tensor]:
    """``(1/n) sum_i weight_i t_i`` for every tensor, as new tensors: one all-reduce per dtype and device.

    ``weight`` is this rank's ``weight_i`` (push-sum's ``v_i``, which sum to ``n``; 1 otherwise). With
    ``collectives`` the all-reduces are bounded and a missing rank is named (``what`` names the average)."""
    groups: dict[tuple[torch.dtype, torch.device], list[int]] = {}
    for index, t in enumerate(tensors):
        groups.setdefault((t.dtype, t.device), []).append(index)
    out: list[torch.Tensor] = list(tensors)
    for indices in groups.values():
        members = [tensors[i].detach() for i in indices]
        flat = torch.cat([m.reshape(-1) for m in members])  # a copy, also of a single tensor
        if weight != 1.0:
            flat.mul_(weight)
        if collectives is None:
            average_all_reduce([flat])
        else:
            collectives.average([flat], what)
        for i, t in zip(indices, torch._utils._unflatten_dense_tensors(flat, members)):
            out[i] = t
    return out


if "decentralized" not in StrategyRegistry:
    DecentralizedStrategy.register_strategies(StrategyRegistry)
