"""The numba fused RMSNorm (+ residual add) and RoPE against the PyTorch formulas they replace.

Fresh random inputs each run (shapes from one row to a prefill, SmolLM2's and odd ones),
outputs poisoned with NaN before the call, and the model-level switch checked both ways.
"""

import platform
import random

import pytest
import torch
import torch.nn.functional as F

pytest.importorskip("numba")

from minipaged.models import llama  # noqa: E402
from minipaged_kernels.cpu import fused_ops as cpu_fused_ops  # noqa: E402

SHAPES = [(1, 576), (32, 576), (257, 64), (3, 7)]


def _reference_rope(x, cos, sin):
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1)


@pytest.mark.parametrize("rows, dim", SHAPES)
@pytest.mark.parametrize("with_residual", [False, True])
def test_add_rms_norm_matches_torch(rows, dim, with_residual):
    scale = random.uniform(0.1, 30.0)  # hidden states grow through a model; eps must not dominate
    x = torch.randn(rows, dim) * scale
    residual = torch.randn(rows, dim) * scale if with_residual else None
    weight = torch.randn(dim)
    eps = random.choice([1e-5, 1e-6])
    summed = x + residual if with_residual else x.clone()
    expected = F.rms_norm(summed, (dim,), weight, eps)
    out, new_residual = cpu_fused_ops.add_rms_norm(x, weight, eps, residual)
    assert new_residual is x, "the sum is written into x, which becomes the residual"
    torch.testing.assert_close(new_residual, summed, rtol=0, atol=0)  # one fp32 add: exact
    torch.testing.assert_close(out, expected, rtol=3e-6, atol=1e-6)


def test_add_rms_norm_leaves_nothing_unwritten():
    """Every output element comes from this call (the output is fresh; a NaN input row stays in its row)."""
    x = torch.randn(5, 64)
    x[2, 10] = float("nan")
    out, _ = cpu_fused_ops.add_rms_norm(x, torch.ones(64), 1e-5)
    assert torch.isnan(out[2]).all() and torch.isfinite(out[[0, 1, 3, 4]]).all()


