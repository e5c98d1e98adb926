"""Paged decode attention: one new query token per sequence against its paged KV cache.

A program owns one (sequence, kv head) pair and every query head of that kv head's
GQA group, so each K/V row is read from memory once per group, not once per query
head. It walks the sequence's tokens ``BLOCK_N`` at a time, finding each token's
physical block through the block table (``block_tables[seq, token // block_size]``),
and keeps an online softmax (running max, running sum, rescaled accumulator) in fp32.

Long contexts with few sequences leave most of the GPU idle, so a split-K variant
adds a grid axis over context partitions: stage 1 writes each partition's normalised
partial output and its log-sum-exp, stage 2 merges the partitions by log-sum-exp.
``choose_num_splits`` holds the rule that picks between them.

Tiles: the query heads of a group are padded to ``GROUP_TILE`` = 16 rows (``tl.dot``
wants at least 16; a group above 16 uses several head tiles), head_dim to the next
power of two (at least 64), and every ragged edge (group, head_dim, last block,
partition end) is masked.

A quantized cache (int8 or fp8 e4m3 with fp32 scales, ``minipaged_kernels._kv_quant``) is read as
1-byte rows plus one scale per row (a per-layer scale is a stride-0 view) and
dequantized in registers into ``q``'s dtype before each dot: the kernel then moves a
quarter (fp32) or half (fp16/bf16) of the cache bytes, and accumulates in fp32 as the unquantized kernel does.
"""

from __future__ import annotations

import math
import os

import torch
import triton
import triton.language as tl

from minipaged_kernels import _kv_quant
from minipaged_kernels._aot import AotSpec, in_ci_subset
from minipaged_kernels._checks import (
    FLOAT_DTYPES,
    check_block_tables,
    check_heads,
    check_kernel_out,
    check_kv_cache,
    check_same_device,
    check_tensor,
    default_scale,
)

GROUP_TILE = 16
BLOCK_N = 32
MAX_HEAD_DIM = 256
HEAD_DIM_TILES = (64, 128, 256)
NUM_WARPS = 4
NUM_STAGES = 2
MERGE_NUM_WARPS = 1
# Split-K rule constants (see choose_num_splits).
SPLIT_MIN_TOKENS = 512
WAVES = 2
# SM count assumed when no CUDA device is present (the interpreter): an A100's.
NOMINAL_NUM_SMS = 108
_LOG2E = 1.4426950408889634

# The report's bytes-moved shape: 64 sequences x 4096 tokens of context on a
# Llama-7B-like layer (32 query and 32 kv heads x 128), fp16.
REFERENCE_SHAPE = {
    "num_seqs": 64,
    "context_len": 4096,
    "num_heads": 32,
    "num_kv_heads": 32,
    "head_dim": 128,
    "dtype_bytes": 2,
}


