"""ATen's int4 CPU kernel behind minipaged_kernels.cpu.int4_aten against the float64 reference.

4-bit weights in groups of 32/64/128 (SmolLM2's K = 576 in groups of 128: a half last group,
run as groups of 64; K = 80 and 100, which no ATen group length divides: padded), per-channel,
a shuffled ``g_idx`` (rows reordered), symmetric and asymmetric zero points, bf16 and fp16 rows
from 1 to 40; the packed values read back exactly; weights the kernel cannot take are named,
not multiplied wrong.
"""

from __future__ import annotations

import pytest
import torch
from quant_cases import random_packed, seeded_generator

from minipaged_kernels import quant_formats as qf
from minipaged_kernels.cpu import int4_aten

pytestmark = pytest.mark.skipif(not int4_aten.available(), reason="this PyTorch has no int4 CPU kernel")

# Relative to max |y|: the output is rounded to 16 bits (2**-9 for bf16) and the zero term
# (8 - z) * scale too; a wrong group, order or zero point is off by far more.
REL_TOL = {torch.bfloat16: 1.5e-2, torch.float16: 2e-3}


def _rel_error(y: torch.Tensor, ref: torch.Tensor) -> float:
    return ((y.double() - ref).abs().max() / ref.abs().max()).item()


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize(
    ("k", "group_size", "shuffled"),
    [
        (96, 32, False),
        (160, 64, True),
        (576, 128, False),
        (576, 128, True),
        (96, None, False),
        (512, 256, False),
        (80, 32, False),
        (100, None, False),
    ],  # fmt: skip
)
@pytest.mark.parametrize("symmetric", [False, True])
def test_matches_reference(dtype, k, group_size, shuffled, symmetric):
    n = 208  # 3 blocks of 64 columns and a block of 16: ATen packs the tail differently
    gen = seeded_generator()
    pw = random_packed(k, n, 4, group_size, shuffled=shuffled, symmetric=symmetric, scale_dtype=dtype, gen=gen)
    w = int4_aten.pack(pw, dtype)
    assert (w.perm is not None) == shuffled
    assert (w.padded_in_features > k) == (k % 32 != 0)  # padded only where no ATen group length divides K
    ref_w = qf.dequantize(pw, torch.float64)
    for rows in (1, 3, 16, 40, int4_aten.DENSE_FROM_ROWS + 3):  # the last dequantizes bf16 once
        x = torch.randn(rows, k, generator=gen).to(dtype)
        bias = torch.randn(n, generator=gen).to(dtype)
        y = int4_aten.matmul(x, w, bias)
        assert y.dtype == dtype and y.shape == (rows, n)
        ref = x.double() @ ref_w + bias.double()
        assert _rel_error(y, ref) < REL_TOL[dtype]


@pytest.mark.parametrize(("k", "group_size", "shuffled"), [(576, 128, False), (160, 64, True), (80, 32, False)])
def test_unpack_reads_back_the_values(k, group_size, shuffled):
    pw = random_packed(k, 80, 4, group_size, shuffled=shuffled)
    w = int4_aten.pack(pw, torch.bfloat16)
    assert torch.equal(int4_aten.unpack(w), qf.unpack_int32(pw.qweight, 4, k))


@pytest.mark.parametrize(
    ("k", "group_size", "shuffled"), [(576, 128, False), (576, 128, True), (160, 64, True), (100, None, False)]
)
def test_format_scales_reads_back_the_scales(k, group_size, shuffled):
    """Each format group's scale is read back exactly from ATen's copy, however its groups were cut or
    reordered (the layer then keeps no second copy); a format group no row uses has none to read."""
    gen = seeded_generator()
    pw = random_packed(k, 64, 4, group_size, shuffled=shuffled, scale_dtype=torch.bfloat16, gen=gen)
    w = int4_aten.pack(pw, torch.bfloat16)
    groups = pw.scales.shape[0]
    assert torch.equal(int4_aten.format_scales(w, groups), pw.scales)
    assert int4_aten.format_scales(w, groups + 1) is None


