"""EquiTopo graphs: consensus rates independent of n with O(ln n) or one peer per round.

Song, Li, Jin, Shi, Yan, Yin & Yuan, "Communication-Efficient Topologies for Decentralized Learning
with O(1) Consensus Rate", NeurIPS 2022 (arXiv:2210.07881). Every graph is built from the basis
matrices (pull convention: node ``i`` pulls from ``i + u``)::

    A_u = (1/n) I + ((n-1)/n) P^u,   P^u[i, (i + u) mod n] = 1,   u in {1, ..., n-1},

whose average over all ``u`` is exactly ``11^T/n``; random samples of them concentrate around it.

* :func:`equistatic` (D-EquiStatic, and U-EquiStatic with ``directed=False``): draw ``M`` shifts
  ``u_1..u_M`` uniformly from ``{1..n-1}`` with replacement; ``W = (1/M) sum_m A_{u_m}`` (directed,
  at most ``M`` peers) or ``W = (1/2M) sum_m (A_{u_m} + A_{u_m}^T)`` (symmetric, at most ``2M`` peers).
  The paper's bound (matrix Bernstein): ``M >= 8 ln(2n/delta) / (3 eps^2)`` shifts give
  ``||W - 11^T/n||_2 <= eps`` with probability at least ``1 - delta`` (:func:`equistatic_shifts`).
* :func:`equidyn` (OD-EquiDyn, and OU-EquiDyn with ``directed=False``): one peer per round. Round ``k``
  draws ``u_k`` (uniform on ``{1..n-1}``, or on the ``M`` shifts of an EquiStatic draw) and mixes
  with ``W(k) = (1 - eta) I + eta A_{u_k}`` (directed: send to ``i - u_k``, receive from ``i + u_k``), or
  with the undirected one-peer version: starting at a random node ``s_k`` and going round the ring,
  ``i`` is matched to ``i + u_k`` when both are still free, and ``W(k) = (1 - eta) I + eta ((1/n) I +
  ((n-1)/n) Q_k)`` with ``Q_k`` the matching's permutation (unmatched nodes keep their value).

  For the directed version with ``u_k`` uniform on ``{1..n-1}``, every ``x`` with mean ``xbar``
  satisfies exactly (``E P^u y = -y/(n-1)`` for ``1^T y = 0``; derivation in ``docs/topologies.md``)::

      E ||W(k) x - xbar||^2 = (1 - 2 eta + 2 eta^2 (n-1)/n) ||x - xbar||^2 <= (1 - 2 eta (1 - eta)) ||x - xbar||^2,

  an n-independent rate, smallest at ``eta = n / (2(n-1))`` (the default; 0.53 for n = 17, the value
  of the authors' scripts), where it is ``(n-2)/(2(n-1)) < 1/2``.

Randomness: every rank draws the same graphs from ``numpy.random.default_rng(seed)``, so ``W(step)``
is a pure function of ``(n, step)`` as the :class:`~lightning_decent.topology.Topology` contract
requires. EquiDyn's sequence is generated for ``period`` rounds (default 1,000) and then repeats:
after a period the consensus error has shrunk by about ``2^-500`` in expectation, so the repetition
cannot be told from fresh draws, while every per-period tool (fingerprints, link schedules,
checkpoints, the inspector) keeps working. An EquiStatic draw whose shifts and ``n`` share a
common factor leaves the graph disconnected; it is redrawn with ``seed + 1, seed + 2, ...``.
"""

from __future__ import annotations

import math

import numpy as np
import scipy.sparse as sp

from lightning_decent.topology.base import Topology

_MAX_DRAWS = 100
DEFAULT_EQUIDYN_PERIOD = 1000


def _check_n(n: int, name: str) -> None:
    if isinstance(n, bool) or not isinstance(n, (int, np.integer)) or n < 2:
        raise ValueError(f"{name} needs an integer number of nodes n >= 2; got n={n!r}.")


def _check_positive(name: str, label: str, value: object) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
        raise ValueError(f"{name} needs a positive integer {label}=; got {label}={value!r}.")


def basis(n: int, shift: int) -> sp.csr_array:
    """``A_u = (1/n) I + ((n-1)/n) P^u``: node ``i`` keeps ``1/n`` of its value and pulls ``(n-1)/n`` from ``i + u``."""
    nodes = np.arange(n)
    rows = np.concatenate([nodes, nodes])
    cols = np.concatenate([nodes, (nodes + shift) % n])
    values = np.concatenate([np.full(n, 1.0 / n), np.full(n, (n - 1) / n)])
    return sp.csr_array((values, (rows, cols)), shape=(n, n))


def equistatic_shifts(n: int, eps: float, delta: float) -> int:
    """The number of shifts ``M = ceil(8 ln(2n/delta) / (3 eps^2))`` after which the paper's bound
    ``P(||W - 11^T/n||_2 <= eps) >= 1 - delta`` holds for EquiStatic (both versions)."""
    if not 0 < eps < 1 or not 0 < delta < 1:
        raise ValueError(f"equistatic_shifts needs 0 < eps < 1 and 0 < delta < 1; got eps={eps}, delta={delta}.")
    return math.ceil(8 * math.log(2 * n / delta) / (3 * eps**2))