@triton.jit
def _decode_kernel(
    q_ptr,
    k_cache_ptr,
    v_cache_ptr,
    k_scale_ptr,
    v_scale_ptr,
    block_tables_ptr,
    context_lens_ptr,
    out_ptr,
    lse_ptr,
    qk_scale,
    group_size,
    head_dim,
    block_size,
    tokens_per_split,
    stride_qs,
    stride_qh,
    stride_kb,
    stride_ko,
    stride_kh,
    stride_vb,
    stride_vo,
    stride_vh,
    stride_sb,
    stride_so,
    stride_sh,
    stride_bts,
    stride_os,
    stride_oh,
    stride_op,
    stride_ls,
    stride_lh,
    GROUP_TILE: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr,
    SPLIT: tl.constexpr,
    QUANT: tl.constexpr = 0,
):
    """Grid ``(num_seqs, num_kv_heads * head_tiles, num_splits)``.

    ``SPLIT=False``: ``out`` is the final ``[num_seqs, num_heads, head_dim]`` output.
    ``SPLIT=True``: ``out`` is the fp32 partial ``[num_seqs, num_heads, num_splits, head_dim]``
    (normalised within the partition) and ``lse`` the fp32 ``[num_seqs, num_heads, num_splits]``
    log2-sum-exp of the scaled scores; an empty partition writes zeros and ``-inf``.
    ``QUANT`` (``_kv_quant`` code): 0 for a float cache, else the scale pointers and
    strides address one fp32 scale per cached row.
    """
    seq = tl.program_id(0).to(tl.int64)
    head_tiles = tl.cdiv(group_size, GROUP_TILE)
    kv_head = tl.program_id(1) // head_tiles
    offs_g = (tl.program_id(1) % head_tiles) * GROUP_TILE + tl.arange(0, GROUP_TILE)
    mask_g = offs_g < group_size
    heads = kv_head * group_size + offs_g
    offs_d = tl.arange(0, BLOCK_D)
    mask_d = offs_d < head_dim
    mask_gd = mask_g[:, None] & mask_d[None, :]

    # Padded group rows load q = 0: their scores stay finite and are never stored.
    q = tl.load(q_ptr + seq * stride_qs + heads[:, None] * stride_qh + offs_d[None, :], mask=mask_gd, other=0.0)

    split = tl.program_id(2)
    start = split * tokens_per_split
    end = tl.minimum(tl.load(context_lens_ptr + seq), start + tokens_per_split)
    table = block_tables_ptr + seq * stride_bts
    k_base = k_cache_ptr + kv_head * stride_kh
    v_base = v_cache_ptr + kv_head * stride_vh

    m_i = tl.full([GROUP_TILE], float("-inf"), tl.float32)
    l_i = tl.zeros([GROUP_TILE], tl.float32)
    acc = tl.zeros([GROUP_TILE, BLOCK_D], tl.float32)
    for n0 in range(start, end, BLOCK_N):
        offs_n = n0 + tl.arange(0, BLOCK_N)
        mask_n = offs_n < end
        blocks = tl.load(table + offs_n // block_size, mask=mask_n, other=0).to(tl.int64)
        rows = offs_n % block_size
        mask_nd = mask_n[:, None] & mask_d[None, :]
        k = tl.load(
            k_base + blocks[:, None] * stride_kb + rows[:, None] * stride_ko + offs_d[None, :],
            mask=mask_nd,
            other=0.0,
        )
        if QUANT != 0:
            scale_offs = blocks * stride_sb + rows * stride_so + kv_head * stride_sh
            k_scale = tl.load(k_scale_ptr + scale_offs, mask=mask_n, other=0.0)
            k = _kv_quant.dequantize(k, k_scale[:, None], QUANT).to(q.dtype)
        # For fp32 inputs, tf32x3 (three TF32 MMAs) keeps about fp32 accuracy on tensor
        # cores instead of a fully unrolled FMA loop; fp16/bf16 dots ignore it.
        s = tl.dot(q, tl.trans(k), input_precision="tf32x3") * qk_scale
        s = tl.where(mask_n[None, :], s, float("-inf"))
        # Every tile holds at least one real token, so m_new is finite.
        m_new = tl.maximum(m_i, tl.max(s, 1))
        alpha = tl.exp2(m_i - m_new)
        p = tl.exp2(s - m_new[:, None])
        l_i = l_i * alpha + tl.sum(p, 1)
        v = tl.load(
            v_base + blocks[:, None] * stride_vb + rows[:, None] * stride_vo + offs_d[None, :],
            mask=mask_nd,
            other=0.0,
        )
        if QUANT != 0:
            v_scale = tl.load(v_scale_ptr + scale_offs, mask=mask_n, other=0.0)
            v = _kv_quant.dequantize(v, v_scale[:, None], QUANT).to(q.dtype)
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision="tf32x3")
        m_i = m_new

    out_ptrs = out_ptr + seq * stride_os + heads[:, None] * stride_oh + split * stride_op + offs_d[None, :]
    if SPLIT:
        nonempty = l_i > 0
        l_safe = tl.where(nonempty, l_i, 1.0)
        tl.store(out_ptrs, acc / l_safe[:, None], mask=mask_gd)
        lse = tl.where(nonempty, m_i + tl.log2(l_safe), float("-inf"))
        tl.store(lse_ptr + seq * stride_ls + heads * stride_lh + split, lse, mask=mask_g)
    else:
        tl.store(out_ptrs, (acc / l_i[:, None]).to(out_ptr.dtype.element_ty), mask=mask_gd)


