"""n virtual nodes in one process: buffers are stacked ``[n, ...]`` and mixing is ``W(step) @ X``."""

from __future__ import annotations

from collections.abc import Sequence

import torch

from lightning_decent.comm.base import Communicator, count_all_reduce, nbytes
from lightning_decent.topology import Topology


class SimulatedCommunicator(Communicator):
    """Runs the same algorithm code as the real strategy on stacked buffers (row ``i`` = node ``i``).

    Statistics count what the ``n`` real nodes would send in total (per-node payload times the
    number of edges of the phase; for a global average, ``n`` times a ring all-reduce's payload), so
    they can be compared with the real communicators'.
    """

    def __init__(self, topology: Topology) -> None:
        super().__init__(topology)
        self._edges = [
            int(((topology.matrix(k) != 0).sum()) - (topology.matrix(k).diagonal() != 0).sum())
            for k in range(topology.period)
        ]
        self._w_cache: dict[tuple[int, torch.dtype, torch.device], torch.Tensor] = {}

    def _w(self, step: int, like: torch.Tensor) -> torch.Tensor:
        key = (step % self.topology.period, like.dtype, like.device)
        w = self._w_cache.get(key)
        if w is None:
            w = self.topology.weights(key[0]).to(dtype=like.dtype, device=like.device)
            self._w_cache[key] = w
        return w

    @torch.no_grad()
    def mix(self, buffers: Sequence[torch.Tensor], step: int) -> None:
        n = self.topology.n
        edges = self._edges[step % self.topology.period]
        for buf in buffers:
            if buf.shape[0] != n:
                raise ValueError(f"Simulated buffers are stacked [n={n}, ...]; got shape {tuple(buf.shape)}.")
            flat = buf.reshape(n, -1)
            flat.copy_(self._w(step, buf) @ flat)
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
