"""Push-sum algorithms for directed (column-stochastic) graphs: SGP, Push-DIGing, MG-Push-DIGing.

On a column-stochastic ``W`` (``1^T W = 1^T`` only) plain gossip converges to the ``pi``-weighted
average, not the average. Push-sum carries a weight ``v_i`` (``v^0 = 1``) mixed with the same ``W``;
``sum_i x_i`` and ``sum_i v_i = n`` are preserved, and the de-biased ``z_i = x_i / v_i`` reaches the
average. Between steps the parameters hold ``z_i`` (so evaluation, checkpoints and gradients see
the de-biased model); the numerator is rebuilt for sending as ``x_i = v_i z_i``.
"""

from __future__ import annotations

import math

import torch

from lightning_decent.algorithms.base import PREVIOUS, Algorithm, Bucket, allocate_previous, save_previous
from lightning_decent.algorithms.membership import restore_sum
from lightning_decent.comm import Communicator
from lightning_decent.topology import Topology
from lightning_decent.topology.metrics import equilibrium_skewness, generalized_consensus_rate, period_product

PUSH_SUM_ALGORITHMS = ("push_sum", "push_diging", "mg_push_diging")


def _require_column_stochastic(topology: Topology, name: str) -> None:
    if not topology.column_stochastic:
        raise ValueError(
            f"algorithm={name!r} needs a column-stochastic mixing matrix (every node's out-weights sum to 1); "
            f"topology {topology.name!r} is not. Build directed graphs with directed_graph(edges=...) or "
            f"from_matrix(W, require='column')."
        )


class _PushSumAverage(Algorithm):
    """The network average of push-sum methods, weighted by the push-sum weights."""

    def average_weight(self, buckets: list[Bucket]) -> float:
        """``v_i``: the average is ``(1/n) sum_i v_i z_i = (1/n) sum_i x_i``, the quantity push-sum preserves
        (``sum_i v_i = n``), not the mean of the de-biased ``z_i``, which differs before consensus. Every
        bucket is mixed in the same rounds, so they share ``v_i``."""
        return float(buckets[0].state["push_weight"]) if buckets else 1.0


def _numerator_from_step(bucket: Bucket) -> None:
    """``x^{k+1/2} = v z^k - lr d`` from the optimizer's ``z^k - lr d`` and the saved ``z^k``.

    (The optimizer stepped the de-biased ``z``; push-sum applies the step to the numerator ``x``.)
    """
    previous, weight = bucket.workspace[PREVIOUS], bucket.state["push_weight"]
    bucket.params.add_(previous.mul_(weight - 1))


class PushSum(_PushSumAverage):
    """Stochastic Gradient Push (Assran, Loizou, Ballas & Rabbat, ICML 2019)::

        z_i^k       = x_i^k / v_i^k                            (gradients at the de-biased model)
        x_i^{k+1/2} = x_i^k - lr d_i(grad F(z_i^k))             (the user's optimizer direction)
        x_i^{k+1}   = sum_j W[i, j](k) x_j^{k+1/2}    }
        v_i^{k+1}   = sum_j W[i, j](k) v_j^k          }  one round: the model and one scalar

    ``W`` only needs to be column-stochastic: static digraphs and time-varying directed graphs
    (e.g. ``one_peer_exponential``) work; on doubly stochastic graphs ``v`` stays 1 and this is D-SGD.
    Any optimizer (SGP's recipes use Nesterov momentum, which stays local).

    Communication: 1 round x (1 buffer + 1 scalar) per step. Extra memory: a push-sum scalar, plus 1
    model of workspace (the parameters before the step).

    Membership change: push-sum is correct because ``W`` conserves the mass, ``sum_i x_i`` and
    ``sum_i v_i = n`` (Kempe, Dobra & Gehrke, FOCS 2003). A lost node takes its mass ``(x_l, v_l)`` with
    it, and a joiner that copied its source would count the source's mass twice, so the members restart
    push-sum from their de-biased models::

        v_i <- 1,   x_i = v_i z_i = z_i        (the parameters hold z_i: unchanged)

    which gives ``sum_i v_i = n'`` exactly, every member's model ``z_i`` continuous, and the network average
    ``(1/n') sum_i z_i``; from there push-sum converges as from any start. No communication.
    """

    name = "push_sum"
    needs_doubly_stochastic = False
    membership_rule = "push-sum restarts from the de-biased models: v_i = 1 (so sum v = n'), x_i = z_i unchanged"

    def prepare_topology(self, topology: Topology, *, global_averaging: bool = False) -> Topology:
        _require_column_stochastic(topology, self.name)
        return topology

    def init_state(self, bucket: Bucket) -> None:
        bucket.state["push_weight"] = bucket.node_scalar(1.0)
        allocate_previous(bucket)

    def before_step(self, buckets: list[Bucket], comm: Communicator, step: int) -> None:
        save_previous(buckets)

    @torch.no_grad()
    def after_step(self, buckets: list[Bucket], comm: Communicator, step: int) -> None:
        for b in buckets:
            _numerator_from_step(b)
        comm.mix([t for b in buckets for t in (b.params, b.state["push_weight"])], step)
        for b in buckets:
            b.params.div_(b.state["push_weight"])

    def change_membership(self, buckets: list[Bucket], comm: Communicator, step: int, joined: torch.Tensor) -> None:
        for b in buckets:
            b.state["push_weight"].fill_(1.0)


