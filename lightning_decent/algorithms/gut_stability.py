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
"""

from __future__ import annotations

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


def _radius(topology: Topology, modes: np.ndarray | None, mu: float, beta: float) -> float | None:
    if modes is not None:
        product = np.broadcast_to(np.eye(4, dtype=complex), (modes.shape[1], 4, 4))
        for phase in modes:
            product = _operator(phase.reshape(-1, 1, 1), mu, beta) @ product
    elif topology.n <= MAX_DENSE_CHECK:
        n = topology.n
        product = np.kron(np.eye(4), np.eye(n) - 1.0 / n)  # project out the consensus
        for k in range(topology.period):
            product = _operator(topology.matrix(k), mu, beta) @ product
    else:
        return None
    return float(np.abs(np.linalg.eigvals(product)).max() ** (1.0 / topology.period))


def gossip_spectral_radius(topology: Topology, mu: float, beta: float) -> float | None:
    """Per-step spectral radius of GUT's ``lr -> 0`` recursion on the disagreement subspace (geometric
    mean over one period); ``None`` for a time-varying, non-circulant graph with ``n >`` ``MAX_DENSE_CHECK``."""
    return _radius(topology, _disagreement_modes(topology), mu, beta)


def check_gossip_stability(topology: Topology, mu: float, beta: float, name: str) -> None:
    """Raise ``ValueError`` naming a stable ``mu`` (or a smaller ``beta``) if GUT is unstable on ``topology``."""
    modes = _disagreement_modes(topology)
    radius = _radius(topology, modes, mu, beta)
    if radius is None or radius <= 1.0 + 1e-9:
        return

    def stable(m: float, b: float) -> bool:
        r = _radius(topology, modes, m, b)
        return r is not None and r <= 1.0 + 1e-9

    mus = [m for m in _MU_GRID if m < mu and stable(m, beta)]
    betas = [b for b in (0.8, 0.5, 0.0) if b < beta and stable(mu, b)]
    if mus:
        fix = f"Use mu <= {mus[0]:g} (stable with beta={beta:g})"
    elif betas:
        fix = f"Lower beta (beta={betas[0]:g} is stable with mu={mu:g})"
    else:
        fix = "Use another graph"
    raise ValueError(
        f"{name} with mu={mu:g}, beta={beta:g} is unstable on topology {topology.name!r} (n={topology.n}): its gossip "
        f"recursion amplifies disagreement by {radius:.4f} per step whatever the learning rate, so training "
        f"diverges. {fix}, or a graph where it is stable (e.g. 'ring')."
    )
