"""n virtual nodes in one process: buffers are stacked ``[n, ...]`` and mixing is ``W(step) @ X``, computed
at a cost that grows with the graph's edges (:mod:`lightning_decent.comm.sparse_mixing`)."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import scipy.sparse as sp
import torch

from lightning_decent.comm.base import Communicator, count_all_reduce, nbytes
from lightning_decent.comm.sparse_mixing import RowMixer, row_mixer
from lightning_decent.topology import Topology


class SimulatedCommunicator(Communicator):
    """Runs the same algorithm code as the real strategy on stacked buffers (row ``i`` = node ``i``).

    Statistics count what the ``n`` real nodes would send in total (per-node payload times the
    number of edges of the phase; for a global average, ``n`` times a ring all-reduce's payload), so
    they can be compared with the real communicators'.
    """

    def __init__(self, topology: Topology) -> None:
        super().__init__(topology)
        self._edges = [_off_diagonal_count(topology.sparse(k)) for k in range(topology.period)]
        self._mixers: dict[tuple[int, torch.dtype, torch.device], RowMixer] = {}

    def _mixer(self, step: int, like: torch.Tensor) -> RowMixer:
        key = (step % self.topology.period, like.dtype, like.device)
        mixer = self._mixers.get(key)
        if mixer is None:
            mixer = self._mixers[key] = row_mixer(self.topology.sparse(key[0]), like.dtype, like.device)
        return mixer

    @torch.no_grad()
    def mix(self, buffers: Sequence[torch.Tensor], step: int) -> None:
        n = self.topology.n
        edges = self._edges[step % self.topology.period]
        for buf in buffers:
            if buf.shape[0] != n:
                raise ValueError(f"Simulated buffers are stacked [n={n}, ...]; got shape {tuple(buf.shape)}.")
            flat = buf.reshape(n, -1)
            self._mixer(step, buf).mix_(flat)
            per_node = nbytes(buf) // n
            self.stats.messages_sent += edges
            self.stats.messages_received += edges
            self.stats.bytes_sent += edges * per_node
            self.stats.bytes_received += edges * per_node

    @torch.no_grad()
    def global_average(self, buffers: Sequence[torch.Tensor]) -> None:
        n = self.topology.n
        for buf in buffers:
            buf.copy_(buf.mean(dim=0, keepdim=True).expand_as(buf))
            count_all_reduce(self.stats, nbytes(buf) // n, n, nodes=n)


def _off_diagonal_count(matrix: sp.csr_array) -> int:
    """The messages of one round: non-zero weights off the diagonal."""
    return int(matrix.nnz - np.count_nonzero(matrix.diagonal()))