@triton.jit
def _merge_kernel(
    part_ptr,
    lse_ptr,
    out_ptr,
    num_splits,
    head_dim,
    stride_ps,
    stride_ph,
    stride_pp,
    stride_ls,
    stride_lh,
    stride_os,
    stride_oh,
    BLOCK_D: tl.constexpr,
):
    """Grid ``(num_seqs, num_heads)``: merge a head's partitions by log-sum-exp.

    Partition 0 always holds token 0, so it seeds a finite running max and empty
    partitions (``lse = -inf``) get weight 0.
    """
    seq = tl.program_id(0).to(tl.int64)
    head = tl.program_id(1)
    offs_d = tl.arange(0, BLOCK_D)
    mask_d = offs_d < head_dim
    part_base = part_ptr + seq * stride_ps + head * stride_ph
    lse_base = lse_ptr + seq * stride_ls + head * stride_lh

    m = tl.load(lse_base)
    l_sum = tl.full([], 1.0, tl.float32)
    acc = tl.load(part_base + offs_d, mask=mask_d, other=0.0)
    for p in range(1, num_splits):
        lse = tl.load(lse_base + p)
        part = tl.load(part_base + p * stride_pp + offs_d, mask=mask_d, other=0.0)
        m_new = tl.maximum(m, lse)
        alpha = tl.exp2(m - m_new)
        w = tl.exp2(lse - m_new)
        l_sum = l_sum * alpha + w
        acc = acc * alpha + w * part
        m = m_new
    out = acc / l_sum
    tl.store(out_ptr + seq * stride_os + head * stride_oh + offs_d, out.to(out_ptr.dtype.element_ty), mask=mask_d)


def head_dim_tile(head_dim: int) -> int:
    """The power-of-two head_dim tile (at least 64) the kernels use for ``head_dim``."""
    return max(64, triton.next_power_of_2(head_dim))


def choose_num_splits(num_programs: int, max_context_len: int, num_sms: int) -> int:
    """Number of context partitions for the split-K path (1 = single pass).

    Rule: split only when the single-pass grid (``num_programs`` = sequences x kv
    heads x head tiles) is smaller than the GPU (``num_sms``). Then split so the grid
    reaches about ``WAVES`` programs per SM, but never give a partition fewer than
    ``SPLIT_MIN_TOKENS`` tokens of the longest context: short contexts gain nothing
    from a second kernel launch and an extra round trip through memory.
    """
    if num_programs >= num_sms:
        return 1
    by_occupancy = math.ceil(WAVES * num_sms / num_programs)
    by_length = max_context_len // SPLIT_MIN_TOKENS
    return max(1, min(by_occupancy, by_length))


def _num_sms(device: torch.device) -> int:
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).multi_processor_count
    return NOMINAL_NUM_SMS


def _interpreted() -> bool:
    return os.environ.get("TRITON_INTERPRET") == "1"


def check_decode_args(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    block_tables: torch.Tensor,
    context_lens: torch.Tensor,
    dtypes: tuple[torch.dtype, ...] = FLOAT_DTYPES,
    k_scale: torch.Tensor | None = None,
    v_scale: torch.Tensor | None = None,
) -> int:
    """Validate decode-attention arguments; raise ``ValueError``. Returns the GQA group size.

    Shared with ``minipaged_kernels.reference.paged_decode_attention`` (which adds float64). A
    quantized cache takes ``q`` of any of ``dtypes`` and needs its scales.
    """
    num_blocks, block_size, num_kv_heads, head_dim = check_kv_cache(k_cache, v_cache, dtypes + _kv_quant.QUANT_DTYPES)
    quant = _kv_quant.check_kv_scales(k_cache, v_cache, k_scale, v_scale)
    check_tensor("q", q, 3, dtypes if quant else (k_cache.dtype,))
    check_same_device(k_cache=k_cache, v_cache=v_cache, q=q, block_tables=block_tables, context_lens=context_lens)
    if q.shape[2] != head_dim:
        raise ValueError(f"q has head_dim {q.shape[2]} but k_cache has head_dim {head_dim}")
    if q.stride(-1) != 1:
        raise ValueError("q must be contiguous in its last (head_dim) dimension")
    if block_tables.shape[0] != q.shape[0]:
        raise ValueError(f"block_tables has {block_tables.shape[0]} rows but q has {q.shape[0]} sequences")
    group = check_heads(q.shape[1], num_kv_heads)
    check_block_tables(block_tables, context_lens, num_blocks, block_size)
    return group


