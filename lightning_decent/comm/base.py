"""The communicator interface: the only place where nodes exchange data.

``mix`` is one blocking gossip round. ``start_mix`` splits it in two so that the transfer can run
while the caller computes: it returns a :class:`PendingMix` whose ``finish`` completes the round.
``global_average`` and ``start_global_average`` do the same for the exact average over all nodes.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import ClassVar

import torch

from lightning_decent.comm.collectives import BoundedCollectives
from lightning_decent.comm.compression import Compressor
from lightning_decent.topology import Topology


@dataclass
class CommStats:
    """Messages and bytes this rank sent and received (payload bytes, not counting protocol overhead)."""

    messages_sent: int = 0
    bytes_sent: int = 0
    messages_received: int = 0
    bytes_received: int = 0

    def as_dict(self) -> dict[str, int]:
        return asdict(self)

    def reset(self) -> None:
        self.messages_sent = self.bytes_sent = self.messages_received = self.bytes_received = 0


class MeanPerStep:
    """The mean increase of a running counter per step between two reports:
    ``(counter_k - counter_j) / (k - j)`` for the steps ``j < k`` of consecutive reports.

    What a logger that writes every ``m`` steps should show of a quantity that moves in bursts (bytes
    of a sync every ``H`` local steps): the average since its last point, not the burst or the silence
    of the one step it happens to sample."""

    def __init__(self, step: int = 0, counter: int = 0) -> None:
        self._step, self._counter = step, counter

    def report(self, step: int, counter: int) -> float:
        steps = step - self._step
        mean = (counter - self._counter) / steps if steps > 0 else 0.0
        self._step, self._counter = step, counter
        return mean


class NonFiniteValueError(FloatingPointError):
    """This rank is about to send or average NaN or Inf."""


def refuse_non_finite(buf: torch.Tensor, rank: int, what: str) -> None:
    """Raise :class:`NonFiniteValueError` naming ``rank`` and ``what`` (e.g. ``"buffer 0 about to be sent at
    gossip step 5"``) if ``buf`` holds NaN or Inf: one sum, in float32 for 16-bit buffers (whose sum
    would overflow first)."""
    total = buf.sum(dtype=torch.float32) if buf.dtype in (torch.float16, torch.bfloat16) else buf.sum()
    if not torch.isfinite(total):
        raise NonFiniteValueError(
            f"rank {rank}: NaN or Inf in {what}; stopping instead of spreading it to the other ranks. Lower the "
            f"learning rate or clip gradients (check_finite=False disables this check)."
        )


def nbytes(t: torch.Tensor) -> int:
    return t.numel() * t.element_size()


def count_all_reduce(stats: CommStats, node_bytes: int, n: int, nodes: int = 1) -> None:
    """Add the payload of a ring all-reduce of ``node_bytes`` per node over ``n`` nodes to ``stats``:
    ``2 (n - 1) / n`` times the buffer sent and received per node, for ``nodes`` nodes (the simulator
    counts all ``n``). The backend may use another algorithm with the same order of traffic."""
    if n == 1:
        return
    traffic = node_bytes * 2 * (n - 1) // n * nodes
    stats.bytes_sent += traffic
    stats.bytes_received += traffic


class Communicator(ABC):
    """Mixes buffers with the neighbours of a topology and averages them over the whole network.

    ``mix`` is the gossip primitive of every algorithm: after it, this node's buffer is
    ``sum_j W[i, j](step) * x_j``. Buffers given together in one call travel in the same round.
    """

    #: Whether the ``*_compressed`` methods are implemented (compressed payloads on the wire).
    sends_compressed: ClassVar[bool] = False
    #: This process's global rank (named in errors) and whether what it sends or averages is first checked
    #: for NaN/Inf (:func:`refuse_non_finite`); the transports between processes set both.
    rank: int = 0
    check_finite: bool = False
    #: The strategy's bounded world collectives (``collective_timeout``, the roll call), for the transports
    #: between processes that run world-wide averages; ``None``: plain collectives.
    collectives: BoundedCollectives | None = None
    #: The training step that errors name when the ``step`` given to ``mix`` is another count (the
    #: local-steps family mixes its ``k``-th synchronisation with ``W(k)``); ``None``: they are the same.
    reported_step: int | None = None

    def __init__(self, topology: Topology) -> None:
        self.topology = topology
        self.stats = CommStats()
        self.closed = False
        self._scratch_buffers: dict[tuple, torch.Tensor] = {}

    @abstractmethod
    def mix(self, buffers: Sequence[torch.Tensor], step: int) -> None:
        """In place, for every buffer: ``x_i <- sum_j W[i, j](step) x_j``."""

    def start_mix(self, buffers: Sequence[torch.Tensor], step: int) -> PendingMix:
        """Begin the round ``x_i <- sum_j W[i, j](step) x_j`` for ``buffers`` and return at once.

        The buffers are read by the transport until the round is finished: do not write them before
        :meth:`PendingMix.finish` (or :meth:`PendingMix.wait`) returned. This default moves nothing
        until ``finish`` (which then runs :meth:`mix`); transports that can send in the background
        override it.
        """
        return DeferredMix(self, buffers, step)

    def is_silent(self, step: int) -> bool:
        """True if mixing at ``step`` sends nothing and leaves this node's buffers unchanged (no
        neighbours and self weight 1), so callers may skip preparing a round."""
        return False

    def step_name(self, step: int) -> str:
        """How errors name the round mixed with ``W(step)``: ``"gossip step 5"``, or with :attr:`reported_step`
        ``"gossip step 5 (synchronisation round 0)"``."""
        if self.reported_step is None:
            return f"gossip step {step}"
        return f"gossip step {self.reported_step} (synchronisation round {step})"

    def close(self) -> None:
        """Release what the transport created (process groups); the communicator is not used afterwards."""
        self.closed = True

    def _scratch(self, key: tuple, like: torch.Tensor) -> torch.Tensor:
        """A buffer shaped like ``like``, allocated once per ``key`` and reused."""
        return self._workspace(key, like.shape, like.dtype, like.device)

    def _workspace(self, key: tuple, shape: Sequence[int], dtype: torch.dtype, device: torch.device) -> torch.Tensor:
        """A buffer of this shape, dtype and device, allocated (zeroed) once per ``key`` and reused."""
        full_key = (*key, tuple(shape), dtype, device)
        if full_key not in self._scratch_buffers:
            self._scratch_buffers[full_key] = torch.zeros(tuple(shape), dtype=dtype, device=device)
        return self._scratch_buffers[full_key]

    def _payload(self, key: tuple, compressor: Compressor, like: torch.Tensor) -> torch.Tensor:
        """A reused payload buffer (``uint8 [..., P]``, padding zero) for ``like`` under ``compressor``."""
        size = compressor.payload_bytes(like.shape[-1], like.dtype)
        return self._workspace(("payload", *key), (*like.shape[:-1], size), torch.uint8, like.device)

    @abstractmethod
    def global_average(self, buffers: Sequence[torch.Tensor]) -> None:
        """In place, for every buffer: ``x_i <- (1/n) sum_j x_j`` (a collective over all nodes)."""

    def start_global_average(self, buffers: Sequence[torch.Tensor]) -> PendingMix:
        """Begin :meth:`global_average` of ``buffers`` and return at once; ``finish(index)`` (without
        ``into``) completes buffer ``index``. As for :meth:`start_mix`, do not write the buffers before
        then. This default averages when finished; transports with asynchronous collectives override it."""
        return DeferredAverage(self, buffers)

    # ---- compressed messages -------------------------------------------------------------------------
    def mix_compressed(
        self,
        buffers: Sequence[torch.Tensor],
        step: int,
        compressor: Compressor,
        residuals: Sequence[torch.Tensor] | None = None,
    ) -> None:
        """In place: ``x_i <- sum_j W[i, j](step) C(x_j)``, every node sending the payload of ``C(x_j)``.

        ``C`` is ``compressor``'s encode then decode; this node's own term is ``C(x_i)`` too, the value
        its neighbours receive, so a doubly stochastic ``W`` preserves the network mean of what was
        sent. With ``residuals``: ``residuals[b] <- x_i - C(x_i)`` for buffer ``b`` (what did not go on
        the wire; error feedback and CHOCO-SGD use it). Message ``(step, b)`` is random-k's key.

        Raises:
            NotImplementedError: for a transport that cannot send payloads.
        """
        raise NotImplementedError(
            f"{type(self).__name__} cannot send compressed payloads; use the 'p2p' or 'allreduce' communicator."
        )

    def average_compressed(
        self,
        buffers: Sequence[torch.Tensor],
        compressor: Compressor,
        step: int,
        residuals: Sequence[torch.Tensor] | None = None,
        shard_residuals: Sequence[torch.Tensor] | None = None,
    ) -> None:
        """In place, the same result on every node: the network average of the compressed buffers.

        Each buffer is cut into ``n`` shards (multiples of ``compressor.alignment``); shard ``s`` of
        every node is compressed and sent to node ``s``, which averages what it decodes and sends the
        compressed average to everyone (a compressed reduce-scatter, then a compressed all-gather)::

            x <- C_s(a_s),  a_s = (1/n) sum_j C_s(x_j)      shard by shard, identical on every node

        so ``2 (n - 1)`` shard payloads (about ``2 (n - 1) / n`` payloads) leave each node. With
        ``residuals``: ``residuals[b] <- x_i - C_s(x_i)``, this node's first-stage compression error.
        With ``shard_residuals`` (shaped like the buffers; node ``s`` uses only shard ``s``'s positions),
        the second stage has error feedback too (as DoubleSqueeze, Tang et al., ICML 2019):
        ``a_s <- a_s + e_s``, then ``e_s <- a_s - C_s(a_s)`` (see
        :class:`~lightning_decent.algorithms.ErrorFeedback`).

        Raises:
            NotImplementedError: for a transport without collectives.
        """
        raise NotImplementedError(f"{type(self).__name__} has no compressed global average.")

    def start_mix_compressed(
        self,
        buffers: Sequence[torch.Tensor],
        step: int,
        compressor: Compressor,
        residuals: Sequence[torch.Tensor] | None = None,
    ) -> PendingMix:
        """Begin :meth:`mix_compressed` and return at once; ``finish(index)`` (without ``into``) completes
        buffer ``index``. The buffers are encoded (and ``residuals`` written) before this returns; do not
        write the buffers before ``finish``. This default runs the whole round now (the simulator's
        numbers do not depend on when); transports with background transfers override it."""
        self.mix_compressed(buffers, step, compressor, residuals)
        return CompletedRound(buffers, step)

    def start_average_compressed(
        self,
        buffers: Sequence[torch.Tensor],
        compressor: Compressor,
        step: int,
        residuals: Sequence[torch.Tensor] | None = None,
        shard_residuals: Sequence[torch.Tensor] | None = None,
    ) -> PendingMix:
        """Begin :meth:`average_compressed` and return at once; ``finish(index)`` (without ``into``)
        completes buffer ``index``. This default runs the whole average now; transports with
        asynchronous collectives override it."""
        self.average_compressed(buffers, compressor, step, residuals, shard_residuals)
        return CompletedRound(buffers, step)


class PendingMix(ABC):
    """A started gossip round over some buffers (see :meth:`Communicator.start_mix`).

    ``finish(index)`` completes buffer ``index`` in one of two ways:

    * ``finish(index)``: the buffer becomes ``(W x)_i = sum_j W[i, j] x_j``, as after ``mix``;
    * ``finish(index, into=t)``: ``t += (W x)_i - x_i`` and the buffer keeps ``x_i``. This adds the
      neighbours' correction to a tensor that has moved on since the round started (the one-step
      delayed mixing ``x^{k+1} = W x^k - lr d^k`` of overlapped D-SGD);
    * ``finish(index, into=t, refill=True)``: the same, then the buffer takes ``t``'s new value, ready
      to be sent in the next round. Implementations may fuse the two (the point-to-point one does
      both in one cache-sized pass over ``t``, the buffer and the received models).
    """

    def __init__(self, buffers: Sequence[torch.Tensor], step: int) -> None:
        self.buffers = list(buffers)
        self.step = step

    @abstractmethod
    def wait(self) -> None:
        """Complete every transfer of the round without changing any tensor (idempotent)."""

    @abstractmethod
    def finish(self, index: int, into: torch.Tensor | None = None, refill: bool = False) -> None:
        """Wait for buffer ``index`` and combine it (see the class docstring). Call once per buffer."""


class DeferredMix(PendingMix):
    """The round runs when it is finished: nothing is in flight in between (simulator, all-reduce)."""

    def __init__(self, comm: Communicator, buffers: Sequence[torch.Tensor], step: int) -> None:
        super().__init__(buffers, step)
        self.comm = comm

    def wait(self) -> None:
        pass

    def finish(self, index: int, into: torch.Tensor | None = None, refill: bool = False) -> None:
        buffer = self.buffers[index]
        if into is None:
            self.comm.mix([buffer], self.step)
            return
        mixed = self.comm._scratch(("deferred",), buffer)
        mixed.copy_(buffer)
        self.comm.mix([mixed], self.step)
        into.add_(mixed).sub_(buffer)
        if refill:
            buffer.copy_(into)


class DeferredAverage(PendingMix):
    """A global average that runs when it is finished (simulator, and the default)."""

    def __init__(self, comm: Communicator, buffers: Sequence[torch.Tensor]) -> None:
        super().__init__(buffers, step=-1)
        self.comm = comm

    def wait(self) -> None:
        pass

    def finish(self, index: int, into: torch.Tensor | None = None, refill: bool = False) -> None:
        if into is not None:
            raise ValueError("a global average completes its own buffer; finish(index) takes no 'into'.")
        self.comm.global_average([self.buffers[index]])


class CompletedRound(PendingMix):
    """A round that already ran to completion when it was started: ``finish`` has nothing left to do."""

    def wait(self) -> None:
        pass

    def finish(self, index: int, into: torch.Tensor | None = None, refill: bool = False) -> None:
        if into is not None:
            raise ValueError("this round has completed its own buffers; finish(index) takes no 'into'.")
