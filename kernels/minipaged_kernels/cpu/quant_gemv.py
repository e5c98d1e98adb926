"""Weight-only quantized few-row linear on CPU, ``y = x @ W``, straight from a packed weight, JIT-compiled by numba.

A decode step with a handful of sequences is bound by streaming the weights; a 4-bit
packed weight is an eighth of fp32's bytes, so the loop reads the int32 words from memory
once per call and dequantizes in registers. Up to ``FUSED_MAX_ROWS`` rows,
each thread takes one contiguous stretch of columns (so each packed word row is one run of
memory for the prefetcher) and each input row widens a word's 8 (4) fields in registers and
multiply-adds them with 8 (4) inputs, vectorised along N (``_words4_fused``: a shift and one
AND-OR per field; ``_words4_fused_pair`` widens a word once for two input rows). Above that, with
a ``g_idx``, or with groups that end inside a word, columns are cut into chunks of ``CHUNK``
whose packed words stay in cache while each packed row is widened once into a ``CHUNK``-wide
fp32 buffer that every input row then reads.

Without ``g_idx`` the rows of a packed word share a group, so the zero point and scale
come out of the inner loop: per group ``g`` and column ``n``,
``y[m, n] += s[g, n] * (sum_k x[m, k] q[k, n] - z[g, n] sum_k x[m, k])``, the inner loop
being a multiply-add of small integers. With a ``g_idx`` (desc_act) each row looks up its
own group, and the loop dequantizes each value before the multiply-add (slower; a loader
can reorder K by group once to get the fast path back).

For more rows, ``dequantize_into`` writes the dense fp32 weight ``[K, N]`` into a
reusable buffer and the caller runs its fastest GEMM on it. Compare the two, and dense
fp32 / bf16, with ``python -m minipaged_kernels.cpu.quant_bench``.

bf16 rows are widened to fp32 first and the result rounded back once. The reference is
``x.double() @ quant_formats.dequantize(pw, torch.float64)``
(``tests/kernels/test_cpu_quant_gemv.py``); sums are fp32 with SIMD partial sums
(``fastmath`` reassociation).
"""

from __future__ import annotations

from typing import NamedTuple

import numpy as np
import torch

from minipaged_kernels.cpu._jit import FASTMATH, numba, set_launch_threads
from minipaged_kernels.quant_formats import PackedWeight

# Up to this many rows the packed loop is the intended path (the Triton twin's GEMV_MAX_ROWS).
MAX_ROWS = 16
# Output columns per chunk: the [rows, CHUNK] fp32 partial sums and the row buffer stay in L1.
CHUNK = 128
# The fused loops' partial sums [rows, width] stay within this many floats (L1: 16 KB of 32).
WIDE_PART_FLOATS = 4096
# Up to this many rows the 4-bit loop unpacks each word once per row, in registers; above, once per
# call into a row buffer that every row then reads.
FUSED_MAX_ROWS = 4
# Activation dtypes the loops take (sums in fp32 for both).
INPUT_DTYPES = (torch.float32, torch.bfloat16)
# Chunks per thread: a few per thread evens out a thread that starts late.
_CHUNKS_PER_THREAD = 4


def available() -> bool:
    """Whether numba is importable, i.e. ``matmul`` can run."""
    return numba is not None


def applies_to(x: torch.Tensor, pw: PackedWeight, bias: torch.Tensor | None = None) -> bool:
    """Whether ``matmul`` takes these operands: numba present, 1..``MAX_ROWS`` rows of fp32 or bf16 CPU
    ``x [rows, K]`` matching ``pw``, a CPU ``pw``, ``bias`` ``None`` or a CPU ``[N]`` of ``x``'s dtype, no
    autograd. bf16 rows are widened to fp32 and the result rounded back: the sums are fp32 either way."""
    return (
        numba is not None
        and isinstance(pw, PackedWeight)
        and x.dim() == 2
        and 1 <= x.shape[0] <= MAX_ROWS
        and x.shape[1] == pw.in_features
        and x.dtype in INPUT_DTYPES
        and x.device.type == "cpu"
        and pw.qweight.device.type == "cpu"
        and (bias is None or (bias.dtype == x.dtype and bias.device.type == "cpu" and bias.shape == (pw.out_features,)))
        and not (torch.is_grad_enabled() and (x.requires_grad or (bias is not None and bias.requires_grad)))
    )


