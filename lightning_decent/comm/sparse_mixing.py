"""``X <- W X`` for stacked node buffers at a cost that grows with the edges of ``W``, not with ``n^2``.

A gossip graph has a few non-zeros per row, so a dense ``n x n`` product wastes almost all of its
``n^2 d`` multiply-adds on zeros (1,024 nodes x d = 100: about 0.1 GFLOP per round, for 2,048
useful weights on a one-peer graph). :func:`row_mixer` picks one of three exact forms per matrix:

* :class:`ExactAverage` for ``W = 11^T/n``: every row becomes the column mean, ``O(n d)``;
* :class:`NeighbourGathers` for graphs with at most :data:`MAX_GATHERS` in-neighbours per node
  (ELLPACK layout): ``(W X)_i = W_ii X_i + sum_s W[i, c_s(i)] X_{c_s(i)}``, one ``index_select`` and one
  fused multiply-add per neighbour slot ``s``, ``O(n d (1 + max in-degree))``, no allocation per call;
* :class:`SparseProduct` otherwise (e.g. a star's hub): a CSR sparse-dense product, ``O(nnz d)``.
"""

from __future__ import annotations

from abc import ABC, abstractmethod

import numpy as np
import scipy.sparse as sp
import torch

#: Largest number of in-neighbour slots handled by gathers; denser rows use the CSR product.
MAX_GATHERS = 8


class RowMixer(ABC):
    """Applies one mixing matrix to ``[n, d]`` row-stacked buffers, in place."""

    @abstractmethod
    def mix_(self, rows: torch.Tensor) -> None:
        """``rows <- W rows`` (``rows`` is ``[n, d]`` and contiguous)."""


class ExactAverage(RowMixer):
    """``W = 11^T/n``: every row becomes the mean row."""

    def mix_(self, rows: torch.Tensor) -> None:
        rows.copy_(rows.mean(dim=0, keepdim=True).expand_as(rows))


class NeighbourGathers(RowMixer):
    """``(W X)_i = a_i X_i + sum_s w_s(i) X_{c_s(i)}`` with every row's off-diagonal entries spread over
    slots (a row with fewer neighbours than slots points the spare slots at itself with weight 0).
    A slot whose weights are all equal (circulant graphs) multiplies by a scalar."""

    def __init__(self, matrix: sp.csr_array, dtype: torch.dtype, device: torch.device) -> None:
        n = matrix.shape[0]
        coo = matrix.tocoo()
        off = coo.row != coo.col
        rows, cols, weights = coo.row[off], coo.col[off], coo.data[off]
        order = np.lexsort((cols, rows))
        rows, cols, weights = rows[order], cols[order], weights[order]
        first = np.searchsorted(rows, np.arange(n))
        slot = np.arange(rows.size) - first[rows]
        self.self_weight = _weights(matrix.diagonal(), dtype, device)
        self.slots: list[tuple[torch.Tensor, float | torch.Tensor]] = []
        for s in range(int(slot.max(initial=-1)) + 1):
            index, weight = np.arange(n), np.zeros(n)
            mask = slot == s
            index[rows[mask]], weight[rows[mask]] = cols[mask], weights[mask]
            self.slots.append((torch.as_tensor(index, device=device), _weights(weight, dtype, device)))
        self._scratch: dict[tuple, tuple[torch.Tensor, torch.Tensor]] = {}

    def mix_(self, rows: torch.Tensor) -> None:
        if not self.slots:
            _scale(rows, rows, self.self_weight)
            return
        key = (rows.shape, rows.dtype, rows.device)
        if key not in self._scratch:
            self._scratch[key] = (torch.empty_like(rows), torch.empty_like(rows))
        mixed, gathered = self._scratch[key]
        _scale(mixed, rows, self.self_weight)
        for index, weight in self.slots:
            torch.index_select(rows, 0, index, out=gathered)
            if isinstance(weight, float):
                mixed.add_(gathered, alpha=weight)
            else:
                mixed.addcmul_(gathered, weight)
        rows.copy_(mixed)


class SparseProduct(RowMixer):
    """A CSR sparse-dense product, for rows with many neighbours."""

    def __init__(self, matrix: sp.csr_array, dtype: torch.dtype, device: torch.device) -> None:
        self.matrix = torch.sparse_csr_tensor(
            torch.as_tensor(matrix.indptr, dtype=torch.int64),
            torch.as_tensor(matrix.indices, dtype=torch.int64),
            torch.as_tensor(matrix.data, dtype=dtype),
            size=matrix.shape,
            device=device,
        )

    def mix_(self, rows: torch.Tensor) -> None:
        rows.copy_(self.matrix @ rows)


def row_mixer(matrix: sp.csr_array, dtype: torch.dtype, device: torch.device) -> RowMixer:
    """The cheapest exact :class:`RowMixer` for ``matrix`` (see the module docstring)."""
    n = matrix.shape[0]
    if matrix.nnz == n * n and np.allclose(matrix.data, 1.0 / n, rtol=0, atol=1e-15):
        return ExactAverage()
    off_diagonal = np.diff(matrix.indptr) - (matrix.diagonal() != 0)
    if off_diagonal.max(initial=0) <= MAX_GATHERS:
        return NeighbourGathers(matrix, dtype, device)
    return SparseProduct(matrix, dtype, device)


def _weights(values: np.ndarray, dtype: torch.dtype, device: torch.device) -> float | torch.Tensor:
    """A scalar when every row has the same weight, else a ``[n, 1]`` column to broadcast over ``d``."""
    if np.all(values == values[0]):
        return float(values[0])
    return torch.as_tensor(values, dtype=dtype, device=device).unsqueeze(1)


def _scale(out: torch.Tensor, rows: torch.Tensor, weight: float | torch.Tensor) -> None:
    torch.mul(rows, weight, out=out)
