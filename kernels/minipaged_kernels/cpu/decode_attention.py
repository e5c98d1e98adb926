"""Paged decode attention on CPU: the Triton decode kernel's algorithm, JIT-compiled by numba.

Same algorithm as ``minipaged_kernels.decode_attention._decode_kernel`` so the two read side by
side: each sequence's query heads walk its tokens one cache block at a time through
the block table, every K and V row is read once for all query heads of its GQA group,
and an fp32 online softmax (running max, running sum, rescaled accumulator) merges the
tiles. The differences are the CPU's:

- Triton's grid is (sequence, kv head); here a program (``_decode_program``) is one
  sequence, launched for every sequence by a ``numba.prange`` loop spread over the
  CPU's threads (or a plain loop, for a lone sequence), and its kv heads are an
  inner loop. A cache block's rows hold all kv heads side by side, so one program per
  sequence streams each block front to back; one per (sequence, kv head) would read it
  in three strided passes, which is slower at SmolLM2's shapes (batch 36-64, context
  220-500). ``python -m minipaged.benchmarks.step --decode-kernel fused gather --rounds 3``
  times this kernel against the gather + SDPA path.
- a tile is one cache block (``block_size`` tokens) instead of ``BLOCK_N`` tokens;
- the dot products are loops over ``head_dim`` that LLVM vectorises (``fastmath``
  reassociation only), not ``tl.dot``; the scores' ``exp`` is a polynomial that
  vectorises too (``minipaged_kernels.cpu._jit.exp_shifted``), not ``tl.exp2``;
- no split-K: a CPU has few cores and a batch already has more sequences than that.

Compared with the pure-PyTorch path (gather every block into a contiguous buffer,
then SDPA), nothing is copied: on CPU that gather is a DRAM-speed copy of all of K and
V before attention even reads them.

numba is optional (``pip install minipaged[cpu]``): ``available()`` says whether it
imports. Compiled code is cached on disk (``cache=True``), so only the first call in a
fresh checkout pays the compile (a few seconds per cache dtype). fp32, fp16 and bf16
caches are supported; fp16/bf16 rows are widened to fp32 as they are read (bf16 by
its bit pattern, since numpy has no bf16). So are the quantized caches of
``minipaged.attention.kv_quant``, as the Triton kernel takes them: int8 or fp8 e4m3 rows with
``k_scale``/``v_scale`` per (block, row, kv head) or one per layer. The 1-byte rows are
widened as they are read (fp8 through a 256-entry table) and the scale is applied to
the row's score and to its probability, not to every element: ``q . (s k) = s (q . k)``.
"""

from __future__ import annotations

import math

import numpy as np
import torch

from minipaged_kernels._checks import check_kernel_out, default_scale
from minipaged_kernels.cpu._jit import FASTMATH as _FASTMATH
from minipaged_kernels.cpu._jit import exp_shifted, numba, set_launch_threads
from minipaged_kernels.decode_attention import check_decode_args


def available() -> bool:
    """Whether numba is importable, i.e. ``paged_decode_attention`` can run."""
    return numba is not None


def _fp16_bits_to_fp32_bits(h):
    """The fp32 bit pattern of the IEEE half whose bits are ``h`` (exact, subnormals and inf/nan included)."""
    sign = (h >> np.uint32(15)) << np.uint32(31)
    exponent = (h >> np.uint32(10)) & np.uint32(0x1F)
    mantissa = h & np.uint32(0x3FF)
    if exponent == 0x1F:  # inf / nan
        return sign | np.uint32(0x7F800000) | (mantissa << np.uint32(13))
    if exponent != 0:  # normal: rebias 15 -> 127
        return sign | ((exponent + np.uint32(112)) << np.uint32(23)) | (mantissa << np.uint32(13))
    if mantissa == 0:
        return sign
    # subnormal half: shift the mantissa up to an implicit leading one
    shift = np.uint32(0)
    while (mantissa & np.uint32(0x400)) == 0:
        mantissa <<= np.uint32(1)
        shift += np.uint32(1)
    return sign | ((np.uint32(113) - shift) << np.uint32(23)) | ((mantissa & np.uint32(0x3FF)) << np.uint32(13))


