"""Compressors: what goes on the wire, what comes back, and the bounds their docstrings state."""

from __future__ import annotations

import math

import pytest
import torch

from lightning_decent.comm import COMPRESSORS, get_compressor
from lightning_decent.comm.compression import encode_and_decode

#: One built compressor per name (non-default options where they exist), for the generic checks.
ALL = {
    "none": get_compressor("none"),
    "bf16": get_compressor("bf16"),
    "fp16": get_compressor("fp16"),
    "int8": get_compressor("int8", block=64),
    "int4": get_compressor("int4", block=16),
    "topk": get_compressor("topk", fraction=0.1),
    "randomk": get_compressor("randomk", fraction=0.1),
}


def data(*shape: int, dtype: torch.dtype = torch.float32, seed: int = 0) -> torch.Tensor:
    """Heavy-tailed values (a few large entries per block, as in model differences)."""
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(shape, generator=g, dtype=torch.float64) ** 3).to(dtype)


def test_every_name_builds() -> None:
    assert set(ALL) == set(COMPRESSORS)


# ---- quantisers --------------------------------------------------------------------------------------
@pytest.mark.parametrize(("name", "levels"), [("int8", 127), ("int4", 7)])
@pytest.mark.parametrize("block", [1, 7, 64])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_quantiser_error_is_within_half_a_step_of_each_block(name: str, levels: int, block: int, dtype) -> None:
    x = data(3, 1000, dtype=dtype)  # 1000 is no multiple of 7 or 64: a short last block
    decoded = get_compressor(name, block=block).roundtrip(x)
    blocks = math.ceil(1000 / block)
    padded = torch.nn.functional.pad(x, (0, blocks * block - 1000)).view(3, blocks, block)
    step = (padded.abs().amax(-1) / levels).float().to(dtype)  # the float32 scale that is sent
    error = torch.nn.functional.pad(decoded - x, (0, blocks * block - 1000)).view(3, blocks, block).abs()
    assert (error <= step.unsqueeze(-1) * (0.5 + 1e-6)).all()  # half a step: round to nearest
    assert (error.amax(-1) > 0).any()  # it really is lossy


def test_quantiser_keeps_zero_blocks_and_the_block_maximum() -> None:
    x = torch.zeros(2, 300)
    x[1, 17] = -3.5
    for name in ("int8", "int4"):
        decoded = get_compressor(name, block=100).roundtrip(x)
        assert decoded[0].eq(0).all() and decoded[1, 100:].eq(0).all()  # no 0/0
        assert decoded[1, 17] == -3.5  # the absmax element is exact: q = -L, s = 3.5 / L


def test_int4_packs_two_values_per_byte() -> None:
    c = get_compressor("int4", block=64)
    assert c.payload_bytes(1024) == 4 * 16 + 512
    assert c.payload_bytes(1025) == 72 + 520  # 17 scales and 513 code bytes, each section padded to 8


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("source", [torch.float32, torch.float64])
def test_16_bit_casts_equal_torchs_cast(dtype, source) -> None:
    x = data(4, 333, dtype=source) * 1000
    name = "bf16" if dtype == torch.bfloat16 else "fp16"
    compressor = get_compressor(name)
    payload = compressor.encode(x, compressor.new_payload(x))
    assert torch.equal(payload.view(dtype), x.to(dtype))  # the bytes on the wire are torch's cast
    assert torch.equal(compressor.roundtrip(x), x.to(dtype).to(source))
    assert compressor.payload_bytes(333) == 666


def test_fp16_overflows_to_inf_as_documented() -> None:
    assert get_compressor("fp16").roundtrip(torch.tensor([7e4])).isinf().all()


