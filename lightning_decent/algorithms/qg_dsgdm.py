"""Quasi-global momentum D-SGD (QG-DSGDm): momentum from the model's own progress, gossip included."""

from __future__ import annotations

import torch

from lightning_decent.algorithms.base import (
    PREVIOUS,
    Algorithm,
    Bucket,
    allocate_previous,
    require_plain_sgd,
    save_previous,
)
from lightning_decent.comm import Communicator


class QGDSGDm(Algorithm):
    """QG-DSGDm (Lin, Karimireddy, Stich & Jaggi, "Quasi-global momentum", ICML 2021; the form of
    the authors' ``decentralized_qg_sgd.py``), adapt-then-combine::

        x_i^{k+1/2} = x_i^k - lr (g_i^k + beta m_i)        (the user's SGD step, then beta m_i)
        x_i^{k+1}   = sum_j W[i, j](k) x_j^{k+1/2}           (one gossip round)
        m_i        <- beta m_i + (1 - beta) (x_i^k - x_i^{k+1}) / lr

    The momentum ``m_i`` averages the node's whole displacement, gossip included, instead of its local
    gradient, which removes the heterogeneity bias that local momentum amplifies. It is kept in
    parameter units, ``u_i = lr m_i``, so the algorithm never needs the learning rate::

        x_i^{k+1/2} = (x_i^k - lr g_i^k) - beta u_i,   u_i <- beta u_i + (1 - beta)(x_i^k - x_i^{k+1})

    Identical to the paper's update for a constant learning rate; when a scheduler changes the rate,
    the old momentum keeps its size instead of being rescaled to the new rate (like heavy-ball in
    displacement form). The algorithm owns its momentum: the user's optimizer must be
    ``torch.optim.SGD`` without momentum (weight decay is fine: it enters ``g`` as in the paper).

    Communication: 1 round x 1 buffer per step. Extra memory: 1 model (``u``), plus 1 model of
    workspace (the pre-step parameters).

    Membership change: the momentum is each node's own running average of its displacement, with no
    network-wide invariant, so members keep ``u_i`` and a joiner takes the ``u`` of the member that
    handed it over; the first displacement on the new graph enters ``u`` as any other.

    Args:
        beta: the momentum factor (paper: 0.9).
    """

    name = "qg_dsgdm"
    membership_rule = "momentum u_i stays each member's own (a joiner takes its source's); no network invariant"
    extra_memory = 1.0

    def __init__(self, beta: float = 0.9) -> None:
        if not 0.0 <= beta < 1.0:
            raise ValueError(f"qg_dsgdm needs 0 <= beta < 1; got beta={beta}.")
        self.beta = beta

    def check_optimizer(self, optimizer: torch.optim.Optimizer) -> None:
        require_plain_sgd(optimizer, self.name, self.beta)

    def init_state(self, bucket: Bucket) -> None:
        bucket.state["momentum"] = torch.zeros_like(bucket.params)
        allocate_previous(bucket)

    def before_step(self, buckets: list[Bucket], comm: Communicator, step: int) -> None:
        save_previous(buckets)

    @torch.no_grad()
    def after_step(self, buckets: list[Bucket], comm: Communicator, step: int) -> None:
        for b in buckets:
            b.params.sub_(b.state["momentum"], alpha=self.beta)
        comm.mix([b.params for b in buckets], step)
        for b in buckets:
            progress = b.workspace[PREVIOUS].sub_(b.params)
            b.state["momentum"].mul_(self.beta).add_(progress, alpha=1.0 - self.beta)
