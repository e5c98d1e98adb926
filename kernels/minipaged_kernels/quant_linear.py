"""Weight-only quantized linear ``y = x @ W (+ bias)`` on a :class:`~minipaged_kernels.quant_formats.PackedWeight`.

The weight stays packed in memory (4 or 8 bits per value, int32 words packed along K);
each kernel loads a tile of words, unpacks it in registers with shifts and masks,
applies the per-group zero points and scales (group of row ``k``: ``g_idx[k]`` or
``k // group_size``) and feeds the dense tile to ``tl.dot`` with an fp32 accumulator:

- ``_quant_gemm_kernel``: square output tiles for prefill-sized ``M``; one program per
  ``[BLOCK_M, BLOCK_N]`` tile of ``y``, looping over K.
- ``_quant_gemv_kernel`` + ``_splitk_reduce_kernel``: decode (``M <= GEMV_MAX_ROWS``). A
  square tile would waste most of its rows at M = 1 and the few output tiles of a small
  N leave most SMs idle, so the rows are padded to the 16 ``tl.dot`` needs and K is split
  across programs, each streaming its slice of the packed weight once; the partial sums
  go to an fp32 workspace that a second kernel adds up in a fixed order (deterministic,
  unlike atomics), adding the bias and rounding to the output dtype.

The reference is ``x.double() @ dequantize(pw, torch.float64)`` (``quant_matmul_reference``),
and each format's converter is checked against its own element-wise reference in
``minipaged_kernels.quant_formats``. Under the Triton interpreter, which has no bf16
arithmetic, bf16 operands are upcast to fp32 around the kernels.
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

from minipaged_kernels._aot import AotSpec
from minipaged_kernels._checks import FLOAT_DTYPES
from minipaged_kernels.quant_formats import PackedWeight, dequantize

# At most this many rows take the split-K GEMV path (the tl.dot tile has 16 rows).
GEMV_MAX_ROWS = 16
# GEMM tiles for prefill-sized M.
GEMM_BLOCK_M, GEMM_BLOCK_N, GEMM_BLOCK_K = 64, 64, 64
GEMM_NUM_WARPS, GEMM_NUM_STAGES = 4, 3
# GEMV tiles: 16 (padded) rows, a narrow N tile and a long K step so each program streams enough words.
GEMV_BLOCK_M, GEMV_BLOCK_N, GEMV_BLOCK_K = 16, 64, 128
GEMV_NUM_WARPS, GEMV_NUM_STAGES = 4, 2
REDUCE_BLOCK_N = 256
# Aim for this many GEMV programs per SM when choosing the split; without CUDA, NOMINAL_NUM_SMS SMs.
PROGRAMS_PER_SM = 2
NOMINAL_NUM_SMS = 108

# The shape the report uses for its bytes-moved estimate: a decode step (M = 1) through a
# Llama-7B MLP up-projection (K = 4096, N = 11008), 4 bits, groups of 128, fp16 scales.
REFERENCE_SHAPE = {"M": 1, "K": 4096, "N": 11008, "bits": 4, "group_size": 128, "dtype_bytes": 2}

_TRITON_DTYPE = {torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16"}


class QuantLinearError(ValueError):
    """Operands of a quantized linear that do not fit together; the message names the argument."""


@triton.jit
def _dequant_tile(
    qw_ptr,
    scales_ptr,
    zeros_ptr,
    gidx_ptr,
    k0,
    offs_n,
    K,
    N,
    group_size,
    has_gidx,
    stride_qk,
    stride_qn,
    stride_sg,
    stride_sn,
    stride_zg,
    stride_zn,
    BITS: tl.constexpr,
    BLOCK_K: tl.constexpr,
    BLOCK_N: tl.constexpr,
):
    """The dequantized fp32 tile ``W[k0 : k0 + BLOCK_K, offs_n]`` (0 outside ``K x N``); ``k0`` and
    ``BLOCK_K`` are multiples of ``PACK``."""
    PACK: tl.constexpr = 32 // BITS
    MASK: tl.constexpr = (1 << BITS) - 1
    offs_k = k0 + tl.arange(0, BLOCK_K)
    mask_k = offs_k < K
    mask = mask_k[:, None] & (offs_n[None, :] < N)
    # Each word is loaded once and split into its PACK rows: [words, PACK, BLOCK_N] -> [BLOCK_K, BLOCK_N].
    offs_w = k0 // PACK + tl.arange(0, BLOCK_K // PACK)
    mask_w = (offs_w[:, None] * PACK < K) & (offs_n[None, :] < N)
    words = tl.load(qw_ptr + offs_w[:, None] * stride_qk + offs_n[None, :] * stride_qn, mask=mask_w, other=0)
    shifts = tl.arange(0, PACK) * BITS
    q = (words[:, None, :] >> shifts[None, :, None]) & MASK  # the mask drops the arithmetic shift's sign bits
    q = tl.reshape(q, [BLOCK_K, BLOCK_N])
    if has_gidx:
        g = tl.load(gidx_ptr + offs_k, mask=mask_k, other=0)
    else:
        g = offs_k // group_size
    scale = tl.load(scales_ptr + g[:, None] * stride_sg + offs_n[None, :] * stride_sn, mask=mask, other=0.0)
    zero = tl.load(zeros_ptr + g[:, None] * stride_zg + offs_n[None, :] * stride_zn, mask=mask, other=0)
    return (q - zero).to(tl.float32) * scale.to(tl.float32)


@triton.jit
def _quant_gemm_kernel(
    x_ptr,
    qw_ptr,
    scales_ptr,
    zeros_ptr,
    gidx_ptr,
    bias_ptr,
    out_ptr,
    M,
    N,
    K,
    group_size,
    has_gidx,
    has_bias,
    stride_xm,
    stride_xk,
    stride_qk,
    stride_qn,
    stride_sg,
    stride_sn,
    stride_zg,
    stride_zn,
    stride_om,
    stride_on,
    BITS: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    """One program per ``[BLOCK_M, BLOCK_N]`` tile of ``out = x @ W (+ bias)``; the weight tile is
    dequantized to ``x``'s dtype in registers before each ``tl.dot``."""
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    mask_m = offs_m < M
    acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K)
        a = tl.load(
            x_ptr + offs_m[:, None].to(tl.int64) * stride_xm + offs_k[None, :] * stride_xk,
            mask=mask_m[:, None] & (offs_k[None, :] < K),
            other=0.0,
        )
        w = _dequant_tile(
            qw_ptr, scales_ptr, zeros_ptr, gidx_ptr, k0, offs_n, K, N, group_size, has_gidx,
            stride_qk, stride_qn, stride_sg, stride_sn, stride_zg, stride_zn, BITS, BLOCK_K, BLOCK_N,
        )  # fmt: skip
        acc = tl.dot(a, w.to(a.dtype), acc, input_precision="tf32x3")
    mask_n = offs_n < N
    if has_bias:
        acc += tl.load(bias_ptr + offs_n, mask=mask_n, other=0.0).to(tl.float32)[None, :]
    out_ptrs = out_ptr + offs_m[:, None].to(tl.int64) * stride_om + offs_n[None, :] * stride_on
    tl.store(out_ptrs, acc.to(out_ptr.dtype.element_ty), mask=mask_m[:, None] & mask_n[None, :])


