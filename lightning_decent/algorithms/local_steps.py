"""Local steps with an outer optimizer: local SGD, DiLoCo and Streaming DiLoCo, and GASLoC over gossip.

Every rank runs ``H`` inner steps with the user's own optimizer (whose state the synchronisation never
touches) from an anchor ``a_i``, then synchronises. With ``x_i`` the rank's model after its local
steps, the pseudo-gradient is ``Delta_i = a_i - x_i``; the outer optimizer (a stock ``torch.optim``
optimizer on the flat anchor buffers, see :mod:`~lightning_decent.algorithms.outer`) treats it as the
gradient of the anchor, and the synchronisation ends with ``x_i <- a_i``.

* :class:`DiLoCo` and :class:`LocalSGD` average ``Delta`` exactly over all ranks (one all-reduce per
  synchronisation, whatever the topology), so the anchors stay identical.
* :class:`GASLoC` mixes with the topology's neighbours only: each rank keeps its own anchor and gossips
  the anchor after its outer step. With outer SGD at lr 1 (and ``gossip_momentum=0``) the anchors follow
  D-SGD's recursion and reach consensus as its models do; with a stateful outer optimizer (the default
  Nesterov) each rank's momentum is its own and the anchors need not agree.

Streaming (Douillard et al. 2025): the flat buffer of every bucket is cut into ``F`` contiguous
slices, and fragment ``f`` is the ``f``-th slice of every bucket. With one bucket (a model below
``bucket_size_mb``) a fragment is a run of consecutive parameters, the paper's "sequential" pattern;
with several buckets it takes a slice of each, so it spans the whole depth of the model (neither of the
paper's patterns: its "strided" pattern picks whole layers). The fragments are synchronised at staggered
offsets (:class:`~lightning_decent.algorithms.sync_schedule.SyncSchedule`); a fragment's exchange
can run during the next ``tau`` inner steps and is then merged into the model that kept training,
``x_i <- mix x_i + (1 - mix) a_i`` (the paper's ``alpha``; default 0: ``x_i <- a_i``). The one place
a synchronisation uses the network is :meth:`LocalSteps.exchange`.

Compression (``compression="int8"`` ...; :mod:`~lightning_decent.comm.compression`): what a rank sends at
a synchronisation, ``v`` (``Delta_i`` for DiLoCo, ``y_i`` for GASLoC), goes on the wire as ``C(v + e_i)``
with error feedback, ``e_i <- v + e_i - C(v + e_i)`` (:class:`~lightning_decent.algorithms.ErrorFeedback`;
the residual is checkpointed per bucket and fragment), and a rank's own term is the value its
neighbours decode, so the network mean of what was sent is kept. DiLoCo's average is the compressed
two-stage average (reduce-scatter, then all-gather of compressed shard averages, each stage with its
residual); GASLoC's gossip round sends one payload per out-neighbour. With ``delay > 0`` the transfer
runs in the background as the uncompressed one does (for the two-stage average: its first stage; the
second, half of the bytes, runs when the exchange is applied).

Evaluation (the strategy's network average of the live models) sees ``(1/n) sum_i x_i``: right after a
synchronisation ``x_i = a_i``; mid-period the average of the ranks' local progress from the anchor,
which is what a local-SGD synchronisation at that step would produce, without the outer optimizer's
extrapolation.
"""

from __future__ import annotations

import weakref
from abc import abstractmethod
from typing import Any, ClassVar

import torch

from lightning_decent.algorithms.base import Algorithm, Bucket
from lightning_decent.algorithms.error_feedback import RESIDUAL, SHARD_RESIDUAL, ErrorFeedback, allocate_residuals
from lightning_decent.algorithms.outer import build_outer_optimizer, check_outer_optimizer, outer_state_models
from lightning_decent.algorithms.sync_schedule import SyncSchedule
from lightning_decent.comm import Communicator, Compressor, get_compressor
from lightning_decent.comm.base import PendingMix, refuse_non_finite

