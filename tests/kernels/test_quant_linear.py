"""Weight-only quantized linear kernels (minipaged_kernels.quant_linear) against the float64 reference.

Each case writes a random packed weight in an on-disk format (compressed-tensors symmetric
and asymmetric, GPTQ v1 with and without a shuffled desc_act ``g_idx``, AWQ GEMM), reads it
back through that format's converter, runs the Triton kernel under the interpreter on an
output poisoned with NaN, and compares with ``x.double() @`` the format's own element-wise
dequantization. Shapes are ragged (M, N and, per-channel, K off every tile and word
boundary); the cases are all-pairs over the axes to keep the interpreter's time small.
"""

from __future__ import annotations

import pytest
import torch
from pairwise import pairwise
from quant_cases import random_packed, seeded_generator
from test_decode_attention import REL_TOL

import minipaged_kernels  # noqa: F401  (turns the interpreter on without CUDA)
from minipaged_kernels import quant_formats as qf
from minipaged_kernels import quant_linear as ql
from minipaged_kernels.quant_linear import QuantLinearError

FORMATS = ("ct-sym", "ct-asym", "gptq", "gptq-sym", "awq")
BITS = (4, 8)
GROUPS = (32, 64, 128, None)
ROWS = (1, 3, 16, 17, 70)
DTYPES = (torch.float32, torch.float16, torch.bfloat16)
PATHS = ("auto", "gemm", "gemv")
SCALE_DTYPE = {torch.float32: torch.bfloat16, torch.float16: torch.float16, torch.bfloat16: torch.bfloat16}


def _through_format(fmt: str, bits: int, group_size: int | None, shuffled: bool, scale_dtype: torch.dtype):
    """A random weight written in ``fmt`` and read back: ``(PackedWeight, float64 reference [N, K])``."""
    if fmt.startswith("ct"):
        sym = fmt == "ct-sym"
        k = {32: 96, 64: 160, 128: 256, None: 90}[group_size]  # 160: a short last group; 90: K off a word
        pw = random_packed(k, 70, bits, group_size, shuffled=shuffled, symmetric=sym, scale_dtype=scale_dtype)
        raw = qf.to_compressed_tensors(pw, sym)
        args = (raw["weight_packed"], raw["weight_scale"], raw.get("weight_zero_point"), raw.get("weight_g_idx"))
        back = qf.from_compressed_tensors(*args, raw["weight_shape"], bits=bits, group_size=group_size, symmetric=sym)
        ref = qf.dequantize_reference_compressed_tensors(*args, raw["weight_shape"], bits=bits, group_size=group_size)
        return back, ref
    k = {32: 96, 64: 160, 128: 256, None: 96}[group_size]
    gs = -1 if group_size is None else group_size
    if fmt == "awq":
        pw = random_packed(k, 72, 4, group_size, scale_dtype=scale_dtype)
        raw = qf.to_awq(pw)
        back = qf.from_awq(raw["qweight"], raw["qzeros"], raw["scales"], bits=4, group_size=gs)
        return back, qf.dequantize_reference_awq(raw["qweight"], raw["qzeros"], raw["scales"], group_size=gs)
    sym = fmt == "gptq-sym"
    pw = random_packed(k, 72, bits, group_size, shuffled=shuffled, symmetric=sym, scale_dtype=scale_dtype)
    raw = qf.to_gptq(pw)
    args = (raw["qweight"], raw["qzeros"], raw["scales"], raw["g_idx"])
    back = qf.from_gptq(*args, bits=bits, group_size=gs, sym=sym)
    return back, qf.dequantize_reference_gptq(*args, bits=bits, group_size=gs, sym=sym)


def _rel_error(y: torch.Tensor, ref: torch.Tensor) -> float:
    return ((y.double() - ref).abs().max() / ref.abs().max()).item()


@pytest.mark.parametrize(
    "fmt, bits, group_size, shuffled, rows, dtype, path, with_bias",
    pairwise([FORMATS, BITS, GROUPS, (False, True), ROWS, DTYPES, PATHS, (False, True)]),
)
def test_matches_reference(fmt, bits, group_size, shuffled, rows, dtype, path, with_bias):
    pw, ref_weight = _through_format(fmt, bits, group_size, shuffled, SCALE_DTYPE[dtype])
    gen = seeded_generator()
    x = torch.randn(rows, pw.in_features, generator=gen).to(dtype)
    bias = torch.randn(pw.out_features, generator=gen).to(dtype) if with_bias else None
    out = torch.full((rows, pw.out_features), float("nan"), dtype=dtype)
    if path == "gemm":
        y = ql.quant_gemm(x, pw, bias, out=out)
    elif path == "gemv" and rows <= ql.GEMV_MAX_ROWS:
        y = ql.quant_gemv(x, pw, bias, out=out, num_splits=2)
    else:
        y = ql.quant_matmul(x, pw, bias, out=out)
    assert y is out and y.dtype == dtype
    ref = x.double() @ ref_weight.t()
    if bias is not None:
        ref = ref + bias.double()
    assert torch.isfinite(y).all()
    assert _rel_error(y, ref) < REL_TOL[dtype]


@pytest.mark.parametrize("num_splits", [1, 2, 3, 100])
def test_gemv_splits_agree(num_splits):
    """Every split of K (uneven last slice, more splits asked than K steps) sums to the same product."""
    pw = random_packed(384, 40, 4, 128, shuffled=True)
    x = torch.randn(5, 384, generator=seeded_generator())
    y = ql.quant_gemv(x, pw, out=torch.full((5, 40), float("nan")), num_splits=num_splits)
    assert _rel_error(y, ql.quant_matmul_reference(x, pw)) < REL_TOL[torch.float32]


def test_reference_is_the_canonical_dequantization():
    pw = random_packed(64, 24, 8, 32, shuffled=True)
    x = torch.randn(2, 64, generator=seeded_generator())
    ref = ql.quant_matmul_reference(x, pw)
    ct = qf.to_compressed_tensors(pw, symmetric=False)
    dense = qf.dequantize_reference_compressed_tensors(
        ct["weight_packed"], ct["weight_scale"], ct["weight_zero_point"], ct["weight_g_idx"], ct["weight_shape"],
        bits=8, group_size=32,
    )  # fmt: skip
    assert torch.allclose(ref, x.double() @ dense.t(), rtol=1e-12, atol=1e-12)


def test_empty_batch():
    pw = random_packed(64, 16, 4, 32)
    assert ql.quant_matmul(torch.empty(0, 64), pw).shape == (0, 16)


def test_bad_operands():
    pw = random_packed(64, 16, 4, 32)
    with pytest.raises(QuantLinearError, match="in_features 64"):
        ql.quant_matmul(torch.randn(2, 32), pw)
    with pytest.raises(QuantLinearError, match="at most 16"):
        ql.quant_gemv(torch.randn(17, 64), pw)
    with pytest.raises(QuantLinearError, match="bias"):
        ql.quant_matmul(torch.randn(2, 64), pw, torch.randn(15))
    with pytest.raises(QuantLinearError, match="out must be"):
        ql.quant_matmul(torch.randn(2, 64), pw, out=torch.empty(2, 15))
    with pytest.raises(QuantLinearError, match="num_splits"):
        ql.quant_gemv(torch.randn(2, 64), pw, num_splits=0)
    with pytest.raises(QuantLinearError, match="PackedWeight"):
        ql.quant_matmul(torch.randn(2, 64), {"qweight": pw.qweight})
