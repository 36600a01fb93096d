"""Hand-written recursions of the local-steps papers, for the tests (no library code but the problems).

* :func:`diloco_reference`: DiLoCo (Douillard et al. 2023) with Streaming DiLoCo's fragments, delay and
  merge (Douillard et al. 2025) and a post-local-SGD warm-up; inner SGD with momentum and outer Nesterov
  written out in PyTorch's formulas.
* :func:`gasloc_reference`: GASLoC's recursion (Cagnasso, Belilovsky & Oyallon 2026) with outer SGD,
  ``A <- W (A + eta G) + gamma [(A + eta G) - (A_prev + eta G_prev)]`` as stacked matrices.

Both return the ``[n, dim]`` models after ``steps`` inner steps, with exchanges still in flight applied
at the end (as the strategy does when training ends). With a ``compressor``, what a rank sends goes
through error feedback: DiLoCo's average is the two-stage compressed average (:func:`two_stage_reference`),
GASLoC sends ``C(y_i + e_i)`` (the compressor's own round trip is the only library code used).
"""

from __future__ import annotations

import torch

from lightning_decent.comm import Compressor
from lightning_decent.sim import Problem
from lightning_decent.topology import Topology


class _InnerSGD:
    """``b <- mu b + g`` (``b = g`` at the first step), ``x <- x - lr b``: PyTorch's SGD without dampening."""

    def __init__(self, lr: float, momentum: float) -> None:
        self.lr, self.momentum, self.buffer = lr, momentum, None

    def step(self, problem: Problem, x: torch.Tensor) -> torch.Tensor:
        x = x.detach().requires_grad_(True)
        (grad,) = torch.autograd.grad(problem.local_losses(x).sum(), x)
        self.buffer = grad if self.buffer is None else self.momentum * self.buffer + grad
        return (x - self.lr * (self.buffer if self.momentum else grad)).detach()


def two_stage_reference(
    values: torch.Tensor, residual: torch.Tensor, shard_residual: torch.Tensor, compressor: Compressor
) -> torch.Tensor:
    """The compressed average of the rows of ``values`` ``[n, m]`` with error feedback in both stages, by
    hand: rank ``i`` sends ``v_i = values_i + e_i`` cut into ``n`` shards of ``L`` (a multiple of the
    compressor's block, zero-padded), each compressed; ``e_i <- v_i - C(v_i)``. Rank ``s`` averages the
    decoded shards ``s``, adds its residual ``f_s``, and sends ``C(a_s)`` to all; ``f_s <- a_s - C(a_s)``.
    Returns the average every rank decodes; ``residual`` and ``shard_residual`` (rank ``s`` keeps shard
    ``s``'s positions) are updated in place."""
    n, m = values.shape
    block = compressor.alignment
    length = -(-m // (n * block)) * block
    sent = values.new_zeros(n, n * length)
    sent[:, :m] = values + residual
    padded_before = sent[:, :m].clone()
    sent = compressor.roundtrip(sent.view(n * n, length)).view(n, n * length)
    residual.copy_(padded_before - sent[:, :m])
    owned = values.new_zeros(n, n * length)
    owned[:, :m] = shard_residual
    ranks = torch.arange(n)
    averages = sent.view(n, n, length).mean(dim=0) + owned.view(n, n, length)[ranks, ranks]
    shared = compressor.roundtrip(averages)
    owned.view(n, n, length)[ranks, ranks] = averages - shared
    shard_residual.copy_(owned[:, :m])
    return shared.reshape(-1)[:m]


def diloco_reference(
    problem: Problem,
    steps: int,
    lr: float,
    H: int,
    *,
    momentum: float = 0.0,
    outer_lr: float = 0.7,
    outer_momentum: float = 0.9,
    fragments: int = 1,
    delay: int = 0,
    mix: float = 0.0,
    warmup_steps: int = 0,
    compressor: Compressor | None = None,
) -> torch.Tensor:
    """Streaming DiLoCo by hand. After inner step ``t`` (1-based): during the warm-up (``t <= K``) the
    models become their average; then, with ``j = t - K``, fragment ``p = (j / (H/F) - 1) mod F`` starts
    when ``H/F`` divides ``j``: ``D = mean_i(a_p - x_{i,p})``; ``delay`` steps later
    ``m_p <- mu m_p + D``, ``a_p <- a_p - eta (D + mu m_p)`` (Nesterov) and
    ``x_{i,p} <- mix x_{i,p} + (1 - mix) a_p``. Fragments: ``F`` contiguous slices, edges ``dim * p // F``."""
    x = problem.initial_params().expand(problem.n, -1).clone()
    anchor, outer_buffer = problem.initial_params().clone(), torch.zeros(problem.dim, dtype=torch.float64)
    edges = [problem.dim * p // fragments for p in range(fragments + 1)]
    stride = H // fragments
    inner = _InnerSGD(lr, momentum)
    in_flight: dict[int, tuple[int, torch.Tensor]] = {}
    residual, shard_residual = torch.zeros_like(x), torch.zeros_like(x)

    def averaged(part: slice, deltas: torch.Tensor) -> torch.Tensor:
        if compressor is None:
            return deltas.mean(dim=0)
        return two_stage_reference(deltas, residual[:, part], shard_residual[:, part], compressor)

    def apply(p: int, average: torch.Tensor) -> None:
        part = slice(edges[p], edges[p + 1])
        outer_buffer[part] = outer_momentum * outer_buffer[part] + average
        anchor[part] = anchor[part] - outer_lr * (average + outer_momentum * outer_buffer[part])
        x[:, part] = mix * x[:, part] + (1 - mix) * anchor[part] if mix else anchor[part]

    for t in range(1, steps + 1):
        x = inner.step(problem, x)
        if t <= warmup_steps:
            x[:] = x.mean(dim=0)
            anchor = x[0].clone()
            continue
        for p, (due, average) in list(in_flight.items()):
            if due == t:
                apply(p, average)
                del in_flight[p]
        j = t - warmup_steps
        if j % stride == 0:
            p = (j // stride - 1) % fragments
            part = slice(edges[p], edges[p + 1])
            in_flight[p] = (t + delay, averaged(part, anchor[part] - x[:, part]))
            if delay == 0:
                apply(p, in_flight.pop(p)[1])
    for p, (_, average) in in_flight.items():
        apply(p, average)
    return x


def gasloc_reference(
    problem: Problem,
    topology: Topology,
    steps: int,
    lr: float,
    H: int,
    *,
    outer_lr: float,
    gamma: float,
    compressor: Compressor | None = None,
) -> torch.Tensor:
    """GASLoC by hand (outer SGD of rate ``eta``): after every ``H`` inner steps, the ``r``-th time,
    ``Y = A + eta (X - A)``, ``A <- W(r) S + gamma (Y - Y_prev)`` (``Y_prev = X^0`` at first), ``X <- A``,
    where ``S = Y``, or with a compressor ``S = C(Y + E)`` row by row and ``E <- Y + E - S``."""
    x = problem.initial_params().expand(problem.n, -1).clone()
    anchors, previous = x.clone(), x.clone()
    residual = torch.zeros_like(x)
    inner = _InnerSGD(lr, 0.0)
    for t in range(1, steps + 1):
        x = inner.step(problem, x)
        if t % H == 0:
            proposal = anchors + outer_lr * (x - anchors)
            sent = proposal
            if compressor is not None:
                sent = compressor.roundtrip(proposal + residual)
                residual = proposal + residual - sent
            anchors = topology.weights(t // H - 1) @ sent + gamma * (proposal - previous)
            previous, x = proposal, anchors.clone()
    return x
