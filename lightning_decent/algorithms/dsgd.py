"""Decentralized SGD with the user's own optimizer: adapt-then-combine, or overlapped (one-step-delayed) mixing."""

from __future__ import annotations

import torch
from torch.autograd.profiler import record_function

from lightning_decent.algorithms.base import Algorithm, Bucket
from lightning_decent.comm import Communicator
from lightning_decent.comm.base import PendingMix

SENT = "sent"  # workspace key of the snapshot x^k that is on the wire while step k computes


class DSGD(Algorithm):
    """D-SGD (Lian et al., NeurIPS 2017), by default in adapt-then-combine (ATC) form::

        x_i^{k+1/2} = x_i^k - lr * d_i^k          (the user's optimizer step)
        x_i^{k+1}   = sum_j W[i, j](k) x_j^{k+1/2} (one gossip round)

    ``d_i^k`` is whatever the user's optimizer computes from the local gradient: plain SGD gives
    D-SGD, SGD with momentum gives decentralized momentum SGD (DmSGD, momentum stays local), and
    Adam/AdamW gives decentralized Adam (DAdam). Communication: 1 round x 1 buffer per step.
    Extra memory: none (plus one receive buffer per in-neighbour in the communicator).

    With ``overlap=True``, the one-step-delayed form of Lian et al.'s D-PSGD (NeurIPS 2017, Algorithm 1)::

        x_i^{k+1} = sum_j W[i, j](k) x_j^k - lr * d_i^k,    d_i^k computed at the un-mixed x_i^k

    The neighbours' ``x_j^k`` are needed only at the end of step ``k``, so the exchange of ``x^k``
    starts as soon as ``x^k`` exists (``after_step`` of step ``k - 1``, per bucket) and runs while step
    ``k`` loads data and does its forward and backward. ``x^k`` travels from a snapshot, because the
    local optimizer then updates the parameters in place; ``after_step`` applies the exchange as the
    correction ``x_i^{k+1} = (x_i^k - lr d_i^k) + ((W x^k)_i - x_i^k)`` (fused with the next snapshot), so the
    optimizer sees exactly the point its gradient was taken at (clipping, AMP loss scaling, weight
    decay and schedulers as without gossip), and a bucket's next exchange starts while later buckets
    are still arriving. Same messages per step; extra memory: one model (the snapshot).

    Membership change: D-SGD keeps no state beyond the models, so members keep ``x_i`` (a joiner the
    ``x`` and optimizer state of the member that handed it over) and the next round mixes with the new
    graph's ``W'``. In the overlapped form the round in flight (``x^k``, started after step ``k - 1``) is
    dropped and ``x^k``, which the cancellation left untouched, is sent again on the new graph by the
    next ``before_step``: no round is lost.

    Args:
        overlap: use the overlapped form (``DecentralizedStrategy(overlap=True)`` sets it).
    """

    name = "dsgd"
    membership_rule = (
        "nothing to restore: members keep x_i (a joiner its source's x and optimizer state); an overlapped round "
        "in flight is dropped and x^k is sent again on the new graph"
    )

    def __init__(self, overlap: bool = False) -> None:
        self._pending: dict[int, PendingMix | None] = {}  # id(bucket) -> its round in flight (None: silent step)
        if overlap:
            self.enable_overlap()

    def enable_overlap(self) -> None:
        self.overlap = True
        self.extra_memory = 1.0

    def init_state(self, bucket: Bucket) -> None:
        self._pending.pop(id(bucket), None)
        if self.overlap:
            bucket.workspace[SENT] = torch.empty_like(bucket.params)

    def before_step(self, buckets: list[Bucket], comm: Communicator, step: int) -> None:
        if not self.overlap:
            return
        for bucket in buckets:  # first step, or first after a resume: x^k has not been sent yet
            if id(bucket) not in self._pending:
                self._start(bucket, comm, step)

    def after_step(self, buckets: list[Bucket], comm: Communicator, step: int) -> None:
        if not self.overlap:
            comm.mix([b.params for b in buckets], step)
            return
        for bucket in buckets:
            snapshot_taken = self._apply(bucket, refill=True)
            self._start(bucket, comm, step + 1, snapshot_taken)

    @torch.no_grad()
    def _start(self, bucket: Bucket, comm: Communicator, step: int, snapshot_taken: bool = False) -> None:
        if comm.is_silent(step):
            self._pending[id(bucket)] = None
            return
        sent = bucket.workspace[SENT]
        if not snapshot_taken:
            with record_function("gossip.snapshot"):
                sent.copy_(bucket.params)
        self._pending[id(bucket)] = comm.start_mix([sent], step)

    @torch.no_grad()
    def _apply(self, bucket: Bucket, refill: bool = False) -> bool:
        """Add the bucket's finished exchange to the parameters; with ``refill`` the snapshot also takes
        the new parameters (fused into the same pass). Whether there was an exchange to apply."""
        pending = self._pending.pop(id(bucket))
        if pending is None:
            return False
        pending.finish(0, into=bucket.params, refill=refill)
        return refill

    def wait_pending(self) -> None:
        for pending in self._pending.values():
            if pending is not None:
                pending.wait()

    def finish_pending(self, buckets: list[Bucket]) -> None:
        for bucket in buckets:
            if id(bucket) in self._pending:
                self._apply(bucket)

    def cancel_pending(self, buckets: list[Bucket]) -> None:
        for bucket in buckets:
            self._pending.pop(id(bucket), None)