@triton.jit
def _quant_gemv_kernel(
    x_ptr,
    qw_ptr,
    scales_ptr,
    zeros_ptr,
    gidx_ptr,
    partial_ptr,
    M,
    N,
    K,
    group_size,
    has_gidx,
    k_per_split,
    stride_xm,
    stride_xk,
    stride_qk,
    stride_qn,
    stride_sg,
    stride_sn,
    stride_zg,
    stride_zn,
    BITS: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    """One program per (``BLOCK_N`` output columns, K slice): the fp32 partial sum of the slice
    ``[k_per_split * pid_k, k_per_split * (pid_k + 1))`` for every row, into
    ``partial [num_splits, M, N]`` (contiguous). ``k_per_split`` is a multiple of ``BLOCK_K``."""
    pid_n = tl.program_id(0)
    pid_k = tl.program_id(1)
    offs_m = tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    mask_m = offs_m < M
    k_start = pid_k * k_per_split
    k_end = tl.minimum(k_start + k_per_split, K)
    acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    for k0 in range(k_start, k_end, BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K)
        a = tl.load(
            x_ptr + offs_m[:, None] * stride_xm + offs_k[None, :] * stride_xk,
            mask=mask_m[:, None] & (offs_k[None, :] < k_end),
            other=0.0,
        )
        w = _dequant_tile(
            qw_ptr, scales_ptr, zeros_ptr, gidx_ptr, k0, offs_n, k_end, N, group_size, has_gidx,
            stride_qk, stride_qn, stride_sg, stride_sn, stride_zg, stride_zn, BITS, BLOCK_K, BLOCK_N,
        )  # fmt: skip
        acc = tl.dot(a, w.to(a.dtype), acc, input_precision="tf32x3")
    out_ptrs = partial_ptr + (pid_k * M + offs_m[:, None]).to(tl.int64) * N + offs_n[None, :]
    tl.store(out_ptrs, acc, mask=mask_m[:, None] & (offs_n[None, :] < N))


@triton.jit
def _splitk_reduce_kernel(
    partial_ptr,
    bias_ptr,
    out_ptr,
    M,
    N,
    num_splits,
    has_bias,
    stride_om,
    stride_on,
    BLOCK_N: tl.constexpr,
):
    """``out[m, n] = sum_s partial[s, m, n] (+ bias[n])``, splits added in order; one program per (row, N tile)."""
    m = tl.program_id(0)
    offs_n = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    mask_n = offs_n < N
    acc = tl.zeros([BLOCK_N], dtype=tl.float32)
    for s in range(0, num_splits):
        acc += tl.load(partial_ptr + (s * M + m).to(tl.int64) * N + offs_n, mask=mask_n, other=0.0)
    if has_bias:
        acc += tl.load(bias_ptr + offs_n, mask=mask_n, other=0.0).to(tl.float32)
    tl.store(out_ptr + m * stride_om + offs_n * stride_on, acc.to(out_ptr.dtype.element_ty), mask=mask_n)


# ---- Python entry points ---------------------------------------------------------------------


def _interpreted() -> bool:
    return os.environ.get("TRITON_INTERPRET") == "1"


def _check(x: torch.Tensor, pw: PackedWeight, bias: torch.Tensor | None, out: torch.Tensor | None) -> torch.Tensor:
    """Validate the operands; returns ``out`` or a fresh ``[M, N]`` in ``x``'s dtype."""
    if not isinstance(pw, PackedWeight):
        raise QuantLinearError(f"pw must be a PackedWeight, got {type(pw).__name__}")
    if not isinstance(x, torch.Tensor) or x.dim() != 2 or x.dtype not in FLOAT_DTYPES:
        raise QuantLinearError(f"x must be a 2-D fp32/fp16/bf16 tensor [M, K], got {getattr(x, 'shape', x)!r}")
    if x.shape[1] != pw.in_features:
        raise QuantLinearError(f"x has {x.shape[1]} columns, the weight has in_features {pw.in_features}")
    if x.device != pw.qweight.device:
        raise QuantLinearError(f"x is on {x.device}, the weight on {pw.qweight.device}")
    if bias is not None and (bias.shape != (pw.out_features,) or bias.device != x.device):
        raise QuantLinearError(f"bias must be [{pw.out_features}] on {x.device}, got {tuple(bias.shape)}")
    shape = (x.shape[0], pw.out_features)
    if out is None:
        return torch.empty(shape, dtype=x.dtype, device=x.device)
    if out.shape != shape or out.dtype != x.dtype or out.device != x.device:
        raise QuantLinearError(f"out must be {shape} {x.dtype} on {x.device}, got {tuple(out.shape)} {out.dtype}")
    return out


def _operands(x: torch.Tensor, pw: PackedWeight, bias: torch.Tensor | None):
    """Kernel operands: scales (and bias) in ``x``'s dtype, ``g_idx`` or a placeholder pointer."""
    scales = pw.scales if pw.scales.dtype == x.dtype else pw.scales.to(x.dtype)
    gidx = pw.g_idx if pw.g_idx is not None else pw.zeros  # never read when has_gidx is 0
    bias_arg = x if bias is None else bias.to(x.dtype)  # never read when has_bias is 0
    return scales, gidx, bias_arg


def _num_sms(device: torch.device) -> int:
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).multi_processor_count
    return NOMINAL_NUM_SMS