def recommended_gossip_rounds(topology: Topology) -> int:
    """MG-Push-DIGing's ``R = (1 + sqrt(ln kappa_pi))^2 / (1 - beta_pi)`` (Liang, Huang, Xin & Yuan 2023),
    rounded up, for the mixing of one whole period.

    For a time-varying graph one application of the mixing is the period's product
    ``P = W(tau - 1) ... W(0)`` (``tau`` rounds), so ``R = tau * ceil((1 + sqrt(ln kappa_pi(P)))^2 / (1 -
    beta_pi(P)))`` rounds: e.g. one-peer exponential with ``n = 2^k`` averages exactly over a period
    (``beta_pi(P) = 0``, ``kappa_pi = 1``), so ``R = tau = k``. A static graph has ``tau = 1``."""
    product = period_product(topology)
    beta, kappa = generalized_consensus_rate(product), equilibrium_skewness(product)
    if beta >= 1.0:
        raise ValueError(
            f"topology {topology.name!r} has beta_pi = {beta:.3g} >= 1 over a period, so no number of "
            f"gossip rounds is recommended; pass rounds=R explicitly."
        )
    log_kappa = math.log(kappa) if kappa > 1.0 + 1e-9 else 0.0  # rounding noise of a balanced product
    rounds = (1 + math.sqrt(log_kappa)) ** 2 / (1 - beta)
    return topology.period * math.ceil(rounds - 1e-9)  # 1.0000000000000002 is one application, not two


