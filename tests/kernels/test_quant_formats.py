"""Packed weight formats (minipaged_kernels.quant_formats): round trips, each converter against its format's
element-by-element reference, compressed-tensors' own unpacker, and typed errors for malformed tensors.

Each case draws fresh random values (the seed is printed); shapes are small because the
references decode one element at a time.
"""

from __future__ import annotations

import pytest
import torch
from quant_cases import assert_same_packed, random_packed, seeded_generator

from minipaged_kernels import quant_formats as qf
from minipaged_kernels.quant_formats import PackedWeightError

GROUPS = [32, 64, 128, None]  # None: per-channel


def _dense(pw: qf.PackedWeight) -> torch.Tensor:
    return qf.dequantize(pw, torch.float64).t()  # [N, K], as the references return


@pytest.mark.parametrize("bits", [4, 8])
@pytest.mark.parametrize("rows", [1, 7, 8, 13, 64])
def test_pack_unpack_round_trip(bits, rows):
    gen = seeded_generator()
    q = torch.randint(0, 1 << bits, (rows, 5), generator=gen, dtype=torch.int32)
    packed = qf.pack_int32(q, bits)
    assert packed.shape == (-(-rows // (32 // bits)), 5) and packed.dtype == torch.int32
    assert torch.equal(qf.unpack_int32(packed, bits, rows), q)
    # the definition, for one element: value k sits at bits * (k % pack) of word k // pack
    k = rows - 1
    word = int(packed[k // (32 // bits), 3]) & 0xFFFFFFFF
    assert (word >> (bits * (k % (32 // bits)))) & ((1 << bits) - 1) == int(q[k, 3])


def test_pack_known_word():
    q = torch.arange(8, dtype=torch.int32).view(8, 1) * 2 + 1  # 1, 3, ..., 15: the top nibble sets the sign bit
    assert int(qf.pack_int32(q, 4)[0, 0]) & 0xFFFFFFFF == 0xFDB97531


# ---------------------------------------------------------------- compressed-tensors


@pytest.mark.parametrize("bits", [4, 8])
@pytest.mark.parametrize("group_size", GROUPS)
@pytest.mark.parametrize("symmetric", [True, False])
@pytest.mark.parametrize("shuffled", [False, True])
def test_compressed_tensors(bits, group_size, symmetric, shuffled):
    k, n = (256 if group_size in (64, 128) else 96), 20  # N = 20: the zero points' packed column is ragged
    pw = random_packed(k, n, bits, group_size, shuffled=shuffled, symmetric=symmetric, scale_dtype=torch.bfloat16)
    raw = qf.to_compressed_tensors(pw, symmetric)
    assert ("weight_zero_point" in raw) == (not symmetric) and ("weight_g_idx" in raw) == shuffled
    assert raw["weight_packed"].shape == (n, k * bits // 32)
    back = qf.from_compressed_tensors(
        raw["weight_packed"],
        raw["weight_scale"],
        raw.get("weight_zero_point"),
        raw.get("weight_g_idx"),
        raw["weight_shape"],
        bits=bits,
        group_size=group_size,
        symmetric=symmetric,
    )
    assert_same_packed(pw, back)
    ref = qf.dequantize_reference_compressed_tensors(
        raw["weight_packed"],
        raw["weight_scale"],
        raw.get("weight_zero_point"),
        raw.get("weight_g_idx"),
        raw["weight_shape"],
        bits=bits,
        group_size=group_size,
    )
    assert torch.equal(_dense(back), ref)


@pytest.mark.parametrize("bits", [4, 8])
def test_compressed_tensors_ragged_k_per_channel(bits):
    pw = random_packed(37, 11, bits, None)
    raw = qf.to_compressed_tensors(pw, symmetric=False)
    assert raw["weight_packed"].shape == (11, -(-37 * bits // 32))
    back = qf.from_compressed_tensors(
        raw["weight_packed"], raw["weight_scale"], raw["weight_zero_point"], None, (11, 37),
        bits=bits, group_size=None, symmetric=False,
    )  # fmt: skip
    assert_same_packed(pw, back)
    ref = qf.dequantize_reference_compressed_tensors(
        raw["weight_packed"], raw["weight_scale"], raw["weight_zero_point"], None, (11, 37), bits=bits, group_size=None
    )
    assert torch.equal(_dense(back), ref)


@pytest.mark.parametrize("bits", [4, 8])
def test_compressed_tensors_matches_its_own_unpacker(bits):
    helpers = pytest.importorskip("compressed_tensors.compressors.pack_quantized.helpers")
    gen = seeded_generator()
    n, k = 12, 64
    signed = torch.randint(-(1 << (bits - 1)), 1 << (bits - 1), (n, k), generator=gen, dtype=torch.int8)
    zp = torch.randint(-(1 << (bits - 1)), 1 << (bits - 1), (n, 2), generator=gen, dtype=torch.int8)
    packed = helpers.pack_to_int32(signed, bits)
    packed_zp = helpers.pack_to_int32(zp, bits, packed_dim=0)
    scale = torch.rand(n, 2, generator=gen)
    pw = qf.from_compressed_tensors(packed, scale, packed_zp, None, (n, k), bits=bits, group_size=32, symmetric=False)
    expected = (signed.double() - zp.double().repeat_interleave(32, dim=1)) * scale.double().repeat_interleave(32, 1)
    assert torch.equal(_dense(pw), expected)
    # and our writer produces the library's bytes
    raw = qf.to_compressed_tensors(pw, symmetric=False)
    assert torch.equal(raw["weight_packed"], packed) and torch.equal(raw["weight_zero_point"], packed_zp)


# ---------------------------------------------------------------- GPTQ


@pytest.mark.parametrize("bits", [4, 8])
@pytest.mark.parametrize("group_size", GROUPS)
@pytest.mark.parametrize("shuffled", [False, True])
@pytest.mark.parametrize("sym", [False, True])
def test_gptq(bits, group_size, shuffled, sym):
    k, n = (256 if group_size in (64, 128) else 96), 24
    pw = random_packed(k, n, bits, group_size, shuffled=shuffled, symmetric=sym, scale_dtype=torch.float16)
    raw = qf.to_gptq(pw)
    assert raw["qweight"].shape == (k * bits // 32, n) and raw["qzeros"].shape == (pw.num_groups, n * bits // 32)
    gs = -1 if group_size is None else group_size
    back = qf.from_gptq(raw["qweight"], raw["qzeros"], raw["scales"], raw["g_idx"], bits=bits, group_size=gs, sym=sym)
    assert_same_packed(pw, back)
    ref = qf.dequantize_reference_gptq(
        raw["qweight"], raw["qzeros"], raw["scales"], raw["g_idx"], bits=bits, group_size=gs, sym=sym
    )
    assert torch.equal(_dense(back), ref)


def test_gptq_v1_zero_offset():
    # symmetric 4-bit GPTQ v1 stores z - 1 = 7 in every nibble
    pw = random_packed(32, 8, 4, 32, symmetric=True)
    assert int(qf.to_gptq(pw)["qzeros"][0, 0]) == 0x77777777
    with pytest.raises(PackedWeightError, match="zeros"):
        qf.to_gptq(qf.PackedWeight(pw.qweight, pw.scales, torch.zeros_like(pw.zeros), None, 4, 32, 32, 8))


# ---------------------------------------------------------------- AWQ


@pytest.mark.parametrize("group_size", GROUPS)
def test_awq(group_size):
    k, n = (256 if group_size in (64, 128) else 96), 40
    pw = random_packed(k, n, 4, group_size, scale_dtype=torch.float16)
    raw = qf.to_awq(pw)
    assert raw["qweight"].shape == (k, n // 8) and raw["qzeros"].shape == (pw.num_groups, n // 8)
    gs = -1 if group_size is None else group_size
    back = qf.from_awq(raw["qweight"], raw["qzeros"], raw["scales"], bits=4, group_size=gs)
    assert_same_packed(pw, back)
    assert torch.equal(
        _dense(back), qf.dequantize_reference_awq(raw["qweight"], raw["qzeros"], raw["scales"], group_size=gs)
    )


def test_awq_interleaved_order():
    # AutoAWQ packs columns 0..7 of a word in the order 0, 2, 4, 6, 1, 3, 5, 7 (nibble i <- column order[i])
    word = sum(c << (4 * i) for i, c in enumerate((0, 2, 4, 6, 1, 3, 5, 7)))
    qweight = torch.tensor([[word - (1 << 32) if word >= 1 << 31 else word]], dtype=torch.int32).repeat(32, 1)
    pw = qf.from_awq(qweight, torch.zeros(1, 1, dtype=torch.int32), torch.ones(1, 8), bits=4, group_size=32)
    assert qf.dequantize(pw)[0].tolist() == list(range(8))


# ---------------------------------------------------------------- bad input


def test_bad_input_names_the_tensor():
    pw = random_packed(64, 16, 4, 32)
    with pytest.raises(PackedWeightError, match="group_size 48 does not divide in_features 64"):
        qf.PackedWeight(pw.qweight, pw.scales, pw.zeros, None, 4, 48, 64, 16)
    with pytest.raises(PackedWeightError, match="bits"):
        qf.PackedWeight(pw.qweight, pw.scales, pw.zeros, None, 3, 32, 64, 16)
    with pytest.raises(PackedWeightError, match="qweight has shape"):
        qf.PackedWeight(pw.qweight[:-1], pw.scales, pw.zeros, None, 4, 32, 64, 16)
    with pytest.raises(PackedWeightError, match="scales has dtype"):
        qf.PackedWeight(pw.qweight, pw.scales.double(), pw.zeros, None, 4, 32, 64, 16)
    with pytest.raises(PackedWeightError, match="g_idx holds groups"):
        qf.PackedWeight(pw.qweight, pw.scales, pw.zeros, torch.full((64,), 2, dtype=torch.int32), 4, 32, 64, 16)
    raw = qf.to_gptq(pw)
    with pytest.raises(PackedWeightError, match="scales is missing"):
        qf.from_gptq(raw["qweight"], raw["qzeros"], None, None, bits=4, group_size=32, sym=False)
    with pytest.raises(PackedWeightError, match="qzeros has shape"):
        qf.from_gptq(raw["qweight"], raw["qzeros"][:1], raw["scales"], None, bits=4, group_size=32, sym=False)
    with pytest.raises(PackedWeightError, match="bits"):
        qf.from_gptq(raw["qweight"], raw["qzeros"], raw["scales"], None, bits=3, group_size=32, sym=False)
    with pytest.raises(PackedWeightError, match="4-bit only"):
        qf.from_awq(raw["qweight"], raw["qzeros"], raw["scales"], bits=8, group_size=32)
    ct = qf.to_compressed_tensors(pw, symmetric=False)
    with pytest.raises(PackedWeightError, match="weight_packed has shape"):
        qf.from_compressed_tensors(
            ct["weight_packed"][:, :-1], ct["weight_scale"], ct["weight_zero_point"], None, ct["weight_shape"],
            bits=4, group_size=32, symmetric=False,
        )  # fmt: skip
    with pytest.raises(PackedWeightError, match="weight_zero_point is missing"):
        qf.from_compressed_tensors(
            ct["weight_packed"],
            ct["weight_scale"],
            None,
            None,
            ct["weight_shape"],
            bits=4,
            group_size=32,
            symmetric=False,
        )
    with pytest.raises(PackedWeightError, match="weight_scale is missing"):
        qf.from_compressed_tensors(
            ct["weight_packed"], None, None, None, ct["weight_shape"], bits=4, group_size=32, symmetric=True
        )
    with pytest.raises(PackedWeightError, match="does not divide"):
        qf.from_compressed_tensors(
            ct["weight_packed"],
            ct["weight_scale"],
            None,
            None,
            ct["weight_shape"],
            bits=4,
            group_size=24,
            symmetric=True,
        )
    assert issubclass(PackedWeightError, ValueError)