def _chunk_grouped(x, xsum, qweight, scales, zeros, bits, group_size, out, n0, n1, part, row):
    """``out[:, n0:n1] = x @ W[:, n0:n1]`` when the group of row ``k`` is ``k // group_size``.

    ``x [M, K]``, ``xsum [M, num_groups]`` (row sums of x per group), ``qweight [ceil(K / pack), N]``,
    ``scales``/``zeros [num_groups, N]`` fp32, ``out [M, N]``; ``part [M, CHUNK]`` and ``row [CHUNK]`` scratch.
    """
    rows, k_in = x.shape
    pack = 32 // bits
    umask = np.uint32((1 << bits) - 1)
    width = n1 - n0
    for m in range(rows):
        for i in range(width):
            out[m, n0 + i] = 0.0
    for g in range(scales.shape[0]):
        for m in range(rows):
            for i in range(width):
                part[m, i] = 0.0
        k_end = min(k_in, (g + 1) * group_size)
        k_start = g * group_size
        if rows <= FUSED_MAX_ROWS and k_start % pack == 0 and k_end % pack == 0:
            if bits == 4:
                for m in range(0, rows - 1, 2):
                    _words4_fused_pair(x, m, qweight, k_start // 8, k_end // 8, n0, n1, part)
                if rows % 2:
                    _words4_fused(x, rows - 1, qweight, k_start // 8, k_end // 8, n0, n1, part)
            else:
                _words8_fused(x, qweight, k_start // 4, k_end // 4, n0, n1, part)
            k_end = k_start  # done: skip the row-buffer loop
        for k in range(k_start, k_end):
            words = qweight[k // pack, n0:n1]
            shift = np.uint32(bits * (k % pack))
            for i in range(width):
                row[i] = np.float32(np.int32((words[i] >> shift) & umask))  # AVX2 converts signed ints only
            for m in range(rows):
                xv = x[m, k]
                acc = part[m]
                for i in range(width):
                    acc[i] += xv * row[i]
        for m in range(rows):
            xs = xsum[m, g]
            for i in range(width):
                n = n0 + i
                out[m, n] += scales[g, n] * (part[m, i] - np.float32(zeros[g, n]) * xs)


def _words4_fused(x, m, qweight, w0, w1, n0, n1, part):
    """``part[m, :] += sum_k x[m, k] q[k, n0:n1]`` for input row ``m`` over the 4-bit words ``[w0, w1)`` (rows
    ``8 w0 .. 8 w1``): one pass over each word row, its 8 fields widened and multiplied in registers.

    A field becomes a float without a conversion: shifted to the top of an fp32 mantissa and OR-ed with
    the bits of 1.0 it reads ``1 + q / 16`` (a shift and one AND-OR per field, where a conversion costs a
    shift, an AND and a convert), so the loop sums ``16 x (1 + q / 16) = 16 x + x q`` and takes
    ``16 sum_k x`` off at the end. Multiplying by 16 is exact; the offset is of the size of the sum.
    """
    width = n1 - n0
    field = np.uint32(0xF << 19)  # a field's bits at the top of the mantissa
    one = np.uint32(0x3F800000)  # fp32 1.0
    sixteen = np.float32(16.0)
    acc = part[m]
    offset = np.float32(0.0)
    for w in range(w0, w1):
        words = qweight[w, n0:n1]
        k = 8 * w
        x0, x1, x2, x3 = sixteen * x[m, k], sixteen * x[m, k + 1], sixteen * x[m, k + 2], sixteen * x[m, k + 3]
        x4, x5, x6, x7 = sixteen * x[m, k + 4], sixteen * x[m, k + 5], sixteen * x[m, k + 6], sixteen * x[m, k + 7]
        offset += x0 + x1 + x2 + x3 + x4 + x5 + x6 + x7
        for i in range(width):
            v = words[i]
            acc[i] += (
                x0 * np.uint32(((v << np.uint32(19)) & field) | one).view(np.float32)
                + x1 * np.uint32(((v << np.uint32(15)) & field) | one).view(np.float32)
                + x2 * np.uint32(((v << np.uint32(11)) & field) | one).view(np.float32)
                + x3 * np.uint32(((v << np.uint32(7)) & field) | one).view(np.float32)
                + x4 * np.uint32(((v << np.uint32(3)) & field) | one).view(np.float32)
                + x5 * np.uint32(((v >> np.uint32(1)) & field) | one).view(np.float32)
                + x6 * np.uint32(((v >> np.uint32(5)) & field) | one).view(np.float32)
                + x7 * np.uint32(((v >> np.uint32(9)) & field) | one).view(np.float32)
            )
    for i in range(width):
        acc[i] -= offset


def _words4_fused_pair(x, m, qweight, w0, w1, n0, n1, part):
    """``_words4_fused`` for input rows ``m`` and ``m + 1`` at once: each word's fields are widened once
    and multiplied into both rows' sums, which halves the widening (the loop's main cost) at 2-4 rows."""
    width = n1 - n0
    field = np.uint32(0xF << 19)
    one = np.uint32(0x3F800000)
    sixteen = np.float32(16.0)
    acc_a, acc_b = part[m], part[m + 1]
    off_a, off_b = np.float32(0.0), np.float32(0.0)
    for w in range(w0, w1):
        words = qweight[w, n0:n1]
        k = 8 * w
        a0, a1, a2, a3 = sixteen * x[m, k], sixteen * x[m, k + 1], sixteen * x[m, k + 2], sixteen * x[m, k + 3]
        a4, a5, a6, a7 = sixteen * x[m, k + 4], sixteen * x[m, k + 5], sixteen * x[m, k + 6], sixteen * x[m, k + 7]
        r = m + 1
        b0, b1, b2, b3 = sixteen * x[r, k], sixteen * x[r, k + 1], sixteen * x[r, k + 2], sixteen * x[r, k + 3]
        b4, b5, b6, b7 = sixteen * x[r, k + 4], sixteen * x[r, k + 5], sixteen * x[r, k + 6], sixteen * x[r, k + 7]
        off_a += a0 + a1 + a2 + a3 + a4 + a5 + a6 + a7
        off_b += b0 + b1 + b2 + b3 + b4 + b5 + b6 + b7
        for i in range(width):
            v = words[i]
            f0 = np.uint32(((v << np.uint32(19)) & field) | one).view(np.float32)
            f1 = np.uint32(((v << np.uint32(15)) & field) | one).view(np.float32)
            f2 = np.uint32(((v << np.uint32(11)) & field) | one).view(np.float32)
            f3 = np.uint32(((v << np.uint32(7)) & field) | one).view(np.float32)
            f4 = np.uint32(((v << np.uint32(3)) & field) | one).view(np.float32)
            f5 = np.uint32(((v >> np.uint32(1)) & field) | one).view(np.float32)
            f6 = np.uint32(((v >> np.uint32(5)) & field) | one).view(np.float32)
            f7 = np.uint32(((v >> np.uint32(9)) & field) | one).view(np.float32)
            acc_a[i] += a0 * f0 + a1 * f1 + a2 * f2 + a3 * f3 + a4 * f4 + a5 * f5 + a6 * f6 + a7 * f7
            acc_b[i] += b0 * f0 + b1 * f1 + b2 * f2 + b3 * f3 + b4 * f4 + b5 * f5 + b6 * f6 + b7 * f7
    for i in range(width):
        acc_a[i] -= off_a
        acc_b[i] -= off_b


def _words8_fused(x, qweight, w0, w1, n0, n1, part):
    """``_words4_fused`` for 8-bit words (4 fields each, rows ``4 w0 .. 4 w1``): a field at the top of
    the mantissa reads ``1 + q / 256``, so the loop sums ``256 x + x q``."""
    width = n1 - n0
    field = np.uint32(0xFF << 15)
    one = np.uint32(0x3F800000)
    scale = np.float32(256.0)
    for m in range(x.shape[0]):
        acc = part[m]
        offset = np.float32(0.0)
        for w in range(w0, w1):
            words = qweight[w, n0:n1]
            k = 4 * w
            x0, x1, x2, x3 = scale * x[m, k], scale * x[m, k + 1], scale * x[m, k + 2], scale * x[m, k + 3]
            offset += x0 + x1 + x2 + x3
            for i in range(width):
                v = words[i]
                acc[i] += (
                    x0 * np.uint32(((v << np.uint32(15)) & field) | one).view(np.float32)
                    + x1 * np.uint32(((v << np.uint32(7)) & field) | one).view(np.float32)
                    + x2 * np.uint32(((v >> np.uint32(1)) & field) | one).view(np.float32)
                    + x3 * np.uint32(((v >> np.uint32(9)) & field) | one).view(np.float32)
                )
        for i in range(width):
            acc[i] -= offset


def _chunk_indexed(x, g_idx, qweight, scales, zeros, bits, out, n0, n1, part, row):
    """``out[:, n0:n1] = x @ W[:, n0:n1]`` with the group of row ``k`` read from ``g_idx [K]``; each
    value is dequantized before its multiply-add. Arguments as ``_chunk_grouped``."""
    rows, k_in = x.shape
    pack = 32 // bits
    mask = (1 << bits) - 1
    width = n1 - n0
    for m in range(rows):
        for i in range(width):
            part[m, i] = 0.0
    for k in range(k_in):
        w = k // pack
        shift = bits * (k % pack)
        g = g_idx[k]
        for i in range(width):
            n = n0 + i
            row[i] = (np.float32(np.int32((qweight[w, n] >> shift) & mask)) - np.float32(zeros[g, n])) * scales[g, n]
        for m in range(rows):
            xv = x[m, k]
            for i in range(width):
                part[m, i] += xv * row[i]
    for m in range(rows):
        for i in range(width):
            out[m, n0 + i] = part[m, i]


def _group_sums(x, group_size, num_groups):
    """``xsum [M, num_groups]``: the sum of each row of ``x [M, K]`` over each group's columns."""
    rows, k_in = x.shape
    xsum = np.zeros((rows, num_groups), dtype=np.float32)
    for m in range(rows):
        for k in range(k_in):
            xsum[m, k // group_size] += x[m, k]
    return xsum


def _run_chunks(x, xsum, g_idx, qweight, scales, zeros, bits, group_size, out, width, c0, c1):
    """Chunks ``[c0, c1)`` of ``width`` columns, serially, with their own scratch."""
    n_out = out.shape[1]
    part = np.empty((x.shape[0], width), dtype=np.float32)
    row = np.empty(width, dtype=np.float32)
    for c in range(c0, c1):
        n0 = c * width
        n1 = min(n_out, n0 + width)
        if g_idx is None:
            _chunk_grouped(x, xsum, qweight, scales, zeros, bits, group_size, out, n0, n1, part, row)
        else:
            _chunk_indexed(x, g_idx, qweight, scales, zeros, bits, out, n0, n1, part, row)


def _run_serial(x, g_idx, qweight, scales, zeros, bits, group_size, out, width):
    """All column chunks on this thread; the group sums are computed here (one dispatch per call)."""
    xsum = _group_sums(x, group_size, scales.shape[0])
    chunks = (out.shape[1] + width - 1) // width
    _run_chunks(x, xsum, g_idx, qweight, scales, zeros, bits, group_size, out, width, 0, chunks)


def _run_parallel(x, g_idx, qweight, scales, zeros, bits, group_size, out, width, tasks):
    """All column chunks, cut into ``tasks`` ranges spread over numba's threads."""
    xsum = _group_sums(x, group_size, scales.shape[0])
    chunks = (out.shape[1] + width - 1) // width
    step = (chunks + tasks - 1) // tasks
    for t in numba.prange(tasks):
        c0 = min(chunks, t * step)
        c1 = min(chunks, c0 + step)
        _run_chunks(x, xsum, g_idx, qweight, scales, zeros, bits, group_size, out, width, c0, c1)


def _dequantize_rows(qweight, scales, zeros, g_idx, bits, group_size, out, k0, k1):
    """``out[k] = (q[k] - zeros[g(k)]) * scales[g(k)]`` for rows ``k`` in ``[k0, k1)``; ``out [K, N]`` fp32."""
    pack = 32 // bits
    mask = (1 << bits) - 1
    n_out = out.shape[1]
    for k in range(k0, k1):
        w = k // pack
        shift = bits * (k % pack)
        g = k // group_size if g_idx is None else g_idx[k]
        for n in range(n_out):
            out[k, n] = (np.float32(np.int32((qweight[w, n] >> shift) & mask)) - np.float32(zeros[g, n])) * scales[g, n]


def _dequantize_parallel(qweight, scales, zeros, g_idx, bits, group_size, out, tasks):
    k_in = out.shape[0]
    step = (k_in + tasks - 1) // tasks
    for t in numba.prange(tasks):
        k0 = min(k_in, t * step)
        _dequantize_rows(qweight, scales, zeros, g_idx, bits, group_size, out, k0, min(k_in, k0 + step))


# As in minipaged_kernels.cpu.gemv: the bodies are compiled on their own, not inside the
# prange loops, whose parallel pipeline vectorises inner loops worse.
if numba is not None:
    _jit = numba.njit(cache=True, fastmath=FASTMATH)
    _words4_fused = _jit(_words4_fused)
    _words4_fused_pair = _jit(_words4_fused_pair)
    _words8_fused = _jit(_words8_fused)
    _chunk_grouped = _jit(_chunk_grouped)
    _chunk_indexed = _jit(_chunk_indexed)
    _group_sums = _jit(_group_sums)
    _run_chunks = _jit(_run_chunks)
    _run_serial = _jit(_run_serial)
    _dequantize_rows = _jit(_dequantize_rows)
    _run_parallel = numba.njit(parallel=True, cache=True, fastmath=FASTMATH)(_run_parallel)
    _dequantize_parallel = numba.njit(parallel=True, cache=True, fastmath=FASTMATH)(_dequantize_parallel)


class PreparedWeight(NamedTuple):
    """The arrays the loops read, built once per weight by ``prepare`` (a caller that multiplies by the
    same weight every step keeps it; building it on every call costs a copy of the scales and a few
    conversions, a large share of a small layer's time at one row)."""

    qweight: np.ndarray  # uint32 [ceil(K / pack), N]: unsigned, so shifts are logical and need no mask
    scales: np.ndarray  # fp32 [num_groups, N] (a view when the scales are fp32 already, else a copy)
    zeros: np.ndarray  # int32 [num_groups, N], a view
    g_idx: np.ndarray | None  # int32 [K], a view


def prepare(pw: PackedWeight) -> PreparedWeight:
    """The numpy arrays of a CPU ``pw`` that ``matmul`` and ``dequantize_into`` read (views, but for
    non-fp32 scales, which are converted to fp32 once here). They alias ``pw``'s tensors: rebuild it when
    those are replaced."""
    return PreparedWeight(
        pw.qweight.contiguous().numpy().view(np.uint32),
        pw.scales.float().contiguous().numpy(),
        pw.zeros.contiguous().numpy(),
        None if pw.g_idx is None else pw.g_idx.contiguous().numpy(),
    )


def matmul(
    x: torch.Tensor,
    pw: PackedWeight,
    bias: torch.Tensor | None = None,
    out: torch.Tensor | None = None,
    prepared: PreparedWeight | None = None,
) -> torch.Tensor:
    """``x [rows, K] @ W (+ bias [N]) -> [rows, N]`` in ``x``'s dtype, for the operands ``applies_to`` accepts.

    ``prepared``: ``prepare(pw)``, kept by a caller that multiplies by ``pw`` again (built here if ``None``).
    ``out``: an fp32 ``[rows, N]`` to write into (fp32 ``x`` only). Raises ``ValueError`` for operands
    it refuses and ``RuntimeError`` without numba.
    """
    if numba is None:
        raise RuntimeError("the CPU quantized GEMV needs numba: pip install 'minipaged[cpu]'")
    if not applies_to(x, pw, bias):
        raise ValueError(
            f"quant_gemv.matmul takes 1-{MAX_ROWS} fp32 or bf16 CPU rows of the weight's in_features and a "
            f"bias of x's dtype and the weight's out_features or none, got x {tuple(x.shape)} {x.dtype} on "
            f"{x.device}, weight [{getattr(pw, 'in_features', '?')}, {getattr(pw, 'out_features', '?')}], "
            f"bias {None if bias is None else (tuple(bias.shape), bias.dtype)}"
        )
    shape = (x.shape[0], pw.out_features)
    if out is not None and (
        x.dtype != torch.float32
        or out.shape != shape
        or out.dtype != torch.float32
        or out.device.type != "cpu"
        or not out.is_contiguous()
    ):
        raise ValueError(
            f"out must be a contiguous fp32 CPU tensor {shape} for fp32 x, got {tuple(out.shape)} {out.dtype} "
            f"for {x.dtype} x"
        )
    return matmul_unchecked(x, pw, bias, out, prepared)


def matmul_unchecked(
    x: torch.Tensor,
    pw: PackedWeight,
    bias: torch.Tensor | None = None,
    out: torch.Tensor | None = None,
    prepared: PreparedWeight | None = None,
) -> torch.Tensor:
    """``matmul`` without its checks, for a caller that has just asked ``applies_to`` (a model's layers, on
    every forward)."""
    arrays = prepare(pw) if prepared is None else prepared
    x32 = x.detach().float().contiguous()  # a few rows: converting bf16 inputs costs nothing next to the weight
    if out is None:
        out = torch.empty(x.shape[0], pw.out_features, dtype=torch.float32)
    x_np, out_np = x32.numpy(), out.numpy()
    threads = set_launch_threads()
    rows, n = x.shape[0], pw.out_features
    args = (x_np, arrays.g_idx, arrays.qweight, arrays.scales, arrays.zeros, pw.bits, pw.group_size, out_np)
    if arrays.g_idx is None and rows <= FUSED_MAX_ROWS:
        # One contiguous stretch of columns per thread: each word row is then read as one run of
        # memory, which the hardware prefetcher streams; a few-KB piece every few KB it does not.
        per_thread = -(-n // threads)
        pieces = -(-per_thread * rows // WIDE_PART_FLOATS)  # per thread, to keep the partial sums in L1
        width, tasks = -(-per_thread // (pieces * 16)) * 16, threads
    else:
        width, tasks = CHUNK, min(-(-n // CHUNK), threads * _CHUNKS_PER_THREAD)
    if threads == 1:
        _run_serial(*args, width)
    else:
        _run_parallel(*args, width, tasks)
    if bias is not None:
        out += bias
    return out if x.dtype == torch.float32 else out.to(x.dtype)


def dequantize_into(pw: PackedWeight, out: torch.Tensor, prepared: PreparedWeight | None = None) -> torch.Tensor:
    """Write the dense weight ``W [K, N]`` of ``pw`` into the reusable fp32 CPU buffer ``out``; returns ``out``.
    ``prepared`` as for ``matmul``."""
    shape = (pw.in_features, pw.out_features)
    if out.shape != shape or out.dtype != torch.float32 or out.device.type != "cpu" or not out.is_contiguous():
        raise ValueError(f"out must be a contiguous fp32 CPU tensor {shape}, got {tuple(out.shape)} {out.dtype}")
    if numba is None:
        from minipaged_kernels.quant_formats import dequantize

        return out.copy_(dequantize(pw, torch.float32))
    arrays = prepare(pw) if prepared is None else prepared
    threads = set_launch_threads()
    args = (arrays.qweight, arrays.scales, arrays.zeros, arrays.g_idx, pw.bits, pw.group_size, out.numpy())
    if threads == 1:
        _dequantize_rows(*args, 0, pw.in_features)
    else:
        _dequantize_parallel(*args, threads * _CHUNKS_PER_THREAD)
    return out
