"""Gradient tracking: every node follows a running estimate of the network-average gradient."""

from __future__ import annotations

import torch

from lightning_decent.algorithms.base import Algorithm, Bucket
from lightning_decent.algorithms.membership import restore_sum
from lightning_decent.comm import Communicator
from lightning_decent.comm.base import PendingMix

SENT = "sent"  # workspace of the overlapped form: the snapshot x^k on the wire while step k computes


class GradientTracking(Algorithm):
    """Gradient tracking (DIGing: Nedić, Olshevsky & Shi, SIAM J. Optim. 2017), adapt-then-combine
    with one round per step (the form of Pu & Nedić, "Distributed stochastic gradient tracking
    methods", Math. Program. 2021)::

        y_i^k       = z_i^k + g_i^k - g_i^{k-1}          (tracked direction; y^0 = g^0)
        x_i^{k+1/2} = x_i^k - lr M(y_i^k)               (the user's optimizer, fed y as its gradient)
        x_i^{k+1}   = sum_j W[i, j](k) x_j^{k+1/2}   }
        z_i^{k+1}   = sum_j W[i, j](k) y_j^k         }  one gossip round, two buffers

    Mixing preserves ``sum_i y_i^k = sum_i g_i^k``, so every node descends along an estimate of the
    average gradient and, with exact gradients and a constant step, converges to the exact optimum
    of ``(1/n) sum_i f_i`` however heterogeneous the ``f_i`` are. ``M`` is whatever the user's optimizer
    does with a gradient (SGD momentum on the tracked direction, as in the epfml code); the optimizer's
    L2 weight decay is added to ``y`` inside the step and is not tracked, which leaves the fixed point
    unchanged because ``wd x_i`` is identical on all nodes at consensus.

    This differs from the two-round ATC form (``y^{k+1} = W(y^k + g^{k+1} - g^k)``) and from epfml's
    one-round form (``x^{k+1} = W x^k - lr y^k``): same fixed point, one round, and the parameters are
    sent after the local step as in D-SGD. Works on any doubly stochastic W, directed and time-varying
    included.

    Communication: 1 round x 2 buffers (parameters, tracker) per step. Extra memory: 2 models
    (tracker ``z``/``y`` and the previous gradient).

    With ``overlap=True``, the one-step-delayed form, which is DIGing as Nedić, Olshevsky & Shi wrote it
    (combine-then-adapt; its delay-robust tracking is analysed by Tian, Sun & Scutari, "ASY-SONATA",
    IEEE TSP 2020)::

        y_i^k     = sum_j W[i, j](k) y_j^{k-1} + g_i^k - g_i^{k-1}    (y^{-1} = g^{-1} = 0, so y^0 = g^0)
        x_i^{k+1} = sum_j W[i, j](k) x_j^k - lr M(y_i^k)

    Round ``k`` carries ``x^k`` (a snapshot) and ``y^{k-1}``; it starts after step ``k - 1`` (before step 0
    for the first) and runs during step ``k``'s forward and backward: its tracker half is completed in
    ``transform_gradients`` (``z^k = W y^{k-1}``, then ``y^k = z^k + g^k - g^{k-1}``), its parameter half in
    ``after_step`` as overlapped D-SGD's (``x^{k+1} = (x^k - lr M(y^k)) + ((W x^k)_i - x_i^k)``). The same
    invariant holds, ``sum_i y_i^k = sum_i g_i^k`` (``W`` doubly stochastic preserves the sum of the
    ``y^{k-1}`` it mixes); between steps the tracker holds ``y^{k-1}`` and the previous gradient ``g^{k-1}``,
    whose sums are equal. Same messages per step; extra memory: 3 models (the snapshot).

    Membership change: between steps the tracker ``z_i`` and the previous gradient ``g_i^prev`` satisfy
    ``sum_i z_i = sum_i g_i^prev`` (DIGing's invariant, from ``y^0 = g^0``; mixing with a doubly stochastic
    ``W`` keeps it). A lost node takes its share of both sums with it, and a joiner copies its source's,
    so the survivors' sums differ by an amount no survivor knows. One global average over the new
    members restores it exactly::

        z_i <- z_i + (1/n') sum_j (g_j^prev - z_j)           (every member adds the same correction)

    after which ``sum_i z_i = sum_i g_i^prev`` over the ``n'`` members. The correction is common to all,
    so what the trackers learned (their common part, the network-average gradient) is kept: at
    consensus ``z_i = gbar_old`` becomes ``gbar_new``, the new members' average gradient. (Restarting
    with ``z_i = g_i^prev``, as at step 0, also restores the invariant but throws the tracking away.)
    In the overlapped form the tracker holds ``y^{k-1}`` (the invariant is the same), the round in flight is
    dropped, and the next ``before_step`` sends ``x^k`` and the corrected ``y^{k-1}`` again on the new graph.

    Args:
        overlap: use the overlapped form (``DecentralizedStrategy(overlap=True)`` sets it).
    """

    name = "gradient_tracking"
    membership_rule = "trackers shifted by one global average, z_i += (1/n') sum_j (g_j^prev - z_j): sum z = sum g^prev"
    buffers_per_round = 2
    extra_memory = 2.0
    transforms_gradients = True

    def __init__(self, overlap: bool = False) -> None:
        self._pending: dict[int, PendingMix | None] = {}  # id(bucket) -> its round in flight (None: silent step)
        if overlap:
            self.enable_overlap()

    def enable_overlap(self) -> None:
        self.overlap = True
        self.extra_memory = 3.0

    def init_state(self, bucket: Bucket) -> None:
        bucket.state["tracker"] = torch.zeros_like(bucket.params)
        bucket.state["previous_grad"] = torch.zeros_like(bucket.params)
        if self.overlap:
            self._pending.pop(id(bucket), None)
            bucket.workspace[SENT] = torch.empty_like(bucket.params)

    def before_step(self, buckets: list[Bucket], comm: Communicator, step: int) -> None:
        if not self.overlap:
            return
        for bucket in buckets:  # first step, first after a resume or a membership change: round k not sent yet
            if id(bucket) not in self._pending:
                bucket.workspace[SENT].copy_(bucket.params)
                self._start(bucket, comm, step)

    @torch.no_grad()
    def transform_gradients(self, buckets: list[Bucket], comm: Communicator, step: int) -> None:
        for b in buckets:
            assert b.grads is not None
            tracker, previous = b.state["tracker"], b.state["previous_grad"]
            if self.overlap:
                pending = self._pending[id(b)]
                if pending is not None:
                    pending.finish(1)  # tracker <- z^k = W y^{k-1}
            tracker.add_(b.grads).sub_(previous)
            previous.copy_(b.grads)
            b.grads.copy_(tracker)

    @torch.no_grad()
    def after_step(self, buckets: list[Bucket], comm: Communicator, step: int) -> None:
        if not self.overlap:
            comm.mix([t for b in buckets for t in (b.params, b.state["tracker"])], step)
            return
        for bucket in buckets:
            pending = self._pending.pop(id(bucket))
            if pending is None:
                bucket.workspace[SENT].copy_(bucket.params)
            else:  # x^{k+1} = x^{k+1/2} + (W x^k)_i - x_i^k, and the snapshot takes x^{k+1}
                pending.finish(0, into=bucket.params, refill=True)
            self._start(bucket, comm, step + 1)

    @torch.no_grad()
    def _start(self, bucket: Bucket, comm: Communicator, step: int) -> None:
        """Start round ``step``: the snapshot ``x^step`` and the tracker ``y^{step-1}``."""
        silent = comm.is_silent(step)
        self._pending[id(bucket)] = (
            None if silent else comm.start_mix([bucket.workspace[SENT], bucket.state["tracker"]], step)
        )

    def wait_pending(self) -> None:
        for pending in self._pending.values():
            if pending is not None:
                pending.wait()

    @torch.no_grad()
    def finish_pending(self, buckets: list[Bucket]) -> None:
        """Apply the parameter half of the round in flight (``x <- W x``). The tracker keeps ``y^{k-1}``, which
        the next ``before_step`` sends again: its half is received into the spent snapshot and dropped."""
        for bucket in buckets:
            if id(bucket) not in self._pending:
                continue
            pending = self._pending.pop(id(bucket))
            if pending is not None:
                pending.finish(0, into=bucket.params)
                pending.finish(1, into=bucket.workspace[SENT])

    def cancel_pending(self, buckets: list[Bucket]) -> None:
        for bucket in buckets:
            self._pending.pop(id(bucket), None)

    def change_membership(self, buckets: list[Bucket], comm: Communicator, step: int, joined: torch.Tensor) -> None:
        restore_sum([b.state["tracker"] for b in buckets], [b.state["previous_grad"] for b in buckets], comm)
