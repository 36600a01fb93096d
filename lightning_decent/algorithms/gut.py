"""Global Update Tracking (GUT) and its quasi-global momentum version (QG-GUTm)."""

from __future__ import annotations

import torch

from lightning_decent.algorithms.base import Algorithm, Bucket, require_plain_sgd
from lightning_decent.algorithms.gut_stability import check_gossip_stability
from lightning_decent.comm import Communicator
from lightning_decent.topology import Topology


class GUT(Algorithm):
    """Global Update Tracking (Aketi, Hashemi & Roy, NeurIPS 2023; the order of the authors' code,
    ``aparna-aketi/global_update_tracking``), with its momentum ``beta`` (QG-GUTm when ``beta > 0``).

    Per node, with ``M_i^t = sum_j W[i, j] x_j^t`` (this step's gossip of the models) and
    ``G_i^t = M_i^t - x_i^t``, ``b = 1 + beta``, in parameter units (``lr`` times the code's units)::

        a_i^t   = (M_i^t - M_i^{t-1}) + b G_i^{t-1}            (neighbours' last update, gossip removed)
        D_i^t   = lr g_i(M_i^t) - G_i^t                        (local update at the gossiped model)
        Y_i^t   = D_i^t - mu a_i^t - mu D_i^{t-1}              (tracks the network's update)
        B_i^t   = beta B_i^{t-1} + Y_i^t ;   x_i^{t+1} = x_i^t - B_i^t

    ``mu`` is the paper's scaling factor (``mu = 0`` gives D-SGD, adapt-then-combine, with the gradient
    at the gossiped model; ``beta > 0, mu = 0`` is the GUT code's "QG-DSGDm"). GUT does not remove the
    heterogeneity bias completely: it shrinks it by about ``(1 - mu)``.

    Its gossip is a momentum-like recursion that, for some graphs and ``(mu, beta)``, amplifies
    disagreement whatever the learning rate (e.g. ``mu = 0.9`` on the one-peer exponential graph):
    :meth:`prepare_topology` refuses those with the largest stable ``mu`` named
    (:mod:`~lightning_decent.algorithms.gut_stability`). Periodic global averaging is checked on its
    whole schedule (an exact average every ``H`` steps can itself destabilise the recursion: ring, n = 8,
    ``H = 4``); an adaptive period, which changes at run time, is refused.

    Implementation (one gossip round per step):

    * ``before_step`` gossips and places the parameters at ``M^t``, so forward and backward run at the
      gossiped model, as in the code. ``M^{t-1}`` is kept in one buffer: the code's memory-efficient
      neighbour sum ``s_i = sum_{j != i} W[i, j] x_j`` plus the self term, instead of one copy per
      neighbour. On a static graph one buffer, the model, is sent and ``M^t - M^{t-1} = W(x^t - x^{t-1})``
      (the code sends the difference and adds it to ``s``: same numbers). When the mixing changes
      between steps (time-varying graphs such as one-peer exponential, or periodic global averaging)
      that identity fails and the incremental sum would be wrong, so the model difference
      ``x^t - x^{t-1}`` is sent too (2 buffers in the same round) and mixed with this step's ``W(t)``.
    * the user's optimizer steps from ``M^t``, so its displacement is ``lr g(M^t) = D + G``; the
      learning rate is never needed and may vary per parameter group. With a constant rate this is the
      code's update exactly; when a scheduler changes it, ``D^{t-1}`` and ``B`` keep the old rate's
      size (the code rescales them, one step late). L2 weight decay of the optimizer acts at the
      gossiped model (the code applies it at ``x^t``).
    * the algorithm owns the momentum ``beta``: the optimizer must be ``torch.optim.SGD`` without
      momentum.

    Communication: 1 round x 1 buffer per step on a static graph (x 2 buffers when the mixing
    changes). Extra memory: 3 models (``x^{t-1}``, ``M^{t-1}``, ``D^{t-1}``), plus 1 for the momentum
    when ``beta > 0``, plus 1 model of workspace.

    Membership change: summed over the nodes (doubly stochastic ``W``), ``sum_i G_i = 0`` and
    ``sum_i a_i^t = sum_i (x_i^t - x_i^{t-1})``, so the tracked update satisfies
    ``sum_i Y_i^t = sum_i D_i^t + mu sum_i (B_i^{t-1} - D_i^{t-1})``: the network mean follows the same
    recursion as one node would. A lost node breaks both sums: its share of the last gossip
    (``sum_{i != l} G_i^{t-1} = -G_l^{t-1}``) and of the last updates is gone, and ``M^{t-1} = W x^{t-1}``
    was formed with the old ``W`` (the static-graph form needs ``M^t - M^{t-1} = W'(x^t - x^{t-1})``). The
    tracking memory is one step deep, so it restarts from the current models, as at ``t = 0``, on the new
    graph (one gossip round, with the operator the next step mixes with)::

        x_i^{t-1} <- x_i^t,   M_i^{t-1} <- sum_j W'[i, j] x_j^t,   D_i^{t-1} <- b (x_i^t - M_i^{t-1})

    Then ``sum_i G_i^{t-1} = 0`` and ``sum_i D_i^{t-1} = 0`` over the new members, and the next step has
    ``a_i^t + D_i^{t-1} = 0``: its tracked update is ``Y^t = D^t`` (a D-SGD step at the gossiped model, GUT's
    own first step), on either form (static or time-varying mixing). The momentum ``B_i``, which carries
    no network invariant, is kept (a joiner takes its source's), as QG-DSGDm keeps its own.

    Args:
        mu: scaling factor of the tracking correction (the authors' README: 0.9 for GUT).
        beta: quasi-global momentum factor (0 for GUT).
    """

    name = "gut"
    extra_memory = 3.0
    membership_rule = (
        "tracking restarts from the current models on the new graph (one gossip round): x^{t-1} = x, M^{t-1} = W'x, "
        "D^{t-1} = b (x - M^{t-1}); momentum B kept"
    )

    def __init__(self, mu: float = 0.9, beta: float = 0.0) -> None:
        if not 0.0 <= mu < 1.0:
            raise ValueError(f"{self.name} needs 0 <= mu < 1; got mu={mu}.")
        if not 0.0 <= beta < 1.0:
            raise ValueError(f"{self.name} needs 0 <= beta < 1; got beta={beta}.")
        self.mu = mu
        self.beta = beta
        self.extra_memory = GUT.extra_memory + (1.0 if beta > 0 else 0.0)
        self.send_difference = False

    def prepare_topology(self, topology: Topology, *, global_averaging: bool = False) -> Topology:
        topology = super().prepare_topology(topology)
        if not global_averaging:
            check_gossip_stability(topology, self.mu, self.beta, self.name)
        self.send_difference = topology.period > 1 or global_averaging
        self.buffers_per_round = 2 if self.send_difference else 1
        return topology

    def check_mixing(
        self, topology: Topology, *, global_average_every: int | None, adaptive: bool, gossip_rounds: int
    ) -> None:
        if adaptive:
            raise ValueError(
                f"{self.name} cannot use adaptive_global_average: the period changes at run time and GUT's "
                f"recursion is unstable for some periods (e.g. ring, n = 16: H = 3..12 with mu = 0.9), so its "
                f"stability cannot be checked. Use a fixed global_average_every=H (checked at set-up)."
            )
        check_gossip_stability(
            topology,
            self.mu,
            self.beta,
            self.name,
            global_average_every=global_average_every,
            gossip_rounds=gossip_rounds,
        )

    def check_optimizer(self, optimizer: torch.optim.Optimizer) -> None:
        require_plain_sgd(optimizer, self.name, self.beta)

    def init_state(self, bucket: Bucket) -> None:
        # All nodes start from the same x^0, so M^{-1} = x^{-1} = x^0 and a^0 = 0.
        bucket.state["previous_params"] = bucket.params.detach().clone()
        bucket.state["previous_mixed"] = bucket.params.detach().clone()
        bucket.state["previous_update"] = torch.zeros_like(bucket.params)
        if self.beta > 0:
            bucket.state["momentum"] = torch.zeros_like(bucket.params)
        bucket.workspace["tracking"] = torch.empty_like(bucket.params)

    @torch.no_grad()
    def before_step(self, buckets: list[Bucket], comm: Communicator, step: int) -> None:
        b_factor = 1.0 + self.beta
        for b in buckets:
            x_prev, mixed, a = b.state["previous_params"], b.state["previous_mixed"], b.workspace["tracking"]
            if self.send_difference:
                torch.sub(b.params, x_prev, out=a)  # x^t - x^{t-1}, mixed below
                mixed.sub_(x_prev).mul_(b_factor)  # b G^{t-1}
            else:
                torch.mul(mixed, b_factor - 1.0, out=a).sub_(x_prev, alpha=b_factor)  # (b-1) M^{t-1} - b x^{t-1}
            x_prev.copy_(b.params)  # x^t
        sent = [
            t for b in buckets for t in ((b.params, b.workspace["tracking"]) if self.send_difference else (b.params,))
        ]
        comm.mix(sent, step)  # parameters = M^t: forward and backward run here
        for b in buckets:
            mixed = b.state["previous_mixed"]
            b.workspace["tracking"].add_(mixed if self.send_difference else b.params)  # a^t
            mixed.copy_(b.params)

    @torch.no_grad()
    def after_step(self, buckets: list[Bucket], comm: Communicator, step: int) -> None:
        for b in buckets:
            x, update, y = b.state["previous_params"], b.state["previous_update"], b.workspace["tracking"]
            y.mul_(-self.mu).sub_(update, alpha=self.mu)  # -mu a^t - mu D^{t-1}
            torch.sub(x, b.params, out=update)  # D^t = x^t - (M^t - lr g)
            y.add_(update)  # Y^t
            if self.beta > 0:
                y = b.state["momentum"].mul_(self.beta).add_(y)  # B^t
            torch.sub(x, y, out=b.params)  # x^{t+1}

    @torch.no_grad()
    def change_membership(self, buckets: list[Bucket], comm: Communicator, step: int, joined: torch.Tensor) -> None:
        for b in buckets:
            b.state["previous_params"].copy_(b.params)
            b.state["previous_mixed"].copy_(b.params)
        comm.mix([b.state["previous_mixed"] for b in buckets], step)  # M^{t-1} = W' x^t, what before_step will mix
        for b in buckets:
            previous = b.state["previous_update"]
            torch.sub(b.params, b.state["previous_mixed"], out=previous).mul_(1.0 + self.beta)


class QGGUT(GUT):
    """QG-GUTm: :class:`GUT` with quasi-global momentum, README defaults ``beta = 0.9``, ``mu = 0.06``
    (the paper tunes ``mu`` per task: 0.005-0.08). Same update as :class:`GUT`.

    Communication: 1 round x 1 buffer per step on a static graph (x 2 buffers when the mixing
    changes). Extra memory: 4 models (``x^{t-1}``, ``M^{t-1}``, ``D^{t-1}``, momentum), plus 1 model of
    workspace.
    """

    name = "qg_gut"
    extra_memory = 4.0

    def __init__(self, mu: float = 0.06, beta: float = 0.9) -> None:
        super().__init__(mu=mu, beta=beta)