def paged_decode_attention(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    block_tables: torch.Tensor,
    context_lens: torch.Tensor,
    scale: float | None = None,
    out: torch.Tensor | None = None,
    num_splits: int | None = None,
    *,
    k_scale: torch.Tensor | None = None,
    v_scale: torch.Tensor | None = None,
) -> torch.Tensor:
    """Attention of one query token per sequence over its paged KV cache.

    ``q``: ``[num_seqs, num_heads, head_dim]``; ``k_cache``/``v_cache``:
    ``[num_blocks, block_size, num_kv_heads, head_dim]`` (same dtype as ``q``: fp32,
    fp16 or bf16; head_dim <= 256); ``block_tables``: int32 (or int64)
    ``[num_seqs, max_blocks_per_seq]``, physical block ids in any order;
    ``context_lens``: int32 (or int64) ``[num_seqs]``, each >= 1. Query head ``h``
    attends to kv head ``h // (num_heads // num_kv_heads)``. ``scale`` defaults to
    ``1/sqrt(head_dim)``. Returns ``out`` ``[num_seqs, num_heads, head_dim]``
    (allocated when ``None``).

    ``num_splits``: ``None`` picks with ``choose_num_splits`` (split only when
    sequences x kv heads x head tiles is below the SM count and the longest context
    is at least ``2 * SPLIT_MIN_TOKENS``); ``1`` forces the single pass; ``n > 1``
    forces the two-stage split-K path with ``n`` partitions of the longest context.
    Without CUDA, the rule assumes ``NOMINAL_NUM_SMS`` SMs.

    Under the Triton interpreter (``TRITON_INTERPRET=1``), which has no bf16
    arithmetic, bf16 inputs are upcast to fp32 around the kernel and the result
    rounded to bf16; compiled, bf16 runs natively.

    Quantized caches: ``k_cache``/``v_cache`` int8 or ``float8_e4m3fn`` with fp32
    ``k_scale``/``v_scale`` ``[num_blocks, block_size, num_kv_heads]`` or ``[1]``
    (``minipaged_kernels._kv_quant``); ``q`` fp32, fp16 or bf16.
    """
    group = check_decode_args(q, k_cache, v_cache, block_tables, context_lens, FLOAT_DTYPES, k_scale, v_scale)
    out = check_kernel_out(out, q)
    if num_splits is not None and (type(num_splits) is not int or num_splits < 1):
        raise ValueError(f"num_splits must be None or an int >= 1, got {num_splits!r}")
    head_dim = q.shape[2]
    if head_dim > MAX_HEAD_DIM:
        raise ValueError(f"q has head_dim {head_dim}, above the supported maximum {MAX_HEAD_DIM}")
    scale = default_scale(head_dim, scale)
    num_seqs = q.shape[0]
    if num_seqs == 0:
        return out
    kv = (k_cache, v_cache, k_scale, v_scale)
    if q.dtype == torch.bfloat16 and _interpreted():
        if k_scale is None:
            kv = (k_cache.float(), v_cache.float(), None, None)
        result = _launch(
            q.float(),
            *kv,
            block_tables,
            context_lens,
            scale,
            torch.empty(q.shape, dtype=torch.float32, device=q.device),
            group,
            num_splits,
        )
        return out.copy_(result)
    return _launch(q, *kv, block_tables, context_lens, scale, out, group, num_splits)


