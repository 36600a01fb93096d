"""Error feedback for compressed messages: what compression leaves out now is sent later.

EF-SGD (Seide et al., Interspeech 2014, "1-bit SGD"; analysed by Karimireddy et al., ICML 2019,
"Error Feedback Fixes SignSGD"). Each node keeps a residual ``e`` per buffer (zero at the start) and,
for every update ``Delta`` it would send::

    v = Delta + e          C(v) goes on the wire (the node's own term is C(v) as well)
    e <- v - C(v)          kept for the next message

so ``sum_t C(v_t) = sum_t Delta_t - e_T``: over many messages nothing is lost, whatever the bias of
``C``. Meant for updates that are sent and then forgotten (outer syncs of local-step methods, the
pseudo-gradient ``Delta = anchor - x``); CHOCO-SGD's public copies play this role for gossip of models.

Usage (the residuals live in ``bucket.state``, so checkpoints restore them)::

    allocate_residuals(bucket)                                    # in init_state
    feedback = ErrorFeedback.of(buckets)                          # or ErrorFeedback(residuals, shard_residuals)
    feedback.average(comm, deltas, compressor, step)   # deltas <- C_s(a_s + e_s), a_s = (1/n) sum_j C_s(Delta_j + e_j)
    feedback.mix(comm, deltas, compressor, step)       # deltas <- sum_j w_ij C(Delta_j + e_j)
    pending = feedback.start_mix(comm, deltas, compressor, step)  # the same, in the background: pending.finish(b)

The compressed global average compresses twice (each node's shards, then each shard's average at the
node that owns it, see :meth:`~lightning_decent.comm.Communicator.average_compressed`), so it keeps two
residuals, as DoubleSqueeze (Tang et al., ICML 2019): the node's own, and the one of the shard it owns
(stored in a model-sized buffer of which only that shard's positions are used).
"""

from __future__ import annotations

import torch

from lightning_decent.algorithms.base import Bucket
from lightning_decent.comm import Communicator, Compressor
from lightning_decent.comm.base import PendingMix

#: ``bucket.state`` keys of the residuals: this node's, and that of the average shard it owns.
RESIDUAL = "error_feedback"
SHARD_RESIDUAL = "error_feedback_shard"


def allocate_residuals(bucket: Bucket, average: bool = True) -> None:
    """Give ``bucket`` zero residuals (in ``init_state``; checkpointed with the bucket's state): one
    model for :meth:`ErrorFeedback.mix`, a second one for :meth:`ErrorFeedback.average` (``average``)."""
    bucket.state[RESIDUAL] = torch.zeros_like(bucket.params)
    if average:
        bucket.state[SHARD_RESIDUAL] = torch.zeros_like(bucket.params)


class ErrorFeedback:
    """Error feedback for one update per buffer, with one residual per buffer (``residuals[b]`` shaped like
    buffer ``b``: a bucket's residual, or the slice of it that a streaming fragment covers) and, for the
    compressed global average, the residual of the shard this node owns (``shard_residuals``, same shapes).
    """

    def __init__(self, residuals: list[torch.Tensor], shard_residuals: list[torch.Tensor] | None = None) -> None:
        self.residuals = residuals
        self.shard_residuals = shard_residuals

    @classmethod
    def of(cls, buckets: list[Bucket]) -> ErrorFeedback:
        """The residuals that :func:`allocate_residuals` put into ``buckets``' state."""
        shards = [b.state[SHARD_RESIDUAL] for b in buckets] if all(SHARD_RESIDUAL in b.state for b in buckets) else None
        return cls([b.state[RESIDUAL] for b in buckets], shards)

    def _add_residuals(self, deltas: list[torch.Tensor]) -> list[torch.Tensor]:
        if len(deltas) != len(self.residuals):
            raise ValueError(f"{len(deltas)} buffers for {len(self.residuals)} error-feedback residuals.")
        for delta, residual in zip(deltas, self.residuals):
            delta.add_(residual)
        return self.residuals

    def _shard_residuals(self) -> list[torch.Tensor]:
        if self.shard_residuals is None:
            raise ValueError(
                "the compressed global average keeps a second residual per buffer: allocate_residuals(bucket, "
                "average=True), or pass shard_residuals."
            )
        return self.shard_residuals

    @torch.no_grad()
    def average(self, comm: Communicator, deltas: list[torch.Tensor], compressor: Compressor, step: int) -> None:
        """``deltas <-`` the compressed global average of ``Delta_i + e_i``, the same on every rank, with
        error feedback in both of its stages."""
        shards = self._shard_residuals()
        residuals = self._add_residuals(deltas)
        comm.average_compressed(deltas, compressor, step, residuals=residuals, shard_residuals=shards)

    @torch.no_grad()
    def start_average(
        self, comm: Communicator, deltas: list[torch.Tensor], compressor: Compressor, step: int
    ) -> PendingMix:
        """:meth:`average` started in the background (``finish(b)`` completes buffer ``b``)."""
        shards = self._shard_residuals()
        residuals = self._add_residuals(deltas)
        return comm.start_average_compressed(deltas, compressor, step, residuals=residuals, shard_residuals=shards)

    @torch.no_grad()
    def mix(self, comm: Communicator, deltas: list[torch.Tensor], compressor: Compressor, step: int) -> None:
        """``deltas <- sum_j W[i, j](step) C(v_j)``, ``v_j = Delta_j + e_j``; then ``e_i <- v_i - C(v_i)``."""
        residuals = self._add_residuals(deltas)
        comm.mix_compressed(deltas, step, compressor, residuals=residuals)

    @torch.no_grad()
    def start_mix(
        self, comm: Communicator, deltas: list[torch.Tensor], compressor: Compressor, step: int
    ) -> PendingMix:
        """:meth:`mix` started in the background (``finish(b)`` completes buffer ``b``)."""
        residuals = self._add_residuals(deltas)
        return comm.start_mix_compressed(deltas, step, compressor, residuals=residuals)
