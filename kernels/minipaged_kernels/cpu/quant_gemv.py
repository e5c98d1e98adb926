"""Weight-only quantized few-row linear on CPU, ``y = x @ W``, straight from a packed weight, JIT-compiled by numba.

A decode step with a handful of sequences is bound by streaming the weights; a 4-bit
packed weight is an eighth of fp32's bytes, so the loop reads the int32 words once per
call (not once per row) and dequantizes in registers. Columns are cut into chunks of
``CHUNK`` (spread over numba's threads); for each chunk the packed rows are walked in K
order, each word's ``32 // bits`` fields are widened to fp32 into a small row buffer, and
every input row accumulates its dot with that buffer (vectorised along N).

Without ``g_idx`` the rows of a packed word share a group, so the zero point and scale
come out of the inner loop: per group ``g`` and column ``n``,
``y[m, n] += s[g, n] * (sum_k x[m, k] q[k, n] - z[g, n] sum_k x[m, k])``, the inner loop
being a multiply-add of small integers. With a ``g_idx`` (desc_act) each row looks up its
own group, and the loop dequantizes each value before the multiply-add (slower; a loader
can reorder K by group once to get the fast path back).

For more rows, ``dequantize_into`` writes the dense fp32 weight ``[K, N]`` into a
reusable buffer and the caller runs its fastest GEMM on it. Compare the two, and dense
fp32 / bf16, with ``python -m minipaged_kernels.bench quant-gemv``.

The reference is ``x.double() @ quant_formats.dequantize(pw, torch.float64)``
(``tests/kernels/test_cpu_quant_gemv.py``); sums are fp32 with SIMD partial sums
(``fastmath`` reassociation).
"""

from __future__ import annotations

import numpy as np
import torch

from minipaged_kernels.cpu._jit import FASTMATH, numba, set_launch_threads
from minipaged_kernels.quant_formats import PackedWeight

# Up to this many rows the packed loop is the intended path (the Triton twin's GEMV_MAX_ROWS).
MAX_ROWS = 16
# Output columns per chunk: the [rows, CHUNK] fp32 partial sums and the row buffer stay in L1.
CHUNK = 128
# Up to this many rows the 4-bit loop unpacks each word once per row, in registers; above, once per
# call into a row buffer that every row then reads.
FUSED_MAX_ROWS = 4
# Chunks per thread: a few per thread evens out a thread that starts late.
_CHUNKS_PER_THREAD = 4


def available() -> bool:
    """Whether numba is importable, i.e. ``matmul`` can run."""
    return numba is not None


