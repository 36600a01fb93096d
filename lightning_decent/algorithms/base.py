"""The algorithm interface: what each node keeps and computes around its local optimizer step.

An algorithm is written once with element-wise tensor operations on flat parameter buckets and
the communicator's ``mix``/``global_average``, so the same code runs in real multi-process
training (a bucket is this rank's flat parameters, ``[m]``) and in the simulator (a bucket is the
stack of all nodes' parameters, ``[n, m]``). Per-node scalars are shaped ``bucket.shape[:-1] + (1,)``.

The strategy calls, for every optimizer step ``k``::

    algorithm.before_step(buckets, comm, k)        # parameters x^k, before forward/backward
    forward + backward                              # gradients at the (possibly de-biased) model
    algorithm.transform_gradients(buckets, comm, k) # only if ``transforms_gradients``
    optimizer.step()                                # the user's local update (clipping, AMP, LR ...)
    algorithm.observe_loss(loss)                    # this node's training loss (used by adaptive modifiers)
    algorithm.after_step(buckets, comm, k)          # gossip: x^{k+1} from the neighbours

and, in an elastic run, when the member set changes between two steps (see :meth:`Algorithm.cancel_pending`
and :meth:`Algorithm.change_membership`; the simulator runs the same two calls)::

    algorithm.cancel_pending(buckets)               # survivors, with the old communicator's transfers aborted
    (a joiner loads its source's parameters, optimizer state, state_dict and bucket_state_dict)
    algorithm.change_membership(buckets, comm, k, joined)  # every member, on the new communicator
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import Any, ClassVar

import torch

from lightning_decent.comm import Communicator, Compressor
from lightning_decent.topology import Topology


class Bucket:
    """A flat, contiguous group of parameters of one dtype and device, and the algorithm's state for it.

    Args:
        params: the flat parameter tensor (``[m]`` in real training, ``[n, m]`` in the simulator).
        grads: a flat gradient buffer of the same shape, filled by the strategy before
            ``transform_gradients`` and copied back to the parameters' ``.grad`` after it; ``None``
            for algorithms that do not transform gradients.

    ``state`` holds the algorithm's persistent per-bucket tensors (checkpointed by the strategy);
    ``workspace`` holds scratch buffers allocated once in ``init_state`` and reused every step (not
    checkpointed: their content is rewritten before it is read).
    """

    def __init__(self, params: torch.Tensor, grads: torch.Tensor | None = None) -> None:
        self.params = params
        self.grads = grads
        self.state: dict[str, torch.Tensor] = {}
        self.workspace: dict[str, torch.Tensor] = {}

    def node_scalar(self, value: float = 0.0) -> torch.Tensor:
        """A per-node scalar buffer (``[1]`` for a rank, ``[n, 1]`` in the simulator)."""
        return self.params.new_full((*self.params.shape[:-1], 1), value)


#: Workspace key of the parameters as they were before the optimizer step (algorithms that need the
#: step's progress ``x^k - x^{k+1/2}``: ``qg_dsgdm``, the push-sum family).
PREVIOUS = "previous"


def allocate_previous(bucket: Bucket) -> None:
    """Give ``bucket`` a :data:`PREVIOUS` workspace buffer (in ``init_state``)."""
    bucket.workspace[PREVIOUS] = torch.empty_like(bucket.params)


@torch.no_grad()
def save_previous(buckets: list[Bucket]) -> None:
    """Copy every bucket's parameters into its :data:`PREVIOUS` buffer (in ``before_step``)."""
    for b in buckets:
        b.workspace[PREVIOUS].copy_(b.params)


#: The algorithms with an overlapped (one-step-delayed) form, which accept ``overlap=True``.
OVERLAPPED = ("dsgd", "choco", "gradient_tracking", "exact_diffusion")


