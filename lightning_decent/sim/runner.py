"""Run the library's algorithms on n virtual nodes in one process.

The parameters of all nodes are one stacked tensor ``[n, dim]``; the local optimizer is
``torch.optim.SGD``, ``torch.optim.Adam`` (DAdam) or :class:`~lightning_decent.optim.AccumAdam` over
it (all element-wise, hence identical to n separate optimizers with per-node state), mixing is
``W(k) @ X`` through :class:`~lightning_decent.comm.SimulatedCommunicator`, and every step calls the
algorithm's hooks in the strategy's order::

    before_step -> forward/backward -> (transform_gradients) -> optimizer.step -> observe_loss -> after_step

For the push-sum algorithms (``push_sum``, ``push_diging``, ``mg_push_diging``) the parameters hold the
de-biased models ``z_i = x_i / v_i``; the metrics' network average is ``xbar = (1/n) sum_i v_i z_i``
(``= (1/n) sum_i x_i``, the quantity push-sum preserves), and ``consensus`` is
``(1/n) sum_i ||z_i - xbar||^2``. :attr:`SimResult.push_weights` keeps the final ``v``.

Membership changes (``membership=``, :mod:`~lightning_decent.sim.membership`): members leave and join
between steps (or in a step's exchange, ``during_exchange``), through the algorithm's ``cancel_pending`` and
``change_membership``. Such a run (or one
that starts with a subset of the problem's data shards, ``nodes=``) reports the loss of the members'
own objective, ``(1/n) sum_{i in members} f_i(xbar)``, without ``excess_loss``.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from lightning_decent.algorithms import Algorithm, LocalSteps, get_algorithm
from lightning_decent.optim import AccumAdam
from lightning_decent.sim.membership import (
    LostExchange,
    MemberLostError,
    Members,
    Schedule,
    build_members,
    change_members,
    membership_schedule,
)
from lightning_decent.sim.problems import Problem
from lightning_decent.topology import Topology

OPTIMIZER_KEYS = ("lr", "momentum", "weight_decay", "opt", "accum_iter", "beta1", "beta2", "eps")

#: Spec keys that go to the compressor (``choco:compression=topk:fraction=0.01``).
COMPRESSION_KEYS = ("block", "fraction")

#: Local optimizers of the simulator: ``sgd`` (momentum, weight decay), ``adam`` (DAdam: Adam on every
#: node, moments never communicated) and ``accum_adam`` (:class:`~lightning_decent.optim.AccumAdam`).
OPTIMIZERS = ("sgd", "adam", "accum_adam")

#: Name of the parallel-SGD baseline in results: :class:`~lightning_decent.algorithms.DDP` (the gradients
#: averaged over all nodes, then one optimizer step: DDP's update for every optimizer, Adam included).
BASELINE = "p_sgd"


@dataclass
class AlgorithmSpec:
    """An algorithm to simulate, parsed from ``name:key=value:key=value`` (e.g. ``dsgd:momentum=0.9``,
    ``dsgd:global_average_every=4``, ``gut:mu=0.5``, ``dsgd:opt=adam:lr=0.001``,
    ``dsgd:opt=accum_adam:accum_iter=4``, ``push_diging:rounds=3``, ``choco:compression=topk:fraction=0.01``).

    The optimizer keys go to the local optimizer (``optimizer`` holds :func:`simulate`'s keyword
    arguments): ``opt`` (one of :data:`OPTIMIZERS`), ``lr``, ``momentum`` (SGD only), ``weight_decay``
    (L2 for all three), ``accum_iter`` (AccumAdam's ``s``), ``beta1``, ``beta2`` and ``eps`` (Adam and
    AccumAdam). ``block`` and ``fraction`` go to the compressor (``compression_options``). Every other
    key goes to :func:`~lightning_decent.algorithms.get_algorithm`."""

    label: str
    name: str
    options: dict[str, Any] = field(default_factory=dict)
    optimizer: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def parse(cls, text: str) -> AlgorithmSpec:
        name, *pairs = [part.strip() for part in text.strip().split(":")]
        options: dict[str, Any] = {}
        raw: dict[str, Any] = {}
        for pair in pairs:
            key, sep, value = pair.partition("=")
            if not sep or not key:
                raise ValueError(f"Cannot parse {pair!r} in algorithm spec {text!r}; write name:key=value:key=value.")
            parsed = _parse_value(value)
            if key in OPTIMIZER_KEYS:
                raw[key] = parsed
            elif key in COMPRESSION_KEYS:
                options.setdefault("compression_options", {})[key] = parsed
            else:
                options[key] = parsed
        return cls(label=text.strip(), name=name, options=options, optimizer=_optimizer_settings(raw, text))


def _optimizer_settings(raw: dict[str, Any], text: str) -> dict[str, Any]:
    """Spec keys (``opt``, ``beta1`` ...) as :func:`simulate` keyword arguments (``optimizer``, ``betas`` ...)."""
    settings: dict[str, Any] = {}
    for key in ("lr", "momentum", "weight_decay", "eps"):
        if key in raw:
            settings[key] = float(raw[key])
    if "opt" in raw:
        settings["optimizer"] = str(raw["opt"]).lower()
        if settings["optimizer"] not in OPTIMIZERS:
            raise ValueError(f"Unknown opt={raw['opt']!r} in {text!r}; valid: {', '.join(OPTIMIZERS)}.")
    if "accum_iter" in raw:
        settings["accum_iter"] = int(raw["accum_iter"])
    if "beta1" in raw or "beta2" in raw:
        settings["betas"] = (float(raw.get("beta1", 0.9)), float(raw.get("beta2", 0.999)))
    return settings


def make_optimizer(
    params: torch.Tensor,
    optimizer: str = "sgd",
    *,
    lr: float,
    momentum: float = 0.0,
    weight_decay: float = 0.0,
    accum_iter: int = 4,
    betas: tuple[float, float] = (0.9, 0.999),
    eps: float = 1e-8,
) -> torch.optim.Optimizer:
    """The local optimizer over the stacked ``[n, dim]`` parameters (element-wise: one per node).

    Raises:
        ValueError: for an unknown name, or ``momentum`` given to an Adam variant.
    """
    name = optimizer.lower()
    if name not in OPTIMIZERS:
        raise ValueError(f"Unknown optimizer {optimizer!r}; valid: {', '.join(OPTIMIZERS)}.")
    if name == "sgd":
        return torch.optim.SGD([params], lr=lr, momentum=momentum, weight_decay=weight_decay)
    if momentum:
        raise ValueError(f"momentum={momentum:g} is an SGD option; {name} uses betas={betas} instead.")
    if name == "adam":
        return torch.optim.Adam([params], lr=lr, betas=betas, eps=eps, weight_decay=weight_decay)
    return AccumAdam([params], lr=lr, betas=betas, eps=eps, weight_decay=weight_decay, accum_iter=accum_iter)


def _parse_value(text: str) -> Any:
    lowered = text.strip().lower()
    if lowered in ("true", "false"):
        return lowered == "true"
    if lowered in ("none", "null"):
        return None
    for kind in (int, float):
        try:
            return kind(text)
        except ValueError:
            pass
    return text.strip()


@dataclass
class SimResult:
    """What one simulated run produced.

    ``series`` maps ``loss`` (``f(xbar)``), ``excess_loss`` (``f(xbar) - f*`` when ``f*`` is known),
    ``grad_norm_sq`` (``||grad f(xbar)||^2``), ``consensus`` (``(1/n) sum_i ||x_i - xbar||^2``) and, for
    classification, ``accuracy`` of ``xbar`` to their values at the steps in ``steps``. ``params`` are
    the final parameters (``z`` for push-sum algorithms) and ``push_weights`` the final push-sum
    weights ``v`` (``[n, 1]``; ``None`` for the other algorithms). ``members`` is the data shard of every
    row of ``params`` when the members are not the problem's nodes ``0..n-1`` in order (membership
    changes, ``nodes=``), and ``changes`` records every membership change (step, new ``n``, shards).
    """

    label: str
    algorithm: str
    topology: str
    steps: list[int]
    series: dict[str, list[float]]
    params: torch.Tensor
    seconds: float
    rounds_per_step: int
    buffers_per_round: int
    extra_memory: float
    bytes_sent_per_node_step: float
    transient: int | None = None
    #: Steps between two communications: ``H`` for the local-steps algorithms, else 1.
    sync_period: int = 1
    push_weights: torch.Tensor | None = None
    members: list[int] | None = None
    changes: list[dict[str, Any]] = field(default_factory=list)

    def final(self, metric: str) -> float:
        return self.series[metric][-1]

    def node_params(self, shard: int) -> torch.Tensor:
        """The final parameters of the member that holds data shard ``shard`` (node ``shard`` when the
        members never changed): what a real run's rank training on that shard ends with.

        Raises:
            ValueError: if no member holds it.
        """
        members = self.members if self.members is not None else list(range(self.params.shape[0]))
        if shard not in members:
            raise ValueError(f"no member holds data shard {shard} at the end; the members hold {members}.")
        return self.params[members.index(shard)]

    def as_dict(self) -> dict[str, Any]:
        return {
            "algorithm": self.algorithm,
            "topology": self.topology,
            "steps": self.steps,
            **self.series,
            "transient_step": self.transient,
            "seconds": self.seconds,
            "rounds_per_step": self.rounds_per_step,
            "buffers_per_round": self.buffers_per_round,
            "sync_period": self.sync_period,
            "extra_memory": self.extra_memory,
            "bytes_sent_per_node_step": self.bytes_sent_per_node_step,
            **({"members": self.members, "membership_changes": self.changes} if self.changes else {}),
        }


def stacked_average(params: torch.Tensor, push_weights: torch.Tensor | None = None) -> torch.Tensor:
    """The average model of the simulated nodes, from their stacked ``[n, dim]`` rows: ``(1/n) sum_i x_i``, or
    ``(1/n) sum_i v_i z_i`` for push-sum (``params = z``)."""
    params = params.detach()
    return params.mean(dim=0) if push_weights is None else (push_weights.detach() * params).mean(dim=0)


def _metrics(
    problem: Problem,
    params: torch.Tensor,
    optimum_loss: float | None,
    push_weights: torch.Tensor | None = None,
    shards: torch.Tensor | None = None,
) -> dict[str, float]:
    xbar = stacked_average(params, push_weights).requires_grad_(True)
    if shards is None:
        loss = problem.global_loss(xbar)
    else:  # the members' own objective
        loss = problem.local_losses(xbar.expand(len(shards), -1), nodes=shards).mean()
    (grad,) = torch.autograd.grad(loss, xbar)
    values = {
        "loss": loss.item(),
        "grad_norm_sq": grad.pow(2).sum().item(),
        "consensus": (params.detach() - xbar.detach()).pow(2).sum(dim=1).mean().item(),
    }
    if optimum_loss is not None:
        values["excess_loss"] = values["loss"] - optimum_loss
    with torch.no_grad():
        accuracy = problem.accuracy(xbar.detach())
    if accuracy is not None:
        values["accuracy"] = accuracy
    return values


def simulate(
    problem: Problem,
    algorithm: str | Algorithm = "dsgd",
    topology: str | Topology = "ring",
    *,
    steps: int,
    lr: float,
    momentum: float = 0.0,
    weight_decay: float = 0.0,
    optimizer: str = "sgd",
    accum_iter: int = 4,
    betas: tuple[float, float] = (0.9, 0.999),
    eps: float = 1e-8,
    noise: float = 0.0,
    eval_every: int = 10,
    seed: int = 0,
    dtype: torch.dtype = torch.float64,
    label: str | None = None,
    finish_in_flight: bool = True,
    membership: Schedule = None,
    nodes: Sequence[int] | None = None,
    **algorithm_options: Any,
) -> SimResult:
    """Run ``steps`` steps of ``algorithm`` on ``problem`` over ``topology`` (built for ``problem.n``, or
    for the number of members).

    Args:
        problem: the local objectives; its data must have ``dtype``.
        algorithm: a name for :func:`~lightning_decent.algorithms.get_algorithm` (with
            ``algorithm_options``) or a built algorithm.
        topology: a name for :func:`~lightning_decent.topology.get_topology` or a built topology.
        steps, lr, momentum, weight_decay: the local optimizer's schedule (constant ``lr``; ``momentum``
            is SGD's only).
        optimizer: ``sgd``, ``adam`` (DAdam) or ``accum_adam`` (AccumAdam with ``accum_iter``), see
            :func:`make_optimizer`; ``betas`` and ``eps`` are the Adam variants'.
        noise: standard deviation of Gaussian noise added to every gradient coordinate (0: exact
            local gradients, or the problem's own mini-batches).
        eval_every: record metrics every this many steps (and at the first and last step).
        seed: seeds the gradient noise and mini-batch sampling (the problem has its own seed).
        dtype: the parameters' dtype.
        label: the name of the run in results (default: the algorithm's name).
        finish_in_flight: after the last step, apply the exchanges still in flight (overlap, streaming
            local steps), as the strategy does at the end of training. ``False`` reports the iterate
            ``x^K`` of the overlapped recursion itself, as papers' tables do.
        membership: changes of the member set, e.g. ``[(100, {"leave": [3]}), (200, {"join_from": [0]})]``
            (before step 100 the member in row 3 leaves; before step 200 a joiner receives row 0's state),
            :class:`~lightning_decent.sim.membership.MembershipChange` objects or the command line's text;
            ``topology`` must then be a name (it is built again for every ``n``).
        nodes: the problem's data shards the initial members hold (default: all ``problem.n``), e.g. the
            survivors' shards for the uninterrupted run of the new size.

    Raises:
        ValueError: naming the fix, for a schedule that cannot run (see
            :func:`~lightning_decent.sim.membership.membership_schedule`).
    """
    algo = get_algorithm(algorithm, **algorithm_options)
    changes = membership_schedule(membership, steps)
    if changes and not isinstance(topology, str):
        raise ValueError(
            f"membership changes rebuild the topology for every n, so give it by name (e.g. 'ring'), not the built "
            f"topology {topology.name!r}."
        )
    shards = _initial_shards(nodes, problem.n)
    first = problem.initial_params().to(dtype).expand(problem.n if shards is None else len(shards), -1).clone()

    def new_optimizer(params: torch.nn.Parameter) -> torch.optim.Optimizer:
        options = {"momentum": momentum, "weight_decay": weight_decay, "accum_iter": accum_iter}
        return make_optimizer(params, optimizer, lr=lr, betas=betas, eps=eps, **options)

    members = build_members(algo, topology, first, new_optimizer, shards)
    generator = torch.Generator().manual_seed(seed)
    noise_buffer: torch.Tensor | None = None
    optimum_loss = problem.optimum_loss() if shards is None and not changes else None
    node_steps = 0
    change_log: list[dict[str, Any]] = []

    history: dict[str, list[float]] = {}
    recorded: list[int] = []

    def record(step: int, members: Members) -> None:
        recorded.append(step)
        push_weights = members.bucket.state.get("push_weight")
        for key, value in _metrics(problem, members.params, optimum_loss, push_weights, members.shards).items():
            history.setdefault(key, []).append(value)

    record(0, members)
    start = time.perf_counter()
    for k in range(steps):
        if k in changes:
            members = change_members(members, changes[k], algo, str(topology), new_optimizer, problem.n)
            assert members.shards is not None
            change_log.append({"step": k, "n": members.n, "shards": members.shards.tolist()})
        params, bucket, comm = members.params, members.bucket, members.comm
        node_steps += members.n
        algo.before_step([bucket], comm, k)
        members.optimizer.zero_grad(set_to_none=False)
        batch = problem.sample_batch(generator)
        if members.shards is None:
            losses = problem.local_losses(params, batch=batch)
        else:
            batch = None if batch is None else batch[members.shards]
            losses = problem.local_losses(params, nodes=members.shards, batch=batch)
        losses.sum().backward()
        if noise > 0:
            if noise_buffer is None or noise_buffer.shape != params.shape:
                noise_buffer = torch.empty_like(params)
            params.grad.add_(
                torch.randn(noise_buffer.shape, generator=generator, dtype=dtype, out=noise_buffer), alpha=noise
            )
        if algo.transforms_gradients:
            bucket.grads = params.grad
            algo.transform_gradients([bucket], comm, k)
        members.optimizer.step()
        algo.observe_loss(losses.detach())
        coming = changes.get(k + 1)
        if coming is not None and coming.during_exchange:
            with contextlib.suppress(MemberLostError):  # the exchange a lost member interrupts: dropped
                algo.after_step([bucket], LostExchange(comm, k), k)  # type: ignore[arg-type]
        else:
            algo.after_step([bucket], comm, k)
        if finish_in_flight and k + 1 == steps:  # as the strategy's on_train_end
            algo.finish_pending([bucket])
        if (k + 1) % eval_every == 0 or k + 1 == steps:
            record(k + 1, members)
    seconds = time.perf_counter() - start
    push_weights = members.bucket.state.get("push_weight")
    return SimResult(
        label=label or algo.name,
        algorithm=algo.name,
        topology=members.graph.name,
        steps=recorded,
        series=history,
        params=members.params.detach().clone(),
        seconds=seconds,
        rounds_per_step=algo.rounds_per_step,
        buffers_per_round=algo.buffers_per_round,
        extra_memory=algo.extra_memory,
        bytes_sent_per_node_step=members.comm.stats.bytes_sent / max(node_steps, 1),
        push_weights=None if push_weights is None else push_weights.detach().clone(),
        members=None if members.shards is None else members.shards.tolist(),
        changes=change_log,
        sync_period=algo.schedule.period if isinstance(algo, LocalSteps) else 1,
    )


def _initial_shards(nodes: Sequence[int] | None, capacity: int) -> torch.Tensor | None:
    """The initial members' data shards (``None``: all of the problem's, in order).

    Raises:
        ValueError: for shards outside ``0..capacity-1``, repeated, or none.
    """
    if nodes is None:
        return None
    shards = [int(s) for s in nodes]
    if not shards or len(set(shards)) != len(shards) or not all(0 <= s < capacity for s in shards):
        raise ValueError(
            f"nodes={list(nodes)} must name distinct data shards of the problem, in 0..{capacity - 1}, at least one."
        )
    return torch.tensor(shards)


def transient_step(result: SimResult, baseline: SimResult, metric: str, factor: float = 2.0) -> int | None:
    """First recorded step from which ``result`` stays within ``factor`` times the baseline's ``metric``
    (e.g. ``excess_loss``) at every later recorded step; values below ``1e-10`` times the initial value
    count as converged. ``None`` if it is not within the factor at the end."""
    ours, theirs = result.series[metric], baseline.series[metric]
    floor = 1e-10 * abs(ours[0])
    within = [a <= factor * b + floor for a, b in zip(ours, theirs)]
    if not within or not within[-1]:
        return None
    first = len(within) - 1
    while first > 0 and within[first - 1]:
        first -= 1
    return result.steps[first]


def compare(
    problem: Problem,
    specs: list[str | AlgorithmSpec],
    topology: str | Topology = "ring",
    *,
    steps: int,
    lr: float,
    momentum: float = 0.0,
    factor: float = 2.0,
    **run_options: Any,
) -> dict[str, SimResult]:
    """Simulate every spec on ``topology`` and the parallel-SGD baseline (:data:`BASELINE`: ``ddp``, the
    gradients averaged over all nodes and one step of the same optimizer), and fill each result's
    transient step against it (on ``excess_loss`` when the optimum is known, else ``loss``).

    ``run_options`` go to every :func:`simulate` call (e.g. ``optimizer="adam"`` for all, baseline
    included); a spec's own optimizer keys override them for that spec."""
    baseline = simulate(
        problem, "ddp", "complete", steps=steps, lr=lr, momentum=momentum, label=BASELINE, **run_options
    )
    metric = "excess_loss" if "excess_loss" in baseline.series else "loss"
    results = {BASELINE: baseline}
    for spec in specs:
        spec = spec if isinstance(spec, AlgorithmSpec) else AlgorithmSpec.parse(spec)
        settings = {"lr": lr, "momentum": momentum, **run_options, **spec.optimizer}
        if settings.get("optimizer", "sgd") != "sgd" and "momentum" not in spec.optimizer:
            settings["momentum"] = 0.0  # the shared SGD momentum does not apply to an Adam spec
        result = simulate(problem, spec.name, topology, steps=steps, label=spec.label, **settings, **spec.options)
        result.transient = transient_step(result, baseline, metric, factor)
        results[spec.label] = result
    return results