if numba is not None:
    _fp16_bits_to_fp32_bits = numba.njit(cache=True)(_fp16_bits_to_fp32_bits)

# fp8 e4m3 byte -> fp32, every one of the 256 patterns (numba freezes a global array as a constant).
_FP8_E4M3_TABLE = (
    torch.arange(256, dtype=torch.uint8).view(torch.float8_e4m3fn).float().numpy()
    if hasattr(torch, "float8_e4m3fn")
    else np.zeros(256, np.float32)
)


def _row_scale(scale, block, row, kv_head):
    """The dequantization scale of ``cache[block, row, kv_head]``: 1 for a float cache (``None``)."""
    raise NotImplementedError("only called from compiled code")


if numba is not None:

    @numba.extending.overload(_row_scale, inline="always")
    def _row_scale_typed(scale, block, row, kv_head):
        # Chosen at compile time, like _load_row: no scale, one per layer, or one per row.
        if isinstance(scale, numba.types.NoneType):
            return lambda scale, block, row, kv_head: np.float32(1.0)
        if scale.ndim == 1:
            return lambda scale, block, row, kv_head: scale[0]
        return lambda scale, block, row, kv_head: scale[block, row, kv_head]


def _load_row(cache, block, row, kv_head, bits, row_f32):
    """``cache[block, row, kv_head, :]`` as fp32: the row itself for an fp32 cache, else widened
    into ``row_f32`` (``bits`` is the same buffer as uint32), which is returned."""
    raise NotImplementedError("only called from compiled code")


if numba is not None:

    @numba.extending.overload(_load_row, inline="always", fastmath=_FASTMATH)
    def _load_row_typed(cache, block, row, kv_head, bits, row_f32):
        # Chosen per cache dtype at compile time: bf16 caches arrive as their uint16 bits,
        # which are the top half of the same fp32 number.
        if cache.dtype == numba.types.uint16:

            def load_bf16(cache, block, row, kv_head, bits, row_f32):
                src = cache[block, row, kv_head]
                for d in range(bits.shape[0]):
                    bits[d] = np.uint32(src[d]) << np.uint32(16)
                return row_f32

            return load_bf16
        if cache.dtype == numba.types.int16:  # fp16 bits (numba has no float16 on CPU)

            def load_fp16(cache, block, row, kv_head, bits, row_f32):
                src = cache[block, row, kv_head]
                for d in range(bits.shape[0]):
                    bits[d] = _fp16_bits_to_fp32_bits(np.uint32(np.uint16(src[d])))
                return row_f32

            return load_fp16
        if cache.dtype == numba.types.uint8:  # fp8 e4m3 bits

            def load_fp8(cache, block, row, kv_head, bits, row_f32):
                src = cache[block, row, kv_head]
                for d in range(row_f32.shape[0]):
                    row_f32[d] = _FP8_E4M3_TABLE[src[d]]
                return row_f32

            return load_fp8
        if cache.dtype == numba.types.float32:  # read in place, no copy
            return lambda cache, block, row, kv_head, bits, row_f32: cache[block, row, kv_head]

        def load_int8(cache, block, row, kv_head, bits, row_f32):
            src = cache[block, row, kv_head]
            for d in range(row_f32.shape[0]):
                row_f32[d] = np.float32(src[d])
            return row_f32

        return load_int8