def test_a_wrong_zero_point_is_caught():
    """The tolerance is tight enough to see a zero point off by one in one group."""
    gen = seeded_generator()
    pw = random_packed(256, 64, 4, 64, gen=gen, scale_dtype=torch.bfloat16)
    bad = qf.PackedWeight(pw.qweight, pw.scales, pw.zeros.clone(), None, 4, 64, 256, 64)
    bad.zeros[2] = (bad.zeros[2] + 1) % 16
    x = torch.randn(4, 256, generator=gen).to(torch.bfloat16)
    ref = x.double() @ qf.dequantize(pw, torch.float64)
    assert _rel_error(int4_aten.matmul(x, int4_aten.pack(bad, torch.bfloat16)), ref) > REL_TOL[torch.bfloat16]


@pytest.mark.parametrize(
    ("bits", "n", "group_size", "dtype", "named"),
    [
        (8, 64, 64, torch.bfloat16, "8-bit"),
        (4, 40, 64, torch.bfloat16, "out_features 40"),
        (4, 64, 16, torch.bfloat16, "groups of 16"),
        (4, 64, 64, torch.float32, "torch.float32 activations"),
    ],
)
def test_refuses_what_it_cannot_take(bits, n, group_size, dtype, named):
    pw = random_packed(128, n, bits, group_size)
    assert named in int4_aten.unsupported_reason(pw, dtype)
    with pytest.raises(ValueError, match=named):
        int4_aten.pack(pw, dtype)


def test_wrong_activations_are_refused():
    w = int4_aten.pack(random_packed(64, 32, 4, 32), torch.bfloat16)
    with pytest.raises(ValueError, match="bfloat16"):
        int4_aten.matmul(torch.randn(2, 64), w)


@pytest.mark.skipif(int4_aten.numba is None, reason="the dense path needs numba")
@pytest.mark.parametrize(
    ("k", "group_size", "shuffled", "n"), [(576, 128, False, 208), (160, 64, True, 3072), (80, 32, False, 16)]
)
def test_dequantize_is_atens_own_dequantization_bit_for_bit(k, group_size, shuffled, n):
    """The numba pass over ATen's layout (whole 64-column blocks, a 16-column tail, reordered and
    padded rows) gives the bits of ATen's kernel multiplying the identity, i.e. its own weights."""
    gen = seeded_generator()
    pw = random_packed(k, n, 4, group_size, shuffled=shuffled, symmetric=False, scale_dtype=torch.bfloat16, gen=gen)
    w = int4_aten.pack(pw, torch.bfloat16)
    eye = torch.eye(w.padded_in_features, dtype=torch.bfloat16)
    expected = torch.ops.aten._weight_int4pack_mm_for_cpu(eye, w.weight, w.group_size, w.scale_zeros)
    assert torch.equal(int4_aten.dequantize(w).view(torch.int16), expected.view(torch.int16))
    buffer = torch.full(expected.shape, float("nan"), dtype=torch.bfloat16)  # poisoned: every element written
    assert int4_aten.dequantize(w, buffer) is buffer
    assert torch.equal(buffer.view(torch.int16), expected.view(torch.int16))


@pytest.mark.skipif(int4_aten.numba is None, reason="the dense path needs numba")
def test_many_bf16_rows_take_the_dense_path_and_fewer_do_not(monkeypatch):
    gen = seeded_generator()
    pw = random_packed(576, 208, 4, 128, shuffled=False, symmetric=True, scale_dtype=torch.bfloat16, gen=gen)
    w = int4_aten.pack(pw, torch.bfloat16)
    calls = []
    dequantize = int4_aten.dequantize
    monkeypatch.setattr(int4_aten, "dequantize", lambda weight, out=None: calls.append(1) or dequantize(weight, out))
    for rows in (int4_aten.DENSE_FROM_ROWS - 1, int4_aten.DENSE_FROM_ROWS):
        x = torch.randn(rows, 576, generator=gen).bfloat16()
        ref = x.double() @ qf.dequantize(pw, torch.float64)
        assert _rel_error(int4_aten.matmul(x, w), ref) < REL_TOL[torch.bfloat16]
    assert len(calls) == 1
    fp16 = int4_aten.pack(random_packed(576, 208, 4, 128, scale_dtype=torch.float16, gen=gen), torch.float16)
    assert not int4_aten.dense_applies_to(fp16)  # fp16 rows stay on ATen's kernel at any count
