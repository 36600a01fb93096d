"""Compressors: a buffer becomes one fixed-size byte payload per message, and back.

A :class:`Compressor` encodes the rows of a float buffer ``[..., m]`` (a rank's flat bucket ``[m]``, or
the simulator's stacked ``[n, m]``) into a ``uint8`` payload ``[..., P]`` with ``P =
payload_bytes(m, dtype)`` known in advance, so receive buffers are allocated once and reused and the
communicators count exactly the bytes they send. :meth:`Compressor.decode` writes ``C(x)`` back into a
float buffer. Encoding and decoding are a few vectorised tensor operations on the whole buffer.

Quality is stated as in CHOCO-SGD (Koloskova, Stich & Jaggi, ICML 2019, Assumption 4), whose
``omega`` the follow-up papers call ``delta``::

    E ||C(x) - x||^2 <= (1 - omega) ||x||^2        (expectation only over random-k's draw)

Every compressor here is *biased* (``E C(x) != x``) except the identity, which CHOCO-SGD allows.

=========  ==================================  =========================  ====================================
name       payload per row (x of m elements)   omega                      notes
=========  ==================================  =========================  ====================================
none       m x itemsize (raw bytes)            1                          lossless
bf16       2 m                                 1 - 2^-16                  round to nearest even (torch's cast)
fp16       2 m                                 1 - 2^-22 (normal range)   |x| > 65504 becomes inf
int8       m + 4 ceil(m / B) (+ padding)       1 - B / (4 * 127^2)        per-block absmax scale, B = block
int4       m / 2 + 4 ceil(m / B)               1 - B / (4 * 7^2)          two codes per byte; bound needs B < 196
topk       k (itemsize + 4)                    k / m                      k = max(1, round(fraction m))
randomk    k itemsize                          1 / ceil(m / k) (~ k/m)    indices from a shared seed
=========  ==================================  =========================  ====================================

Sections of a payload row (e.g. scales, then codes) start at multiples of 8 bytes so that each can be
viewed in its own dtype without a copy; rows are padded to 8 bytes when they have several sections.
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from collections.abc import Sequence
from functools import partial
from typing import Any, ClassVar

import numpy as np
import torch

from lightning_decent.registry import Registry

Key = Sequence[int]


def _aligned(nbytes: int) -> int:
    return (nbytes + 7) // 8 * 8


def _rows(t: torch.Tensor) -> torch.Tensor:
    """``t`` as ``[rows, last dim]`` (a view; the buffers here are contiguous)."""
    return t.view(-1, t.shape[-1])


def _section(payload: torch.Tensor, offset: int, count: int, dtype: torch.dtype) -> torch.Tensor:
    """Bytes ``[offset, offset + count * itemsize)`` of every payload row, viewed as ``[rows, count]`` of ``dtype``."""
    return payload[:, offset : offset + count * dtype.itemsize].view(dtype)


class Compressor(ABC):
    """Encodes the rows of a float buffer into fixed-size byte payloads and decodes them.

    Subclasses state their contraction ``omega`` (see the module docstring) in :meth:`omega`.

    ``key`` identifies a message (e.g. ``(step, bucket)``); only random-k uses it, to draw the same
    coordinates on the sender and every receiver without sending them.
    """

    name: ClassVar[str]
    #: Shards of a buffer split over ranks (the compressed global average) start at multiples of this.
    alignment: int = 1

    def options(self) -> dict[str, Any]:
        """The constructor options, for :meth:`describe`."""
        return {}

    def describe(self) -> str:
        """``name`` or ``name(option=value, ...)``: what goes into run names and checkpoint metadata."""
        options = ", ".join(f"{k}={v:g}" if isinstance(v, float) else f"{k}={v}" for k, v in self.options().items())
        return f"{self.name}({options})" if options else self.name

    @property
    def lossless(self) -> bool:
        return False

    @abstractmethod
    def payload_bytes(self, numel: int, dtype: torch.dtype = torch.float32) -> int:
        """Bytes of the payload of one row of ``numel`` elements of ``dtype``."""

    @abstractmethod
    def omega(self, numel: int) -> float:
        """The contraction ``omega``: ``E ||C(x) - x||^2 <= (1 - omega) ||x||^2`` for rows of ``numel``."""

    @abstractmethod
    def encode(self, x: torch.Tensor, out: torch.Tensor, key: Key = ()) -> torch.Tensor:
        """Write the payload of every row of ``x`` (``[..., m]``, contiguous) into ``out`` (``uint8 [..., P]``).

        Returns ``out``."""

    @abstractmethod
    def decode(self, payload: torch.Tensor, out: torch.Tensor, key: Key = ()) -> torch.Tensor:
        """Write ``C(x)`` of every payload row into ``out`` (``[..., m]``, the sender's dtype); return ``out``."""

    def new_payload(self, like: torch.Tensor) -> torch.Tensor:
        """A zeroed payload buffer for ``like`` (``uint8 [..., P]``). Encoding never writes the padding
        between sections, so it stays zero in a reused buffer."""
        size = self.payload_bytes(like.shape[-1], like.dtype)
        return torch.zeros((*like.shape[:-1], size), dtype=torch.uint8, device=like.device)

    def roundtrip(self, x: torch.Tensor, key: Key = ()) -> torch.Tensor:
        """``C(x)`` as a new tensor (tests and analysis; the hot path reuses its buffers)."""
        return self.decode(self.encode(x, self.new_payload(x), key), torch.empty_like(x), key)


@torch.no_grad()
def encode_and_decode(
    x: torch.Tensor, compressor: Compressor, payload: torch.Tensor, key: Key = (), residual: torch.Tensor | None = None
) -> None:
    """Encode ``x`` into ``payload`` and replace ``x`` by what the receivers decode, ``C(x)``.

    With ``residual``: ``residual <- x - C(x)``, the part of ``x`` that did not go on the wire (error
    feedback keeps it; CHOCO-SGD derives its public copy from it). This is how every communicator
    prepares a compressed message, so a node's own term in a compressed mix is the value its
    neighbours receive.
    """
    compressor.encode(x, payload, key)
    if residual is not None:
        residual.copy_(x)
    compressor.decode(payload, x, key)
    if residual is not None:
        residual.sub_(x)


class Cast(Compressor):
    """Every value cast to a 16-bit float (torch's round-to-nearest-even cast), 2 bytes per value; with
    ``dtype=None`` the raw values themselves (``"none"``: lossless, ``omega = 1``, unbiased).

    Relative error per value at most the unit roundoff ``u`` (bf16: ``2^-8``, fp16: ``2^-11``), so
    ``omega = 1 - u^2`` inside the format's normal range; fp16 turns ``|x| > 65504`` into ``inf`` and
    loses relative precision below ``6.1e-5``. Biased (deterministic rounding).
    """

    NAMES: ClassVar[dict[torch.dtype | None, str]] = {None: "none", torch.bfloat16: "bf16", torch.float16: "fp16"}

    def __init__(self, dtype: torch.dtype | None = None) -> None:
        self.dtype = dtype
        self.name = self.NAMES[dtype]  # type: ignore[misc]
        self._unit_roundoff = 0.0 if dtype is None else torch.finfo(dtype).eps / 2

    @property
    def lossless(self) -> bool:
        return self.dtype is None

    def _wire(self, dtype: torch.dtype) -> torch.dtype:
        return dtype if self.dtype is None else self.dtype

    def payload_bytes(self, numel: int, dtype: torch.dtype = torch.float32) -> int:
        return numel * self._wire(dtype).itemsize

    def omega(self, numel: int) -> float:
        return 1.0 - self._unit_roundoff**2

    def encode(self, x: torch.Tensor, out: torch.Tensor, key: Key = ()) -> torch.Tensor:
        _rows(out).view(self._wire(x.dtype)).copy_(_rows(x))
        return out

    def decode(self, payload: torch.Tensor, out: torch.Tensor, key: Key = ()) -> torch.Tensor:
        _rows(out).copy_(_rows(payload).view(self._wire(out.dtype)))
        return out


class BlockQuantizer(Compressor):
    """Symmetric absmax quantisation per block of ``block`` consecutive values (the last block may be shorter).

    A block with scale ``s = max_j |x_j| / L`` (``L = 127`` for 8 bits, ``7`` for 4 bits; ``s`` computed and
    sent in float32 whatever the buffer's dtype) sends ``q_j = round(x_j / s)`` in ``[-L, L]`` and is decoded
    as ``q_j s``. Each value is off
    by at most ``s / 2`` (half a quantisation step), so per block ``||C(x) - x||^2 <= B s^2 / 4 <=
    B / (4 L^2) ||x||^2``: ``omega = 1 - B / (4 L^2)`` (int8, B = 256: 0.996; int4, B = 64: 0.67; the
    bound is void for int4 blocks of 196 or more). Deterministic rounding: biased. int4 stores ``q + 7``
    in a nibble, two values per byte (even index in the low nibble).

    Payload row: the float32 scales, then the codes (each section padded to 8 bytes).
    """

    def __init__(self, bits: int, block: int) -> None:
        if isinstance(block, bool) or not isinstance(block, int) or block < 1:
            raise ValueError(f"int{bits} block must be a positive integer (values per scale), got {block!r}.")
        self.bits = bits
        self.block = block
        self.alignment = block
        self.levels = 2 ** (bits - 1) - 1
        self.name = f"int{bits}"  # type: ignore[misc]

    def options(self) -> dict[str, Any]:
        return {"block": self.block}

    def _code_bytes(self, numel: int) -> int:
        return numel if self.bits == 8 else (numel + 1) // 2

    def payload_bytes(self, numel: int, dtype: torch.dtype = torch.float32) -> int:
        return _aligned(4 * math.ceil(numel / self.block)) + _aligned(self._code_bytes(numel))

    def omega(self, numel: int) -> float:
        return max(0.0, 1.0 - min(self.block, numel) / (4.0 * self.levels**2))

    def _blocks(self, t: torch.Tensor) -> list[torch.Tensor]:
        """Views of ``t`` (``[rows, m]``) as ``[rows, blocks, B]``: the full blocks, then the short last one."""
        rows, m = t.shape
        full = m // self.block
        parts = [t[:, : full * self.block].view(rows, full, self.block)] if full else []
        if m % self.block:
            parts.append(t[:, full * self.block :].unsqueeze(1))
        return parts

    def _sections(self, payload: torch.Tensor, m: int) -> tuple[torch.Tensor, torch.Tensor]:
        blocks = math.ceil(m / self.block)
        scales = _section(payload, 0, blocks, torch.float32)
        codes = payload[:, _aligned(4 * blocks) : _aligned(4 * blocks) + self._code_bytes(m)]
        return scales, codes

    def encode(self, x: torch.Tensor, out: torch.Tensor, key: Key = ()) -> torch.Tensor:
        x, payload = _rows(x), _rows(out)
        m = x.shape[1]
        scales, codes = self._sections(payload, m)
        quantised = torch.empty_like(x) if self.bits == 4 else None
        start = 0
        for part in self._blocks(x):
            count = part.shape[1]
            scale = scales[:, start : start + count]
            # The scale and the division in float32 whatever the buffer's dtype: in float16 a block whose
            # maximum is below ~3.8e-6 would get a zero scale (amax / 127 underflows) and be sent as zeros.
            wide = part if part.dtype in (torch.float32, torch.float64) else part.float()
            scale.copy_(torch.amax(wide.abs(), dim=-1).div_(self.levels))  # 11x faster than vector_norm(inf) on CPU
            divisor = scale.to(wide.dtype).unsqueeze(-1)
            divisor = torch.where(divisor > 0, divisor, torch.ones_like(divisor))
            q = torch.div(wide, divisor).round_().clamp_(-self.levels, self.levels)
            first, length = start * self.block, part.shape[1] * part.shape[2]
            if self.bits == 8:
                codes.view(torch.int8)[:, first : first + length].view_as(q).copy_(q)
            else:
                assert quantised is not None
                quantised[:, first : first + length].view_as(q).copy_(q)
            start += count
        if quantised is not None:
            _pack_nibbles(quantised.add_(self.levels), codes)
        return out

    def decode(self, payload: torch.Tensor, out: torch.Tensor, key: Key = ()) -> torch.Tensor:
        payload, values = _rows(payload), _rows(out)
        scales, codes = self._sections(payload, values.shape[1])
        if self.bits == 8:
            values.copy_(codes.view(torch.int8))
        else:
            _unpack_nibbles(codes, values).sub_(self.levels)
        start = 0
        for part in self._blocks(values):
            part.mul_(scales[:, start : start + part.shape[1]].unsqueeze(-1))
            start += part.shape[1]
        return out


def _pack_nibbles(codes: torch.Tensor, out: torch.Tensor) -> None:
    """``out[:, i] = codes[:, 2i] | codes[:, 2i + 1] << 4`` for codes in ``[0, 15]`` (a missing last odd code is 0)."""
    m = codes.shape[1]
    even = out.copy_(codes[:, 0::2])
    if m > 1:
        odd = codes[:, 1::2].to(torch.uint8).bitwise_left_shift_(4)
        even[:, : odd.shape[1]].bitwise_or_(odd)


def _unpack_nibbles(packed: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
    """The inverse of :func:`_pack_nibbles`, written into ``out`` (``[rows, m]``); returns ``out``."""
    m = out.shape[1]
    out[:, 0::2].copy_(packed.bitwise_and(15)[:, : (m + 1) // 2])
    out[:, 1::2].copy_(packed.bitwise_right_shift(4)[:, : m // 2])
    return out


class _Sparsifier(Compressor):
    """Keeps ``k = max(1, round(fraction m))`` values of every row of ``m`` (top-k also sends their indices)."""

    def __init__(self, fraction: float) -> None:
        if isinstance(fraction, bool) or not isinstance(fraction, (int, float)) or not 0 < fraction <= 1:
            raise ValueError(f"{self.name} fraction must be in (0, 1] (the share of values sent), got {fraction!r}.")
        self.fraction = float(fraction)

    def options(self) -> dict[str, Any]:
        return {"fraction": self.fraction}

    def k(self, numel: int) -> int:
        return min(numel, max(1, round(self.fraction * numel)))


class TopK(_Sparsifier):
    """The ``k`` entries of largest magnitude per row, as values then int32 indices (ties: torch.topk's pick).

    Deterministic and biased; ``||C(x) - x||^2 <= (1 - k/m) ||x||^2``, so ``omega = k / m``.
    """

    name = "topk"

    def payload_bytes(self, numel: int, dtype: torch.dtype = torch.float32) -> int:
        k = self.k(numel)
        return _aligned(k * dtype.itemsize) + _aligned(4 * k)

    def omega(self, numel: int) -> float:
        return self.k(numel) / numel

    def _sections(self, payload: torch.Tensor, m: int, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        k = self.k(m)
        values = _section(payload, 0, k, dtype)
        indices = _section(payload, _aligned(k * values.element_size()), k, torch.int32)
        return values, indices

    def encode(self, x: torch.Tensor, out: torch.Tensor, key: Key = ()) -> torch.Tensor:
        x = _rows(x)
        values, indices = self._sections(_rows(out), x.shape[1], x.dtype)
        _, chosen = torch.topk(x.abs(), values.shape[1], dim=-1, sorted=False)
        torch.gather(x, -1, chosen, out=values)
        indices.copy_(chosen)
        return out

    def decode(self, payload: torch.Tensor, out: torch.Tensor, key: Key = ()) -> torch.Tensor:
        values_out = _rows(out)
        values, indices = self._sections(_rows(payload), values_out.shape[1], out.dtype)
        values_out.zero_().scatter_(-1, indices.long(), values)
        return out


class RandomK(_Sparsifier):
    """``k`` coordinates drawn from a seed every rank derives from ``(seed, *key)``; only their values are sent.

    The coordinates are stratified: row positions are cut into ``k`` contiguous strata of ``floor`` or
    ``ceil(m / k)`` positions and one is drawn uniformly in each (``O(k)`` work, no duplicates, sorted).
    A coordinate in a stratum of size ``c`` is kept with probability ``1 / c``, so ``E ||C(x) - x||^2 <=
    (1 - 1/ceil(m/k)) ||x||^2``: ``omega = 1 / ceil(m / k)``, exactly ``k / m`` when ``k`` divides ``m``
    (the contraction of uniform random-k). Not rescaled (``E C(x) = x k/m``): biased, as CHOCO-SGD's
    ``rand_k``. Every row of a stacked buffer uses the same coordinates, as every rank does for one key.
    """

    name = "randomk"

    def __init__(self, fraction: float, seed: int = 0) -> None:
        super().__init__(fraction)
        if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
            raise ValueError(f"randomk seed must be a non-negative integer, got {seed!r}.")
        self.seed = seed

    def options(self) -> dict[str, Any]:
        return {"fraction": self.fraction, "seed": self.seed}

    def payload_bytes(self, numel: int, dtype: torch.dtype = torch.float32) -> int:
        return self.k(numel) * dtype.itemsize

    def omega(self, numel: int) -> float:
        return 1.0 / math.ceil(numel / self.k(numel))

    def indices(self, numel: int, key: Key, device: torch.device) -> torch.Tensor:
        """The ``k`` coordinates of message ``key`` (int64, sorted): the same on every rank and device
        (drawn by a CPU generator, then moved to ``device``)."""
        k = self.k(numel)
        state = np.random.SeedSequence([self.seed, *[int(v) for v in key]]).generate_state(1, np.uint64)[0]
        generator = torch.Generator().manual_seed(int(state) & (2**63 - 1))
        bounds = torch.arange(k + 1) * numel // k
        uniform = torch.rand(k, generator=generator, dtype=torch.float64)
        return (bounds[:-1] + (uniform * (bounds[1:] - bounds[:-1])).long()).to(device)

    def encode(self, x: torch.Tensor, out: torch.Tensor, key: Key = ()) -> torch.Tensor:
        x = _rows(x)
        values = _rows(out).view(x.dtype)
        torch.index_select(x, -1, self.indices(x.shape[1], key, x.device), out=values)
        return out

    def decode(self, payload: torch.Tensor, out: torch.Tensor, key: Key = ()) -> torch.Tensor:
        values_out = _rows(out)
        chosen = self.indices(values_out.shape[1], key, out.device)
        values_out.zero_().index_copy_(-1, chosen, _rows(payload).view(out.dtype))
        return out


#: Default values per block of the quantisers: int8 sends 0.254 bytes per float32 byte; int4 blocks
#: stay small enough for a useful contraction bound (omega = 0.67).
DEFAULT_BLOCK = {"int8": 256, "int4": 64}

#: The registered compressors by name; each builder's keyword parameters are the name's options.
COMPRESSOR_REGISTRY: Registry[Compressor] = Registry(
    "compressor",
    {
        "none": partial(Cast, None),
        "bf16": partial(Cast, torch.bfloat16),
        "fp16": partial(Cast, torch.float16),
        "int8": partial(BlockQuantizer, 8, block=DEFAULT_BLOCK["int8"]),
        "int4": partial(BlockQuantizer, 4, block=DEFAULT_BLOCK["int4"]),
        "topk": TopK,
        "randomk": RandomK,
    },
)

#: Names accepted by :func:`get_compressor`.
COMPRESSORS = COMPRESSOR_REGISTRY.names()


def get_compressor(name: str | Compressor | None, **options: Any) -> Compressor:
    """Build a compressor by name: ``get_compressor("int8", block=128)``, ``get_compressor("topk", fraction=0.01)``.

    Options: ``block`` (int8, int4: values per scale), ``fraction`` (topk, randomk: share of values
    sent), ``seed`` (randomk). ``None`` is the identity (``"none"``); a built compressor is returned as is.

    Raises:
        ValueError: for an unknown name or option, or a bad value, naming the valid ones.
    """
    if isinstance(name, Compressor):
        if options:
            raise ValueError(f"Options {sorted(options)} only apply to a compressor given by name.")
        return name
    key = COMPRESSOR_REGISTRY.resolve("none" if name is None else str(name))
    COMPRESSOR_REGISTRY.check_options(key, options)
    if "fraction" in COMPRESSOR_REGISTRY.options(key) and "fraction" not in options:
        raise ValueError(f"compressor {key!r} needs fraction=... (the share of values sent, e.g. 0.01).")
    return COMPRESSOR_REGISTRY.build(key, **options)