def draw_shifts(n: int, M: int, seed: int) -> np.ndarray:
    """EquiStatic's ``M`` shifts from ``{1..n-1}`` (with replacement) by ``default_rng(seed)``, redrawn
    with ``seed + 1, seed + 2, ...`` while ``gcd(n, u_1, ..., u_M) > 1`` (a disconnected graph)."""
    for attempt in range(_MAX_DRAWS):
        shifts = np.random.default_rng(seed + attempt).integers(1, n, size=M)
        if math.gcd(n, *map(int, shifts)) == 1:
            return shifts
    raise ValueError(
        f"No connected EquiStatic draw of M={M} shifts for n={n} in {_MAX_DRAWS} seeds from seed={seed}; "
        "use a larger M."
    )


def equistatic(n: int, M: int | None = None, seed: int = 0, directed: bool = False) -> Topology:
    """EquiStatic (Song et al. 2022): ``W = (1/M) sum_m A_{u_m}`` over ``M`` random shifts (directed,
    D-EquiStatic) or its symmetric part ``(W + W^T)/2`` (``directed=False``, U-EquiStatic; the default,
    so that algorithms needing a symmetric W can use it). ``M`` defaults to ``ceil(log2 n)``, the peer
    count of the static exponential graph; :func:`equistatic_shifts` gives the ``M`` of the paper's
    bound. See the module docstring."""
    _check_n(n, "equistatic")
    M = max(1, (n - 1).bit_length()) if M is None else M
    _check_positive("equistatic", "M", M)
    shifts = draw_shifts(n, M, seed)
    w = sum((basis(n, int(u)) for u in shifts), sp.csr_array((n, n))) / M
    if not directed:
        w = (w + w.T) / 2
    return Topology([w], name="equistatic")


def _matching(n: int, shift: int, start: int) -> np.ndarray:
    """OU-EquiDyn's greedy matching: ``partner[i]`` (``i`` itself when unmatched), visiting
    ``start, start + 1, ...`` round the ring and pairing ``i`` with ``i + shift`` when both are free."""
    partner = np.arange(n)
    free = np.ones(n, dtype=bool)
    for i in (np.arange(n) + start) % n:
        j = (i + shift) % n
        if i != j and free[i] and free[j]:
            partner[i], partner[j] = j, i
            free[i] = free[j] = False
    return partner


def _one_peer_undirected(n: int, shift: int, start: int) -> sp.csr_array:
    """``(1/n) I + ((n-1)/n) Q`` for the matching ``Q`` (unmatched nodes keep weight 1)."""
    partner = _matching(n, shift, start)
    matched = partner != np.arange(n)
    nodes = np.arange(n)
    values = np.where(matched, 1.0 / n, 1.0)
    rows = np.concatenate([nodes, nodes[matched]])
    cols = np.concatenate([nodes, partner[matched]])
    weights = np.concatenate([values, np.full(int(matched.sum()), (n - 1) / n)])
    return sp.csr_array((weights, (rows, cols)), shape=(n, n))


def equidyn(
    n: int,
    eta: float | None = None,
    M: int | None = None,
    seed: int = 0,
    directed: bool = True,
    period: int = DEFAULT_EQUIDYN_PERIOD,
) -> Topology:
    """EquiDyn (Song et al. 2022): one peer per round, ``W(k) = (1 - eta) I + eta A_{u_k}`` with a random
    shift ``u_k`` per round (OD-EquiDyn), or its one-peer undirected form (``directed=False``,
    OU-EquiDyn). ``u_k`` is uniform on ``{1..n-1}``, or on the ``M`` shifts of an EquiStatic draw when
    ``M`` is given. ``eta`` defaults to ``n / (2(n-1))``, which minimises the expected contraction
    ``1 - 2 eta + 2 eta^2 (n-1)/n`` (< 1/2). The ``period`` rounds drawn from ``seed`` then repeat
    (see the module docstring)."""
    _check_n(n, "equidyn")
    _check_positive("equidyn", "period", period)
    eta = n / (2 * (n - 1)) if eta is None else float(eta)
    if not 0.0 < eta <= 1.0:
        raise ValueError(f"equidyn needs a mixing weight 0 < eta <= 1; got eta={eta}.")
    rng = np.random.default_rng(seed)
    if M is None:
        shifts = rng.integers(1, n, size=period)
    else:
        _check_positive("equidyn", "M", M)
        shifts = draw_shifts(n, M, seed)[rng.integers(0, M, size=period)]
    starts = rng.integers(0, n, size=period)
    eye = sp.eye_array(n, format="csr")
    phases = []
    for u, s in zip(shifts, starts):
        one_peer = basis(n, int(u)) if directed else _one_peer_undirected(n, int(u), int(s))
        phases.append((1.0 - eta) * eye + eta * one_peer)
    return Topology(phases, name="equidyn")