def applies_to(x: torch.Tensor, pw: PackedWeight, bias: torch.Tensor | None = None) -> bool:
    """Whether ``matmul`` takes these operands: numba present, 1..``MAX_ROWS`` rows of fp32 CPU
    ``x [rows, K]`` matching ``pw``, a CPU ``pw``, ``bias`` ``None`` or fp32 CPU ``[N]``, no autograd."""
    return (
        numba is not None
        and isinstance(pw, PackedWeight)
        and x.dim() == 2
        and 1 <= x.shape[0] <= MAX_ROWS
        and x.shape[1] == pw.in_features
        and x.dtype == torch.float32
        and x.device.type == "cpu"
        and pw.qweight.device.type == "cpu"
        and (
            bias is None
            or (bias.dtype == torch.float32 and bias.device.type == "cpu" and bias.shape == (pw.out_features,))
        )
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
        if bits == 4 and rows <= FUSED_MAX_ROWS and k_start % 8 == 0 and k_end % 8 == 0:
            _words4_fused(x, qweight, k_start // 8, k_end // 8, n0, n1, part)
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
                out[m, n] += scales[g, n] * (part[m, i] - zeros[g, n] * xs)


def _words4_fused(x, qweight, w0, w1, n0, n1, part):
    """``part[m, :] += sum_k x[m, k] q[k, n0:n1]`` over the 4-bit words ``[w0, w1)`` (rows ``8 w0 .. 8 w1``):
    one pass over each word row per input row, its 8 fields widened and multiplied in registers."""
    width = n1 - n0
    m4 = np.uint32(15)
    for m in range(x.shape[0]):
        acc = part[m]
        for w in range(w0, w1):
            words = qweight[w, n0:n1]
            k = 8 * w
            x0, x1, x2, x3 = x[m, k], x[m, k + 1], x[m, k + 2], x[m, k + 3]
            x4, x5, x6, x7 = x[m, k + 4], x[m, k + 5], x[m, k + 6], x[m, k + 7]
            for i in range(width):
                v = words[i]
                acc[i] += (
                    x0 * np.float32(np.int32(v & m4))
                    + x1 * np.float32(np.int32((v >> np.uint32(4)) & m4))
                    + x2 * np.float32(np.int32((v >> np.uint32(8)) & m4))
                    + x3 * np.float32(np.int32((v >> np.uint32(12)) & m4))
                    + x4 * np.float32(np.int32((v >> np.uint32(16)) & m4))
                    + x5 * np.float32(np.int32((v >> np.uint32(20)) & m4))
                    + x6 * np.float32(np.int32((v >> np.uint32(24)) & m4))
                    + x7 * np.float32(np.int32(v >> np.uint32(28)))
                )


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
            row[i] = (np.float32(np.int32((qweight[w, n] >> shift) & mask)) - zeros[g, n]) * scales[g, n]
        for m in range(rows):
            xv = x[m, k]
            for i in range(width):
                part[m, i] += xv * row[i]
    for m in range(rows):
        for i in range(width):
            out[m, n0 + i] = part[m, i]


def _run_chunks(x, xsum, g_idx, qweight, scales, zeros, bits, group_size, out, c0, c1):
    """Chunks ``[c0, c1)`` of ``CHUNK`` columns, serially, with their own scratch."""
    n_out = out.shape[1]
    part = np.empty((x.shape[0], CHUNK), dtype=np.float32)
    row = np.empty(CHUNK, dtype=np.float32)
    for c in range(c0, c1):
        n0 = c * CHUNK
        n1 = min(n_out, n0 + CHUNK)
        if g_idx is None:
            _chunk_grouped(x, xsum, qweight, scales, zeros, bits, group_size, out, n0, n1, part, row)
        else:
            _chunk_indexed(x, g_idx, qweight, scales, zeros, bits, out, n0, n1, part, row)


def _run_parallel(x, xsum, g_idx, qweight, scales, zeros, bits, group_size, out, tasks):
    """All column chunks, cut into ``tasks`` ranges spread over numba's threads."""
    chunks = (out.shape[1] + CHUNK - 1) // CHUNK
    step = (chunks + tasks - 1) // tasks
    for t in numba.prange(tasks):
        c0 = min(chunks, t * step)
        c1 = min(chunks, c0 + step)
        _run_chunks(x, xsum, g_idx, qweight, scales, zeros, bits, group_size, out, c0, c1)


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
            out[k, n] = (np.float32(np.int32((qweight[w, n] >> shift) & mask)) - zeros[g, n]) * scales[g, n]


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
    _chunk_grouped = _jit(_chunk_grouped)
    _chunk_indexed = _jit(_chunk_indexed)
    _run_chunks = _jit(_run_chunks)
    _dequantize_rows = _jit(_dequantize_rows)
    _run_parallel = numba.njit(parallel=True, cache=True, fastmath=FASTMATH)(_run_parallel)
    _dequantize_parallel = numba.njit(parallel=True, cache=True, fastmath=FASTMATH)(_dequantize_parallel)


def _weight_arrays(pw: PackedWeight):
    """numpy views of the packed words and g_idx, fp32 copies of scales and zeros (both ``[num_groups, N]``)."""
    qweight = pw.qweight.contiguous().numpy().view(np.uint32)  # unsigned: logical shifts, no sign to mask
    scales = pw.scales.float().contiguous().numpy()
    zeros = pw.zeros.float().contiguous().numpy()
    g_idx = None if pw.g_idx is None else pw.g_idx.contiguous().numpy()
    return qweight, scales, zeros, g_idx


def matmul(
    x: torch.Tensor, pw: PackedWeight, bias: torch.Tensor | None = None, out: torch.Tensor | None = None
) -> torch.Tensor:
    """``x [rows, K] @ W (+ bias [N]) -> out [rows, N]`` fp32, for the operands ``applies_to`` accepts.

    Raises ``ValueError`` for operands it refuses and ``RuntimeError`` without numba.
    """
    if numba is None:
        raise RuntimeError("the CPU quantized GEMV needs numba: pip install 'minipaged[cpu]'")
    if not applies_to(x, pw, bias):
        raise ValueError(
            f"quant_gemv.matmul takes 1-{MAX_ROWS} fp32 CPU rows of the weight's in_features and an fp32 CPU bias "
            f"of its out_features or none, got x {tuple(x.shape)} {x.dtype} on {x.device}, weight "
            f"[{getattr(pw, 'in_features', '?')}, {getattr(pw, 'out_features', '?')}], "
            f"bias {None if bias is None else tuple(bias.shape)}"
        )
    shape = (x.shape[0], pw.out_features)
    if out is None:
        out = torch.empty(shape, dtype=torch.float32)
    elif out.shape != shape or out.dtype != torch.float32 or out.device.type != "cpu" or not out.is_contiguous():
        raise ValueError(f"out must be a contiguous fp32 CPU tensor {shape}, got {tuple(out.shape)} {out.dtype}")
    x_np = x.detach().contiguous().numpy()
    qweight, scales, zeros, g_idx = _weight_arrays(pw)
    padded = torch.nn.functional.pad(x.detach(), (0, pw.num_groups * pw.group_size - pw.in_features))
    xsum = padded.view(x.shape[0], pw.num_groups, pw.group_size).sum(-1).numpy()  # unused with g_idx
    out_np = out.numpy()
    threads = set_launch_threads()
    chunks = -(-pw.out_features // CHUNK)
    if threads == 1:
        _run_chunks(x_np, xsum, g_idx, qweight, scales, zeros, pw.bits, pw.group_size, out_np, 0, chunks)
    else:
        tasks = min(chunks, threads * _CHUNKS_PER_THREAD)
        _run_parallel(x_np, xsum, g_idx, qweight, scales, zeros, pw.bits, pw.group_size, out_np, tasks)
    if bias is not None:
        out += bias
    return out


def dequantize_into(pw: PackedWeight, out: torch.Tensor) -> torch.Tensor:
    """Write the dense weight ``W [K, N]`` of ``pw`` into the reusable fp32 CPU buffer ``out``; returns ``out``."""
    shape = (pw.in_features, pw.out_features)
    if out.shape != shape or out.dtype != torch.float32 or out.device.type != "cpu" or not out.is_contiguous():
        raise ValueError(f"out must be a contiguous fp32 CPU tensor {shape}, got {tuple(out.shape)} {out.dtype}")
    qweight, scales, zeros, g_idx = _weight_arrays(pw)
    if numba is None:
        from minipaged_kernels.quant_formats import dequantize

        return out.copy_(dequantize(pw, torch.float32))
    threads = set_launch_threads()
    args = (qweight, scales, zeros, g_idx, pw.bits, pw.group_size, out.numpy())
    if threads == 1:
        _dequantize_rows(*args, 0, pw.in_features)
    else:
        _dequantize_parallel(*args, threads * _CHUNKS_PER_THREAD)
    return out
