"""CHOCO-SGD: decentralized SGD whose gossip sends compressed messages (Koloskova, Stich & Jaggi, ICML 2019)."""

from __future__ import annotations

from typing import Any

import torch
from torch.autograd.profiler import record_function

from lightning_decent.algorithms.base import Algorithm, Bucket
from lightning_decent.comm import Communicator
from lightning_decent.comm.base import PendingMix
from lightning_decent.comm.compression import Compressor, RandomK, TopK, get_compressor
from lightning_decent.topology import Topology

PUBLIC = "public"  # state: this node's public copy x_hat_i
NEIGHBOUR_SUM = "neighbour_sum"  # state: s_i = sum_j w_ij x_hat_j (j = i included)
DIFFERENCE = "difference"  # workspace: x_i - x_hat_i, then sum_j w_ij q_j, then s_i - x_hat_i
# overlapped form only (state, so that a checkpoint taken with a round in flight resumes it exactly):
INBOX = "inbox"  # x_i - x_hat_i, then q_i while its round is in flight, then sum_j w_ij q_j once it arrived
IN_FLIGHT = "in_flight"  # [1] int64: the step after which the inbox's round started, -1 if none


def default_gamma(compressor: Compressor) -> float:
    """The consensus step size CHOCO-SGD takes unless told: ``min(1, 4 fraction)`` for top-k,
    ``min(1, fraction)`` for random-k, 1 for the quantisers and casts.

    The sparsifiers follow the paper's tuned values (its authors' experiment scripts: ring of 9 nodes,
    logistic regression on epsilon, 1 % of the coordinates: top-k 0.04, random-k 0.01), i.e. ``4 omega``
    and ``omega``, carried to other fractions through ``omega = fraction``. The quantisers here scale
    per block, much finer than the paper's 4-bit QSGD (one scale per vector, tuned 0.34), and reach
    D-SGD's accuracy at gamma = 1 (int8 ``omega = 0.996``; int4 ``omega = 0.67``). Measured on the
    simulator's digits (docs/compression.md): top-k 10 % best at 0.4 (diverges at 0.7), random-k 10 %
    best at 0.1 (diverges at 0.2), int4 at 0.6 and 1 equal to D-SGD (0.34: 2.2 points lower).
    """
    if isinstance(compressor, TopK):
        return min(1.0, 4.0 * compressor.fraction)
    if isinstance(compressor, RandomK):
        return min(1.0, compressor.fraction)
    return 1.0