def _launch(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    k_scale: torch.Tensor | None,
    v_scale: torch.Tensor | None,
    block_tables: torch.Tensor,
    context_lens: torch.Tensor,
    scale: float,
    out: torch.Tensor,
    group: int,
    num_splits: int | None,
) -> torch.Tensor:
    quant = _kv_quant.quant_code(k_cache.dtype)
    k_cache, k_scale = _kv_quant.kernel_views(k_cache, k_scale)
    v_cache, v_scale = _kv_quant.kernel_views(v_cache, v_scale)
    num_seqs, num_heads, head_dim = q.shape
    block_size, num_kv_heads = k_cache.shape[1], k_cache.shape[2]
    block_tables = block_tables.to(torch.int32)
    context_lens = context_lens.to(torch.int32)
    max_context_len = int(context_lens.max())
    head_tiles = triton.cdiv(group, GROUP_TILE)
    if num_splits is None:
        num_splits = choose_num_splits(num_seqs * num_kv_heads * head_tiles, max_context_len, _num_sms(q.device))
    tokens_per_split = triton.cdiv(triton.cdiv(max_context_len, num_splits), BLOCK_N) * BLOCK_N
    block_d = head_dim_tile(head_dim)
    grid = (num_seqs, num_kv_heads * head_tiles, num_splits)
    split = num_splits > 1
    if split:
        target = torch.empty((num_seqs, num_heads, num_splits, head_dim), dtype=torch.float32, device=q.device)
        lse = torch.empty((num_seqs, num_heads, num_splits), dtype=torch.float32, device=q.device)
        target_strides = (target.stride(0), target.stride(1), target.stride(2))
        lse_strides = (lse.stride(0), lse.stride(1))
    else:
        target, lse = out, None
        target_strides = (out.stride(0), out.stride(1), 0)
        lse_strides = (0, 0)
    _decode_kernel[grid](
        q,
        k_cache,
        v_cache,
        k_scale,
        v_scale,
        block_tables,
        context_lens,
        target,
        lse,
        scale * _LOG2E,
        group,
        head_dim,
        block_size,
        tokens_per_split,
        q.stride(0),
        q.stride(1),
        k_cache.stride(0),
        k_cache.stride(1),
        k_cache.stride(2),
        v_cache.stride(0),
        v_cache.stride(1),
        v_cache.stride(2),
        *_kv_quant.scale_strides(k_scale),
        block_tables.stride(0),
        *target_strides,
        *lse_strides,
        GROUP_TILE=GROUP_TILE,
        BLOCK_N=BLOCK_N,
        BLOCK_D=block_d,
        SPLIT=split,
        QUANT=quant,
        num_warps=NUM_WARPS,
        num_stages=NUM_STAGES,
    )
    if split:
        _merge_kernel[(num_seqs, num_heads)](
            target,
            lse,
            out,
            num_splits,
            head_dim,
            *target_strides,
            *lse_strides,
            out.stride(0),
            out.stride(1),
            BLOCK_D=block_d,
            num_warps=MERGE_NUM_WARPS,
            num_stages=1,
        )
    return out


def bytes_moved(shape: dict) -> int:
    """Bytes a decode call must move at least: every cached K and V row once, q in, out back.

    The split-K path adds its fp32 partials on top of this floor. ``cache_bytes`` (default
    ``dtype_bytes``) and ``scale_bytes`` (per row, default 0) describe a quantized cache.
    """
    rows = 2 * shape["num_seqs"] * shape["context_len"] * shape["num_kv_heads"]
    kv = rows * (shape["head_dim"] * shape.get("cache_bytes", shape["dtype_bytes"]) + shape.get("scale_bytes", 0))
    qo = 2 * shape["num_seqs"] * shape["num_heads"] * shape["head_dim"] * shape["dtype_bytes"]
    return kv + qo