def gemv_num_splits(k: int, n: int, device: torch.device) -> int:
    """K split for the GEMV: ``PROGRAMS_PER_SM`` programs per SM, at most one per ``GEMV_BLOCK_K`` step."""
    tiles = triton.cdiv(n, GEMV_BLOCK_N)
    wanted = triton.cdiv(PROGRAMS_PER_SM * _num_sms(device), tiles)
    return max(1, min(wanted, triton.cdiv(k, GEMV_BLOCK_K)))


def _upcast_for_interpreter(fn, x, pw, bias, out, **kwargs):
    """Run ``fn`` on fp32 copies of bf16 operands (the interpreter has no bf16 arithmetic); round into ``out``."""
    pw32 = PackedWeight(pw.qweight, pw.scales.float(), pw.zeros, pw.g_idx, pw.bits, pw.group_size, pw.in_features,
                        pw.out_features)  # fmt: skip
    result = fn(x.float(), pw32, None if bias is None else bias.float(), **kwargs)
    return out.copy_(result)


def quant_gemm(
    x: torch.Tensor, pw: PackedWeight, bias: torch.Tensor | None = None, out: torch.Tensor | None = None
) -> torch.Tensor:
    """``x [M, K] @ W (+ bias [N]) -> out [M, N]`` (``x``'s dtype) by the tiled dequantizing GEMM, any ``M``."""
    out = _check(x, pw, bias, out)
    if x.shape[0] == 0:
        return out
    if x.dtype == torch.bfloat16 and _interpreted():
        return _upcast_for_interpreter(quant_gemm, x, pw, bias, out)
    scales, gidx, bias_arg = _operands(x, pw, bias)
    m, k = x.shape
    n = pw.out_features
    grid = (triton.cdiv(m, GEMM_BLOCK_M), triton.cdiv(n, GEMM_BLOCK_N))
    _quant_gemm_kernel[grid](
        x, pw.qweight, scales, pw.zeros, gidx, bias_arg, out, m, n, k, pw.group_size,
        int(pw.g_idx is not None), int(bias is not None),
        x.stride(0), x.stride(1), pw.qweight.stride(0), pw.qweight.stride(1), scales.stride(0), scales.stride(1),
        pw.zeros.stride(0), pw.zeros.stride(1), out.stride(0), out.stride(1),
        BITS=pw.bits, BLOCK_M=GEMM_BLOCK_M, BLOCK_N=GEMM_BLOCK_N, BLOCK_K=GEMM_BLOCK_K,
        num_warps=GEMM_NUM_WARPS, num_stages=GEMM_NUM_STAGES,
    )  # fmt: skip
    return out


