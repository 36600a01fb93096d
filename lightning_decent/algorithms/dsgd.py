"""Decentralized SGD in adapt-then-combine form, with the user's own optimizer."""

from __future__ import annotations

from lightning_decent.algorithms.base import Algorithm, Bucket
from lightning_decent.comm import Communicator


class DSGD(Algorithm):
    """Adapt-then-combine D-SGD (Lian et al., NeurIPS 2017; the ATC form of Yuan, Ying et al.)::

        x_i^{k+1/2} = x_i^k - lr * d_i^k          (the user's optimizer step)
        x_i^{k+1}   = sum_j W[i, j](k) x_j^{k+1/2} (one gossip round)

    ``d_i^k`` is whatever the user's optimizer computes from the local gradient: plain SGD gives
    D-SGD, SGD with momentum gives decentralized momentum SGD (DmSGD, momentum stays local), and
    Adam/AdamW gives decentralized Adam (DAdam). Communication: 1 round x 1 buffer per step.
    Extra memory: none (plus one receive buffer per in-neighbour in the communicator).
    """

    name = "dsgd"

    def after_step(self, buckets: list[Bucket], comm: Communicator, step: int) -> None:
        comm.mix([b.params for b in buckets], step)
