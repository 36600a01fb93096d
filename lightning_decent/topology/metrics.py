"""Spectral metrics of mixing matrices: how fast gossip averages (all float64).

* ``rho = ||W - 11^T/n||_2`` (the ``beta`` of Chen, Yuan, Zhang, Pan, Xu & Yin, ICML 2021): after ``k``
  rounds of a static doubly stochastic W, ``||x^k - x̄|| <= rho^k ||x^0 - x̄||``; the spectral gap is
  ``1 - rho``.
* For column-stochastic digraphs (push-sum), with ``pi`` the equilibrium (``W pi = pi``, ``1^T pi = 1``):
  ``beta_pi = ||diag(sqrt pi)^-1 (W - pi 1^T) diag(sqrt pi)||_2`` and ``kappa_pi = max pi / min pi``
  (Liang, Huang, Xin & Yuan, arXiv:2312.04928).
"""

from __future__ import annotations

import math

import numpy as np
import torch

from lightning_decent.topology.base import Topology

MatrixLike = Topology | np.ndarray | torch.Tensor


def _matrix(w: MatrixLike, step: int = 0) -> np.ndarray:
    """``W(step)`` of a Topology, or the given tensor/array, as a float64 square numpy array."""
    if isinstance(w, Topology):
        return w.matrix(step)
    m = np.asarray(w.detach().cpu() if isinstance(w, torch.Tensor) else w, dtype=np.float64)
    if m.ndim != 2 or m.shape[0] != m.shape[1]:
        raise ValueError(f"Expected a square n x n mixing matrix; got shape {m.shape}.")
    return m


def consensus_rate(w: MatrixLike, step: int = 0) -> float:
    """``rho = ||W - 11^T/n||_2`` of a matrix (or of a Topology's phase ``step``): the factor by which
    one gossip round with a doubly stochastic W at least shrinks the distance to the average."""
    m = _matrix(w, step)
    return float(np.linalg.norm(m - 1.0 / len(m), ord=2))


def spectral_gap(w: MatrixLike, step: int = 0) -> float:
    """``1 - rho`` with ``rho`` = :func:`consensus_rate`."""
    return 1.0 - consensus_rate(w, step)


def consensus_rate_per_round(topology: Topology) -> float:
    """The worst single-round ``rho`` over the phases of a (possibly time-varying) topology."""
    return max(consensus_rate(topology, k) for k in range(topology.period))


def period_product(topology: Topology, start: int = 0) -> np.ndarray:
    """``W(start + period - 1) ... W(start + 1) W(start)``: the mixing of one full period."""
    product = np.eye(topology.n)
    for k in range(start, start + topology.period):
        product = topology.matrix(k) @ product
    return product


def consensus_rate_over_period(topology: Topology) -> float:
    """``rho`` of :func:`period_product`: 0 when a period averages exactly (e.g. one-peer exponential
    with n a power of two); equals the per-round ``rho`` for a static graph."""
    return consensus_rate(period_product(topology))


def lambda_min(w: MatrixLike, step: int = 0) -> float:
    """Smallest eigenvalue of a symmetric W; Exact-Diffusion/D² need ``lambda_min(W) > -1/3``."""
    m = _matrix(w, step)
    if not np.allclose(m, m.T, atol=1e-10):
        raise ValueError(
            "lambda_min needs a symmetric W (an undirected graph); Exact-Diffusion's condition "
            "lambda_min > -1/3 does not apply to a directed graph."
        )
    return float(np.linalg.eigvalsh(m)[0])


def equilibrium(w: MatrixLike, step: int = 0) -> np.ndarray:
    """The equilibrium ``pi`` of a column-stochastic W: ``W pi = pi``, ``1^T pi = 1`` (push-sum weights
    converge to ``n pi``). Unique and positive when the graph is strongly connected.

    ``pi`` is the stationary distribution of the Markov chain ``P = W^T``, computed by the
    Grassmann-Taksar-Heyman elimination (Grassmann, Taksar & Heyman, Oper. Res. 1985), which never
    subtracts and so gives every entry to full relative accuracy however skewed ``pi`` is (the
    challenging digraph's ``pi_max / pi_min = 2^(n-1)``; a least-squares solve loses that from n ~ 40).
    For ``k = n-1, ..., 1``, with ``s_k = sum_{j<k} P[k, j]``::

        P[i, k] <- P[i, k] / s_k,   P[i, j] <- P[i, j] + P[i, k] P[k, j]     (i, j < k)

    then ``x_0 = 1``, ``x_k = sum_{i<k} x_i P[i, k]`` and ``pi = x / sum(x)``.
    """
    m = _matrix(w, step)
    n = len(m)
    if not np.allclose(m.sum(axis=0), 1.0, atol=1e-9):
        raise ValueError("equilibrium needs a column-stochastic W (every column sums to 1).")
    not_strongly_connected = ValueError(
        "W has no unique positive equilibrium because the graph is not strongly connected; add edges so "
        "that every node can reach every other."
    )
    chain = m.T.copy()
    for k in range(n - 1, 0, -1):
        leaving = chain[k, :k].sum()
        if not leaving > 0.0:
            raise not_strongly_connected
        chain[:k, k] /= leaving
        chain[:k, :k] += np.outer(chain[:k, k], chain[k, :k])
    x = np.zeros(n)
    x[0] = 1.0
    for k in range(1, n):
        x[k] = x[:k] @ chain[:k, k]
    if not (x > 0).all():
        raise not_strongly_connected
    return x / x.sum()


