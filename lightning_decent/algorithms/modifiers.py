"""Modifiers that compose with any algorithm: periodic/adaptive global averaging and multi-round gossip.

They wrap the base algorithm and hand it a communicator whose ``mix`` is either repeated
``gossip_rounds`` times or, at a global-averaging step, replaced by an exact average
(``comm.global_average``, an all-reduce: the one world-wide collective the user asked for). The
base algorithm's math is untouched, so e.g. ``gradient_tracking`` averages both of its buffers.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Sequence
from typing import Any

import torch

from lightning_decent.algorithms.base import Algorithm, Bucket
from lightning_decent.comm import Communicator
from lightning_decent.topology import Topology

MODIFIER_OPTIONS = ("global_average_every", "adaptive_global_average", "gossip_rounds")

#: Gossip-AGA's exponent (Chen et al., ICML 2021): H = H0 * (f(x^0) / f(x^T))^(1/4).
AGA_EXPONENT = 0.25


class _RoutedCommunicator(Communicator):
    """The communicator the base algorithm sees: ``R`` mixing rounds per call, or a global average."""

    def __init__(self, inner: Communicator, rounds: int) -> None:
        super().__init__(inner.topology)
        self.inner = inner
        self.stats = inner.stats
        self.rounds = rounds
        self.average_globally = False

    def mix(self, buffers: Sequence[torch.Tensor], step: int) -> None:
        if self.average_globally:
            self.inner.global_average(buffers)
            return
        for r in range(self.rounds):  # consecutive phases of a time-varying graph
            self.inner.mix(buffers, step * self.rounds + r)

    def global_average(self, buffers: Sequence[torch.Tensor]) -> None:
        self.inner.global_average(buffers)


class Modified(Algorithm):
    """A base algorithm with global averaging every ``H`` steps and/or ``R`` gossip rounds per step.

    * **Periodic global averaging** (Gossip-PGA / DSGD-PGA; Chen, Yuan, Zhang, Pan, Xu & Yin,
      ICML 2021): at steps ``k`` with ``(k + 1) mod H = 0`` the base algorithm's gossip round is an
      exact average, ``x_i^{k+1} = (1/n) sum_j x_j^{k+1/2}`` for D-SGD. ``H = 1`` averages the
      parameters after every local step (parallel SGD for SGD with or without momentum; for Adam it is
      not DDP, which averages gradients: use ``algorithm="ddp"``). Optimizer state is not averaged.
    * **Adaptive period** (Gossip-AGA, same paper):
      ``H_l = ceil(H_0 (f_0 / f_l)^(1/4))``, where ``f_l`` is the training loss averaged over every
      node and every step of the period that just ended (all-reduced with the average, so all nodes
      agree) and ``f_0`` the first period's: averaging is frequent while the loss is high and gets
      rarer as it falls. The loss reaches the algorithm through :meth:`Algorithm.observe_loss`; a
      period in which no loss was observed, or a non-positive loss, keeps the current ``H``.
    * **Multi-round gossip** (``gossip_rounds = R``): every mixing is ``R`` rounds with consecutive
      phases, ``W(kR + R - 1) ... W(kR)`` (``W^R`` for a static graph); the consensus factor per
      step becomes ``rho^R`` at ``R`` times the communication.

    Communication: the base's buffers, ``R`` rounds per step (one all-reduce instead at global
    steps). Extra memory: the base's.

    Membership change: the base's rule, run on the communicator the base sees at ``step`` (so a rule that
    gossips uses the operator the next step mixes with). The global-averaging schedule continues: it
    counts the global optimizer step, which every member (a joiner through :meth:`state_dict`) shares,
    and the next exact average is over the ``n'`` members. The adaptive period's loss sums of the
    unfinished period restart at zero (they were sums over the old members), so its next ``f_l`` is the
    average over the steps since the change; ``f_0`` and ``H`` are kept.

    Args:
        base: the algorithm to modify.
        global_average_every: ``H``, the (initial, if adaptive) number of steps between global averages.
        adaptive_global_average: adapt ``H`` with the AGA rule.
        gossip_rounds: ``R``, gossip rounds per mixing.
    """

    def __init__(
        self,
        base: Algorithm,
        global_average_every: int | None = None,
        adaptive_global_average: bool = False,
        gossip_rounds: int = 1,
    ) -> None:
        if global_average_every is not None and (
            isinstance(global_average_every, bool)
            or not isinstance(global_average_every, int)
            or global_average_every < 1
        ):
            raise ValueError(f"global_average_every must be an integer >= 1 (or None); got {global_average_every!r}.")
        if adaptive_global_average and global_average_every is None:
            raise ValueError("adaptive_global_average=True needs the initial period: set global_average_every=H0.")
        if isinstance(gossip_rounds, bool) or not isinstance(gossip_rounds, int) or gossip_rounds < 1:
            raise ValueError(f"gossip_rounds must be an integer >= 1; got {gossip_rounds!r}.")
        self.base = base
        self.initial_period = global_average_every
        self.adaptive = adaptive_global_average
        self.gossip_rounds = gossip_rounds
        self.name = base.name + _suffix(global_average_every, adaptive_global_average, gossip_rounds)
        self.needs_doubly_stochastic = base.needs_doubly_stochastic
        self.transforms_gradients = base.transforms_gradients
        self.period = global_average_every
        self.next_global_step = -1 if global_average_every is None else global_average_every - 1
        self.reference_loss: float | None = None
        self._loss_sum: torch.Tensor | None = None
        self._loss_count = 0
        self._routed: _RoutedCommunicator | None = None
        self._warned_no_loss = False

    @property  # type: ignore[override]
    def membership_rule(self) -> str:
        adaptive = "; the adaptive period's loss sums restart" if self.adaptive else ""
        return f"{self.base.membership_rule}; the global-averaging schedule continues{adaptive}"

    # ---- cost (the base's may depend on the graph it was prepared for) -----------------------------
    @property  # type: ignore[override]
    def rounds_per_step(self) -> int:
        return self.base.rounds_per_step * self.gossip_rounds

    @property  # type: ignore[override]
    def buffers_per_round(self) -> int:
        return self.base.buffers_per_round

    @property  # type: ignore[override]
    def extra_memory(self) -> float:
        return self.base.extra_memory

    # ---- delegation ------------------------------------------------------------------------------
    def prepare_topology(self, topology: Topology, *, global_averaging: bool = False) -> Topology:
        prepared = self.base.prepare_topology(topology, global_averaging=global_averaging or self.period is not None)
        if self.period is not None:
            self.base.check_mixing(
                prepared, global_average_every=self.period, adaptive=self.adaptive, gossip_rounds=self.gossip_rounds
            )
        return prepared

    def check_optimizer(self, optimizer: torch.optim.Optimizer) -> None:
        self.base.check_optimizer(optimizer)

    def init_state(self, bucket: Bucket) -> None:
        self.base.init_state(bucket)

    def _route(self, comm: Communicator, step: int) -> Communicator:
        if self._routed is None or self._routed.inner is not comm:
            self._routed = _RoutedCommunicator(comm, self.gossip_rounds)
        self._routed.average_globally = step == self.next_global_step
        return self._routed

    def before_step(self, buckets: list[Bucket], comm: Communicator, step: int) -> None:
        self.base.before_step(buckets, self._route(comm, step), step)

    def transform_gradients(self, buckets: list[Bucket], comm: Communicator, step: int) -> None:
        self.base.transform_gradients(buckets, self._route(comm, step), step)

    def observe_loss(self, loss: torch.Tensor) -> None:
        self.base.observe_loss(loss)
        if not self.adaptive:
            return
        loss = loss.detach().reshape(-1)
        if self._loss_sum is None:
            self._loss_sum = torch.zeros_like(loss, dtype=torch.float64)
        self._loss_sum.add_(loss)
        self._loss_count += 1

    def after_step(self, buckets: list[Bucket], comm: Communicator, step: int) -> None:
        self.base.after_step(buckets, self._route(comm, step), step)
        if step == self.next_global_step:
            if self.adaptive:
                self._adapt_period(comm)
            assert self.period is not None
            self.next_global_step = step + self.period

    # ---- membership changes ----------------------------------------------------------------------
    def cancel_pending(self, buckets: list[Bucket]) -> None:
        self.base.cancel_pending(buckets)

    def change_membership(self, buckets: list[Bucket], comm: Communicator, step: int, joined: torch.Tensor) -> None:
        self._loss_sum = None
        self._loss_count = 0
        self.base.change_membership(buckets, self._route(comm, step), step, joined)

    # ---- adaptive period -------------------------------------------------------------------------
    def _adapt_period(self, comm: Communicator) -> None:
        assert self.initial_period is not None and self.period is not None
        if self._loss_sum is None or self._loss_count == 0:
            if not self._warned_no_loss:
                warnings.warn(
                    "adaptive_global_average saw no training loss (nothing called Algorithm.observe_loss), "
                    f"so the global-averaging period stays at {self.period}.",
                    stacklevel=2,
                )
                self._warned_no_loss = True
            return
        comm.global_average([self._loss_sum])
        loss = self._loss_sum.mean().item() / self._loss_count
        self._loss_sum.zero_()
        self._loss_count = 0
        if not math.isfinite(loss) or loss <= 0:
            return
        if self.reference_loss is None:
            self.reference_loss = loss
        ratio = self.reference_loss / loss
        self.period = max(1, math.ceil(self.initial_period * ratio**AGA_EXPONENT))

    # ---- checkpoints -----------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        return {
            "base": self.base.state_dict(),
            "period": self.period,
            "next_global_step": self.next_global_step,
            "reference_loss": self.reference_loss,
            "loss_sum": self._loss_sum,
            "loss_count": self._loss_count,
        }

    def bucket_state_dict(self, bucket: Bucket) -> dict[str, Any]:
        return self.base.bucket_state_dict(bucket)

    def load_bucket_state_dict(self, bucket: Bucket, state: dict[str, Any]) -> None:
        self.base.load_bucket_state_dict(bucket, state)

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.base.load_state_dict(state["base"])
        self.period = state["period"]
        self.next_global_step = state["next_global_step"]
        self.reference_loss = state["reference_loss"]
        self._loss_sum = state["loss_sum"]
        self._loss_count = state["loss_count"]


def _suffix(global_average_every: int | None, adaptive: bool, gossip_rounds: int) -> str:
    parts = []
    if global_average_every is not None:
        parts.append(f"{'aga' if adaptive else 'pga'}{global_average_every}")
    if gossip_rounds > 1:
        parts.append(f"r{gossip_rounds}")
    return "".join(f"+{p}" for p in parts)


def with_modifiers(
    base: Algorithm,
    global_average_every: int | None = None,
    adaptive_global_average: bool = False,
    gossip_rounds: int = 1,
) -> Algorithm:
    """``base`` wrapped in :class:`Modified` if any modifier is active, else ``base`` itself."""
    if global_average_every is None and not adaptive_global_average and gossip_rounds == 1:
        return base
    return Modified(base, global_average_every, adaptive_global_average, gossip_rounds)
