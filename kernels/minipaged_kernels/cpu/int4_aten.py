"""4-bit weight-only linear on CPU through PyTorch's own int4 kernel, for bf16 / fp16 activations.

PyTorch ships a CPU W4A16 GEMM (``aten._weight_int4pack_mm_for_cpu``, the one torchao's int4
weight-only CPU path calls), vectorised by hand for AVX2 / AVX-512. For 16-bit rows it streams
a 4-bit weight two to three times faster than the numba loop in ``quant_gemv``, which stays
the path for fp32 rows (ATen's kernel has no fast fp32 path) and for weights it cannot take.
Re-measure with ``python -m minipaged_kernels.cpu.quant_bench``.

ATen's kernel has its own contract, so ``pack`` translates a :class:`PackedWeight` once:

- its weight is ``[N, K / 2]`` uint8 in a private blocked layout, built by
  ``aten._convert_weight_to_int4pack_for_cpu`` from unpacked ``q [N, K]``; N must be a
  multiple of 16;
- its groups are contiguous runs of ``g in (32, 64, 128, 256)`` rows of K, and K a multiple of
  ``g``. A format group of ``group_size`` rows is cut into ATen groups of the largest such
  ``g`` that divides it (repeating its scale), preferring one that also divides K (SmolLM2's
  K = 576 in groups of 128, ending in a half group, runs as groups of 64); otherwise K is padded
  with zero weights to a multiple of ``g``, and ``x`` with zero columns on every call;
- with a ``g_idx`` (GPTQ's act order) the rows of K are reordered once so that each group is
  contiguous, and ``x``'s columns are gathered in the same order on every call;
- it dequantizes ``W[k, n] = (q - 8) * scale + zero``, so the format's zero point ``z``
  becomes ``zero = (8 - z) * scale``, rounded to the activation dtype (exact for symmetric
  weights, whose ``z`` is 8).

ATen's kernel dequantizes as it multiplies, per row of ``x``, so its time grows with the rows as
a dense product's does but at about 2.4x the bf16 one's. From ``DENSE_FROM_ROWS`` bf16 rows
(a long prefill) ``matmul`` instead dequantizes the whole weight once to bf16 (``dequantize``, a
numba pass over ATen's layout) and multiplies densely; each weight is then rounded to bf16 before
the product, as GPU W4A16 kernels round it to their 16-bit type.

The reference is ``x.double() @ quant_formats.dequantize(pw, torch.float64)``
(``tests/kernels/test_cpu_int4_aten.py``).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from minipaged_kernels.cpu._jit import numba, set_launch_threads
from minipaged_kernels.quant_formats import PackedWeight, unpack_int32

# Group lengths ATen's kernel takes, largest first: the fewest scales to read.
ATEN_GROUP_SIZES = (256, 128, 64, 32)
# Activation dtypes ATen vectorises (fp32 rows go to ``quant_gemv``).
INPUT_DTYPES = (torch.bfloat16, torch.float16)
N_MULTIPLE = 16  # ATen's packing takes N in whole blocks of 16 columns
# ATen's CPU layout: columns in blocks of 64, each block [K, 32] bytes, byte j holding column j in
# its low nibble and column j + 32 in its high one; the columns past the last whole block follow
# as [K, tail / 2] bytes, each holding two neighbouring columns (``tests`` read it back).
LAYOUT_BLOCK_N = 64
# From this many bf16 rows, dequantize once and multiply densely. One layer of SmolLM2's, 576 x 3072,
# 2 threads: ATen 1.5 / 3.1 / 6.3 / 10.7 ms at 64 / 128 / 256 / 512 rows, dequantizing (0.9 ms) and
# multiplying 1.3 / 2.0 / 3.1 / 4.9 ms; level at 64 rows for 1536 x 576. Re-measure by timing
# ``aten._weight_int4pack_mm_for_cpu`` against ``x @ dequantize(w)`` at those row counts.
DENSE_FROM_ROWS = 128


def available() -> bool:
    """Whether this PyTorch has the int4 CPU ops."""
    return hasattr(torch.ops.aten, "_weight_int4pack_mm_for_cpu") and hasattr(
        torch.ops.aten, "_convert_weight_to_int4pack_for_cpu"
    )


@dataclass(frozen=True)
class Int4Weight:
    """One weight in ATen's int4 layout.

    ``weight`` uint8 ``[N, K_pad / 2]`` (ATen's blocked order), ``scale_zeros [K_pad / g, N, 2]`` in
    the activation dtype (``[..., 0]`` scales, ``[..., 1]`` zeros as ATen defines them),
    ``group_size`` ATen's ``g``, ``in_features`` K, ``padded_in_features`` K_pad,
    ``perm`` int64 ``[K]`` (column order of ``x``) or ``None`` when K is in order, ``group_of`` int64
    ``[K_pad / g]``, the format group each ATen group was cut from (non-decreasing).
    """

    weight: torch.Tensor
    scale_zeros: torch.Tensor
    group_size: int
    in_features: int
    padded_in_features: int
    perm: torch.Tensor | None
    group_of: torch.Tensor

    @property
    def out_features(self) -> int:
        """N."""
        return self.weight.shape[0]

    @property
    def dtype(self) -> torch.dtype:
        """The activation dtype this weight multiplies."""
        return self.scale_zeros.dtype

    def nbytes(self) -> int:
        """Bytes held: packed weight, scales and zeros, permutation."""
        held = (self.weight, self.scale_zeros, self.group_of) + ((self.perm,) if self.perm is not None else ())
        return sum(t.nbytes for t in held)


def _group_rows(pw: PackedWeight) -> tuple[torch.Tensor | None, torch.Tensor]:
    """``(perm, groups)``: the order of K that makes each format group contiguous (``None``: K is already
    in group order) and the format group of each row in that order, int64 ``[K]``."""
    groups = pw.group_index().long()
    if pw.g_idx is None or bool((groups[1:] >= groups[:-1]).all()):
        return None, groups
    perm = torch.sort(groups, stable=True).indices
    return perm, groups[perm]


def _aten_group_size(groups: torch.Tensor) -> int | None:
    """The ATen group length for rows in format groups ``groups [K]``: runs of it must never mix two format
    groups. The largest that divides K comes first (no padding on every call), then the largest that does
    after padding K; ``None`` when there is none."""
    k = groups.numel()
    fits = [g for g in ATEN_GROUP_SIZES if k % g == 0] + [g for g in ATEN_GROUP_SIZES if k % g]
    for g in fits:
        padded = F.pad(groups, (0, -k % g), value=-1).view(-1, g)
        ok = (padded == padded[:, :1]) | (padded == -1)
        if bool(ok.all()):
            return g
    return None


def unsupported_reason(pw: PackedWeight, dtype: torch.dtype) -> str | None:
    """Why ``pack(pw, dtype)`` cannot serve this weight, or ``None`` when it can."""
    if not available():
        return "this PyTorch has no aten._weight_int4pack_mm_for_cpu"
    if pw.bits != 4:
        return f"{pw.bits}-bit weights (the kernel is 4-bit only)"
    if dtype not in INPUT_DTYPES:
        return f"{dtype} activations (the kernel is fast for {[str(d) for d in INPUT_DTYPES]} only)"
    if pw.qweight.device.type != "cpu":
        return f"a weight on {pw.qweight.device}"
    if pw.out_features % N_MULTIPLE:
        return f"out_features {pw.out_features} is not a multiple of {N_MULTIPLE}"
    if _aten_group_size(_group_rows(pw)[1]) is None:
        return f"groups of {pw.group_size} rows cannot be cut into runs of {ATEN_GROUP_SIZES} rows"
    return None


def pack(pw: PackedWeight, dtype: torch.dtype) -> Int4Weight:
    """Translate ``pw`` into ATen's layout for ``dtype`` activations (see the module docstring);
    a ``ValueError`` names why when ``unsupported_reason`` does."""
    reason = unsupported_reason(pw, dtype)
    if reason is not None:
        raise ValueError(f"ATen's int4 kernel cannot take this weight: {reason}")
    perm, groups = _group_rows(pw)
    g = _aten_group_size(groups)
    k = pw.in_features
    pad = -k % g
    q = unpack_int32(pw.qweight, 4, k)  # [K, N] in 0..15
    if perm is not None:
        q = q[perm]
    q = F.pad(q, (0, 0, 0, pad), value=8)  # padded rows dequantize to exactly 0
    starts = F.pad(groups, (0, pad), value=int(groups[-1]))[::g]  # format group of each ATen group
    scales = pw.scales.double()[starts]  # [K_pad / g, N]
    zeros = (8 - pw.zeros.double()[starts]) * scales
    weight = torch.ops.aten._convert_weight_to_int4pack_for_cpu(q.t().contiguous().int(), 1)
    scale_zeros = torch.stack([scales, zeros], dim=-1).to(dtype).contiguous()
    return Int4Weight(weight, scale_zeros, g, k, k + pad, perm, starts.contiguous())


def matmul(x: torch.Tensor, w: Int4Weight, bias: torch.Tensor | None = None) -> torch.Tensor:
    """``x [M, K] @ W + bias`` -> ``[M, N]`` in ``w.dtype``; ``x`` a CPU tensor of ``w.dtype``."""
    if x.dtype != w.dtype or x.dim() != 2 or x.shape[1] != w.in_features or x.device.type != "cpu":
        raise ValueError(
            f"x must be a [M, {w.in_features}] {w.dtype} CPU tensor for this weight, got "
            f"{tuple(x.shape)} {x.dtype} on {x.device}"
        )
    return matmul_unchecked(x, w, bias)


def matmul_unchecked(
    x: torch.Tensor, w: Int4Weight, bias: torch.Tensor | None = None, buffer: torch.Tensor | None = None
) -> torch.Tensor:
    """``matmul`` without its checks on ``x``, for a caller that has made them (a decode step makes
    about a hundred of these products, each tens of microseconds). ``buffer``: bf16 ``[K_pad, N]`` to
    dequantize into on the dense path (a fresh one each call costs page faults), or ``None``."""
    if w.perm is not None:
        x = x.index_select(1, w.perm)
    if w.padded_in_features != w.in_features:
        x = F.pad(x, (0, w.padded_in_features - w.in_features))
    if x.shape[0] >= DENSE_FROM_ROWS and dense_applies_to(w):
        out = x @ dequantize(w, buffer)
    else:
        out = torch.ops.aten._weight_int4pack_mm_for_cpu(x.contiguous(), w.weight, w.group_size, w.scale_zeros)
    return out if bias is None else out.add_(bias)


def format_scales(w: Int4Weight, num_groups: int) -> torch.Tensor | None:
    """The format's scales ``[num_groups, N]`` in ``w.dtype``, read back from ATen's copy (each format
    group's first ATen group); ``None`` when some format group has no ATen group (no row of K uses it),
    so that its scale is not held. Equal to the format's scales when those were in ``w.dtype``."""
    wanted = torch.arange(num_groups)
    first = torch.searchsorted(w.group_of, wanted)
    if bool((first >= w.group_of.numel()).any()) or not torch.equal(w.group_of[first], wanted):
        return None
    return w.scale_zeros[first, :, 0].contiguous()


def unpack(w: Int4Weight) -> torch.Tensor:
    """The unsigned 4-bit values ``q [K, N]`` (int32, in the weight's original row order) held by ``w``.

    ATen's layout is private, so the kernel reads it back itself: multiplying the identity by the
    weight with scale 1 and zero 0 yields ``q - 8``, small integers exact in any float dtype.
    """
    ones = torch.ones(w.scale_zeros.shape[:2], dtype=w.dtype)
    unit = torch.stack([ones, torch.zeros_like(ones)], dim=-1).contiguous()
    eye = torch.eye(w.padded_in_features, dtype=w.dtype)
    q = torch.ops.aten._weight_int4pack_mm_for_cpu(eye, w.weight, w.group_size, unit)[: w.in_features]
    q = q.round().int() + 8
    if w.perm is not None:
        q = torch.empty_like(q).index_copy_(0, w.perm, q)
    return q


def dense_applies_to(w: Int4Weight) -> bool:
    """Whether ``dequantize`` takes ``w``: numba present and bf16 activations."""
    return numba is not None and w.dtype == torch.bfloat16


def dequantize(w: Int4Weight, out: torch.Tensor | None = None) -> torch.Tensor:
    """``W`` bf16 ``[K_pad, N]`` (rows in the kernel's order: ``perm`` applied, padding rows 0), each
    ``(q - 8) * scale + zero`` computed in fp32 as ATen's kernel does and rounded to bf16: bit-equal to
    ATen's own product of the identity by ``w`` (finite scales). Written into ``out`` (contiguous bf16
    ``[K_pad, N]``) when given. ``w`` must have bf16 activations (``dense_applies_to``)."""
    if out is None:
        out = torch.empty(w.padded_in_features, w.out_features, dtype=torch.bfloat16)
    scales = w.scale_zeros[..., 0].float().contiguous()  # [K_pad / g, N]
    zeros = w.scale_zeros[..., 1].float().contiguous()
    set_launch_threads()
    _dequantize_blocks(
        w.weight.view(-1).numpy(), scales.numpy(), zeros.numpy(), w.group_size, out.view(torch.int16).numpy()
    )
    return out


def _round_to_bf16_bits(value):
    """The bf16 bit pattern (int16) nearest a finite fp32 ``value``, ties to even (no NaN branch, so
    that the loops around it vectorise)."""
    bits = np.float32(value).view(np.uint32)
    return np.int16((bits + np.uint32(0x7FFF) + ((bits >> np.uint32(16)) & np.uint32(1))) >> np.uint32(16))


def _dequantize_run(src, s_lo, z_lo, s_hi, z_hi, o_lo, o_hi):
    """The bytes ``src`` into two runs of bf16 bits: low nibbles to ``o_lo``, high ones to ``o_hi``, each
    ``(q - 8) * scale + zero`` with that run's ``s_*``/``z_*`` (1-D views, so that the loop vectorises)."""
    for j in range(src.shape[0]):
        byte = np.int32(src[j])
        o_lo[j] = _round_to_bf16_bits((np.float32(byte & 15) - np.float32(8.0)) * s_lo[j] + z_lo[j])
        o_hi[j] = _round_to_bf16_bits((np.float32(byte >> 4) - np.float32(8.0)) * s_hi[j] + z_hi[j])


def _dequantize_blocks(packed, scales, zeros, group_size, out):
    """``out [K_pad, N]`` (bf16 bits) from ATen's bytes ``packed [N * K_pad / 2]`` (``LAYOUT_BLOCK_N``
    says the order), ``scales`` and ``zeros`` fp32 ``[K_pad / g, N]``; whole blocks over the threads."""
    k_pad, n_total = out.shape
    half = LAYOUT_BLOCK_N // 2
    blocks = n_total // LAYOUT_BLOCK_N
    for b in numba.prange(blocks):
        lo, hi, end = b * LAYOUT_BLOCK_N, b * LAYOUT_BLOCK_N + half, (b + 1) * LAYOUT_BLOCK_N
        for k in range(k_pad):
            g, row = k // group_size, (b * k_pad + k) * half
            src = packed[row : row + half]
            _dequantize_run(
                src,
                scales[g, lo:hi],
                zeros[g, lo:hi],
                scales[g, hi:end],
                zeros[g, hi:end],
                out[k, lo:hi],
                out[k, hi:end],
            )
    first = blocks * LAYOUT_BLOCK_N
    tail = n_total - first
    for k in range(k_pad):  # past the last whole block a byte holds two neighbouring columns
        g, row = k // group_size, (first * k_pad + k * tail) // 2
        src = packed[row : row + tail // 2]
        evens, odds = slice(first, n_total, 2), slice(first + 1, n_total, 2)
        _dequantize_run(
            src, scales[g, evens], zeros[g, evens], scales[g, odds], zeros[g, odds], out[k, evens], out[k, odds]
        )


if numba is not None:
    # No fastmath: (q - 8) * scale + zero must round as ATen's kernel rounds it.
    _round_to_bf16_bits = numba.njit(inline="always")(_round_to_bf16_bits)
    _dequantize_run = numba.njit(inline="always")(_dequantize_run)
    _dequantize_blocks = numba.njit(parallel=True, cache=True)(_dequantize_blocks)