class PushDIGing(_PushSumAverage):
    """Push-DIGing: push-sum gradient tracking (Nedić, Olshevsky & Shi, SIAM J. Optim. 2017), in the
    form of Liang, Huang, Xin & Yuan 2023 (the tracker is combined after adding the new gradient),
    with ``R`` gossip rounds per exchange (``W^R``; ``R > 1`` is MG-Push-DIGing)::

        x^{k+1} = W^R (x^k - lr y^k)          v^{k+1} = W^R v^k          z^{k+1} = x^{k+1} / v^{k+1}
        y^{k+1} = W^R (y^k + g(z^{k+1}) - g(z^k))                        y^0 = g(z^0)

    ``g`` is the mini-batch gradient at the de-biased model; MG-Push-DIGing also averages ``R``
    samples per step (give it an ``R`` times larger batch). The tracker exchange of iteration ``k``
    runs once ``g(z^{k+1})`` exists, i.e. inside the next step. Exact with a constant step size on
    heterogeneous data, on any column-stochastic ``W``. The optimizer must be plain SGD (the update
    is ``x - lr y``).

    Communication: 2 sequential exchanges of ``R`` rounds x 1 buffer (+1 scalar with ``x``) per step.
    Extra memory: 2 models (tracker ``y``, previous gradient) and a push-sum scalar, plus 1 model of
    workspace.

    Membership change: push-sum restarts from the de-biased models as in :class:`PushSum` (``v_i = 1``,
    ``x_i = z_i``); the tracker, a numerator like ``x`` (``y_i / v_i`` estimates the average gradient), is
    de-biased with the same ``v_i``, then its sum restored by one global average, as gradient tracking's
    (``sum_i y_i = sum_i g_i^prev`` holds between steps from ``y^0 = g^0``)::

        y_i <- y_i / v_i,   v_i <- 1,   y_i <- y_i + (1/n') sum_j (g_j^prev - y_j)

    With ``rounds=None`` the recommended ``R`` is computed again for the new graph.

    Args:
        rounds: gossip rounds ``R`` per exchange; ``None`` picks :func:`recommended_gossip_rounds`.
    """

    name = "push_diging"
    needs_doubly_stochastic = False
    transforms_gradients = True
    extra_memory = 2.0
    membership_rule = (
        "push-sum restarts from the de-biased models (v_i = 1, y_i /= v_i), then one global average restores "
        "sum y = sum g^prev"
    )

    def __init__(self, rounds: int | None = 1) -> None:
        if rounds is not None and (int(rounds) != rounds or rounds < 1):
            raise ValueError(f"{self.name} needs rounds >= 1 (or None for the recommended value); got {rounds}.")
        self.rounds = rounds
        self.recommend_rounds = rounds is None
        self.rounds_per_step = 2 * (rounds or 1)

    def prepare_topology(self, topology: Topology, *, global_averaging: bool = False) -> Topology:
        _require_column_stochastic(topology, self.name)
        if self.recommend_rounds:
            self.rounds = recommended_gossip_rounds(topology)
            self.rounds_per_step = 2 * self.rounds
        return topology

    def check_optimizer(self, optimizer: torch.optim.Optimizer) -> None:
        plain = type(optimizer) is torch.optim.SGD and all(
            g.get("momentum", 0) == 0 and g.get("weight_decay", 0) == 0 for g in optimizer.param_groups
        )
        if not plain:
            raise ValueError(
                f"{self.name} steps along its tracked gradient, x - lr y: use torch.optim.SGD without momentum "
                f"and weight decay (got {type(optimizer).__name__} with {optimizer.defaults})."
            )

    def init_state(self, bucket: Bucket) -> None:
        bucket.state["push_weight"] = bucket.node_scalar(1.0)
        bucket.state["tracker"] = torch.zeros_like(bucket.params)
        bucket.state["previous_grad"] = torch.zeros_like(bucket.params)
        allocate_previous(bucket)

    def _mix(self, buffers: list[torch.Tensor], comm: Communicator, step: int) -> None:
        rounds = self.rounds or 1
        for r in range(rounds):
            comm.mix(buffers, step * rounds + r)

    def before_step(self, buckets: list[Bucket], comm: Communicator, step: int) -> None:
        save_previous(buckets)

    @torch.no_grad()
    def transform_gradients(self, buckets: list[Bucket], comm: Communicator, step: int) -> None:
        for b in buckets:
            assert b.grads is not None
            tracker = b.state["tracker"]
            if step == 0:
                tracker.copy_(b.grads)
            else:
                tracker.add_(b.grads).sub_(b.state["previous_grad"])
            b.state["previous_grad"].copy_(b.grads)
        if step > 0:
            self._mix([b.state["tracker"] for b in buckets], comm, step)
        for b in buckets:
            b.grads.copy_(b.state["tracker"])

    @torch.no_grad()
    def after_step(self, buckets: list[Bucket], comm: Communicator, step: int) -> None:
        for b in buckets:
            _numerator_from_step(b)
        self._mix([t for b in buckets for t in (b.params, b.state["push_weight"])], comm, step)
        for b in buckets:
            b.params.div_(b.state["push_weight"])

    @torch.no_grad()
    def change_membership(self, buckets: list[Bucket], comm: Communicator, step: int, joined: torch.Tensor) -> None:
        for b in buckets:
            b.state["tracker"].div_(b.state["push_weight"])
            b.state["push_weight"].fill_(1.0)
        restore_sum([b.state["tracker"] for b in buckets], [b.state["previous_grad"] for b in buckets], comm)


class MGPushDIGing(PushDIGing):
    """MG-Push-DIGing (Liang, Huang, Xin & Yuan 2023): :class:`PushDIGing` with ``R`` rounds per
    exchange, by default ``R = ceil((1 + sqrt(ln kappa_pi))^2 / (1 - beta_pi))``."""

    name = "mg_push_diging"

    def __init__(self, rounds: int | None = None) -> None:
        super().__init__(rounds)
