"""Exact-Diffusion / D²: D-SGD with a bias correction that removes the heterogeneity error."""

from __future__ import annotations

import torch

from lightning_decent.algorithms.base import Algorithm, Bucket
from lightning_decent.algorithms.membership import remove_mean
from lightning_decent.comm import Communicator
from lightning_decent.comm.base import PendingMix
from lightning_decent.topology import Topology, lambda_min, lazy

#: Exact-Diffusion/D² converge only when every eigenvalue of W is above this bound.
LAMBDA_MIN_BOUND = -1.0 / 3.0

SENT = "sent"  # workspace of the overlapped form: the snapshot x^k on the wire while step k computes


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

    With ``overlap=True``, the one-step-delayed (combine-then-adapt) form, in which the local step is
    taken out of the mixing as overlapped D-SGD takes it out of D-SGD's::

        x^{k+1} = Wbar (2 x^k - x^{k-1}) - lr (d^k - d^{k-1})        (x^{-1} = x^0, d^{-1} = 0)

    With the lazy ``Wbar = (W + I)/2`` this is EXTRA (Shi, Ling, Wu & Yin, SIAM J. Optim. 2015) with
    ``W~ = (I + W)/2``: ``x^{k+1} = (I + W) x^k - W~ x^{k-1} - lr (g^k - g^{k-1})``, which converges for
    ``lr < 2 lambda_min(W~) / L`` (the ring's ``W~`` has ``lambda_min = 1/3``; measured in the simulator:
    converges up to about two thirds of the blocking form's step size, docs/algorithms.md). It needs
    only ``Wbar x^k``, one exchange of ``x^k`` that runs during step ``k``'s forward and backward; written
    with the state ``c`` and the round's correction ``m^k = Wbar x^k - x^k``::

        c^{k+1}   = c^k + m^k                                (c^0 = 0)
        x^{k+1}   = x^{k+1/2} + m^k + c^{k+1}                (x^{k+1/2} = x^k - lr d^k, the optimizer step)

    (subtracting two consecutive steps gives the recursion above). ``sum_i m_i^k = 0`` keeps
    ``sum_i c_i = 0``, so the network mean again follows the local steps. Non-lazy mixing needs
    ``lambda_min(W) > 0`` (EXTRA's ``W~ = W`` positive definite) and refuses other graphs. Same messages per
    step; extra memory: 2 models (``c`` and the snapshot of ``x^k``).

    Membership change: summing the update over the nodes (``Wbar`` doubly stochastic) gives
    ``sum_i c_i^{k+1} = sum_i c_i^k``, so ``sum_i c_i = 0`` for ever from ``c^0 = 0``; it is what makes the
    network mean follow the local steps, ``xbar^{k+1} = xbar^k - lr dbar^k`` (in the primal-dual view of
    Yuan et al., the dual variable stays in the range of ``I - Wbar``, orthogonal to the consensus vector).
    After a loss, the survivors' ``c_i`` no longer sum to zero, and every later step would shift the mean
    by ``(1/n') sum_i c_i``: a drift that grows linearly. One global average restores it::

        c_i <- c_i - (1/n') sum_j c_j

    keeping each member's bias correction relative to the others (a joiner starts with its source's ``c``).
    Setting ``c = 0`` (the first step a D-SGD step, as at the start) would also do, but forgets the
    correction the survivors built. The overlapped form keeps the same invariant and rule; its round in
    flight is dropped (``c`` is unchanged until a round is applied) and ``x^k`` is sent again on the new graph.

    Args:
        lazy_mixing: gossip with ``(W + I)/2`` instead of W.
        overlap: use the overlapped form (``DecentralizedStrategy(overlap=True)`` sets it).
    """

    name = "exact_diffusion"
    extra_memory = 1.0
    membership_rule = "the corrections' mean removed by one global average, c_i -= (1/n') sum_j c_j: sum c = 0 again"

    def __init__(self, lazy_mixing: bool = True, overlap: bool = False) -> None:
        self.lazy_mixing = lazy_mixing
        self._pending: dict[int, PendingMix | None] = {}  # id(bucket) -> its round in flight (None: silent step)
        if overlap:
            self.enable_overlap()

    def enable_overlap(self) -> None:
        self.overlap = True
        self.extra_memory = 2.0

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
        bound, text = (0.0, "0 with overlap=True") if self.overlap else (LAMBDA_MIN_BOUND, "-1/3")
        if smallest <= bound + 1e-12:
            raise ValueError(
                f"exact_diffusion needs lambda_min(W) > {text}, but topology {topology.name!r} has "
                f"lambda_min = {smallest:.6g}; use lazy_mixing=True (gossip with (W + I)/2) or another graph."
            )
        return topology

    def init_state(self, bucket: Bucket) -> None:
        bucket.state["correction"] = torch.zeros_like(bucket.params)
        if self.overlap:
            self._pending.pop(id(bucket), None)
            bucket.workspace[SENT] = torch.empty_like(bucket.params)

    def before_step(self, buckets: list[Bucket], comm: Communicator, step: int) -> None:
        if not self.overlap:
            return
        for bucket in buckets:  # first step, first after a resume or a membership change: x^k not sent yet
            if id(bucket) not in self._pending:
                bucket.workspace[SENT].copy_(bucket.params)
                self._start(bucket, comm, step)

    @torch.no_grad()
    def after_step(self, buckets: list[Bucket], comm: Communicator, step: int) -> None:
        if self.overlap:
            for bucket in buckets:
                self._apply(bucket)
                bucket.workspace[SENT].copy_(bucket.params)
                self._start(bucket, comm, step + 1)
            return
        for b in buckets:
            correction = b.state["correction"]  # x^k - psi^k
            b.params.add_(correction)  # phi^{k+1}
            torch.sub(b.params, correction, out=correction)  # psi^{k+1}
        comm.mix([b.params for b in buckets], step)
        for b in buckets:
            correction = b.state["correction"]
            torch.sub(b.params, correction, out=correction)  # x^{k+1} - psi^{k+1}

    @torch.no_grad()
    def _start(self, bucket: Bucket, comm: Communicator, step: int) -> None:
        self._pending[id(bucket)] = None if comm.is_silent(step) else comm.start_mix([bucket.workspace[SENT]], step)

    @torch.no_grad()
    def _apply(self, bucket: Bucket) -> None:
        """``c <- c + m``, ``x <- x + m + c`` with the round's ``m = Wbar x^k - x^k`` (``x - c``, then ``+ 2 c``)."""
        pending = self._pending.pop(id(bucket))
        if pending is None:
            return
        correction = bucket.state["correction"]
        bucket.params.sub_(correction)
        pending.finish(0, into=correction)
        bucket.params.add_(correction, alpha=2.0)

    def wait_pending(self) -> None:
        for pending in self._pending.values():
            if pending is not None:
                pending.wait()

    def finish_pending(self, buckets: list[Bucket]) -> None:
        """Apply the round in flight (a step of the recursion without a local step)."""
        for bucket in buckets:
            if id(bucket) in self._pending:
                self._apply(bucket)

    def cancel_pending(self, buckets: list[Bucket]) -> None:
        for bucket in buckets:
            self._pending.pop(id(bucket), None)

    def change_membership(self, buckets: list[Bucket], comm: Communicator, step: int, joined: torch.Tensor) -> None:
        remove_mean([b.state["correction"] for b in buckets], comm)