def quant_gemv(
    x: torch.Tensor,
    pw: PackedWeight,
    bias: torch.Tensor | None = None,
    out: torch.Tensor | None = None,
    num_splits: int | None = None,
) -> torch.Tensor:
    """``x [M, K] @ W (+ bias [N])`` for ``M <= GEMV_MAX_ROWS`` with the split-K GEMV; returns ``out [M, N]``.

    ``num_splits``: how many K slices (``None``: ``gemv_num_splits``); clipped to the number of ``BLOCK_K`` steps.
    """
    out = _check(x, pw, bias, out)
    m, k = x.shape
    if m > GEMV_MAX_ROWS:
        raise QuantLinearError(f"x has {m} rows; the GEMV path takes at most {GEMV_MAX_ROWS}")
    if num_splits is not None and (type(num_splits) is not int or num_splits < 1):
        raise QuantLinearError(f"num_splits must be None or an int >= 1, got {num_splits!r}")
    if m == 0:
        return out
    if x.dtype == torch.bfloat16 and _interpreted():
        return _upcast_for_interpreter(quant_gemv, x, pw, bias, out, num_splits=num_splits)
    scales, gidx, bias_arg = _operands(x, pw, bias)
    n = pw.out_features
    steps = triton.cdiv(k, GEMV_BLOCK_K)
    splits = min(num_splits or gemv_num_splits(k, n, x.device), steps)
    k_per_split = triton.cdiv(steps, splits) * GEMV_BLOCK_K
    splits = triton.cdiv(k, k_per_split)  # no empty slice
    partial = torch.empty(splits, m, n, dtype=torch.float32, device=x.device)
    _quant_gemv_kernel[(triton.cdiv(n, GEMV_BLOCK_N), splits)](
        x, pw.qweight, scales, pw.zeros, gidx, partial, m, n, k, pw.group_size, int(pw.g_idx is not None),
        k_per_split, x.stride(0), x.stride(1), pw.qweight.stride(0), pw.qweight.stride(1),
        scales.stride(0), scales.stride(1), pw.zeros.stride(0), pw.zeros.stride(1),
        BITS=pw.bits, BLOCK_M=GEMV_BLOCK_M, BLOCK_N=GEMV_BLOCK_N, BLOCK_K=GEMV_BLOCK_K,
        num_warps=GEMV_NUM_WARPS, num_stages=GEMV_NUM_STAGES,
    )  # fmt: skip
    _splitk_reduce_kernel[(m, triton.cdiv(n, REDUCE_BLOCK_N))](
        partial, bias_arg, out, m, n, splits, int(bias is not None), out.stride(0), out.stride(1),
        BLOCK_N=REDUCE_BLOCK_N,
    )  # fmt: skip
    return out


