"""The ``Topology`` abstraction: a communication graph as a (possibly time-varying) mixing matrix.

Convention (pull): ``W[i, j]`` is the weight node ``i`` gives to node ``j``'s value, and one gossip
round is ``x_i <- sum_j W[i, j] x_j``. ``W[i, j] > 0`` for ``j != i`` means *j sends to i*: row ``i``
lists the in-neighbours of ``i`` and column ``j`` the out-neighbours of ``j``.
"""

from __future__ import annotations

from collections.abc import Sequence
from functools import cached_property

import numpy as np
import torch

_TOL = 1e-10


class Topology:
    """A periodic sequence of ``n x n`` mixing matrices ``W(0), W(1), ..., W(period - 1)``.

    ``weights(step)`` returns ``W(step mod period)``. Every rank can build the whole matrix locally,
    so no coordination is needed to agree on who talks to whom at a given gossip step.

    Args:
        matrices: one matrix per phase of the period (a static graph has one).
        name: a short name used in logs, tables and fingerprints.
    """

    def __init__(self, matrices: Sequence[np.ndarray | torch.Tensor], name: str = "custom") -> None:
        if len(matrices) == 0:
            raise ValueError("A topology needs at least one mixing matrix.")
        mats = [np.asarray(torch.as_tensor(m, dtype=torch.float64).numpy(), dtype=np.float64) for m in matrices]
        n = mats[0].shape[0]
        for m in mats:
            if m.ndim != 2 or m.shape != (n, n):
                raise ValueError(f"Every mixing matrix must be square n x n with the same n; got {m.shape}.")
            if (m < -_TOL).any():
                raise ValueError("Mixing matrices must have non-negative entries.")
        self._mats = [m.copy() for m in mats]
        for m in self._mats:
            m.setflags(write=False)
        self.name = name

    # ---- size and shape -------------------------------------------------------------------------
    @property
    def n(self) -> int:
        """Number of nodes."""
        return self._mats[0].shape[0]

    @property
    def period(self) -> int:
        """Number of distinct phases; 1 for a static graph."""
        return len(self._mats)

    @cached_property
    def directed(self) -> bool:
        """True if some phase is not symmetric (some j sends to i without i sending to j with equal weight)."""
        return not all(np.allclose(m, m.T, atol=_TOL) for m in self._mats)

    @cached_property
    def row_stochastic(self) -> bool:
        return all(np.allclose(m.sum(axis=1), 1.0, atol=1e-9) for m in self._mats)

    @cached_property
    def column_stochastic(self) -> bool:
        return all(np.allclose(m.sum(axis=0), 1.0, atol=1e-9) for m in self._mats)

    @property
    def doubly_stochastic(self) -> bool:
        return self.row_stochastic and self.column_stochastic

    @cached_property
    def max_degree(self) -> int:
        """Largest number of peers (in or out, self excluded) of any node in any phase."""
        best = 0
        for m in self._mats:
            off = (np.abs(m) > _TOL) & ~np.eye(self.n, dtype=bool)
            best = max(best, int(off.sum(axis=0).max()), int(off.sum(axis=1).max()))
        return best

    # ---- per-step views ---------------------------------------------------------------------------
    def matrix(self, step: int) -> np.ndarray:
        """``W(step)`` as a read-only float64 numpy array."""
        return self._mats[step % self.period]

    def weights(self, step: int = 0) -> torch.Tensor:
        """``W(step)`` as a float64 ``n x n`` tensor."""
        return torch.from_numpy(self.matrix(step).copy())

    def in_neighbors(self, rank: int, step: int = 0) -> list[tuple[int, float]]:
        """``(peer, W[rank, peer])`` for every peer that sends to ``rank`` at ``step`` (self excluded)."""
        row = self.matrix(step)[rank]
        return [(j, float(row[j])) for j in range(self.n) if j != rank and abs(row[j]) > _TOL]

    def out_neighbors(self, rank: int, step: int = 0) -> list[tuple[int, float]]:
        """``(peer, W[peer, rank])`` for every peer that ``rank`` sends to at ``step`` (self excluded)."""
        col = self.matrix(step)[:, rank]
        return [(i, float(col[i])) for i in range(self.n) if i != rank and abs(col[i]) > _TOL]

    def self_weight(self, rank: int, step: int = 0) -> float:
        return float(self.matrix(step)[rank, rank])

    def fingerprint(self) -> str:
        """A short hash of the name and every phase matrix: ranks compare it to agree on the graph."""
        import hashlib

        h = hashlib.sha256(self.name.encode())
        for m in self._mats:
            h.update(np.round(m, 12).tobytes())
        return h.hexdigest()[:16]

    def __repr__(self) -> str:
        return f"Topology(name={self.name!r}, n={self.n}, period={self.period}, directed={self.directed})"
