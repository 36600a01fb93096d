"""Whether GUT's gossip recursion is stable on a graph, whatever the learning rate.

With the gradients switched off (``lr -> 0``), :class:`~lightning_decent.algorithms.gut.GUT` is the
linear recursion on ``(x^t, x^{t-1}, G^{t-1}, B^{t-1})``, per step with mixing matrix ``W``::

    G = (W - I) x
    Y = -G - mu (W (x - x_prev) + (1 + beta) G_prev) + mu G_prev
    B' = beta B + Y ;   x' = x - B' ;   x_prev' = x ;   G_prev' = G

Its blocks are polynomials in ``W``, so on the disagreement subspace (orthogonal to the consensus
vector, which every doubly stochastic ``W`` preserves) its spectral radius decides whether the
models ever agree: above 1, gossip itself amplifies disagreement and training diverges for small
learning rates (e.g. the README's ``mu = 0.9`` on the one-peer exponential graph, or
``beta = 0.9, mu = 0.06`` on the static exponential graph; the reference code diverges there too).
For the 1/3-ring and the complete graph both README settings are stable.

The modifiers change the mixing of some steps: with ``R`` gossip rounds a step mixes with
``W(kR + R - 1) ... W(kR)``, and with periodic global averaging every ``H``-th step mixes with the
exact average ``J = 11^T / n``. The check then runs on the product of the per-step operators over
one period of that schedule. An exact average alone does not make GUT stable: ``J`` removes the
disagreement of ``x`` but not that of the memory ``x^{t-1}, G^{t-1}, B``, and the jump from ``W`` to
``J`` drives them (ring, n = 8: ``qg_gut`` is unstable for ``H = 4..7``, ``gut`` for ``H = 3, 4``).
"""

from __future__ import annotations

import math

import numpy as np

from lightning_decent.topology import Topology

#: Largest ``n`` for which a time-varying, non-circulant graph is checked (a ``4n x 4n`` product).
MAX_DENSE_CHECK = 128

_MU_GRID = (0.9, 0.8, 0.7, 0.6, 0.5, 0.4, 0.3, 0.2, 0.1, 0.05, 0.02, 0.01, 0.0)


def _operator(w: np.ndarray, mu: float, beta: float) -> np.ndarray:
    """The ``lr -> 0`` step on ``(x, x_prev, G_prev, B)`` for each matrix in ``w`` (``[..., k, k]``)."""
    eye = np.broadcast_to(np.eye(w.shape[-1]), w.shape)
    zero = np.zeros(w.shape, dtype=w.dtype)
    gossip = w - eye
    y_x, y_prev, y_gossip = -gossip - mu * w, mu * w, -mu * beta * eye  # Y = y_x x + y_prev x_prev + y_gossip G_prev
    rows = [
        [eye - y_x, -y_prev, -y_gossip, -beta * eye],  # x' = x - beta B - Y
        [eye, zero, zero, zero],
        [gossip, zero, zero, zero],
        [y_x, y_prev, y_gossip, beta * eye],  # B' = beta B + Y
    ]
    return np.concatenate([np.concatenate(row, axis=-1) for row in rows], axis=-2)


def _is_circulant(m: np.ndarray) -> bool:
    n = len(m)
    idx = (np.arange(n)[None, :] - np.arange(n)[:, None]) % n
    return bool(np.allclose(m, m[0][idx], atol=1e-12))


def _disagreement_modes(topology: Topology) -> np.ndarray | None:
    """``[period, n - 1]`` eigenvalues of every phase on a common eigenbasis without the consensus mode,
    when one exists cheaply (phases that are all circulant, or a static graph); else ``None``."""
    mats = [topology.matrix(k) for k in range(topology.period)]
    if all(_is_circulant(m) for m in mats):
        return np.stack([np.fft.fft(m[0])[1:] for m in mats])  # Fourier mode 0 is the consensus
    if topology.period > 1:
        return None
    m = mats[0]
    lam = np.linalg.eigvalsh(m).astype(complex) if np.allclose(m, m.T, atol=1e-12) else np.linalg.eigvals(m)
    return np.delete(lam, np.argmin(np.abs(lam - 1.0)))[None, :]


def _step_phases(topology: Topology, global_average_every: int | None, gossip_rounds: int) -> list[tuple[int, ...]]:
    """The phases each step's ``R`` rounds use, for one cycle of the per-step pattern (steps ``0..p-1``)."""
    cycle = topology.period // math.gcd(topology.period, gossip_rounds)
    return [tuple((k * gossip_rounds + r) % topology.period for r in range(gossip_rounds)) for k in range(cycle)]