def _decode_program(q, k_cache, v_cache, k_scale, v_scale, block_tables, context_lens, scale, out, seq):
    """One program: ``out[seq, h] = softmax(scale * q[seq, h] . K[seq]) V[seq]`` for all heads ``h``.

    ``q``/``out`` fp32 ``[num_seqs, num_heads, head_dim]``; caches ``[num_blocks,
    block_size, num_kv_heads, head_dim]`` (fp32, bf16/fp16 as their 16-bit patterns,
    int8, or fp8 as uint8 bits); ``k_scale``/``v_scale`` ``None``, ``[1]`` or
    ``[num_blocks, block_size, num_kv_heads]`` fp32;
    ``block_tables`` ``[num_seqs, max_blocks]``; ``context_lens`` ``[num_seqs]``, each >= 1.
    """
    num_heads, head_dim = q.shape[1], q.shape[2]
    block_size, num_kv_heads = k_cache.shape[1], k_cache.shape[2]
    group = num_heads // num_kv_heads
    qs = np.empty((num_heads, head_dim), np.float32)  # scale folded into q once
    for h in range(num_heads):
        for d in range(head_dim):
            qs[h, d] = q[seq, h, d] * scale
    m_i = np.full(num_heads, -np.inf, np.float32)
    l_i = np.zeros(num_heads, np.float32)
    acc = np.zeros((num_heads, head_dim), np.float32)
    s = np.empty((num_heads, block_size), np.float32)  # one tile's scores, then probabilities
    bits = np.empty(head_dim, np.uint32)
    row = bits.view(np.float32)  # one K or V row widened to fp32
    pow2 = np.empty(block_size, np.uint32)  # exp_shifted's scratch
    end = context_lens[seq]
    for n0 in range(0, end, block_size):  # one tile = one cache block
        block = block_tables[seq, n0 // block_size]
        n = min(block_size, end - n0)
        for t in range(n):  # s = q . K^T, each K row read once for its GQA group
            for kv_head in range(num_kv_heads):
                k_row = _load_row(k_cache, block, t, kv_head, bits, row)
                row_scale = _row_scale(k_scale, block, t, kv_head)
                for h in range(kv_head * group, (kv_head + 1) * group):
                    dot = np.float32(0.0)
                    for d in range(head_dim):
                        dot += qs[h, d] * k_row[d]
                    s[h, t] = dot * row_scale
        # Online softmax: every tile holds at least one real token, so m_new is finite.
        for h in range(num_heads):
            m_new = m_i[h]
            for t in range(n):
                m_new = max(m_new, s[h, t])
            alpha = math.exp(m_i[h] - m_new)
            l_i[h] = l_i[h] * alpha + exp_shifted(s[h], n, m_new, pow2)
            for d in range(head_dim):
                acc[h, d] *= alpha
            m_i[h] = m_new
        for t in range(n):  # acc += p V, each V row read once
            for kv_head in range(num_kv_heads):
                v_row = _load_row(v_cache, block, t, kv_head, bits, row)
                row_scale = _row_scale(v_scale, block, t, kv_head)
                for h in range(kv_head * group, (kv_head + 1) * group):
                    p = s[h, t] * row_scale
                    for d in range(head_dim):
                        acc[h, d] += p * v_row[d]
    for h in range(num_heads):
        inv = np.float32(1.0) / l_i[h]
        for d in range(head_dim):
            out[seq, h, d] = acc[h, d] * inv


def _decode_serial(q, k_cache, v_cache, k_scale, v_scale, block_tables, context_lens, scale, out):
    """Every sequence's program in turn, on the calling thread (arguments as ``_decode_program``'s)."""
    for seq in range(q.shape[0]):
        _decode_program(q, k_cache, v_cache, k_scale, v_scale, block_tables, context_lens, scale, out, seq)


def _decode_parallel(q, k_cache, v_cache, k_scale, v_scale, block_tables, context_lens, scale, out):
    """Every sequence's program, spread over numba's threads (Triton: the grid's sequence axis)."""
    for seq in numba.prange(q.shape[0]):
        _decode_program(q, k_cache, v_cache, k_scale, v_scale, block_tables, context_lens, scale, out, seq)


# The program is compiled on its own and called from both launchers, not written inside
# the prange loop: numba compiles a prange body through its parallel pipeline, which
# vectorises these loops worse (more time per thread), and starting numba's thread
# pool costs more than one sequence's attention, so a lone sequence or one thread runs
# the serial launcher.
if numba is not None:
    _decode_program = numba.njit(cache=True, fastmath=_FASTMATH)(_decode_program)
    _decode_serial = numba.njit(cache=True, fastmath=_FASTMATH)(_decode_serial)
    _decode_parallel = numba.njit(parallel=True, cache=True, fastmath=_FASTMATH)(_decode_parallel)


def _as_numpy(cache: torch.Tensor) -> np.ndarray:
    """A zero-copy numpy view of a CPU cache: fp32 and int8 as they are, bf16 as uint16 bits,
    fp16 as int16 bits, fp8 as uint8 bits (numpy has no bf16 or fp8 and numba no fp16;
    ``_load_row`` tells them apart by that integer type)."""
    if cache.dtype == getattr(torch, "float8_e4m3fn", None):
        return cache.view(torch.uint8).numpy()
    if cache.dtype == torch.bfloat16:
        return cache.view(torch.int16).numpy().view(np.uint16)
    if cache.dtype == torch.float16:
        return cache.view(torch.int16).numpy()
    return cache.numpy()


def paged_decode_attention(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    block_tables: torch.Tensor,
    context_lens: torch.Tensor,
    scale: float | None = None,
    out: torch.Tensor | None = None,
    *,
    k_scale: torch.Tensor | None = None,
    v_scale: torch.Tensor | None = None,
) -> torch.Tensor:
    """Attention of one query token per sequence over its paged KV cache, on CPU.

    Same contract as ``minipaged_kernels.paged_decode_attention`` (and ``minipaged_kernels.reference``):
    ``q`` ``[num_seqs, num_heads, head_dim]``; caches ``[num_blocks, block_size,
    num_kv_heads, head_dim]`` of ``q``'s dtype (fp32, fp16 or bf16), or int8 / fp8 e4m3
    with fp32 ``k_scale``/``v_scale`` (``[num_blocks, block_size, num_kv_heads]`` or
    ``[1]``; ``minipaged.attention.kv_quant``'s scheme) for a ``q`` of any of those; ``block_tables``
    int32/int64 ``[num_seqs, max_blocks_per_seq]``; ``context_lens`` ``[num_seqs]``,
    each >= 1. Returns ``out`` ``[num_seqs, num_heads, head_dim]``. Raises ``ValueError``
    on bad arguments and ``RuntimeError`` without numba.
    """
    check_decode_args(q, k_cache, v_cache, block_tables, context_lens, k_scale=k_scale, v_scale=v_scale)
    out = check_kernel_out(out, q)
    if q.device.type != "cpu":
        raise ValueError(f"the CPU decode kernel needs CPU tensors, got q on {q.device}")
    scale = default_scale(q.shape[2], scale)
    # int32 always, so int64 inputs do not compile a second specialisation of the kernel.
    tables = block_tables.to(torch.int32).contiguous().numpy()
    return decode_unchecked(
        q, k_cache, v_cache, tables, context_lens.to(torch.int32).numpy(), scale, out, k_scale, v_scale
    )


def decode_unchecked(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    block_tables: np.ndarray,
    context_lens: np.ndarray,
    scale: float,
    out: torch.Tensor,
    k_scale: torch.Tensor | None = None,
    v_scale: torch.Tensor | None = None,
) -> torch.Tensor:
    """``paged_decode_attention`` without argument checks, for a caller that validated once
    per step (the torch attention backend): ``block_tables``/``context_lens`` as int32 numpy
    arrays (``[num_seqs, max_blocks]``, ``[num_seqs]``), every block id valid (numba does not
    bounds-check), ``out`` of ``q``'s shape and dtype, scales fp32 and contiguous."""
    if numba is None:
        raise RuntimeError("the CPU decode kernel needs numba: pip install 'minipaged[cpu]'")
    if q.shape[0] == 0:
        return out
    kernel = _decode_serial if q.shape[0] == 1 or set_launch_threads() == 1 else _decode_parallel
    q32 = q.float().contiguous()
    target = out if out.dtype == torch.float32 and out.is_contiguous() else torch.empty(q.shape, dtype=torch.float32)
    k_scale_np = None if k_scale is None else k_scale.float().contiguous().numpy()
    v_scale_np = None if v_scale is None else v_scale.float().contiguous().numpy()
    kernel(
        q32.numpy(),
        _as_numpy(k_cache),
        _as_numpy(v_cache),
        k_scale_np,
        v_scale_np,
        block_tables,
        context_lens,
        np.float32(scale),
        target.numpy(),
    )
    if target is not out:
        out.copy_(target)
    return out
