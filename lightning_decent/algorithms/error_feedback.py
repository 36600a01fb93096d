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

    allocate_residuals(bucket)                         # in init_state
    feedback = ErrorFeedback(buckets)
    feedback.average(comm, deltas, compressor, step)   # deltas <- C_s(a_s + e_s), a_s = (1/n) sum_j C_s(Delta_j + e_j)
    feedback.mix(comm, deltas, compressor, step)       # deltas <- sum_j w_ij C(Delta_j + e_j)

The compressed global average compresses twice (each node's shards, then each shard's average at the
node that owns it, see :meth:`~lightning_decent.comm.Communicator.average_compressed`), so it keeps two
residuals, as DoubleSqueeze (Tang et al., ICML 2019): the node's own, and the one of the shard it owns
(stored in a model-sized buffer of which only that shard's positions are used).
"""

from __future__ import annotations

import torch

from lightning_decent.algorithms.base import Bucket
from lightning_decent.comm import Communicator, Compressor

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
    """Error feedback for one update per bucket, with the residuals that :func:`allocate_residuals` put
    into the buckets' state."""

    def __init__(self, buckets: list[Bucket]) -> None:
        self.buckets = buckets

    def _add_residuals(self, deltas: list[torch.Tensor]) -> list[torch.Tensor]:
        if len(deltas) != len(self.buckets):
            raise ValueError(f"{len(deltas)} buffers for the error-feedback residuals of {len(self.buckets)} buckets.")
        residuals = [b.state[RESIDUAL] for b in self.buckets]
        for delta, residual in zip(deltas, residuals):
            delta.add_(residual)
        return residuals

    @torch.no_grad()
    def average(self, comm: Communicator, deltas: list[torch.Tensor], compressor: Compressor, step: int) -> None:
        """``deltas <-`` the compressed global average of ``Delta_i + e_i``, the same on every rank, with
        error feedback in both of its stages.

        Raises:
            KeyError: if the buckets have no shard residual (``allocate_residuals(bucket, average=True)``).
        """
        residuals = self._add_residuals(deltas)
        shards = [b.state[SHARD_RESIDUAL] for b in self.buckets]
        comm.average_compressed(deltas, compressor, step, residuals=residuals, shard_residuals=shards)

    @torch.no_grad()
    def mix(self, comm: Communicator, deltas: list[torch.Tensor], compressor: Compressor, step: int) -> None:
        """``deltas <- sum_j W[i, j](step) C(v_j)``, ``v_j = Delta_j + e_j``; then ``e_i <- v_i - C(v_i)``."""
        residuals = self._add_residuals(deltas)
        comm.mix_compressed(deltas, step, compressor, residuals=residuals)