class Algorithm(ABC):
    """Base class of decentralized algorithms.

    Class attributes describe the cost; the tests hold every registered algorithm to them (bytes sent
    per step, state allocated by :meth:`init_state`):
        communicates_every_step: every optimizer step sends ``rounds_per_step x buffers_per_round``
            buffers to each out-neighbour (False: the local-steps family, which synchronises every ``H``
            steps).
        rounds_per_step: sequential communication rounds per optimizer step.
        buffers_per_round: model-sized buffers sent to each out-neighbour per round.
        extra_memory: persistent per-node state in model sizes, beyond parameters, gradients and
            the user's optimizer state.
        needs_doubly_stochastic: refuse column-stochastic (directed) graphs.
        transforms_gradients: the algorithm rewrites the gradient before the optimizer step.
        uses_topology: the mixing matrix (the topology, and the communicator that realises it) enters the
            algorithm's mathematics; ``False`` for algorithms whose only exchange is an exact average over
            all ranks, which a resume may then continue on another graph.
        sends_compressed: its messages go through the communicator's ``*_compressed`` methods.

        membership_rule: what :meth:`change_membership` does, in one line (docs/elastic.md).

    ``overlap`` is True once :meth:`enable_overlap` switched an algorithm to its overlapped form, in
    which the exchange started in ``after_step`` of step ``k`` runs during the forward and backward
    of step ``k + 1``; such an algorithm may have rounds in flight between steps (see
    :meth:`wait_pending` and :meth:`finish_pending`).
    """

    name: ClassVar[str]
    communicates_every_step: ClassVar[bool] = True
    rounds_per_step: ClassVar[int] = 1
    buffers_per_round: ClassVar[int] = 1
    extra_memory: ClassVar[float] = 0.0
    needs_doubly_stochastic: ClassVar[bool] = True
    transforms_gradients: ClassVar[bool] = False
    uses_topology: ClassVar[bool] = True
    sends_compressed: bool = False
    overlap: bool = False
    membership_rule: ClassVar[str]

    def prepare_topology(self, topology: Topology, *, global_averaging: bool = False) -> Topology:
        """Check that the graph suits the algorithm; return the graph to gossip on.

        Args:
            topology: the graph built for the world size.
            global_averaging: a modifier replaces some gossip rounds by an exact average, so the mixing
                operator changes between steps even on a static graph.

        Raises:
            ValueError: naming the fix, if the graph breaks the algorithm's assumptions.
        """
        if self.needs_doubly_stochastic and not topology.doubly_stochastic:
            raise ValueError(
                f"algorithm={self.name!r} needs a doubly stochastic mixing matrix, but topology "
                f"{topology.name!r} is only column-stochastic (a directed graph). For directed graphs use a "
                f"push-sum algorithm: push_sum, push_diging or mg_push_diging; or an undirected topology."
            )
        return topology

    def check_mixing(  # noqa: B027
        self, topology: Topology, *, global_average_every: int | None, adaptive: bool, gossip_rounds: int
    ) -> None:
        """Raise ``ValueError`` naming the fix if the algorithm breaks when every step mixes with
        ``gossip_rounds`` consecutive phases of ``topology`` and every ``global_average_every``-th step
        with an exact average (``adaptive``: a period that changes at run time). The modifiers call it
        after :meth:`prepare_topology`."""

    def check_optimizer(self, optimizer: torch.optim.Optimizer) -> None:  # noqa: B027
        """Raise ``ValueError`` if the optimizer's update breaks the algorithm's math."""

    def init_state(self, bucket: Bucket) -> None:  # noqa: B027
        """Create the algorithm's per-bucket state (all nodes start from the same parameters)."""

    def before_step(self, buckets: list[Bucket], comm: Communicator, step: int) -> None:  # noqa: B027
        """Runs with the parameters ``x^k``, before forward and backward."""

    def transform_gradients(self, buckets: list[Bucket], comm: Communicator, step: int) -> None:  # noqa: B027
        """Rewrite ``bucket.grads`` in place (only called when ``transforms_gradients``)."""

    def observe_loss(self, loss: torch.Tensor) -> None:  # noqa: B027
        """This step's local training loss (``[]`` on a rank, ``[n]`` in the simulator), reported before
        ``after_step``. Only adaptive modifiers use it (the adaptive global-averaging period)."""

    def enable_overlap(self) -> None:
        """Switch to the overlapped (one-step-delayed) form; algorithms without one refuse (those with one:
        :data:`OVERLAPPED`).

        Raises:
            ValueError: naming the fix.
        """
        raise ValueError(
            f"algorithm={self.name!r} cannot overlap its gossip with computation: its next local step needs "
            f"the neighbours' values of this step. Use overlap=False, or an algorithm with a one-step-delayed "
            f"form: {', '.join(OVERLAPPED)} (e.g. D-SGD's x^(k+1) = W x^k - lr d^k; docs/algorithms.md)."
        )

    def use_compression(self, compressor: Compressor) -> None:
        """Send this algorithm's messages through ``compressor`` (``DecentralizedStrategy(compression=...)``).

        The identity (``"none"``) changes nothing and is accepted by every algorithm; a lossy compressor
        is refused here, and accepted by the algorithms built for it (``choco``).

        Raises:
            ValueError: naming the fix.
        """
        if compressor.lossless:
            return
        raise ValueError(
            f"algorithm={self.name!r} cannot send compressed messages (compression={compressor.describe()!r}): "
            f"its update needs its neighbours' exact values. Per-step gossip with compression is CHOCO-SGD "
            f"(public copies, compressed differences): use algorithm='choco' with compression="
            f"{compressor.name!r} (Hydra: algorithm=choco strategy.compression={compressor.name})."
        )

    def wait_pending(self) -> None:  # noqa: B027
        """Complete every transfer in flight without changing parameters (the strategy calls it before
        evaluation, consensus measurement and checkpoints). Only overlapped algorithms have any; those whose
        round's buffer is state (overlapped CHOCO-SGD, streaming local steps) complete the round into it, to be
        applied at its step as if it had just arrived; the others leave the state as it is."""

    def finish_pending(self, buckets: list[Bucket]) -> None:  # noqa: B027
        """Complete and apply the rounds in flight for ``buckets`` (end of training); the next
        ``before_step`` starts afresh."""

    def cancel_pending(self, buckets: list[Bucket]) -> None:  # noqa: B027
        """Drop every exchange in flight without applying it (a member of it is gone): parameters and state
        stay as they were before it started (overlapped D-SGD, streaming local-steps fragments, asynchronous
        global averages). Never waits on a transfer: the strategy aborts the old communicator's transfers
        before calling it. Call it before a survivor hands its state to a joiner. Blocking algorithms have
        nothing in flight between steps."""

    def change_membership(  # noqa: B027
        self, buckets: list[Bucket], comm: Communicator, step: int, joined: torch.Tensor
    ) -> None:
        """Restore this algorithm's invariants after the member set changed (:attr:`membership_rule`).

        Called on every member (survivors and joiners), in the same bucket order, once the new communicator
        and topology for the new ``n`` are in place and a joiner has loaded the state of the member that
        handed it over (parameters, optimizer state, :meth:`state_dict`, :meth:`bucket_state_dict`). It uses
        element-wise operations on this node's state and the communicator only (some rules run one gossip
        round or one global average, so every member must call it), which the simulator runs unchanged.

        Args:
            buckets: this node's buckets (stacked ``[n', m]`` in the simulator).
            comm: the communicator of the new member set.
            step: the optimizer step that comes next (the ``k`` of the next :meth:`before_step`).
            joined: per-node boolean, shaped ``bucket.params.shape[:-1] + (1,)`` (``[1]`` on a rank,
                ``[n', 1]`` in the simulator): the members that just joined.
        """

    def average_weight(self, buckets: list[Bucket]) -> float:
        """This rank's weight ``w_i`` in the network average ``(1/n) sum_i w_i x_i`` that evaluation and
        ``average.ckpt`` use: 1 (the plain mean of the replicas), except for push-sum (see there)."""
        return 1.0

    def state_dict(self) -> dict[str, Any]:
        """Python-level state that is not per bucket (counters, adaptive periods), for checkpoints.

        Per-bucket state belongs in :meth:`bucket_state_dict`; the strategy checkpoints it per bucket.
        """
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:  # noqa: B027
        """Restore what :meth:`state_dict` returned."""

    def bucket_state_dict(self, bucket: Bucket) -> dict[str, Any]:
        """What a checkpoint keeps of ``bucket``: its ``state`` tensors. Algorithms with per-bucket objects
        (the outer optimizer of local-steps algorithms) add their state."""
        return dict(bucket.state)

    @torch.no_grad()
    def load_bucket_state_dict(self, bucket: Bucket, state: dict[str, Any]) -> None:
        """Restore what :meth:`bucket_state_dict` returned into a bucket that ``init_state`` prepared."""
        for key, tensor in state.items():
            bucket.state[key].copy_(tensor)

    @abstractmethod
    def after_step(self, buckets: list[Bucket], comm: Communicator, step: int) -> None:
        """Runs after the local optimizer step: gossip and the algorithm's own corrections."""


def require_plain_sgd(optimizer: torch.optim.Optimizer, algorithm: str, beta: float) -> None:
    """Refuse any optimizer but ``torch.optim.SGD`` without momentum, for algorithms that apply their
    own momentum ``beta`` to the model's progress (a second, local momentum would change their math).

    Raises:
        ValueError: naming the fix.
    """
    fix = f"use torch.optim.SGD without momentum; {algorithm} applies momentum beta={beta:g} itself"
    if not isinstance(optimizer, torch.optim.SGD):
        raise ValueError(f"algorithm={algorithm!r} got {type(optimizer).__name__}: {fix}.")
    momenta = sorted({float(group.get("momentum", 0.0)) for group in optimizer.param_groups} - {0.0})
    if momenta:
        raise ValueError(f"algorithm={algorithm!r} got SGD with momentum={momenta[0]:g}: {fix}.")
