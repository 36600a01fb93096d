"""Exact-Diffusion / D²: D-SGD with a bias correction that removes the heterogeneity error."""

from __future__ import annotations

import torch

from lightning_decent.algorithms.base import Algorithm, Bucket
from lightning_decent.algorithms.membership import remove_mean
from lightning_decent.comm import Communicator
from lightning_decent.topology import Topology, lambda_min, lazy

#: Exact-Diffusion/D² converge only when every eigenvalue of W is above this bound.
LAMBDA_MIN_BOUND = -1.0 / 3.0


class ExactDiffusion(Algorithm):
    """Exact-Diffusion (Yuan, Ying, Zhao & Sayed, IEEE TSP 2019), equivalently D² (Tang et al.,
    ICML 2018) and NIDS (Li, Shi & Yan 2019), in the one-buffer adapt-correct-combine form::

        psi_i^{k+1} = x_i^k - lr d_i^k                         (the user's optimizer step)
        phi_i^{k+1} = psi_i^{k+1} + x_i^k - psi_i^k            (bias correction; psi^0 = x^0)
        x_i^{k+1}   = sum_j Wbar[i, j] phi_j^{k+1}              (one gossip round)

    which equals D²'s ``x^{k+1} = Wbar(2x^k - x^{k-1} - lr(g^k - g^{k-1}))``. With exact gradients it
    converges to the exact optimum of ``(1/n) sum_i f_i`` for any heterogeneity, where D-SGD stalls at
    a bias proportional to it. The state is ``c_i = x_i^k - psi_i^k`` (zero at the start, so the first
    step is a plain D-SGD step).

    Needs a static, symmetric, doubly stochastic W with ``lambda_min(W) > -1/3``.
    ``lazy_mixing=True`` (default) gossips with ``Wbar = (W + I)/2``, whose eigenvalues are all
    ``>= 0`` (the paper's choice); ``lazy_mixing=False`` gossips with W itself and refuses a W that
    violates the bound (e.g. the 1/3-ring with even n sits exactly on it). Directed graphs (static or
    one-peer exponential), time-varying graphs and periodic global averaging (which switches W to
    ``11^T/n`` every H steps; it diverges) are refused. The local direction ``d`` may come
    from any optimizer, but the analysis covers plain SGD (no verified momentum variant exists).

    Communication: 1 round x 1 buffer per step. Extra memory: 1 model (``c``).

    Membership change: summing the update over the nodes (``Wbar`` doubly stochastic) gives
    ``sum_i c_i^{k+1} = sum_i c_i^k``, so ``sum_i c_i = 0`` for ever from ``c^0 = 0``; it is what makes the
    network mean follow the local steps, ``xbar^{k+1} = xbar^k - lr dbar^k`` (in the primal-dual view of
    Yuan et al., the dual variable stays in the range of ``I - Wbar``, orthogonal to the consensus vector).
    After a loss, the survivors' ``c_i`` no longer sum to zero, and every later step would shift the mean
    by ``(1/n') sum_i c_i``: a drift that grows linearly. One global average restores it::

        c_i <- c_i - (1/n') sum_j c_j

    keeping each member's bias correction relative to the others (a joiner starts with its source's ``c``).
    Setting ``c = 0`` (the first step a D-SGD step, as at the start) would also do, but forgets the
    correction the survivors built.

    Args:
        lazy_mixing: gossip with ``(W + I)/2`` instead of W.
    """

    name = "exact_diffusion"
    extra_memory = 1.0
    membership_rule = "the corrections' mean removed by one global average, c_i -= (1/n') sum_j c_j: sum c = 0 again"

    def __init__(self, lazy_mixing: bool = True) -> None:
        self.lazy_mixing = lazy_mixing

    def prepare_topology(self, topology: Topology, *, global_averaging: bool = False) -> Topology:
        topology = super().prepare_topology(topology)
        alternatives = "use gradient_tracking or gut, which accept it"
        if global_averaging:
            raise ValueError(
                "exact_diffusion needs the same W every step: replacing it by an exact average every H steps "
                "(global_average_every) breaks its bias correction and diverges. Use gradient_tracking or dsgd "
                "with global_average_every, or exact_diffusion without it."
            )
        if topology.period > 1:
            raise ValueError(
                f"exact_diffusion needs a static mixing matrix, but topology {topology.name!r} changes every "
                f"step (period {topology.period}); {alternatives}, or a static symmetric graph "
                f"(ring, torus, grid, star, erdos_renyi, complete)."
            )
        if topology.directed:
            raise ValueError(
                f"exact_diffusion needs a symmetric W (an undirected graph), but topology {topology.name!r} is "
                f"directed; {alternatives}, or a symmetric graph (ring, torus, grid, star, erdos_renyi)."
            )
        if self.lazy_mixing:
            return lazy(topology)
        smallest = lambda_min(topology)
        if smallest <= LAMBDA_MIN_BOUND + 1e-12:
            raise ValueError(
                f"exact_diffusion needs lambda_min(W) > -1/3, but topology {topology.name!r} has "
                f"lambda_min = {smallest:.6g}; use lazy_mixing=True (gossip with (W + I)/2) or another graph."
            )
        return topology

    def init_state(self, bucket: Bucket) -> None:
        bucket.state["correction"] = torch.zeros_like(bucket.params)

    @torch.no_grad()
    def after_step(self, buckets: list[Bucket], comm: Communicator, step: int) -> None:
        for b in buckets:
            correction = b.state["correction"]  # x^k - psi^k
            b.params.add_(correction)  # phi^{k+1}
            torch.sub(b.params, correction, out=correction)  # psi^{k+1}
        comm.mix([b.params for b in buckets], step)
        for b in buckets:
            correction = b.state["correction"]
            torch.sub(b.params, correction, out=correction)  # x^{k+1} - psi^{k+1}

    def change_membership(self, buckets: list[Bucket], comm: Communicator, step: int, joined: torch.Tensor) -> None:
        remove_mean([b.state["correction"] for b in buckets], comm)
