"""Gradient tracking: every node follows a running estimate of the network-average gradient."""

from __future__ import annotations

import torch

from lightning_decent.algorithms.base import Algorithm, Bucket
from lightning_decent.algorithms.membership import restore_sum
from lightning_decent.comm import Communicator


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
    """

    name = "gradient_tracking"
    membership_rule = "trackers shifted by one global average, z_i += (1/n') sum_j (g_j^prev - z_j): sum z = sum g^prev"
    buffers_per_round = 2
    extra_memory = 2.0
    transforms_gradients = True

    def init_state(self, bucket: Bucket) -> None:
        bucket.state["tracker"] = torch.zeros_like(bucket.params)
        bucket.state["previous_grad"] = torch.zeros_like(bucket.params)

    @torch.no_grad()
    def transform_gradients(self, buckets: list[Bucket], comm: Communicator, step: int) -> None:
        for b in buckets:
            assert b.grads is not None
            tracker, previous = b.state["tracker"], b.state["previous_grad"]
            tracker.add_(b.grads).sub_(previous)
            previous.copy_(b.grads)
            b.grads.copy_(tracker)

    @torch.no_grad()
    def after_step(self, buckets: list[Bucket], comm: Communicator, step: int) -> None:
        comm.mix([t for b in buckets for t in (b.params, b.state["tracker"])], step)

    def change_membership(self, buckets: list[Bucket], comm: Communicator, step: int, joined: torch.Tensor) -> None:
        restore_sum([b.state["tracker"] for b in buckets], [b.state["previous_grad"] for b in buckets], comm)
