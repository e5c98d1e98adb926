"""The numba quantized few-row linear (minipaged_kernels.cpu.quant_gemv) against the float64 reference.

Every format through its converter (so the kernel sees what a loader gives it), 4 and 8
bits, groups of 32/64/128 (a short last group included) and per-channel, shuffled
``g_idx``, 1-16 rows, serial and parallel launches, outputs poisoned with NaN first.
"""

from __future__ import annotations

import pytest
import torch
from quant_cases import random_packed, seeded_generator

pytest.importorskip("numba")

from minipaged_kernels import quant_formats as qf  # noqa: E402
from minipaged_kernels.cpu import quant_gemv  # noqa: E402

REL_TOL = 1e-5


def _rel_error(y: torch.Tensor, ref: torch.Tensor) -> float:
    return ((y.double() - ref).abs().max() / ref.abs().max()).item()


def _through(fmt: str, pw: qf.PackedWeight) -> qf.PackedWeight:
    gs = pw.group_size
    if fmt == "ct":
        raw = qf.to_compressed_tensors(pw, symmetric=False)
        return qf.from_compressed_tensors(
            raw["weight_packed"], raw["weight_scale"], raw["weight_zero_point"], raw.get("weight_g_idx"),
            raw["weight_shape"], bits=pw.bits, group_size=gs, symmetric=False,
        )  # fmt: skip
    if fmt == "gptq":
        raw = qf.to_gptq(pw)
        return qf.from_gptq(raw["qweight"], raw["qzeros"], raw["scales"], raw["g_idx"], bits=pw.bits, group_size=gs,
                            sym=False)  # fmt: skip
    raw = qf.to_awq(pw)
    return qf.from_awq(raw["qweight"], raw["qzeros"], raw["scales"], bits=4, group_size=gs)


@pytest.mark.parametrize("fmt", ["ct", "gptq", "awq"])
@pytest.mark.parametrize("bits", [4, 8])
@pytest.mark.parametrize("group_size", [32, 64, 128, None])
@pytest.mark.parametrize("shuffled", [False, True])
def test_matches_reference(fmt, bits, group_size, shuffled):
    if fmt == "awq" and (bits == 8 or shuffled):
        pytest.skip("AWQ's GEMM layout is 4-bit without g_idx")
    k = {32: 96, 64: 160, 128: 576, None: 96}[group_size]  # 576 in groups of 128: SmolLM2's short last group
    n = 200  # a ragged last column chunk
    pw = _through(fmt, random_packed(k, n, bits, group_size, shuffled=shuffled, scale_dtype=torch.bfloat16))
    gen = seeded_generator()
    for rows in (1, 4, 16):
        x = torch.randn(rows, k, generator=gen)
        bias = torch.randn(n, generator=gen)
        out = torch.full((rows, n), float("nan"))
        y = quant_gemv.matmul(x, pw, bias, out=out)
        ref = x.double() @ qf.dequantize(pw, torch.float64) + bias.double()
        assert y is out and _rel_error(y, ref) < REL_TOL


@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize("shuffled", [False, True])
def test_serial_and_parallel(threads, shuffled):
    pw = random_packed(256, 1000, 4, 128, shuffled=shuffled)
    x = torch.randn(3, 256, generator=seeded_generator())
    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        y = quant_gemv.matmul(x, pw)
        buffer = torch.full((256, 1000), float("nan"))
        dense = quant_gemv.dequantize_into(pw, buffer)
    finally:
        torch.set_num_threads(previous)
    reference_weight = qf.dequantize(pw, torch.float64)
    assert _rel_error(y, x.double() @ reference_weight) < REL_TOL
    assert dense is buffer and torch.allclose(dense.double(), reference_weight, rtol=1e-6, atol=1e-7)


def test_refusals():
    pw = random_packed(64, 16, 4, 32)
    assert not quant_gemv.applies_to(torch.randn(17, 64), pw)
    assert not quant_gemv.applies_to(torch.randn(2, 64, dtype=torch.float16), pw)
    assert not quant_gemv.applies_to(torch.randn(2, 64, dtype=torch.bfloat16), pw, torch.randn(16))  # bias dtype
    assert not quant_gemv.applies_to(torch.randn(2, 32), pw)
    with pytest.raises(ValueError, match="1-16 fp32 or bf16 CPU rows"):
        quant_gemv.matmul(torch.randn(2, 32), pw)
    with pytest.raises(ValueError, match="out must be"):
        quant_gemv.matmul(torch.randn(2, 64), pw, out=torch.empty(2, 15))
    with pytest.raises(ValueError, match="out must be"):  # out is fp32, for fp32 x only
        quant_gemv.matmul(torch.randn(2, 64, dtype=torch.bfloat16), pw, out=torch.empty(2, 16))
    with pytest.raises(ValueError, match="out must be"):
        quant_gemv.dequantize_into(pw, torch.empty(16, 64))


@pytest.mark.parametrize("bits", [4, 8])
def test_bf16_rows_and_prepared_weight(bits):
    """bf16 rows (a bf16 model's decode) give the fp32 sum of the bf16 inputs, rounded to bf16 once; a kept
    ``prepare`` gives what a fresh one gives, here with bf16 scales (converted once)."""
    pw = random_packed(576, 200, bits, 128, scale_dtype=torch.bfloat16)  # SmolLM2's K, a short last group
    prepared = quant_gemv.prepare(pw)
    gen = seeded_generator()
    for rows in (1, 3):
        x = torch.randn(rows, 576, generator=gen).bfloat16()
        bias = torch.randn(200, generator=gen).bfloat16()
        y = quant_gemv.matmul(x, pw, bias, prepared=prepared)
        ref = x.double() @ qf.dequantize(pw, torch.float64) + bias.double()
        assert y.dtype == torch.bfloat16
        assert torch.allclose(y.double(), ref, rtol=2**-8, atol=2**-8 * ref.abs().max().item())
        assert torch.equal(y, quant_gemv.matmul(x, pw, bias))  # prepared once or per call: the same loops
        buffer = torch.full((576, 200), float("nan"))
        assert torch.equal(quant_gemv.dequantize_into(pw, buffer, prepared), qf.dequantize(pw, torch.float32))