def generalized_consensus_rate(w: MatrixLike, step: int = 0) -> float:
    """``beta_pi = ||diag(sqrt pi)^-1 (W - pi 1^T) diag(sqrt pi)||_2`` for a column-stochastic W
    (Liang et al., arXiv:2312.04928): the push-sum analogue of ``rho``. Equals ``rho`` for a doubly stochastic W."""
    m = _matrix(w, step)
    pi = equilibrium(m)
    root = np.sqrt(pi)
    scaled = (m - np.outer(pi, np.ones(len(m)))) * root[None, :] / root[:, None]
    return float(np.linalg.norm(scaled, ord=2))


def equilibrium_skewness(w: MatrixLike, step: int = 0) -> float:
    """``kappa_pi = max pi / min pi`` (Liang et al., arXiv:2312.04928); 1 for a doubly stochastic W."""
    pi = equilibrium(w, step)
    return float(pi.max() / pi.min())


_TRANSIENT_FORMULAS = {
    "iid": lambda rho, n: rho**4 * n**3 / (1.0 - rho) ** 2,
    "non_iid": lambda rho, n: rho**4 * n**3 / (1.0 - rho) ** 4,
    "strongly_convex_non_iid": lambda rho, n: rho**2 * n / (1.0 - rho) ** 2,
}


def transient_iterations(rho: float, n: int, setting: str = "iid") -> float:
    """Order of the number of iterations before D-SGD reaches the linear speed-up of parallel SGD
    (as Chen et al., ICML 2021, tabulate them for Gossip SGD), constants such as the
    gradient noise sigma and the heterogeneity b dropped:

    * ``"iid"`` (non-convex, identical data):   ``rho^4 n^3 / (1 - rho)^2``
    * ``"non_iid"`` (non-convex, heterogeneous): ``rho^4 n^3 / (1 - rho)^4``
    * ``"strongly_convex_non_iid"``:             ``rho^2 n / (1 - rho)^2``

    Returns ``inf`` when ``rho >= 1`` (no consensus in one round) and 0 when ``rho == 0`` (exact
    averaging: D-SGD is parallel SGD). Meant for comparing graphs, not as an iteration count.
    """
    if setting not in _TRANSIENT_FORMULAS:
        raise ValueError(f"Unknown setting {setting!r}; choose one of {', '.join(_TRANSIENT_FORMULAS)}.")
    if rho >= 1.0:
        return math.inf
    return float(_TRANSIENT_FORMULAS[setting](rho, n))


def consensus_error_curve(topology: Topology, rounds: int, seed: int = 0) -> np.ndarray:
    """``||x^k - x̄|| / ||x^0 - x̄||`` for ``k = 0..rounds`` of repeated gossip from a fixed random
    ``x^0`` (``numpy.random.default_rng(seed).standard_normal(n)``), ``x̄`` its average.

    A column-stochastic topology runs push-sum (``z <- W z``, ``v <- W v`` from ``v = 1``, estimate
    ``z / v``) so that a digraph also converges to ``x̄``; for a doubly stochastic W, ``v`` stays 1
    and this is plain gossip. Any other W runs plain gossip.
    """
    x0 = np.random.default_rng(seed).standard_normal(topology.n)
    target = x0.mean()
    scale = np.linalg.norm(x0 - target)
    push_sum = topology.column_stochastic
    z, v = x0.copy(), np.ones(topology.n)
    errors = [1.0]
    for k in range(rounds):
        m = topology.matrix(k)
        z = m @ z
        v = m @ v if push_sum else v
        errors.append(float(np.linalg.norm(z / v - target) / scale) if scale > 0 else 0.0)
    return np.array(errors)