ANCHOR = "anchor"  # a_i: where the current local steps started (bucket state)
EXCHANGE = "exchange"  # what is on the wire: Delta (DiLoCo) or y (GASLoC); state while it can be in flight
IN_FLIGHT = "in_flight"  # [F] int64: the step after which each fragment's exchange started, -1 if none
OUTER_OPTIMIZER = "outer_optimizer"  # key of the outer optimizer's state_dict in a bucket's checkpoint


class _BucketSync:
    """One bucket's outer optimizer (one ``torch.optim`` parameter per fragment: the anchor's slices) and
    its exchanges in flight, ``fragment -> (round, index of the bucket's buffer in it)``."""

    def __init__(self, optimizer: torch.optim.Optimizer, bounds: list[tuple[int, int]]) -> None:
        self.optimizer = optimizer
        self.bounds = bounds
        self.pending: dict[int, tuple[PendingMix, int]] = {}

    def complete(self) -> None:
        """Finish every exchange in flight into its buffer (the result it will have when applied)."""
        for pending, index in self.pending.values():
            pending.finish(index)
        self.pending.clear()


class LocalSteps(Algorithm):
    """The local-steps family (see the module docstring); subclasses say what is exchanged and how it
    is applied (:meth:`_prepare`, :meth:`_apply`, :meth:`exchange`).

    Args:
        H: inner steps between two synchronisations of the same fragment.
        outer_optimizer: ``sgd``, ``nesterov``, ``adam`` or ``adamw`` (see
            :data:`~lightning_decent.algorithms.outer.OUTER_OPTIMIZERS`).
        outer_lr: the outer learning rate.
        outer_momentum: SGD/Nesterov momentum, or Adam's ``beta1``.
        outer_weight_decay: the outer optimizer's ``weight_decay`` (default 0 for every outer optimizer,
            ``adamw`` included: torch's AdamW default of 0.01 is not used).
        fragments: ``F``, streaming fragments per bucket (1: the whole model at once).
        delay: ``tau``, inner steps a fragment's exchange overlaps before it is applied (0: blocking).
        mix: Streaming DiLoCo's merge factor ``alpha``, ``x_i <- alpha x_i + (1 - alpha) a_i`` when a
            synchronisation is applied; 0 (the default, as torchft's): the model restarts from the anchor.
        warmup_steps: ``K``, initial steps that each end with a plain average of the models (``H = 1``,
            no outer optimizer: synchronous training, post-local SGD's warm-up).
        compression: a compressor name (:data:`~lightning_decent.comm.COMPRESSORS`) or a built
            :class:`~lightning_decent.comm.Compressor` for what a synchronisation sends, with error
            feedback (``"none"``: float values as they are); ``DecentralizedStrategy(compression=...)`` sets it.
        compression_options: the compressor's options (``block``, ``fraction``, ``seed``).
    """

    #: The synchronisation is a global average (DiLoCo), which keeps a second error-feedback residual.
    averages: ClassVar[bool] = True

    communicates_every_step: ClassVar[bool] = False
    rounds_per_step: ClassVar[int] = 1
    buffers_per_round: ClassVar[int] = 1

    def __init__(
        self,
        H: int = 16,
        *,
        outer_optimizer: str = "nesterov",
        outer_lr: float = 0.7,
        outer_momentum: float = 0.9,
        outer_weight_decay: float = 0.0,
        fragments: int = 1,
        delay: int = 0,
        mix: float = 0.0,
        warmup_steps: int = 0,
        compression: str | Compressor = "none",
        compression_options: dict[str, Any] | None = None,
    ) -> None:
        self.schedule = SyncSchedule(H, fragments, delay, warmup_steps)
        self.compressor = get_compressor(compression, **(compression_options or {}))
        check_outer_optimizer(outer_optimizer, outer_lr, outer_momentum, outer_weight_decay)
        self.outer_optimizer, self.outer_lr, self.outer_momentum = outer_optimizer, outer_lr, outer_momentum
        self.outer_weight_decay = float(outer_weight_decay)
        self.mix = float(mix)
        if not 0.0 <= self.mix <= 1.0:
            raise ValueError(f"mix must be in [0, 1] (the weight of the local model in the merge); got {mix!r}.")
        self._syncs: weakref.WeakKeyDictionary[Bucket, _BucketSync] = weakref.WeakKeyDictionary()

    # ---- cost ----------------------------------------------------------------------------------------
    @property  # type: ignore[override]
    def extra_memory(self) -> float:
        """Anchor, outer optimizer state, with ``delay > 0`` the exchange buffer in flight, and with a lossy
        compressor its error-feedback residual(s)."""
        in_flight = 1 if self.schedule.delay else 0
        residuals = 0 if self.compressor.lossless else 1 + int(self.averages)
        return 1.0 + outer_state_models(self.outer_optimizer, self.outer_momentum) + in_flight + residuals

    def use_compression(self, compressor: Compressor) -> None:
        self.compressor = compressor

    @property  # type: ignore[override]
    def sends_compressed(self) -> bool:
        return not self.compressor.lossless

    # ---- set-up ---------------------------------------------------------------------------------------
    def enable_overlap(self) -> None:
        raise ValueError(
            f"algorithm={self.name!r} overlaps its synchronisation through its own option delay=tau (Streaming "
            f"DiLoCo: the exchange runs during the next tau local steps); pass algorithm_options={{'delay': 1}} "
            f"instead of overlap=True."
        )

    def init_state(self, bucket: Bucket) -> None:
        bounds = self.schedule.bounds(bucket.params.shape[-1])
        anchor = bucket.params.detach().clone()
        bucket.state[ANCHOR] = anchor
        exchange_home = bucket.state if self.schedule.delay else bucket.workspace
        exchange_home[EXCHANGE] = torch.empty_like(bucket.params)
        bucket.state[IN_FLIGHT] = torch.full((self.schedule.fragments,), -1, dtype=torch.int64)
        if not self.compressor.lossless:
            allocate_residuals(bucket, average=self.averages)
        views = [anchor[..., start:end] for start, end in bounds]
        optimizer = build_outer_optimizer(
            self.outer_optimizer, views, self.outer_lr, self.outer_momentum, self.outer_weight_decay
        )
        self._syncs[bucket] = _BucketSync(optimizer, bounds)

    # ---- the step ------------------------------------------------------------------------------------
    @torch.no_grad()
    def after_step(self, buckets: list[Bucket], comm: Communicator, step: int) -> None:
        comm.reported_step = step  # errors name this step, not the synchronisation's round
        try:
            self._synchronise(buckets, comm, step)
        finally:
            comm.reported_step = None

    def _synchronise(self, buckets: list[Bucket], comm: Communicator, step: int) -> None:
        """Complete the exchanges due after ``step`` and start the one that starts then."""
        if self.schedule.is_warmup(step):
            self._start(buckets, comm, None, step, step, blocking=True)
            for bucket in buckets:
                self._finish(bucket, None)
            return
        for bucket in buckets:
            in_flight = bucket.state[IN_FLIGHT]
            for fragment in range(self.schedule.fragments):
                started = int(in_flight[fragment])
                if started >= 0 and step >= started + self.schedule.delay:
                    self._finish(bucket, fragment)
        starting = self.schedule.starting(step)
        if starting is None:
            return
        fragment, round_ = starting
        blocking = self.schedule.delay == 0
        self._start(buckets, comm, fragment, round_, step, blocking)
        if blocking:
            for bucket in buckets:
                self._finish(bucket, fragment)

    def _region(self, bucket: Bucket, fragment: int | None) -> tuple[Any, slice]:
        """Index of ``fragment``'s slice of a flat buffer (the whole buffer for ``None``)."""
        if fragment is None:
            return (..., slice(None))
        start, end = self._syncs[bucket].bounds[fragment]
        return (..., slice(start, end))

    def _exchange_buffer(self, bucket: Bucket) -> torch.Tensor:
        return bucket.state[EXCHANGE] if self.schedule.delay else bucket.workspace[EXCHANGE]

    def _start(
        self, buckets: list[Bucket], comm: Communicator, fragment: int | None, round_: int, step: int, blocking: bool
    ) -> None:
        """Prepare every bucket's buffer for ``fragment`` (``None``: warm-up, whole model) and exchange them."""
        buffers = []
        for index, bucket in enumerate(buckets):
            region = self._region(bucket, fragment)
            buffer = self._exchange_buffer(bucket)[region]
            self._prepare(bucket, fragment, bucket.params[region], bucket.state[ANCHOR][region], buffer)
            if comm.check_finite:  # before it enters anyone's average or anchor
                part = "the whole model" if fragment is None else f"fragment {fragment}"
                where = f"the synchronisation after step {step}"
                refuse_non_finite(buffer, comm.rank, f"buffer {index} ({part}) about to be sent at {where}")
            buffers.append(buffer)
        pending = self.exchange(buffers, comm, round_, blocking=blocking, feedback=self._feedback(buckets, fragment))
        if fragment is None:
            return
        for index, bucket in enumerate(buckets):
            bucket.state[IN_FLIGHT][fragment] = step
            if pending is not None:
                self._syncs[bucket].pending[fragment] = (pending, index)

    def _feedback(self, buckets: list[Bucket], fragment: int | None) -> ErrorFeedback | None:
        """The error feedback of ``fragment``'s slices of the buckets' residuals (``None`` without compression)."""
        if self.compressor.lossless:
            return None
        regions = [self._region(bucket, fragment) for bucket in buckets]
        residuals = [bucket.state[RESIDUAL][region] for bucket, region in zip(buckets, regions)]
        if not self.averages:
            return ErrorFeedback(residuals)
        return ErrorFeedback(
            residuals, [bucket.state[SHARD_RESIDUAL][region] for bucket, region in zip(buckets, regions)]
        )

    def _finish(self, bucket: Bucket, fragment: int | None) -> None:
        """Complete ``fragment``'s exchange for ``bucket``, apply it to the anchor and merge the model."""
        if fragment is not None:
            entry = self._syncs[bucket].pending.pop(fragment, None)
            if entry is not None:  # else it was completed earlier (wait_pending, or before a checkpoint)
                pending, index = entry
                pending.finish(index)
            bucket.state[IN_FLIGHT][fragment] = -1
        region = self._region(bucket, fragment)
        anchor = bucket.state[ANCHOR][region]
        self._apply(bucket, fragment, anchor, self._exchange_buffer(bucket)[region])
        self._merge(bucket.params[region], anchor, fragment)

    def _merge(self, model: torch.Tensor, anchor: torch.Tensor, fragment: int | None) -> None:
        """``x <- alpha x + (1 - alpha) a`` after a synchronisation (``x <- a`` for ``alpha = 0`` and warm-up)."""
        if fragment is None or self.mix == 0.0:
            model.copy_(anchor)
        else:
            model.lerp_(anchor, 1.0 - self.mix)

    def _outer_step(self, bucket: Bucket, fragment: int | None, anchor: torch.Tensor, delta: torch.Tensor) -> None:
        """``anchor <- outer optimizer step with gradient delta`` (warm-up, ``fragment=None``: ``anchor - delta``)."""
        if fragment is None:
            anchor.sub_(delta)
            return
        optimizer = self._syncs[bucket].optimizer
        parameter = optimizer.param_groups[0]["params"][fragment]
        parameter.grad = delta
        optimizer.step()
        parameter.grad = None

    # ---- what subclasses define ------------------------------------------------------------------------
    @abstractmethod
    def _prepare(
        self, bucket: Bucket, fragment: int | None, model: torch.Tensor, anchor: torch.Tensor, buffer: torch.Tensor
    ) -> None:
        """Fill ``buffer`` with what this rank sends (slices of one bucket; ``fragment=None``: warm-up)."""

    @abstractmethod
    def _apply(self, bucket: Bucket, fragment: int | None, anchor: torch.Tensor, buffer: torch.Tensor) -> None:
        """Update ``anchor`` from the exchanged ``buffer`` (before the model is merged with it)."""

    @abstractmethod
    def exchange(
        self,
        buffers: list[torch.Tensor],
        comm: Communicator,
        round_: int,
        *,
        blocking: bool,
        feedback: ErrorFeedback | None = None,
    ) -> PendingMix | None:
        """The one place a synchronisation uses the network: every buffer becomes its average over the
        topology (``round_`` is the fragment's synchronisation count). ``blocking``: the buffers hold the
        result on return (``None``); else a started exchange whose ``finish(index)`` completes buffer
        ``index``. ``feedback``: send ``C(v + e)`` through :attr:`compressor` with these residuals."""

    # ---- transfers in flight ---------------------------------------------------------------------------
    def wait_pending(self) -> None:
        """Complete every exchange in flight into its buffer (parameters, anchors and the outer optimizer
        unchanged); it is applied at its scheduled step as if it had just arrived."""
        for sync in self._syncs.values():
            sync.complete()

    @torch.no_grad()
    def finish_pending(self, buckets: list[Bucket]) -> None:
        for bucket in buckets:
            for fragment in range(self.schedule.fragments):
                if int(bucket.state[IN_FLIGHT][fragment]) >= 0:
                    self._finish(bucket, fragment)

    # ---- membership changes ----------------------------------------------------------------------------
    @torch.no_grad()
    def cancel_pending(self, buckets: list[Bucket]) -> None:
        """Drop every fragment's exchange in flight (see :meth:`_abandon` for what the fragment keeps)."""
        for bucket in buckets:
            in_flight = bucket.state[IN_FLIGHT]
            for fragment in range(self.schedule.fragments):
                if int(in_flight[fragment]) >= 0:
                    self._syncs[bucket].pending.pop(fragment, None)
                    in_flight[fragment] = -1
                    self._abandon(bucket, fragment)

    def _abandon(self, bucket: Bucket, fragment: int) -> None:
        """What a fragment whose exchange was dropped keeps: by default nothing changes (the exchange was
        prepared from the anchor and the model without writing them), so the model keeps its local
        progress and the fragment's next synchronisation sends it."""

    @torch.no_grad()
    def change_membership(self, buckets: list[Bucket], comm: Communicator, step: int, joined: torch.Tensor) -> None:
        """A joiner starts its local steps from its anchor (``x_j <- a_j``); error-feedback residuals restart
        at zero (the compressed average's shard residual belongs to the old ``n``'s shards)."""
        for bucket in buckets:
            joiner = joined.to(bucket.params.device)
            bucket.params.copy_(torch.where(joiner, bucket.state[ANCHOR], bucket.params))
            for key in (RESIDUAL, SHARD_RESIDUAL):
                if key in bucket.state:
                    bucket.state[key].zero_()

    # ---- checkpoints -----------------------------------------------------------------------------------
    def _config(self) -> dict[str, Any]:
        s = self.schedule
        return {
            "H": s.period,
            "fragments": s.fragments,
            "delay": s.delay,
            "warmup_steps": s.warmup_steps,
            "outer_optimizer": self.outer_optimizer,
            "outer_lr": self.outer_lr,
            "outer_momentum": self.outer_momentum,
            "outer_weight_decay": self.outer_weight_decay,
            "mix": self.mix,
            "compression": self.compressor.describe(),
        }

    def state_dict(self) -> dict[str, Any]:
        return {"config": self._config()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        saved, mine = dict(state["config"]), self._config()
        if "outer_weight_decay" not in saved:  # saved before it was an option: torch's defaults applied
            saved["outer_weight_decay"] = 0.01 if saved.get("outer_optimizer") == "adamw" else 0.0
        differing = {key: (saved.get(key), mine[key]) for key in mine if saved.get(key) != mine[key]}
        if differing:
            described = ", ".join(f"{key}={old!r} (now {new!r})" for key, (old, new) in differing.items())
            raise ValueError(
                f"The checkpoint's {self.name} was saved with {described}: the synchronisation schedule and outer "
                f"optimizer would not continue exactly. Resume with the same options, or pass "
                f"DecentralizedStrategy(resume_from_average=True) (training application: "
                f"strategy.resume_from_average=true)."
            )

    def bucket_state_dict(self, bucket: Bucket) -> dict[str, Any]:
        """The bucket's tensors (anchor, and with ``delay > 0`` the exchange buffer and which fragment is in
        flight; an exchange in flight is completed first) and its outer optimizer's ``state_dict``."""
        sync = self._syncs[bucket]
        sync.complete()
        return {**bucket.state, OUTER_OPTIMIZER: sync.optimizer.state_dict()}

    def load_bucket_state_dict(self, bucket: Bucket, state: dict[str, Any]) -> None:
        tensors = {key: value for key, value in state.items() if key != OUTER_OPTIMIZER}
        super().load_bucket_state_dict(bucket, tensors)
        sync = self._syncs[bucket]
        sync.optimizer.load_state_dict(state[OUTER_OPTIMIZER])
        sync.pending.clear()  # a fragment marked in flight has its completed exchange in the buffer


class DiLoCo(LocalSteps):
    """DiLoCo (Douillard et al., "DiLoCo: Distributed Low-Communication Training of Language Models", 2023),
    with Streaming DiLoCo's fragments and overlap (Douillard et al., "Streaming DiLoCo with overlapping
    communication: towards a distributed free lunch", 2025). For every fragment ``p`` (the whole model
    when ``F = 1``), at its synchronisation after step ``t`` (every ``H`` steps, offset ``p H/F``)::

        Delta_i  = a_p - x_{i,p}                        (pseudo-gradient of rank i)
        Delta    = (1/n) sum_i Delta_i                  (exact average: one all-reduce, started at t)
        a_p     <- OuterOpt(a_p, Delta)                 (after step t + tau; DiLoCo: Nesterov, lr 0.7, 0.9)
        x_{i,p} <- alpha x_{i,p} + (1 - alpha) a_p      (after step t + tau; tau = 0, alpha = 0: x_{i,p} = a_p)

    The anchor ``a_p`` is the "global" fragment, identical on every rank (the same average enters the
    same optimizer); the next pseudo-gradient of the fragment is taken against it, so the ``tau`` local
    steps made while the exchange travelled (kept in proportion ``alpha`` by the merge) count in it.
    With ``F = 1``, ``tau = 0`` this is DiLoCo; with outer SGD, lr 1 and no momentum it is local SGD
    (:class:`LocalSGD`). The topology is not used: the average is exact over all ranks.

    Communication: one model (or fragment) per rank per synchronisation, i.e. ``1/H`` model per step.
    Extra memory: the anchor, the outer optimizer's state (Nesterov: one model) and one model of
    exchange buffer (workspace; persistent with ``delay > 0``).

    Membership change: the anchors and the outer optimizer's state are identical on every member (the
    same average enters the same optimizer), so they stay as they are and a joiner's copies of its
    source's are identical too; the next average is over the ``n'`` members. A joiner starts its local
    steps from the anchor, ``x_j <- a`` (its pseudo-gradient then counts only its own steps). A fragment
    in flight is dropped (:meth:`cancel_pending`): its exchange touched neither anchor nor model, so the
    model keeps the fragment's local progress and its next synchronisation, ``H`` steps later, sends it
    (``Delta_i = a_p - x_{i,p}`` over the longer span). Error-feedback residuals restart at zero (the
    shard residual of the two-stage average belongs to the old ``n``'s shards; the dropped part is at
    most one message's compression error).
    """

    name = "diloco"
    needs_doubly_stochastic = False
    membership_rule = (
        "anchors and outer optimizer state are identical on every member and stay; a joiner starts from the anchor; "
        "a fragment in flight is dropped (its progress is sent at its next sync); error-feedback residuals restart"
    )
    uses_topology = False  # the exact average of every rank: the same on any graph

    def _prepare(
        self, bucket: Bucket, fragment: int | None, model: torch.Tensor, anchor: torch.Tensor, buffer: torch.Tensor
    ) -> None:
        torch.sub(anchor, model, out=buffer)

    def _apply(self, bucket: Bucket, fragment: int | None, anchor: torch.Tensor, buffer: torch.Tensor) -> None:
        self._outer_step(bucket, fragment, anchor, buffer)

    def exchange(
        self,
        buffers: list[torch.Tensor],
        comm: Communicator,
        round_: int,
        *,
        blocking: bool,
        feedback: ErrorFeedback | None = None,
    ) -> PendingMix | None:
        if feedback is not None:
            if blocking:
                feedback.average(comm, buffers, self.compressor, round_)
                return None
            return feedback.start_average(comm, buffers, self.compressor, round_)
        if blocking:
            comm.global_average(buffers)
            return None
        return comm.start_global_average(buffers)


class LocalSGD(DiLoCo):
    """Local SGD (Stich, ICLR 2019; with ``warmup_steps``: post-local SGD, Lin, Stich, Patel & Jaggi,
    ICLR 2020): :class:`DiLoCo` with the outer optimizer SGD, lr 1 and no momentum, i.e. every ``H``
    steps the models are replaced by their exact average, ``x_i <- a - (1/n) sum_j (a - x_j) = (1/n) sum_j x_j``.
    Extra memory: the anchor (plus one model of workspace).
    """

    name = "local_sgd"

    def __init__(
        self,
        H: int = 16,
        *,
        outer_optimizer: str = "sgd",
        outer_lr: float = 1.0,
        outer_momentum: float = 0.0,
        **options: Any,
    ) -> None:
        super().__init__(
            H, outer_optimizer=outer_optimizer, outer_lr=outer_lr, outer_momentum=outer_momentum, **options
        )


GOSSIP_PREVIOUS = "gossip_previous"  # y_i of the fragment's previous synchronisation (GASLoC with gamma > 0)


class GASLoC(LocalSteps):
    """GASLoC (Cagnasso, Belilovsky & Oyallon, "Unifying Local Communications and Local Updates for LLM
    Pretraining", 2026): local steps, an outer optimizer on each rank's own anchor, then gossip with the
    topology's neighbours instead of an all-reduce. The paper's recursion, with ``g_t = x_t - a_t = -Delta_t``
    the drift of the local steps, ``W = I - s Lambda`` the mixing matrix (Laplacian ``Lambda``) and
    ``gamma`` the momentum of its accelerated variant (``gamma = 0``: the plain one)::

        a_{t+1} = W (a_t + eta g_t) + gamma [(a_t + eta g_t) - (a_{t-1} + eta g_{t-1})]

    in which ``a_t + eta g_t`` is an outer SGD step of rate ``eta`` on the pseudo-gradient. Generalised to
    any outer optimizer (the paper's point: DiLoCo's outer optimizer, adaptive ones included), per
    fragment ``p`` and rank ``i``, at its ``t``-th synchronisation::

        Delta_i  = a_{i,p} - x_{i,p}
        y_i      = OuterOpt_i(a_{i,p}, Delta_i)                  (this rank's own outer optimizer state)
        a_{i,p} <- sum_j W[i, j](t) y_j + gamma (y_i - y_i^prev)  (one gossip round; y^prev = x^0 at t = 0)
        x_{i,p} <- alpha x_{i,p} + (1 - alpha) a_{i,p}            (as in :class:`DiLoCo`; tau steps later with delay)

    With outer SGD and ``gamma = 0`` this is D-SGD on the anchors with the pseudo-gradient as gradient,
    so with outer lr 1 the anchors reach consensus as D-SGD's models (exactly, on a problem with a common
    optimum). A stateful outer optimizer (Nesterov, Adam) keeps each rank's state apart, and the anchors
    then need not agree. On
    the complete graph (or ``communicator="allreduce"``) and a linear outer optimizer (SGD, Nesterov) it
    is DiLoCo: the average of the ranks' momentum buffers follows DiLoCo's momentum.

    Args:
        gossip_momentum: ``gamma`` (0: the non-accelerated form).
        options: those of :class:`LocalSteps` (default outer optimizer: DiLoCo's).

    Communication: one model (or fragment) per out-neighbour per synchronisation. Extra memory: as
    :class:`DiLoCo`, plus ``y^prev`` when ``gamma > 0``.

    Membership change: the anchors, outer optimizer states and ``y^prev`` are each member's own, with no
    network invariant (as D-SGD's models), so they stay (a joiner takes its source's and starts its local
    steps from that anchor, ``x_j <- a_j``) and the next round mixes with the new graph's ``W'``. A
    fragment in flight has already taken its outer step (the anchor holds ``y_i``, the optimizer's state
    moved), which cannot be undone for adaptive optimizers, so :meth:`cancel_pending` completes it with
    ``W = I`` for that round: ``a_{i,p} <- y_i + gamma (y_i - y_i^prev)``, then the model is merged as
    after any synchronisation. Error-feedback residuals restart at zero.
    """

    name = "gasloc"
    averages = False
    membership_rule = (
        "anchors and outer states stay each member's own (a joiner starts from its source's anchor); a fragment "
        "in flight completes with W = I (its outer step is kept, no neighbours); error-feedback residuals restart"
    )

    def __init__(self, H: int = 16, *, gossip_momentum: float = 0.0, **options: Any) -> None:
        super().__init__(H, **options)
        if not 0.0 <= gossip_momentum < 1.0:
            raise ValueError(f"gasloc needs 0 <= gossip_momentum < 1; got {gossip_momentum!r}.")
        self.gossip_momentum = gossip_momentum

    @property  # type: ignore[override]
    def extra_memory(self) -> float:
        return super().extra_memory + (1.0 if self.gossip_momentum else 0.0)

    def init_state(self, bucket: Bucket) -> None:
        super().init_state(bucket)
        if self.gossip_momentum:
            bucket.state[GOSSIP_PREVIOUS] = bucket.params.detach().clone()

    def _prepare(
        self, bucket: Bucket, fragment: int | None, model: torch.Tensor, anchor: torch.Tensor, buffer: torch.Tensor
    ) -> None:
        torch.sub(anchor, model, out=buffer)
        self._outer_step(bucket, fragment, anchor, buffer)  # the anchor holds y_i until the exchange is applied
        buffer.copy_(anchor)

    def _apply(self, bucket: Bucket, fragment: int | None, anchor: torch.Tensor, buffer: torch.Tensor) -> None:
        if self.gossip_momentum:
            previous = bucket.state[GOSSIP_PREVIOUS][self._region(bucket, fragment)]
            previous.sub_(anchor).neg_()  # y_i - y_i^prev
            buffer.add_(previous, alpha=self.gossip_momentum)
            previous.copy_(anchor)
        anchor.copy_(buffer)

    def _abandon(self, bucket: Bucket, fragment: int) -> None:
        """Complete the fragment with ``W = I``: the anchor holds ``y_i``, its own outer step."""
        region = self._region(bucket, fragment)
        anchor, buffer = bucket.state[ANCHOR][region], self._exchange_buffer(bucket)[region]
        buffer.copy_(anchor)
        self._apply(bucket, fragment, anchor, buffer)
        self._merge(bucket.params[region], anchor, fragment)

    def exchange(
        self,
        buffers: list[torch.Tensor],
        comm: Communicator,
        round_: int,
        *,
        blocking: bool,
        feedback: ErrorFeedback | None = None,
    ) -> PendingMix | None:
        if feedback is not None:
            if blocking:
                feedback.mix(comm, buffers, self.compressor, round_)
                return None
            return feedback.start_mix(comm, buffers, self.compressor, round_)
        if blocking:
            comm.mix(buffers, round_)
            return None
        return comm.start_mix(buffers, round_)

    def _config(self) -> dict[str, Any]:
        return {**super()._config(), "gossip_momentum": self.gossip_momentum}