def _schedule_product(
    gossip: list[np.ndarray], average: np.ndarray, global_average_every: int | None
) -> tuple[np.ndarray, int]:
    """Product of the per-step operators over one period of the schedule, and that period in steps.

    ``gossip[j]`` is the operator of a step at position ``j`` of the per-step pattern (step ``k`` is at
    position ``k mod len(gossip)``) and ``average`` that of a global-averaging step (steps ``k`` with
    ``(k + 1) mod H = 0``). Runs of gossip steps use powers of the pattern's product, so a long ``H``
    costs ``log H`` products."""
    cycle_length = len(gossip)
    cycle = gossip[0]
    for op in gossip[1:]:
        cycle = op @ cycle
    if global_average_every is None:
        return cycle, cycle_length
    period = math.lcm(global_average_every, cycle_length)
    total = None
    for block_start in range(0, period, global_average_every):
        segment = None
        position, remaining = block_start % cycle_length, global_average_every - 1
        while remaining and position:  # up to the start of the next pattern cycle
            segment = gossip[position] if segment is None else gossip[position] @ segment
            position, remaining = (position + 1) % cycle_length, remaining - 1
        repeats, remaining = divmod(remaining, cycle_length)
        if repeats:
            power = np.linalg.matrix_power(cycle, repeats)
            segment = power if segment is None else power @ segment
        for op in gossip[:remaining]:
            segment = op if segment is None else op @ segment
        block = average if segment is None else average @ segment
        total = block if total is None else block @ total
    assert total is not None
    return total, period


def _radius(
    topology: Topology,
    modes: np.ndarray | None,
    mu: float,
    beta: float,
    global_average_every: int | None = None,
    gossip_rounds: int = 1,
) -> float | None:
    steps = _step_phases(topology, global_average_every, gossip_rounds)
    if modes is not None:  # per mode: a 4 x 4 operator; the exact average has eigenvalue 0 on every mode
        gossip = [_operator(np.prod(modes[list(p)], axis=0).reshape(-1, 1, 1), mu, beta) for p in steps]
        average = _operator(np.zeros((modes.shape[1], 1, 1), dtype=complex), mu, beta)
        product, length = _schedule_product(gossip, average, global_average_every)
    elif topology.n <= MAX_DENSE_CHECK:
        n = topology.n
        mats = [np.linalg.multi_dot([np.eye(n), *(topology.matrix(k) for k in reversed(p))]) for p in steps]
        gossip = [_operator(m, mu, beta) for m in mats]
        average = _operator(np.full((n, n), 1.0 / n), mu, beta)
        product, length = _schedule_product(gossip, average, global_average_every)
        product = product @ np.kron(np.eye(4), np.eye(n) - 1.0 / n)  # project out the consensus
    else:
        return None
    if not np.isfinite(product).all():  # a very long period of unstable gossip: that gossip's rate dominates
        return _radius(topology, modes, mu, beta, None, gossip_rounds)
    return float(np.abs(np.linalg.eigvals(product)).max() ** (1.0 / length))


def gossip_spectral_radius(
    topology: Topology, mu: float, beta: float, *, global_average_every: int | None = None, gossip_rounds: int = 1
) -> float | None:
    """Per-step spectral radius of GUT's ``lr -> 0`` recursion on the disagreement subspace (geometric
    mean over one period of the mixing schedule: the graph's phases, ``gossip_rounds`` rounds per step and
    an exact average every ``global_average_every``-th step); ``None`` for a time-varying, non-circulant
    graph with ``n >`` ``MAX_DENSE_CHECK``."""
    return _radius(topology, _disagreement_modes(topology), mu, beta, global_average_every, gossip_rounds)


def check_gossip_stability(
    topology: Topology,
    mu: float,
    beta: float,
    name: str,
    *,
    global_average_every: int | None = None,
    gossip_rounds: int = 1,
) -> None:
    """Raise ``ValueError`` naming a stable ``mu``, a smaller ``beta`` or stable global-averaging periods if
    GUT is unstable on ``topology`` with this mixing schedule (see :func:`gossip_spectral_radius`)."""
    modes = _disagreement_modes(topology)

    def radius(m: float, b: float, period: int | None = global_average_every) -> float | None:
        return _radius(topology, modes, m, b, period, gossip_rounds)

    def stable(m: float, b: float, period: int | None = global_average_every) -> bool:
        r = radius(m, b, period)
        return r is not None and r <= 1.0 + 1e-9

    worst = radius(mu, beta)
    if worst is None or worst <= 1.0 + 1e-9:
        return
    mus = [m for m in _MU_GRID if m < mu and stable(m, beta)]
    betas = [b for b in (0.8, 0.5, 0.0) if b < beta and stable(mu, b)]
    if mus:
        fix = f"Use mu <= {mus[0]:g} (stable with beta={beta:g})"
    elif betas:
        fix = f"Lower beta (beta={betas[0]:g} is stable with mu={mu:g})"
    else:
        fix = "Use another graph"
    schedule = f"topology {topology.name!r} (n={topology.n})"
    if gossip_rounds > 1:
        schedule += f" with {gossip_rounds} gossip rounds per step"
    if global_average_every is not None:
        schedule += f" with an exact global average every {global_average_every} steps"
        if modes is not None:  # cheap to scan
            periods = [h for h in range(1, 2 * global_average_every + 1) if stable(mu, beta, h)]
            fix += f", or global_average_every in {periods} (the stable ones up to {2 * global_average_every})"
    raise ValueError(
        f"{name} with mu={mu:g}, beta={beta:g} is unstable on {schedule}: its gossip recursion amplifies "
        f"disagreement by {worst:.4f} per step whatever the learning rate, so training diverges. {fix}, or a "
        f"graph where it is stable."
    )
