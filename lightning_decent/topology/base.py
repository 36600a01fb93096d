"""The ``Topology`` abstraction: a communication graph as a (possibly time-varying) mixing matrix.

Convention (pull): ``W[i, j]`` is the weight node ``i`` gives to node ``j``'s value, and one gossip
round is ``x_i <- sum_j W[i, j] x_j``. ``W[i, j] > 0`` for ``j != i`` means *j sends to i*: row ``i``
lists the in-neighbours of ``i`` and column ``j`` the out-neighbours of ``j``.

Phases are stored as sparse matrices (``scipy.sparse.csr_array``): a gossip graph has a few
non-zeros per row, so memory and the cost of every per-phase query grow with the edges, not with
``n^2`` (a 4,096-node one-peer exponential graph holds 12 x 8,192 weights instead of 12 x 16.8M).
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from functools import cached_property

import numpy as np
import scipy.sparse as sp
import torch

_TOL = 1e-10
#: Dense copies of the phases are cached while they take at most this many entries in all (32 MB).
_DENSE_CACHE_ENTRIES = 1 << 22

MatrixInput = np.ndarray | torch.Tensor | sp.sparray | sp.spmatrix


def as_csr(matrix: MatrixInput) -> sp.csr_array:
    """A float64 CSR copy of a dense or sparse matrix, explicit zeros dropped and indices sorted."""
    if sp.issparse(matrix):
        csr = sp.csr_array(matrix, dtype=np.float64, copy=True)
    else:
        dense = matrix.detach().cpu().numpy() if isinstance(matrix, torch.Tensor) else np.asarray(matrix)
        if dense.ndim != 2:
            raise ValueError(f"Every mixing matrix must be square n x n with the same n; got shape {dense.shape}.")
        csr = sp.csr_array(dense.astype(np.float64, copy=False))
    csr.eliminate_zeros()
    csr.sort_indices()
    return csr


#: Rows of a phase densified at a time by :meth:`Topology.fingerprint`.
_FINGERPRINT_ROWS = 256


class Topology:
    """A periodic sequence of ``n x n`` mixing matrices ``W(0), W(1), ..., W(period - 1)``.

    ``weights(step)`` returns ``W(step mod period)``. Every rank can build the whole matrix locally,
    so no coordination is needed to agree on who talks to whom at a given gossip step.

    Args:
        matrices: one matrix per phase of the period (a static graph has one): dense arrays, tensors
            or scipy sparse matrices.
        name: a short name used in logs, tables and fingerprints.
    """

    def __init__(self, matrices: Sequence[MatrixInput], name: str = "custom") -> None:
        if len(matrices) == 0:
            raise ValueError("A topology needs at least one mixing matrix.")
        phases = [as_csr(m) for m in matrices]
        n = phases[0].shape[0]
        for m in phases:
            if m.shape != (n, n):
                raise ValueError(f"Every mixing matrix must be square n x n with the same n; got {m.shape}.")
            if (m.data < -_TOL).any():
                raise ValueError("Mixing matrices must have non-negative entries.")
        self._phases = phases
        self._dense: dict[int, np.ndarray] = {}
        self._columns: dict[int, sp.csc_array] = {}
        self.name = name

    # ---- size and shape -------------------------------------------------------------------------
    @property
    def n(self) -> int:
        """Number of nodes."""
        return self._phases[0].shape[0]

    @property
    def period(self) -> int:
        """Number of distinct phases; 1 for a static graph."""
        return len(self._phases)

    @cached_property
    def directed(self) -> bool:
        """True if some phase is not symmetric (some j sends to i without i sending to j with equal weight)."""
        return any(_max_abs(m - m.T) > _TOL for m in self._phases)

    @cached_property
    def row_stochastic(self) -> bool:
        return all(np.allclose(m.sum(axis=1), 1.0, atol=1e-9) for m in self._phases)

    @cached_property
    def column_stochastic(self) -> bool:
        return all(np.allclose(m.sum(axis=0), 1.0, atol=1e-9) for m in self._phases)

    @property
    def doubly_stochastic(self) -> bool:
        return self.row_stochastic and self.column_stochastic

    @cached_property
    def max_degree(self) -> int:
        """Largest number of peers (in or out, self excluded) of any node in any phase."""
        best = 0
        for m in self._phases:
            off = _off_diagonal_pattern(m)
            best = max(best, int(off.sum(axis=0).max(initial=0)), int(off.sum(axis=1).max(initial=0)))
        return best

    # ---- per-step views ---------------------------------------------------------------------------
    def sparse(self, step: int) -> sp.csr_array:
        """``W(step)`` as a float64 CSR matrix (shared: do not modify it)."""
        return self._phases[step % self.period]

    def matrix(self, step: int) -> np.ndarray:
        """``W(step)`` as a read-only float64 dense numpy array (``n x n``: prefer :meth:`sparse` for large n)."""
        phase = step % self.period
        dense = self._dense.get(phase)
        if dense is None:
            dense = self._phases[phase].toarray()
            dense.setflags(write=False)
            if self.n * self.n * self.period <= _DENSE_CACHE_ENTRIES:
                self._dense[phase] = dense
        return dense

    def weights(self, step: int = 0) -> torch.Tensor:
        """``W(step)`` as a float64 ``n x n`` tensor."""
        return torch.from_numpy(self.matrix(step).copy())

    def in_neighbors(self, rank: int, step: int = 0) -> list[tuple[int, float]]:
        """``(peer, W[rank, peer])`` for every peer that sends to ``rank`` at ``step`` (self excluded)."""
        m = self.sparse(step)
        start, end = m.indptr[rank], m.indptr[rank + 1]
        return _peers(m.indices[start:end], m.data[start:end], rank)

    def out_neighbors(self, rank: int, step: int = 0) -> list[tuple[int, float]]:
        """``(peer, W[peer, rank])`` for every peer that ``rank`` sends to at ``step`` (self excluded)."""
        phase = step % self.period
        columns = self._columns.get(phase)
        if columns is None:
            columns = self._columns[phase] = sp.csc_array(self._phases[phase])
            columns.sort_indices()
        start, end = columns.indptr[rank], columns.indptr[rank + 1]
        return _peers(columns.indices[start:end], columns.data[start:end], rank)

    def self_weight(self, rank: int, step: int = 0) -> float:
        return float(self.sparse(step)[rank, rank])

    def fingerprint(self) -> str:
        """A short hash of the name and every phase matrix: ranks compare it to agree on the graph, and
        checkpoints record it.

        The hash is over the dense matrices rounded to 12 decimals, as in earlier releases (so their
        checkpoints still resume), fed to the hash :data:`_FINGERPRINT_ROWS` rows at a time: memory
        stays ``O(rows x n)`` and time ``O(period x n^2)``, paid once per set-up.
        """
        h = hashlib.sha256(self.name.encode())
        for m in self._phases:
            for start in range(0, self.n, _FINGERPRINT_ROWS):
                h.update(np.round(m[start : start + _FINGERPRINT_ROWS].toarray(), 12).tobytes())
        return h.hexdigest()[:16]

    def __repr__(self) -> str:
        return f"Topology(name={self.name!r}, n={self.n}, period={self.period}, directed={self.directed})"


def _max_abs(m: sp.sparray) -> float:
    return float(np.abs(m.data).max(initial=0.0))


def _off_diagonal_pattern(m: sp.csr_array) -> sp.csr_array:
    """The 0/1 pattern of the off-diagonal entries larger than the tolerance."""
    coo = m.tocoo()
    keep = (coo.row != coo.col) & (np.abs(coo.data) > _TOL)
    ones = np.ones(int(keep.sum()))
    return sp.csr_array((ones, (coo.row[keep], coo.col[keep])), shape=m.shape)


def _peers(indices: np.ndarray, data: np.ndarray, rank: int) -> list[tuple[int, float]]:
    return [(int(j), float(w)) for j, w in zip(indices, data) if j != rank and abs(w) > _TOL]
