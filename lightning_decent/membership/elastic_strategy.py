"""``ElasticDDPStrategy``: Lightning's DDP process management whose world is the current membership epoch.

With ``elastic`` options set, the process group is not Lightning's but the one of the first membership epoch
(:class:`~lightning_decent.membership.EpochGroup`), ``global_rank``/``world_size`` (and so ``trainer.global_rank``,
``rank_zero_only`` and the data sampler) follow the epoch, and a part of a step wrapped in :meth:`_survive`
turns the loss of a member into a change of epoch. Steps that every member takes at the same point outside
the gossip step (Lightning's barriers, broadcasts and metric reductions, torchmetrics' synchronisation, the
evaluation average, a checkpoint save) go through :meth:`_retry_after_loss`: after a loss the survivors change
the epoch and take that step again on the new group. What a change rebuilds (topology, communicator,
algorithm state) is the subclass's: :meth:`_leave_epoch` and :meth:`_enter_epoch`.
"""

from __future__ import annotations

import logging
import socket
from collections.abc import Callable
from typing import Any, TypeVar

import torch
from lightning.fabric.utilities.seed import reset_seed
from torchmetrics import Metric
from torchmetrics.utilities.distributed import gather_all_tensors
from typing_extensions import override

from lightning_decent.bounded_strategy import BoundedDDPStrategy
from lightning_decent.membership import ElasticOptions, EpochGroup, is_membership_loss

log = logging.getLogger(__name__)

T = TypeVar("T")


