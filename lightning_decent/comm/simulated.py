"""n virtual nodes in one process: buffers are stacked ``[n, ...]`` and mixing is ``W(step) @ X``, computed
at a cost that grows with the graph's edges (:mod:`lightning_decent.comm.sparse_mixing`)."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import scipy.sparse as sp
import torch

from lightning_decent.comm.base import Communicator, count_all_reduce, nbytes
from lightning_decent.comm.compressed_collectives import shard_length
from lightning_decent.comm.compression import Compressor, encode_and_decode
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

    # ---- compressed messages: every node's encode -> decode, row by row, then the same mixing ----------
    @torch.no_grad()
    def mix_compressed(
        self,
        buffers: Sequence[torch.Tensor],
        step: int,
        compressor: Compressor,
        residuals: Sequence[torch.Tensor] | None = None,
    ) -> None:
        n = self.topology.n
        for index, buf in enumerate(buffers):
            rows = buf.reshape(n, -1)
            residual = None if residuals is None else residuals[index].reshape(n, -1)
            encode_and_decode(rows, compressor, self._payload((index,), compressor, rows), (step, index), residual)
        sent, received = self.stats.bytes_sent, self.stats.bytes_received
        self.mix(buffers, step)
        payload = sum(compressor.payload_bytes(b.reshape(n, -1).shape[1], b.dtype) for b in buffers)
        edges = self._edges[step % self.topology.period]
        self.stats.bytes_sent, self.stats.bytes_received = sent + edges * payload, received + edges * payload

    @torch.no_grad()
    def average_compressed(
        self,
        buffers: Sequence[torch.Tensor],
        compressor: Compressor,
        step: int,
        residuals: Sequence[torch.Tensor] | None = None,
        shard_residuals: Sequence[torch.Tensor] | None = None,
    ) -> None:
        """The two-stage average of the real communicators, with node ``i``'s shard ``s`` as row ``(i, s)``."""
        n = self.topology.n
        for index, buf in enumerate(buffers):
            rows = buf.reshape(n, -1)
            numel = rows.shape[1]
            length = shard_length(numel, n, compressor.alignment)
            padded = self._workspace(("shards", index), (n, n * length), buf.dtype, buf.device)
            padded[:, :numel].copy_(rows)
            padded[:, numel:].zero_()
            shards = padded.view(n * n, length)
            sent = self._payload(("shards", index), compressor, shards)
            encode_and_decode(shards, compressor, sent, (step, index, 0))
            if residuals is not None:
                torch.sub(rows, padded[:, :numel], out=residuals[index].reshape(n, -1))
            averages = padded.view(n, n, length).mean(dim=0)  # row s: the average node s computes
            shared = self._payload(("averages", index), compressor, averages)
            if shard_residuals is None:
                encode_and_decode(averages, compressor, shared, (step, index, 1))
            else:  # node s keeps the residual of shard s: the diagonal blocks of its padded rows
                owned = self._workspace(("owned", index), (n, n * length), buf.dtype, buf.device)
                owned[:, :numel].copy_(shard_residuals[index].reshape(n, -1))
                owned[:, numel:].zero_()
                diagonal = owned.view(n, n, length).diagonal(dim1=0, dim2=1).T  # [shard s = node s, length]
                averages.add_(diagonal)
                encode_and_decode(averages, compressor, shared, (step, index, 1), diagonal)
                shard_residuals[index].reshape(n, -1).copy_(owned[:, :numel])
            rows.copy_(averages.view(1, -1)[:, :numel].expand(n, numel))
            shard_payload = compressor.payload_bytes(length, buf.dtype)
            self.stats.messages_sent += 2 * n
            self.stats.messages_received += 2 * n
            self.stats.bytes_sent += n * 2 * (n - 1) * shard_payload
            self.stats.bytes_received += n * 2 * (n - 1) * shard_payload


def _off_diagonal_count(matrix: sp.csr_array) -> int:
    """The messages of one round: non-zero weights off the diagonal."""
    return int(matrix.nnz - np.count_nonzero(matrix.diagonal()))