def quant_matmul(
    x: torch.Tensor, pw: PackedWeight, bias: torch.Tensor | None = None, out: torch.Tensor | None = None
) -> torch.Tensor:
    """``x [M, K] @ W (+ bias [N]) -> [M, N]`` in ``x``'s dtype: the split-K GEMV for ``M <= GEMV_MAX_ROWS``,
    the tiled GEMM above. Raises ``QuantLinearError`` for operands that do not fit ``pw``."""
    if isinstance(x, torch.Tensor) and x.dim() == 2 and x.shape[0] <= GEMV_MAX_ROWS:
        return quant_gemv(x, pw, bias, out)
    return quant_gemm(x, pw, bias, out)


def quant_matmul_reference(x: torch.Tensor, pw: PackedWeight, bias: torch.Tensor | None = None) -> torch.Tensor:
    """Float64 ``x [M, K] @ dequantize(pw) (+ bias) -> [M, N]``."""
    y = x.double() @ dequantize(pw, torch.float64)
    return y if bias is None else y + bias.double()


# ---- AOT report --------------------------------------------------------------------------------


def bytes_moved(shape: dict) -> int:
    """Bytes a call must move at least: packed weight, scales and zeros, x and y."""
    k, n, m = shape["K"], shape["N"], shape["M"]
    groups = k // shape["group_size"]
    weight = k * n * shape["bits"] // 8 + groups * n * (shape["dtype_bytes"] + 4)
    return weight + (m * k + m * n) * shape["dtype_bytes"]


def _signature(ty: str, pointers: tuple[str, ...], ints: tuple[str, ...], constexprs: tuple[str, ...]) -> dict:
    """Signature of a kernel whose float pointers are ``*<ty>`` (``partial_ptr`` fp32, weight words int32)."""
    fixed = {"qw_ptr": "*i32", "zeros_ptr": "*i32", "gidx_ptr": "*i32", "partial_ptr": "*fp32"}
    return {
        **{name: fixed.get(name, f"*{ty}") for name in pointers},
        **dict.fromkeys(ints, "i32"),
        **dict.fromkeys(constexprs, "constexpr"),
    }


_WEIGHT_POINTERS = ("qw_ptr", "scales_ptr", "zeros_ptr", "gidx_ptr")
_WEIGHT_STRIDES = ("stride_qk", "stride_qn", "stride_sg", "stride_sn", "stride_zg", "stride_zn")
_TILES = ("BITS", "BLOCK_M", "BLOCK_N", "BLOCK_K")


def aot_specs() -> list[AotSpec]:
    """Every configuration ``quant_matmul`` can launch: GEMM, GEMV and its reduction for each
    activation dtype and bit width (``g_idx`` and bias are runtime switches, not builds)."""
    specs = []
    for ty in _TRITON_DTYPE.values():
        for bits in (4, 8):
            gemm = _signature(
                ty,
                ("x_ptr", *_WEIGHT_POINTERS, "bias_ptr", "out_ptr"),
                ("M", "N", "K", "group_size", "has_gidx", "has_bias", "stride_xm", "stride_xk", *_WEIGHT_STRIDES,
                 "stride_om", "stride_on"),
                _TILES,
            )  # fmt: skip
            tiles = {"BITS": bits, "BLOCK_M": GEMM_BLOCK_M, "BLOCK_N": GEMM_BLOCK_N, "BLOCK_K": GEMM_BLOCK_K}
            specs.append(
                AotSpec("quant_gemm", f"{ty} w{bits}", _quant_gemm_kernel, gemm, tiles, GEMM_NUM_WARPS, GEMM_NUM_STAGES)
            )
            gemv = _signature(
                ty,
                ("x_ptr", *_WEIGHT_POINTERS, "partial_ptr"),
                ("M", "N", "K", "group_size", "has_gidx", "k_per_split", "stride_xm", "stride_xk", *_WEIGHT_STRIDES),
                _TILES,
            )
            tiles = {"BITS": bits, "BLOCK_M": GEMV_BLOCK_M, "BLOCK_N": GEMV_BLOCK_N, "BLOCK_K": GEMV_BLOCK_K}
            specs.append(
                AotSpec("quant_gemv", f"{ty} w{bits}", _quant_gemv_kernel, gemv, tiles, GEMV_NUM_WARPS, GEMV_NUM_STAGES)
            )
        reduce = _signature(
            ty,
            ("partial_ptr", "bias_ptr", "out_ptr"),
            ("M", "N", "num_splits", "has_bias", "stride_om", "stride_on"),
            ("BLOCK_N",),
        )
        specs.append(AotSpec("quant_gemv", f"{ty} reduce", _splitk_reduce_kernel, reduce, {"BLOCK_N": REDUCE_BLOCK_N}))
    return specs