class ElasticDDPStrategy(BoundedDDPStrategy):
    """A ``BoundedDDPStrategy`` whose world can change while it trains (when :attr:`elastic` is set)."""

    elastic: ElasticOptions | None = None
    _elastic: EpochGroup | None = None  # the membership epochs (set up with the process group)
    _joining: bool = False  # a joiner until its first training step; its Lightning collectives are local

    @property
    def _explain_losses(self) -> bool:  # type: ignore[override]
        return self.elastic is None  # an elastic run changes its membership instead of holding a roll call

    @override
    def _configure_launcher(self) -> None:
        super()._configure_launcher()
        environment = self.cluster_environment
        if self.elastic is not None and self.num_processes > 1 and not environment.creates_processes_externally:
            raise ValueError(
                f"elastic training needs every rank started as its own process, but Lightning would start "
                f"{self.num_processes} ranks on this machine itself, and its launcher stops all of them when one "
                f"dies. Start one process per rank (Trainer(devices=1, num_nodes=N) with NODE_RANK and LOCAL_RANK=0 "
                f"set for each, SLURM's srun, or torchrun --nproc-per-node 1), or drop elastic (docs/elastic.md)."
            )

    @override
    def setup_distributed(self) -> None:
        """Elastic runs build the process group of their first membership epoch instead of Lightning's."""
        if self.elastic is None:
            return super().setup_distributed()
        reset_seed()
        self.set_world_ranks()
        self._process_group_backend = self._get_process_group_backend()
        launch_rank = None if self.elastic.joining else self.node_rank * self.num_processes + self.local_rank
        world = self.num_nodes * self.num_processes
        self._elastic = EpochGroup(self.elastic, launch_rank, world, self._process_group_backend, self._timeout)
        self._elastic.next_epoch()
        self._joining = self._local_collectives = self.elastic.joining
        self.set_world_ranks()  # rank_zero_only follows the epoch's rank
        log.warning(self._elastic.describe())

    @property
    @override
    def global_rank(self) -> int:
        epoch = self._elastic.epoch if self._elastic is not None else None
        return epoch.rank if epoch is not None else super().global_rank

    @property
    @override
    def world_size(self) -> int:
        epoch = self._elastic.epoch if self._elastic is not None else None
        return epoch.world_size if epoch is not None else super().world_size

    @property
    @override
    def distributed_sampler_kwargs(self) -> dict[str, Any]:
        return {"num_replicas": self.world_size, "rank": self.global_rank}

    def _survive(self, run: Callable[[], Any]) -> Any:
        """``run()``, a part of a step that communicates; in an elastic run a lost member changes the membership
        instead of ending the run (the interrupted exchange is dropped and ``None`` returned)."""
        if self._elastic is None:
            return run()
        result, lost = _interrupted_by_loss(run)
        if lost is not None:
            self._change_membership(lost)
        return result

    def _retry_after_loss(self, run: Callable[[], T]) -> T:
        """``run()``, a step that every member takes at the same point and that reads the current group when it
        runs (a barrier, a reduction, the evaluation average, a checkpoint save); in an elastic run a lost member
        changes the membership and the survivors take it again on the new epoch's group. Each change has one
        member fewer or fails (``min_ranks``, ``join_timeout``), so this ends."""
        while True:
            if self._elastic is None or self._local_collectives:
                return run()
            result, lost = _interrupted_by_loss(run)
            if lost is None:
                return result
            self._change_membership(lost)

    def _machines_of_members(self) -> list[tuple[str, int]] | None:
        """Every member's machine (host name, ``NODE_RANK``; a joiner's is the machine it runs on), in rank order
        (one small all-gather): what decides whether a two-level topology's machines are whole. ``None`` when
        not elastic (the launcher's layout is checked instead)."""
        if self._elastic is None:
            return None
        here = (socket.gethostname(), self.node_rank)
        return self.collectives.all_gather_object(here, "the members' machines (two-level topology)")

    @override
    def barrier(self, name: str | None = None) -> None:
        barrier = super().barrier
        self._retry_after_loss(lambda: barrier(name))

    @override
    def broadcast(self, obj: Any, src: int = 0) -> Any:
        broadcast = super().broadcast
        return self._retry_after_loss(lambda: broadcast(obj, src))

    @override
    def reduce(self, tensor: Any, group: Any | None = None, reduce_op: Any | None = "mean") -> Any:
        reduce = super().reduce
        if self._elastic is None or not isinstance(tensor, torch.Tensor):
            return self._retry_after_loss(lambda: reduce(tensor, group, reduce_op))
        original = tensor.detach().clone()

        def attempt() -> Any:
            with torch.no_grad():
                tensor.copy_(original)  # a failed all-reduce may have changed it in place
            return reduce(tensor, group, reduce_op)

        return self._retry_after_loss(attempt)

    @override
    def all_gather(self, tensor: torch.Tensor, group: Any | None = None, sync_grads: bool = False) -> torch.Tensor:
        all_gather = super().all_gather
        return self._retry_after_loss(lambda: all_gather(tensor, group, sync_grads))

    def _gather_metric_state(self, tensor: torch.Tensor, group: Any | None = None) -> list[torch.Tensor]:
        """torchmetrics' ``dist_sync_fn`` in an elastic run: its all-gather on the current epoch's group, taken
        again after a loss. A loss between two of one metric's gathers leaves that evaluation's value computed
        from states of two member sets: said in the log."""
        assert self._elastic is not None
        before = self._elastic.epoch
        gathered = self._retry_after_loss(lambda: gather_all_tensors(tensor, group=group))
        if self._elastic.epoch is not before:
            log.warning(
                f"rank {self.global_rank}: the membership changed while a metric synchronised its states; this "
                f"evaluation's value of that metric may combine states of the old and the new members"
            )
        return gathered

    def _route_metric_synchronisation(self, module: torch.nn.Module) -> None:
        """Point every torchmetrics metric of ``module`` without a ``dist_sync_fn`` of its own at
        :meth:`_gather_metric_state` (elastic runs: their all-gathers would otherwise fail on a lost member)."""
        for metric in module.modules():
            if isinstance(metric, Metric) and metric.dist_sync_fn is None:
                metric.dist_sync_fn = self._gather_metric_state

    def _change_membership(self, reason: str) -> None:
        """Leave this epoch, form the next one (its process group) and enter it."""
        assert self._elastic is not None
        self._leave_epoch()
        log.warning(f"rank {self.global_rank}: membership change ({reason})")
        self._elastic.next_epoch()
        self.set_world_ranks()
        self._enter_epoch()
        log.warning(self._elastic.describe())

    def _leave_epoch(self) -> None:
        """Drop what belongs to the epoch being left (exchanges in flight, its groups)."""
        self._collectives = None

    def _enter_epoch(self) -> None:
        """Rebuild what the new epoch needs, with the same collectives in the same order on every member."""


def _interrupted_by_loss(run: Callable[[], T]) -> tuple[T | None, str | None]:
    """``(run(), None)``, or ``(None, why)`` when the loss of a member interrupted it. The change of membership
    that follows runs outside this handler: its traceback would keep the old process groups open."""
    try:
        return run(), None
    except Exception as error:
        if not is_membership_loss(error):
            raise
        return None, f"{type(error).__name__}: {error}"
