"""Quantized-cache helpers shared by the kernels: int8 and fp8 e4m3 (the scheme: ``minipaged_kernels.kv_quant``).

A quantized cache is a pair of 1-byte tensors (``torch.int8`` or ``torch.float8_e4m3fn``,
``[num_blocks, block_size, num_kv_heads, head_dim]``) plus fp32 scales ``k_scale`` /
``v_scale``: either ``[num_blocks, block_size, num_kv_heads]`` (one per token and KV head,
computed and written by ``kv_append``) or ``[1]`` (one per layer, fixed, read by
``kv_append``). The kernels receive every scale as a ``[num_blocks, block_size,
num_kv_heads]`` view, a per-layer one with all strides 0, so one load expression serves
both.

fp8 e4m3 is encoded and decoded with integer bit operations on a uint8 view instead of
Triton's ``float8e4nv`` casts: those compile only for sm_89+, and the interpreter's
float->fp8 cast truncates where torch (and the hardware) round to nearest even. The bit
version compiles for sm_80 and sm_90 alike and gives torch's bits exactly.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from minipaged_kernels._checks import check_tensor

QUANT_NONE, QUANT_INT8, QUANT_FP8 = 0, 1, 2
QUANT_DTYPES = (torch.int8, torch.float8_e4m3fn)
QUANT_NAMES = {QUANT_INT8: "int8", QUANT_FP8: "fp8e4m3"}
INT8_MAX = 127.0
FP8_E4M3_MAX = 448.0
# Adding then subtracting 1.5 * 2**23 rounds an fp32 of magnitude < 2**22 to an integer,
# half to even (the add itself rounds), in the interpreter and compiled alike.
_RINT_MAGIC = tl.constexpr(12582912.0)


def quant_code(cache_dtype: torch.dtype) -> int:
    """``QUANT_INT8`` / ``QUANT_FP8`` for a quantized cache dtype, ``QUANT_NONE`` for a float one."""
    if cache_dtype == torch.int8:
        return QUANT_INT8
    if cache_dtype == torch.float8_e4m3fn:
        return QUANT_FP8
    return QUANT_NONE


def check_kv_scales(
    k_cache: torch.Tensor, v_cache: torch.Tensor, k_scale: torch.Tensor | None, v_scale: torch.Tensor | None
) -> int:
    """Check the scales that go with a cache; returns its ``quant_code``.

    A float cache takes no scales; an int8/fp8 one needs fp32 ``k_scale`` and ``v_scale``
    of one shape, ``[num_blocks, block_size, num_kv_heads]`` or ``[1]``, on its device.
    """
    code = quant_code(k_cache.dtype)
    if code == QUANT_NONE:
        if k_scale is not None or v_scale is not None:
            raise ValueError(f"k_scale / v_scale go with int8 or fp8 caches, not {k_cache.dtype}")
        return code
    per_token = tuple(k_cache.shape[:3])
    for name, s in (("k_scale", k_scale), ("v_scale", v_scale)):
        if s is None:
            raise ValueError(f"a {k_cache.dtype} cache needs {name}")
        check_tensor(name, s, s.dim() if s.dim() in (1, 3) else 3, (torch.float32,))
        if tuple(s.shape) not in ((1,), per_token):
            raise ValueError(f"{name} has shape {tuple(s.shape)}, expected {list(per_token)} or [1]")
        if s.device != k_cache.device:
            raise ValueError(f"{name} is on {s.device}, but k_cache is on {k_cache.device}")
    if k_scale.shape != v_scale.shape:
        raise ValueError(f"v_scale shape {tuple(v_scale.shape)} differs from k_scale shape {tuple(k_scale.shape)}")
    return code


def kernel_views(cache: torch.Tensor, scale: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor | None]:
    """What a kernel gets: the cache (fp8 as its uint8 bits) and the scale as a
    ``[num_blocks, block_size, num_kv_heads]`` view (per-layer scale: strides 0)."""
    if scale is None:
        return cache, None
    data = cache.view(torch.uint8) if cache.dtype == torch.float8_e4m3fn else cache
    return data, scale.view(1, 1, 1).expand(cache.shape[:3]) if scale.dim() == 1 else scale


def scale_strides(scale: torch.Tensor | None) -> tuple[int, int, int]:
    """Strides of a ``kernel_views`` scale (zeros without one)."""
    return (0, 0, 0) if scale is None else tuple(scale.stride())


@triton.jit
def e4m3_to_fp32(u):
    """fp8 e4m3fn bits (any integer type holding 0..255) -> fp32; NaN codes never occur (writes saturate)."""
    u = u.to(tl.int32) & 0xFF
    sign = (u >> 7) << 31
    exponent = (u >> 3) & 0xF
    mantissa = u & 0x7
    normal = (sign | ((exponent + 120) << 23) | (mantissa << 20)).to(tl.float32, bitcast=True)
    subnormal = mantissa.to(tl.float32) * 0.001953125  # m * 2**-9
    subnormal = tl.where(sign != 0, -subnormal, subnormal)
    return tl.where(exponent == 0, subnormal, normal)


@triton.jit
def fp32_to_e4m3(y):
    """fp32 within +-448 -> fp8 e4m3fn bits (uint8), round to nearest even, as torch's cast."""
    bits = y.to(tl.int32, bitcast=True)
    sign = (bits >> 24) & 0x80
    magnitude = bits & 0x7FFFFFFF
    # Normal results (|y| >= 2**-6): keep 3 mantissa bits, rounding half to even; a carry
    # moves into the exponent by itself. fp32 exponent bias 127, e4m3's 7: 120 apart.
    rounded = magnitude + 0x7FFFF + ((magnitude >> 20) & 1)
    normal = (rounded >> 20) - (120 << 3)
    # Subnormal results are multiples of 2**-9: round |y| * 512 to an integer.
    subnormal = ((tl.abs(y) * 512.0 + _RINT_MAGIC) - _RINT_MAGIC).to(tl.int32)
    code = tl.where(magnitude >= 0x3C800000, normal, subnormal) | sign
    return code.to(tl.uint8)


@triton.jit
def dequantize(raw, scale, QUANT: tl.constexpr):
    """Stored ``raw`` (int8, or fp8 bits) times ``scale`` (broadcast by the caller), in fp32."""
    if QUANT == 1:
        x = raw.to(tl.float32)
    else:
        x = e4m3_to_fp32(raw)
    return x * scale


@triton.jit
def quantize(x, scale, QUANT: tl.constexpr):
    """fp32 ``x`` divided by ``scale`` (broadcast by the caller; 0 for an all-zero row) -> stored values.

    int8: round half to even, clamp to +-127; fp8: clamp to +-448 (saturate), encode.
    Division is the correctly rounded one, so the result matches torch bit for bit.
    """
    safe = tl.where(scale > 0, scale, 1.0)
    y = tl.math.div_rn(x, safe)
    if QUANT == 1:
        # Clamp first: the rounding trick needs |y| < 2**22 (a per-layer scale can overflow).
        y = tl.minimum(tl.maximum(y, -127.0), 127.0)
        return ((y + _RINT_MAGIC) - _RINT_MAGIC).to(tl.int8)
    else:
        return fp32_to_e4m3(tl.minimum(tl.maximum(y, -448.0), 448.0))
