"""``BoundedDDPStrategy``: Lightning's DDP process management with every world-wide collective bounded.

Lightning's barriers, broadcasts, ``sync_dist`` reductions and ``all_gather`` wait as long as the process
group's timeout (30 minutes by default) and, when a rank is lost, fail without naming it. Here they run
through :class:`~lightning_decent.comm.collectives.BoundedCollectives` once the process group exists: each
ends within ``2 x collective_timeout`` and names the ranks that are missing.
"""

from __future__ import annotations

from datetime import timedelta
from typing import Any

import torch
from lightning.pytorch.strategies import DDPStrategy
from typing_extensions import override

from lightning_decent._lightning_private import _all_gather_ddp_if_available, _sync_ddp_if_available
from lightning_decent.comm.collectives import BoundedCollectives


class BoundedDDPStrategy(DDPStrategy):
    """A ``DDPStrategy`` whose collectives are bounded by :attr:`collective_timeout` (set by the subclass).

    While :attr:`_local_collectives` is set (a process that joins a running job sets itself up while the others
    train), Lightning's collectives are this process's own: a barrier returns, a broadcast or reduction returns
    its input, a boolean decision is this process's.
    """

    collective_timeout: timedelta = timedelta(seconds=300)
    _collectives: BoundedCollectives | None = None
    _local_collectives: bool = False
    _explain_losses: bool = True  # roll call after a lost neighbour (BoundedCollectives.explain)

    @property
    def collectives(self) -> BoundedCollectives:
        """The bounded world-wide collectives (built by :meth:`setup_environment`)."""
        if self._collectives is None:
            self._collectives = BoundedCollectives(
                self.global_rank, self.world_size, self.collective_timeout, self._explain_losses
            )
        return self._collectives

    @override
    def setup_environment(self) -> None:
        super().setup_environment()
        self._collectives = None
        self._collectives = self.collectives

    @override
    def teardown(self) -> None:
        if self._collectives is not None:
            self._collectives.close()
            self._collectives = None
        super().teardown()

    @override
    def barrier(self, name: str | None = None) -> None:
        if self._local_collectives:
            return None
        if self._collectives is None:
            return super().barrier(name)
        self._collectives.barrier(f"barrier {name!r}" if name else "barrier")

    @override
    def broadcast(self, obj: Any, src: int = 0) -> Any:
        if self._local_collectives:
            return obj
        if self._collectives is None:
            return super().broadcast(obj, src)
        return self._collectives.broadcast_object(obj, src, f"broadcast from rank {src}")

    @override
    def reduce(self, tensor: Any, group: Any | None = None, reduce_op: Any | None = "mean") -> Any:
        if self._local_collectives:
            return tensor
        if self._collectives is None or group is not None or not isinstance(tensor, torch.Tensor):
            return super().reduce(tensor, group, reduce_op)
        group = self._collectives.group
        return self._collectives.run(
            "metric reduction (sync_dist, ModelCheckpoint)", lambda: _sync_ddp_if_available(tensor, group, reduce_op)
        )

    @override
    def reduce_boolean_decision(self, decision: bool, all: bool = True) -> bool:
        if self._local_collectives:
            return decision
        return super().reduce_boolean_decision(decision, all)

    @override
    def all_gather(self, tensor: torch.Tensor, group: Any | None = None, sync_grads: bool = False) -> torch.Tensor:
        if self._local_collectives:
            return tensor.unsqueeze(0)
        if self._collectives is None or group is not None:
            return super().all_gather(tensor, group, sync_grads)
        group = self._collectives.group
        return self._collectives.run("all_gather", lambda: _all_gather_ddp_if_available(tensor, group, sync_grads))