@pytest.mark.parametrize("rows, heads, head_dim", [(1, 12, 64), (32, 12, 64), (300, 5, 6), (2, 1, 2)])
def test_rope_matches_torch_in_place_on_strided_columns(rows, heads, head_dim):
    """As the model calls it: the q and k columns of a qkv product (a strided view), rotated in
    place, v's columns untouched."""
    v_cols = random.randint(1, 3) * head_dim
    qkv = torch.randn(rows, heads * head_dim + v_cols)
    before = qkv.clone()
    x = qkv[:, : heads * head_dim].view(rows, heads, head_dim)
    angles = torch.rand(rows, 1, head_dim // 2) * 100
    cos, sin = angles.cos(), angles.sin()
    expected = _reference_rope(before[:, : heads * head_dim].view(rows, heads, head_dim), cos, sin)
    assert cpu_fused_ops.rope_(x, cos, sin) is x
    torch.testing.assert_close(x, expected, rtol=0, atol=0)  # same products and order: bit-equal
    torch.testing.assert_close(qkv[:, heads * head_dim :], before[:, heads * head_dim :], rtol=0, atol=0)


def test_model_takes_rms_norm_for_fp32_and_rope_for_fp32_and_bf16_on_cpu():
    x, weight = torch.randn(4, 8), torch.randn(8)
    assert cpu_fused_ops.norm_applies_to(x, weight) and cpu_fused_ops.norm_applies_to(x, weight, x)
    assert not cpu_fused_ops.norm_applies_to(x.bfloat16(), weight.bfloat16())  # bf16 has a kernel of its own
    assert not cpu_fused_ops.norm_applies_to(x, weight.bfloat16())  # a weight of another dtype
    assert not cpu_fused_ops.norm_applies_to(x, weight, x.to("meta"))
    assert not cpu_fused_ops.norm_applies_to(x.double(), weight.double())
    cos = sin = torch.randn(4, 1, 4)
    for dtype in (torch.float32, torch.bfloat16):
        assert cpu_fused_ops.rope_applies_to(x.to(dtype).view(4, 2, 4), cos.to(dtype), sin.to(dtype))
    assert not cpu_fused_ops.rope_applies_to(x.bfloat16().view(4, 2, 4), cos, sin)
    assert not cpu_fused_ops.rope_applies_to(x.half().view(4, 2, 4), cos.half(), sin.half())
    assert not cpu_fused_ops.norm_applies_to(x.requires_grad_(), weight)


@pytest.mark.parametrize("rows, heads, head_dim", [(1, 12, 64), (32, 12, 64), (300, 5, 6), (2, 1, 2)])
def test_bf16_rope_is_bit_equal_to_torch_in_place(rows, heads, head_dim):
    v_cols = random.randint(1, 3) * head_dim
    qkv = (torch.randn(rows, heads * head_dim + v_cols) * 4).bfloat16()
    before = qkv.clone()
    x = qkv[:, : heads * head_dim].view(rows, heads, head_dim)
    angles = torch.rand(rows, 1, head_dim // 2) * 100
    cos, sin = angles.cos().bfloat16(), angles.sin().bfloat16()
    expected = _reference_rope(before[:, : heads * head_dim].view(rows, heads, head_dim), cos, sin)
    assert cpu_fused_ops.rope_(x, cos, sin) is x
    assert torch.equal(x, expected)
    assert torch.equal(qkv[:, heads * head_dim :], before[:, heads * head_dim :])


def test_bf16_rounding_is_torchs_on_every_bit_pattern():
    """The kernels' bf16 <-> fp32 conversions against torch's on all 2^16 patterns (NaNs aside) and on
    fp32 values on both sides of every rounding boundary, ties included."""
    patterns = torch.arange(-(2**15), 2**15, dtype=torch.int32).to(torch.int16)
    values = patterns.view(torch.bfloat16).float()
    finite = ~values.isnan()
    # Halfway between neighbours (the ties), and just either side of them.
    ties = (values.view(torch.int32) + (1 << 15)).view(torch.float32)
    nudged = [ties.nextafter(torch.tensor(float(side))) for side in ("inf", "-inf")]
    probes = torch.cat([values, ties, *nudged])
    probes = probes[~probes.isnan()]
    got = cpu_fused_ops.to_bf16_bits(probes.numpy())
    assert torch.equal(torch.from_numpy(got).view(torch.bfloat16), probes.bfloat16())
    assert torch.equal(torch.from_numpy(cpu_fused_ops.from_bf16_bits(patterns.numpy()))[finite], values[finite])


def test_rmsnorm_module_fused_equals_unfused(monkeypatch):
    """The model's RMSNorm returns the same (normalised, residual) pair with and without numba."""
    norm = llama.RMSNorm(96, 1e-6)
    with torch.no_grad():
        norm.weight.normal_()
    x, residual = torch.randn(7, 96) * 4, torch.randn(7, 96) * 4
    with torch.inference_mode():
        fused = norm(x.clone(), residual)
        monkeypatch.setattr(llama, "_fused_ops", lambda: None)
        plain = norm(x.clone(), residual)
    torch.testing.assert_close(fused[1], plain[1], rtol=0, atol=0)
    torch.testing.assert_close(fused[0], plain[0], rtol=3e-6, atol=1e-6)


def test_bf16_rope_in_the_model_equals_the_formula(monkeypatch):
    """``apply_rope`` on bf16 gives the PyTorch formula's bits with and without numba."""
    x = (torch.randn(5, 4, 16) * 3).bfloat16()
    angles = torch.rand(5, 1, 8) * 50
    cos, sin = angles.cos().bfloat16(), angles.sin().bfloat16()
    rotated = x.clone()
    fused = llama.apply_rope(rotated, cos, sin)
    assert fused is rotated, "bf16 takes the in-place numba kernel"
    monkeypatch.setattr(llama, "_fused_ops", lambda: None)
    assert torch.equal(fused, llama.apply_rope(x.clone(), cos, sin))


# PyTorch's x86 builds sum a float row with the 8-float vectors of their AVX2 kernel; elsewhere the
# order may differ, and the model then keeps PyTorch's bf16 RMSNorm (``bf16_norm_matches_torch``).
x86_only = pytest.mark.skipif(platform.machine() not in ("x86_64", "AMD64"), reason="PyTorch's x86 summation order")


@x86_only
@pytest.mark.parametrize("dim", [1, 7, 8, 37, 64, 576, 960, 2048, 4096, 5120, 16384])
def test_torch_order_sum_is_torchs_sum_bit_for_bit(dim):
    """The cascade, the leftover vectors and the scalar tail, for rows shorter than one vector up to
    several cascade levels, over magnitudes where the order of additions shows."""
    rows = (torch.randn(24, dim) * torch.logspace(-4, 4, 24)[:, None]).bfloat16()
    expected = rows.float().pow(2).sum(-1)
    got = torch.tensor([cpu_fused_ops.torch_order_sum(row) for row in rows])
    assert torch.equal(got, expected)


@x86_only
@pytest.mark.parametrize("rows, dim", [(1, 576), (16, 576), (3, 7), (2, 2048), (5, 4096), (4, 960), (16, 2048)])
@pytest.mark.parametrize("with_residual", [False, True])
def test_bf16_add_rms_norm_is_bit_equal_to_torch(rows, dim, with_residual):
    """Bit for bit, including 16 x 2048 rows, which PyTorch reduces on several threads (row by row)."""
    scale = random.uniform(0.01, 100.0)
    x = (torch.randn(rows, dim) * scale).bfloat16()
    residual = (torch.randn(rows, dim) * scale).bfloat16() if with_residual else None
    weight = (torch.randn(dim) * 2).bfloat16()
    eps = random.choice([1e-5, 1e-6])
    summed = x.clone().add_(residual) if with_residual else x.clone()
    expected = weight * F.rms_norm(summed, (dim,), None, eps)
    assert cpu_fused_ops.bf16_norm_applies_to(x, weight, eps, residual)
    out, new_residual = cpu_fused_ops.add_rms_norm_bf16(x, weight, eps, residual)
    assert new_residual is x, "the sum is written into x, which becomes the residual"
    assert torch.equal(new_residual.view(torch.int16), summed.view(torch.int16))
    assert torch.equal(out.view(torch.int16), expected.view(torch.int16))


def test_bf16_norm_is_refused_where_it_would_not_be_torchs(monkeypatch):
    """Another summation order fails the per-size check, and the model keeps PyTorch's ops; so do
    batches past the row limit, strided rows, mismatched shapes, other dtypes or devices, and autograd."""
    x, weight, eps = torch.randn(4, 40).bfloat16(), torch.rand(40).bfloat16(), 1e-5
    assert cpu_fused_ops.bf16_norm_applies_to(x, weight, eps, x) == (platform.machine() in ("x86_64", "AMD64"))
    too_many = torch.randn(cpu_fused_ops.BF16_NORM_MAX_ROWS + 1, 40).bfloat16()
    assert not cpu_fused_ops.bf16_norm_applies_to(too_many, weight, eps)
    assert not cpu_fused_ops.bf16_norm_applies_to(torch.randn(40, 4).bfloat16().t(), torch.rand(4).bfloat16(), eps)
    assert not cpu_fused_ops.bf16_norm_applies_to(x, torch.rand(41).bfloat16(), eps)
    assert not cpu_fused_ops.bf16_norm_applies_to(x, weight, eps, x[:3])
    assert not cpu_fused_ops.bf16_norm_applies_to(x, weight, eps, x.to("meta"))
    assert not cpu_fused_ops.bf16_norm_applies_to(x, weight.float(), eps)
    assert not cpu_fused_ops.bf16_norm_applies_to(x.half(), weight.half(), eps)
    assert not cpu_fused_ops.bf16_norm_applies_to(x.requires_grad_(), weight, eps)
    monkeypatch.setattr(cpu_fused_ops, "TORCH_SUM_LANES", 16)  # the order of a 16-float vector kernel
    cpu_fused_ops.bf16_norm_matches_torch.cache_clear()
    try:
        assert not cpu_fused_ops.bf16_norm_matches_torch(576, eps)
    finally:
        cpu_fused_ops.bf16_norm_matches_torch.cache_clear()


def test_bf16_rmsnorm_module_takes_the_kernel_and_equals_the_formula(monkeypatch):
    """The model's bf16 RMSNorm runs the kernel (on x86) and gives the same bits as PyTorch's ops."""
    norm = llama.RMSNorm(576, 1e-5).bfloat16()
    with torch.no_grad():
        norm.weight.copy_(torch.rand(576) * 2)
    x, residual = (torch.randn(3, 576) * 8).bfloat16(), (torch.randn(3, 576) * 8).bfloat16()
    cpu_fused_ops.bf16_norm_matches_torch(576, 1e-5)  # the host check runs the kernel too: before the count
    calls = []
    kernel = cpu_fused_ops.add_rms_norm_bf16
    monkeypatch.setattr(cpu_fused_ops, "add_rms_norm_bf16", lambda *a: calls.append(1) or kernel(*a))
    with torch.inference_mode():
        fused = norm(x.clone(), residual)
        monkeypatch.setattr(llama, "_fused_ops", lambda: None)
        plain = norm(x.clone(), residual)
    assert len(calls) == (1 if platform.machine() in ("x86_64", "AMD64") else 0)
    assert torch.equal(fused[0].view(torch.int16), plain[0].view(torch.int16))
    assert torch.equal(fused[1].view(torch.int16), plain[1].view(torch.int16))