_TRITON_DTYPE = {torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16"}


def aot_specs() -> list[AotSpec]:
    """Every configuration ``paged_decode_attention`` can launch.

    The wrapper's choices: dtype (fp32/fp16/bf16) x head_dim tile (64, 128, 256, i.e.
    head_dim 1..256) x {single pass, split stage 1, merge}. Block size, group size,
    context length and split count are runtime values and change no compiled code.
    """
    ints = (
        "group_size",
        "head_dim",
        "block_size",
        "tokens_per_split",
        "stride_qs",
        "stride_qh",
        "stride_kb",
        "stride_ko",
        "stride_kh",
        "stride_vb",
        "stride_vo",
        "stride_vh",
        "stride_sb",
        "stride_so",
        "stride_sh",
        "stride_bts",
        "stride_os",
        "stride_oh",
        "stride_op",
        "stride_ls",
        "stride_lh",
    )
    specs = []
    for dtype in _TRITON_DTYPE.values():
        for block_d in HEAD_DIM_TILES:
            for quant in (_kv_quant.QUANT_NONE, _kv_quant.QUANT_INT8, _kv_quant.QUANT_FP8):
                for split in (False, True):
                    specs.append(_stage1_spec(dtype, block_d, split, quant, ints))
            specs.append(
                AotSpec(
                    kernel="paged_decode_attention",
                    config=f"{dtype} D{block_d} merge",
                    fn=_merge_kernel,
                    signature={
                        "part_ptr": "*fp32",
                        "lse_ptr": "*fp32",
                        "out_ptr": f"*{dtype}",
                        **{
                            name: "i32"
                            for name in (
                                "num_splits",
                                "head_dim",
                                "stride_ps",
                                "stride_ph",
                                "stride_pp",
                                "stride_ls",
                                "stride_lh",
                                "stride_os",
                                "stride_oh",
                            )
                        },
                        "BLOCK_D": "constexpr",
                    },
                    constexprs={"BLOCK_D": block_d},
                    num_warps=MERGE_NUM_WARPS,
                    num_stages=1,
                )
            )
    return specs


_CACHE_POINTER = {_kv_quant.QUANT_INT8: "*i8", _kv_quant.QUANT_FP8: "*u8"}


def _stage1_spec(dtype: str, block_d: int, split: bool, quant: int, ints: tuple[str, ...]) -> AotSpec:
    """The decode kernel for one query dtype, head_dim tile, pass (single / split) and cache kind."""
    cache = _CACHE_POINTER.get(quant, f"*{dtype}")
    signature = {
        "q_ptr": f"*{dtype}",
        "k_cache_ptr": cache,
        "v_cache_ptr": cache,
        "k_scale_ptr": "*fp32" if quant else "constexpr",
        "v_scale_ptr": "*fp32" if quant else "constexpr",
        "block_tables_ptr": "*i32",
        "context_lens_ptr": "*i32",
        "out_ptr": "*fp32" if split else f"*{dtype}",
        "lse_ptr": "*fp32" if split else "constexpr",
        "qk_scale": "fp32",
        **{name: "i32" for name in ints},
        "GROUP_TILE": "constexpr",
        "BLOCK_N": "constexpr",
        "BLOCK_D": "constexpr",
        "SPLIT": "constexpr",
        "QUANT": "constexpr",
    }
    constexprs = {"GROUP_TILE": GROUP_TILE, "BLOCK_N": BLOCK_N, "BLOCK_D": block_d, "SPLIT": split, "QUANT": quant}
    if not split:
        constexprs["lse_ptr"] = None
    if not quant:
        constexprs["k_scale_ptr"] = constexprs["v_scale_ptr"] = None
    kv = f" kv={_kv_quant.QUANT_NAMES[quant]}" if quant else ""
    return AotSpec(
        kernel="paged_decode_attention",
        config=f"{dtype} D{block_d} {'split' if split else 'single'}{kv}",
        fn=_decode_kernel,
        signature=signature,
        constexprs=constexprs,
        num_warps=NUM_WARPS,
        num_stages=NUM_STAGES,
        in_ci=not quant or in_ci_subset(dtype, block_d),
    )