# ---- sparsifiers -------------------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_topk_sends_exactly_the_k_largest_magnitudes_and_their_indices(dtype) -> None:
    x = data(3, 500, dtype=dtype)
    c = get_compressor("topk", fraction=0.05)
    k = c.k(500)
    assert k == 25
    payload = c.encode(x, c.new_payload(x))
    values_bytes = -(-x.element_size() * k // 8) * 8  # sections start at multiples of 8 bytes
    assert payload.shape == (3, values_bytes + 104)  # 25 int32 indices, padded to 8
    values = payload[:, : x.element_size() * k].view(dtype)
    indices = payload[:, values_bytes : values_bytes + 4 * k].view(torch.int32).long()
    expected = x.abs().topk(k, dim=-1).indices
    for row in range(3):
        assert set(indices[row].tolist()) == set(expected[row].tolist())
        assert torch.equal(values[row], x[row, indices[row]])
    decoded = c.decode(payload, torch.empty_like(x))
    assert torch.equal(decoded.ne(0).sum(-1), torch.full((3,), k))
    kept = decoded.ne(0)
    assert torch.equal(decoded[kept], x[kept])
    for row in range(3):
        assert x[row][~kept[row]].abs().max() <= x[row][kept[row]].abs().min()


def test_topk_fraction_rounds_to_at_least_one_value() -> None:
    c = get_compressor("topk", fraction=0.01)
    assert [c.k(m) for m in (1, 50, 100, 149, 151, 10_000)] == [1, 1, 1, 1, 2, 100]


def test_randomk_sender_and_receiver_draw_the_same_coordinates() -> None:
    x = data(2, 1000)
    sender = get_compressor("randomk", fraction=0.03, seed=7)
    receiver = get_compressor("randomk", fraction=0.03, seed=7)  # another process builds its own
    payload = sender.encode(x, sender.new_payload(x), key=(12, 3))
    assert payload.numel() == 2 * 30 * 4  # values only
    decoded = receiver.decode(payload, torch.empty_like(x), key=(12, 3))
    chosen = receiver.indices(1000, (12, 3), x.device)
    assert chosen.unique().numel() == 30
    assert torch.equal(decoded[:, chosen], x[:, chosen])  # every row uses the same coordinates
    assert decoded.ne(0).sum() == 2 * 30
    assert not torch.equal(chosen, receiver.indices(1000, (13, 3), x.device))  # a new draw per message
    assert not torch.equal(chosen, get_compressor("randomk", fraction=0.03, seed=8).indices(1000, (12, 3), x.device))


def test_randomk_keeps_each_coordinate_with_probability_k_over_m() -> None:
    # Stratified draw: one coordinate per stratum of m/k, so the marginal is k/m and omega = k/m.
    c = get_compressor("randomk", fraction=0.1)
    hits = torch.zeros(200)
    draws = 2000
    for step in range(draws):
        hits[c.indices(200, (step,), torch.device("cpu"))] += 1
    assert hits.sum() == draws * 20
    assert (hits / draws).sub(0.1).abs().max() < 0.035  # binomial(2000, 0.1): sd 0.0067
    assert c.omega(200) == pytest.approx(0.1)


# ---- shared contract -----------------------------------------------------------------------------------
@pytest.mark.parametrize("name", COMPRESSORS)
@pytest.mark.parametrize("m", [1, 5, 257, 1000])
def test_contraction_bound_holds(name: str, m: int) -> None:
    c = ALL[name]
    x = data(16, m, dtype=torch.float64, seed=m)
    if name == "fp16":  # the bound holds in fp16's normal range (documented)
        x = x.sign() * x.abs().clamp(1e-3, 1e3)
    error = (c.roundtrip(x, key=(0,)) - x).pow(2).sum(-1)
    bound = (1 - c.omega(m)) * x.pow(2).sum(-1)
    if name == "randomk":  # a bound in expectation: the mean over many draws
        error = torch.stack([(c.roundtrip(x, key=(s,)) - x).pow(2).sum(-1) for s in range(300)]).mean(0)
        bound = bound * 1.3
    assert (error <= bound * (1 + 1e-9) + 1e-300).all()


@pytest.mark.parametrize("name", COMPRESSORS)
def test_rows_are_encoded_independently_into_fixed_size_payloads(name: str) -> None:
    c = ALL[name]
    x = data(5, 1001)
    stacked = c.encode(x, c.new_payload(x), key=(4, 1))
    assert stacked.shape == (5, c.payload_bytes(1001))
    for row in range(5):
        alone = c.encode(x[row].clone(), c.new_payload(x[row]), key=(4, 1))
        assert torch.equal(alone, stacked[row])
    decoded = c.decode(stacked, torch.empty_like(x), key=(4, 1))
    assert torch.equal(decoded[2], c.decode(stacked[2], torch.empty(1001), key=(4, 1)))


def test_identity_is_lossless() -> None:
    x = data(3, 77, dtype=torch.float64)
    assert torch.equal(ALL["none"].roundtrip(x), x) and ALL["none"].payload_bytes(77, torch.float64) == 616


def test_int8_payload_is_at_most_0_27_of_float32() -> None:
    for numel in (10_000, 1_000_000, 25 * 2**18):  # a 25 MB bucket
        assert get_compressor("int8").payload_bytes(numel) <= 0.27 * 4 * numel
    assert get_compressor("int8").payload_bytes(1_000_000) / 4e6 == pytest.approx(0.2539, abs=1e-4)


def test_encode_and_decode_leaves_what_was_sent_and_the_residual() -> None:
    c = ALL["int4"]
    x = data(2, 300)
    original = x.clone()
    residual = torch.empty_like(x)
    payload = c.new_payload(x)
    encode_and_decode(x, c, payload, residual=residual)
    assert torch.equal(x, c.decode(payload, torch.empty_like(x)))  # x is now C(x), what receivers decode
    torch.testing.assert_close(residual, original - x, rtol=0, atol=0)


# ---- bad input ------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("name", "options", "match"),
    [
        ("int2", {}, r"Unknown compressor 'int2'; valid names: none, bf16, fp16, int8, int4, topk, randomk"),
        ("topk", {}, r"'topk' needs fraction=\.\.\."),
        ("topk", {"fraction": 0}, r"fraction must be in \(0, 1\]"),
        ("randomk", {"fraction": 1.5}, r"fraction must be in \(0, 1\]"),
        ("topk", {"fraction": True}, r"fraction must be in \(0, 1\]"),
        ("int8", {"block": 0}, "block must be a positive integer"),
        ("int4", {"block": 2.5}, "block must be a positive integer"),
        ("int8", {"fraction": 0.1}, r"'int8' does not take option\(s\) \['fraction'\]; its options are: block"),
        ("bf16", {"block": 8}, r"'bf16' does not take option\(s\) \['block'\]; its options are: none"),
        ("randomk", {"fraction": 0.1, "seed": -1}, "seed must be a non-negative integer"),
    ],
)
def test_bad_compressor_input_names_the_fix(name: str, options: dict, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        get_compressor(name, **options)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("name", COMPRESSORS)
def test_a_gpu_buffer_gets_the_payload_of_the_cpu_one(name: str) -> None:
    x = data(3, 1001)
    c = ALL[name]
    on_cpu = c.encode(x, c.new_payload(x), key=(2, 1))
    on_gpu = c.encode(x.cuda(), c.new_payload(x.cuda()), key=(2, 1))
    if name == "topk":  # the same set of coordinates, perhaps in another order
        assert torch.equal(c.roundtrip(x.cuda(), key=(2, 1)).cpu(), c.roundtrip(x, key=(2, 1)))
    else:
        assert torch.equal(on_gpu.cpu(), on_cpu)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("magnitude", [1e-6, 1.0])
def test_int8_on_16_bit_buffers_keeps_the_float32_error_bound(dtype, magnitude: float) -> None:
    # The scales are computed in float32: before, float16 blocks below ~3.8e-6 got a zero scale and were sent as
    # zeros (relative error 1.0 at 1e-6), and bfloat16 blocks went over half a step.
    x = (data(4, 512) * magnitude).to(dtype)
    decoded = get_compressor("int8", block=64).roundtrip(x)
    step = (x.float().abs().view(4, 8, 64).amax(-1) / 127).repeat_interleave(64, dim=-1)  # the float32 scale sent
    rounding = decoded.float().abs() * torch.finfo(dtype).eps / 2 + torch.finfo(dtype).smallest_normal * 2**-11
    assert ((decoded.float() - x.float()).abs() <= step * (0.5 + 1e-6) + rounding).all()
    relative = (decoded.float() - x.float()).norm() / x.float().norm()
    assert relative < 0.02