class Choco(Algorithm):
    """CHOCO-SGD (Koloskova, Stich & Jaggi, ICML 2019, Algorithm 2) with the user's optimizer as the local step::

        x_i^{t+1/2} = x_i^t - lr d_i^t                                      (the optimizer step)
        q_i^t       = C(x_i^{t+1/2} - x_hat_i^t)                            (sent to the out-neighbours)
        x_hat_j^{t+1} = x_hat_j^t + q_j^t                                   (public copies, x_hat^0 = 0)
        x_i^{t+1}   = x_i^{t+1/2} + gamma sum_j w_ij (x_hat_j^{t+1} - x_hat_i^{t+1})

    ``C`` is a compressor (:mod:`~lightning_decent.comm.compression`; biased ones allowed) and ``gamma``
    the consensus step size. Every node only needs ``x_hat_i`` and ``s_i = sum_j w_ij x_hat_j`` (``j = i``
    included), whatever its degree, because ``s_i^{t+1} = s_i^t + sum_j w_ij q_j^t`` on a static ``W``;
    this memory-efficient form is exact, not an approximation::

        q_i = C(x_i^{t+1/2} - x_hat_i)                       r_i = (x_i^{t+1/2} - x_hat_i) - q_i
        x_hat_i <- x_i^{t+1/2} - r_i   (= x_hat_i + q_i)     s_i <- s_i + sum_j w_ij q_j    (one compressed round)
        x_i^{t+1} = x_i^{t+1/2} + gamma (s_i - x_hat_i)

    Properties: with the identity compressor and ``gamma = 1`` it is adapt-then-combine D-SGD,
    ``x^{t+1} = W x^{t+1/2}`` (``x_hat^{t+1} = x^{t+1/2}``); with a doubly stochastic ``W`` the network mean
    follows the local steps exactly (the corrections ``sum_i (s_i - x_hat_i)`` sum to zero).

    Default ``gamma`` (:func:`default_gamma`): the paper's tuned values for the sparsifiers, carried to
    other fractions through ``omega`` (top-k ``min(1, 4 fraction)``, random-k ``min(1, fraction)``), 1
    for the quantisers and casts. The theory's ``gamma`` (Theorem 2, of order ``delta^2 omega``) is far
    smaller and slow in practice.

    Communication: 1 round x 1 buffer per step (the compressed payload of ``q_i``, e.g. 0.254 x the
    float32 bytes with int8). Extra memory: 2 models (``x_hat_i``, ``s_i``); besides, one workspace
    model, and in the communicator the payloads and one decode buffer.

    Static graphs only: ``s_i`` is current only if every ``q_j`` of every in-neighbour reached node ``i``
    at every step, which a graph whose neighbours change (one-peer exponential) breaks; such graphs and
    the modifiers (global averaging, gossip rounds) are refused.

    With ``overlap=True``, the one-step-delayed form: the compressed differences ``q^t`` sent after step
    ``t`` travel during the forward and backward of step ``t + 1``, whose consensus step uses them::

        x_i^{t+1}     = x_i^t - lr d_i^t + gamma sum_j w_ij (x_hat_j^t - x_hat_i^t)    (d_i^t at x_i^t)
        q_i^t         = C(x_i^{t+1} - x_hat_i^t)                                       (sent after step t)
        x_hat_j^{t+1} = x_hat_j^t + q_j^t                                              (applied at step t + 1)

    It is CHOCO-Gossip's order (Koloskova, Stich & Jaggi, ICML 2019, Algorithm 1: a consensus step with
    the copies at hand, then the new difference compressed and sent) with the local step added to the
    consensus step, so no quantity of step ``t + 1`` waits for the messages of step ``t`` before its
    gradient is computed (a derivation; tested against a stacked reference in the simulator). In the
    memory-efficient form, after step ``t``'s optimizer step::

        s_i <- s_i + sum_j w_ij q_j^{t-1}                   (the round sent after step t - 1 arrives)
        x_i <- x_i + gamma (s_i - x_hat_i)                   (consensus with the copies x_hat^t)
        q_i = C(x_i - x_hat_i),  x_hat_i <- x_hat_i + q_i    (sent; the round arrives at step t + 1)

    The public copies stay identical on a sender and its receivers: ``x_hat_i`` takes ``q_i`` (the value
    its payload decodes to) when it is sent, the receivers add the same ``q_i`` to their sums when the
    round arrives, and nothing reads ``x_hat_j^{t+1}`` before then, so at every consensus step
    ``s_i = sum_j w_ij x_hat_j`` holds for the copies ``x_hat_j`` that the senders hold. With the
    identity compressor and ``gamma = 1`` it is overlapped D-SGD (``x_hat^{t+1} = x^{t+1}``, so
    ``x^{t+1} = W x^t - lr d^t``), and the network mean follows the local steps as in the blocking form.
    The round's buffer is state (``inbox``, with the step it started after): a checkpoint completes the
    round into it first, and a resume applies it at the next step. Extra memory: 3 models.

    Convergence cost of the delay (simulator, docs/algorithms.md): measured against the blocking form.

    Membership change: ``s_i = sum_j w_ij x_hat_j`` holds for the old graph only (new neighbours never
    received this node's ``q``'s, a lost one's copy is gone, the weights change with ``n``). The members
    refresh their public copies to their models and rebuild the sums on the new graph with one
    uncompressed gossip round (what a D-SGD step sends)::

        x_hat_i <- x_i,   s_i <- sum_j W'[i, j] x_j

    after which ``s_i = sum_j w'_ij x_hat_j`` holds exactly and the compression error left in the copies is
    zero (a joiner's copy is its own model, like everyone's). Restarting from ``x_hat = s = 0``, as at the
    start, also keeps the invariant but re-sends the whole model through the compressor, which takes
    about ``1/fraction`` rounds with top-k.
    In the overlapped form the round in flight is dropped first (its ``q``'s are in no one's sum; the
    sender's own copy, which took its ``q``, is refreshed by the rule like everyone's), so the rule holds
    as it is.

    Args:
        compression: a compressor name (:data:`~lightning_decent.comm.COMPRESSORS`) or a built
            :class:`~lightning_decent.comm.Compressor`; ``DecentralizedStrategy(compression=...)`` sets it.
        gamma: the consensus step size in ``(0, 1]`` (``None``: :func:`default_gamma` of the compressor).
        compression_options: the compressor's options (``block``, ``fraction``, ``seed``).
        overlap: use the overlapped form (``DecentralizedStrategy(overlap=True)`` sets it).
    """

    extra_memory = 2.0
    membership_rule = (
        "public copies refreshed to the models and neighbour sums rebuilt on the new graph by one uncompressed "
        "round: x_hat_i = x_i, s_i = sum_j w'_ij x_j"
    )

    def __init__(
        self,
        compression: str | Compressor = "int8",
        gamma: float | None = None,
        compression_options: dict[str, Any] | None = None,
        overlap: bool = False,
    ) -> None:
        if gamma is not None and (isinstance(gamma, bool) or not 0 < gamma <= 1):
            raise ValueError(f"choco's consensus step size gamma must be in (0, 1], got {gamma!r}.")
        self._gamma = None if gamma is None else float(gamma)
        self.compressor = get_compressor(compression, **(compression_options or {}))
        self._pending: dict[int, tuple[PendingMix, int]] = {}  # id(bucket) -> its round in flight, buffer index
        if overlap:
            self.enable_overlap()

    @property
    def gamma(self) -> float:
        """The consensus step size: the one given, or the compressor's default."""
        return self._gamma if self._gamma is not None else default_gamma(self.compressor)

    @property  # type: ignore[override]
    def name(self) -> str:
        return f"choco[{self.compressor.describe()}]"

    sends_compressed = True

    def use_compression(self, compressor: Compressor) -> None:
        self.compressor = compressor

    def prepare_topology(self, topology: Topology, *, global_averaging: bool = False) -> Topology:
        topology = super().prepare_topology(topology, global_averaging=global_averaging)
        if topology.period > 1:
            raise ValueError(
                f"choco needs a static graph: its sum s_i = sum_j w_ij x_hat_j of the neighbours' public copies "
                f"stays exact only if every neighbour's compressed update reaches it every step, but topology "
                f"{topology.name!r} changes every step (period {topology.period}). Use a static topology "
                f"(ring, exponential, torus, grid, complete, ...), or algorithm='dsgd' without compression."
            )
        return topology

    def enable_overlap(self) -> None:
        self.overlap = True
        self.extra_memory = 3.0

    def init_state(self, bucket: Bucket) -> None:
        bucket.state[PUBLIC] = torch.zeros_like(bucket.params)
        bucket.state[NEIGHBOUR_SUM] = torch.zeros_like(bucket.params)
        if not self.overlap:
            bucket.workspace[DIFFERENCE] = torch.empty_like(bucket.params)
            return
        self._pending.pop(id(bucket), None)
        bucket.state[INBOX] = torch.zeros_like(bucket.params)
        bucket.state[IN_FLIGHT] = torch.full((1,), -1, dtype=torch.int64)

    @torch.no_grad()
    def after_step(self, buckets: list[Bucket], comm: Communicator, step: int) -> None:
        if self.overlap:
            self._receive(buckets)
            self._consensus(buckets)
            self._send(buckets, comm, step)
            return
        differences = [b.workspace[DIFFERENCE] for b in buckets]
        for bucket, difference in zip(buckets, differences):
            torch.sub(bucket.params, bucket.state[PUBLIC], out=difference)
        # differences <- sum_j w_ij q_j; public <- r_i, the compression residual of this node's difference
        comm.mix_compressed(differences, step, self.compressor, residuals=[b.state[PUBLIC] for b in buckets])
        with record_function("choco.update"):
            for bucket, mixed in zip(buckets, differences):
                public, neighbour_sum = bucket.state[PUBLIC], bucket.state[NEIGHBOUR_SUM]
                public.neg_().add_(bucket.params)  # x_hat_i = x^{t+1/2} - r_i
                neighbour_sum.add_(mixed)
                bucket.params.add_(torch.sub(neighbour_sum, public, out=mixed), alpha=self.gamma)

    # ---- the overlapped form ------------------------------------------------------------------------------
    @torch.no_grad()
    def _receive(self, buckets: list[Bucket]) -> None:
        """``s_i <- s_i + sum_j w_ij q_j`` for the round in flight (waiting for it if it has not arrived)."""
        for bucket in buckets:
            if int(bucket.state[IN_FLIGHT]) < 0:
                continue
            entry = self._pending.pop(id(bucket), None)
            if entry is not None:  # else wait_pending (or a checkpoint's) completed it into the inbox
                pending, index = entry
                pending.finish(index)
            bucket.state[NEIGHBOUR_SUM].add_(bucket.state[INBOX])
            bucket.state[IN_FLIGHT].fill_(-1)

    @torch.no_grad()
    def _consensus(self, buckets: list[Bucket]) -> None:
        """``x_i <- x_i + gamma (s_i - x_hat_i)`` (the inbox, free once received, holds ``s_i - x_hat_i``)."""
        with record_function("choco.update"):
            for bucket in buckets:
                gap = torch.sub(bucket.state[NEIGHBOUR_SUM], bucket.state[PUBLIC], out=bucket.state[INBOX])
                bucket.params.add_(gap, alpha=self.gamma)

    @torch.no_grad()
    def _send(self, buckets: list[Bucket], comm: Communicator, step: int) -> None:
        """Start the round of ``q_i = C(x_i - x_hat_i)`` and take it into this node's copy: ``x_hat_i <- x_i - r_i``."""
        inboxes = [b.state[INBOX] for b in buckets]
        for bucket, inbox in zip(buckets, inboxes):
            torch.sub(bucket.params, bucket.state[PUBLIC], out=inbox)
        residuals = [b.state[PUBLIC] for b in buckets]  # r_i = (x_i - x_hat_i) - q_i, written before it returns
        pending = comm.start_mix_compressed(inboxes, step, self.compressor, residuals=residuals)
        for index, bucket in enumerate(buckets):
            bucket.state[PUBLIC].neg_().add_(bucket.params)
            bucket.state[IN_FLIGHT].fill_(step)
            self._pending[id(bucket)] = (pending, index)

    def wait_pending(self) -> None:
        """Complete the rounds in flight into the inboxes (state): a checkpoint keeps what arrived, and the next
        step (after a resume too) applies it as if it had just arrived. Parameters and copies are unchanged."""
        for pending, index in self._pending.values():
            pending.finish(index)
        self._pending.clear()

    def finish_pending(self, buckets: list[Bucket]) -> None:
        """Apply the rounds in flight: the copies take the last ``q``'s and one consensus step uses them."""
        arriving = [b for b in buckets if self.overlap and int(b.state[IN_FLIGHT]) >= 0]
        self._receive(arriving)
        self._consensus(arriving)

    def cancel_pending(self, buckets: list[Bucket]) -> None:
        """Drop the rounds in flight: no member adds their ``q``'s (the senders' own copies took theirs, which
        :meth:`change_membership` overwrites)."""
        for bucket in buckets:
            self._pending.pop(id(bucket), None)
            if self.overlap:
                bucket.state[IN_FLIGHT].fill_(-1)

    @torch.no_grad()
    def change_membership(self, buckets: list[Bucket], comm: Communicator, step: int, joined: torch.Tensor) -> None:
        for bucket in buckets:
            bucket.state[PUBLIC].copy_(bucket.params)
            bucket.state[NEIGHBOUR_SUM].copy_(bucket.params)
        comm.mix([bucket.state[NEIGHBOUR_SUM] for bucket in buckets], step)
