"""Prefill / extend attention over a paged KV cache.

With prefix caching and chunked prefill, the new query tokens of a sequence attend
to a prefix that already sits in the paged cache and, causally, to themselves. The
new tokens' K/V are written to the cache first (``minipaged_kernels.kv_append``), so the
kernel sees one uniform key range per sequence: positions ``0 .. context_len - 1``,
all read through the block table.

One program handles ``BLOCK_M`` consecutive new tokens of one sequence for one query
head. It walks the keys in ``BLOCK_N`` tiles, gathering each key row from its physical
block (``block_tables[s, pos // block_size] * block_size + pos % block_size``), and
stops after the tile holding its last token's position: tiles wholly in the causal
future are never read. Softmax is online (running max and sum in fp32), as in the
Triton fused-attention tutorial.

A quantized cache (int8 or fp8 e4m3 with fp32 scales, ``minipaged_kernels._kv_quant``) is read as
1-byte rows and one scale per row, dequantized in registers into ``q``'s dtype before
the dots; tiles and accumulation are those of ``q``'s dtype.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from minipaged_kernels import _checks, _kv_quant
from minipaged_kernels._aot import AotSpec, in_ci_subset

MAX_HEAD_DIM = 256
# Sequences with at most this many new tokens get 16-row query tiles (see the wrapper).
SHORT_QUERY_LEN = 16
_DTYPES = {torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16"}

# Shape the kernel report uses for its bytes-moved column: four sequences, each a
# 512-token chunk behind a 512-token cached prefix, Llama-7B-like heads, fp16.
REFERENCE_SHAPE: dict = {
    "num_seqs": 4,
    "new_len": 512,
    "prefix_len": 512,
    "num_heads": 32,
    "num_kv_heads": 32,
    "head_dim": 128,
    "block_size": 16,
    "dtype_bytes": 2,
}


@triton.jit
def _prefill_kernel(
    Q,
    K_cache,
    V_cache,
    K_scale,
    V_scale,
    Out,
    block_tables,
    cu_seqlens_q,
    context_lens,
    tile_seq,
    tile_start,
    scale_log2e,
    stride_qt,
    stride_qh,
    stride_kb,
    stride_ks,
    stride_kh,
    stride_vb,
    stride_vs,
    stride_vh,
    stride_sb,
    stride_ss,
    stride_sh,
    stride_ot,
    stride_oh,
    stride_bt,
    group_size,
    head_dim,
    block_size,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr,
    QUANT: tl.constexpr = 0,
):
    tile = tl.program_id(0)
    head = tl.program_id(1)
    kv_head = head // group_size
    seq = tl.load(tile_seq + tile)
    m_start = tl.load(tile_start + tile)

    q_begin = tl.load(cu_seqlens_q + seq)
    new_len = tl.load(cu_seqlens_q + seq + 1) - q_begin
    context_len = tl.load(context_lens + seq)
    prefix_len = context_len - new_len

    offs_m = m_start + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    row_ok = offs_m < new_len
    d_ok = offs_d < head_dim
    # Absolute position of each query row; rows past new_len sit past the context,
    # so they see every key, never an all-masked row (their output is not stored).
    pos_m = prefix_len + offs_m

    q_ptrs = Q + (q_begin + offs_m).to(tl.int64)[:, None] * stride_qt + head * stride_qh + offs_d[None, :]
    q = tl.load(q_ptrs, mask=row_ok[:, None] & d_ok[None, :], other=0.0)

    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)

    # Causal early exit: no row of this tile sees a key past its last row's position.
    kv_end = tl.minimum(context_len, prefix_len + m_start + BLOCK_M)
    table_row = block_tables + seq.to(tl.int64) * stride_bt
    for start_n in range(0, kv_end, BLOCK_N):
        pos_n = start_n + tl.arange(0, BLOCK_N)
        col_ok = pos_n < kv_end
        block = tl.load(table_row + pos_n // block_size, mask=col_ok, other=0).to(tl.int64)
        in_block = pos_n % block_size
        kv_mask = col_ok[:, None] & d_ok[None, :]
        k = tl.load(
            K_cache
            + block[:, None] * stride_kb
            + in_block[:, None] * stride_ks
            + kv_head * stride_kh
            + offs_d[None, :],
            mask=kv_mask,
            other=0.0,
        )
        v = tl.load(
            V_cache
            + block[:, None] * stride_vb
            + in_block[:, None] * stride_vs
            + kv_head * stride_vh
            + offs_d[None, :],
            mask=kv_mask,
            other=0.0,
        )
        if QUANT != 0:
            scale_offs = block * stride_sb + in_block * stride_ss + kv_head * stride_sh
            k_scale = tl.load(K_scale + scale_offs, mask=col_ok, other=0.0)
            v_scale = tl.load(V_scale + scale_offs, mask=col_ok, other=0.0)
            k = _kv_quant.dequantize(k, k_scale[:, None], QUANT).to(q.dtype)
            v = _kv_quant.dequantize(v, v_scale[:, None], QUANT).to(q.dtype)
        # fp32 inputs: tf32x3 (three TF32 MMAs) keeps about fp32 accuracy on tensor
        # cores, where plain tf32 would round to 10 bits; fp16/bf16 dots ignore it.
        qk = tl.dot(q, tl.trans(k), input_precision="tf32x3")
        visible = col_ok[None, :] & (pos_n[None, :] <= pos_m[:, None])
        qk = tl.where(visible, qk * scale_log2e, float("-inf"))

        # Every row has seen key 0 after the first tile, so m_new is finite from then
        # on and fully masked later tiles contribute exp2(-inf) = 0.
        m_new = tl.maximum(m_i, tl.max(qk, 1))
        p = tl.math.exp2(qk - m_new[:, None])
        alpha = tl.math.exp2(m_i - m_new)
        l_i = l_i * alpha + tl.sum(p, 1)
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision="tf32x3")
        m_i = m_new

    out = acc / l_i[:, None]
    o_ptrs = Out + (q_begin + offs_m).to(tl.int64)[:, None] * stride_ot + head * stride_oh + offs_d[None, :]
    tl.store(o_ptrs, out.to(Out.dtype.element_ty), mask=row_ok[:, None] & d_ok[None, :])


@dataclass(frozen=True)
class PrefillConfig:
    """Tile sizes and launch options of one compiled variant of the kernel."""

    block_m: int
    block_n: int
    block_d: int
    num_warps: int = 4
    num_stages: int = 2


def choose_config(head_dim: int, dtype: torch.dtype, short: bool = False) -> PrefillConfig:
    """The wrapper's tile rule; ``short`` for sequences with at most ``SHORT_QUERY_LEN``
    new tokens.

    ``block_d`` is the next power of two >= ``head_dim``, at least 64 (smaller heads
    are rare and not worth their own compiled variants); the extra lanes are masked.
    Key tiles shrink as rows get wider so that the Q tile and the double-buffered K
    and V tiles stay well inside shared memory: ``block_n = 64`` up to 256 bytes per
    row, 32 up to 512, else 16. ``block_m`` is 64 with 4 warps (8 from
    ``block_d = 128`` on), 32 for rows over 512 bytes (fp32 at head_dim > 128, whose
    tf32x3 operand copies overflow sm_80's shared memory at 64); short sequences in fp16/bf16
    get ``block_m = 16`` with 4 warps. fp32, a dtype for checking rather than serving, keeps one variant per tile
    width so the ahead-of-time build stays small.
    """
    block_d = max(64, triton.next_power_of_2(head_dim))
    row_bytes = block_d * torch.empty((), dtype=dtype).element_size()
    block_n = 64 if row_bytes <= 256 else 32 if row_bytes <= 512 else 16
    if short and dtype != torch.float32:
        return PrefillConfig(block_m=16, block_n=block_n, block_d=block_d, num_warps=4)
    block_m = 64 if row_bytes <= 512 else 32
    return PrefillConfig(block_m=block_m, block_n=block_n, block_d=block_d, num_warps=8 if block_d >= 128 else 4)


def plan_query_tiles(
    cu_seqlens_q: torch.Tensor, block_m: int, include: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Split each sequence's new tokens into tiles of ``block_m``.

    ``cu_seqlens_q`` is int ``[num_seqs + 1]``; ``include`` (bool ``[num_seqs]``, all
    when ``None``) picks the sequences to tile. Returns int32 ``tile_seq [num_tiles]``
    (the sequence of each tile) and ``tile_start [num_tiles]`` (its first new-token
    index within that sequence). A sequence with no new tokens gets no tile.
    """
    cu = cu_seqlens_q.to("cpu", torch.int64)
    new_lens = cu[1:] - cu[:-1]
    if include is not None:
        new_lens = torch.where(include.cpu(), new_lens, 0)
    tiles_per_seq = (new_lens + block_m - 1) // block_m
    tile_seq = torch.repeat_interleave(torch.arange(len(new_lens)), tiles_per_seq)
    first_tile = torch.cumsum(tiles_per_seq, 0) - tiles_per_seq
    tile_start = (torch.arange(len(tile_seq)) - first_tile[tile_seq]) * block_m
    return tile_seq.to(torch.int32), tile_start.to(torch.int32)


@dataclass(frozen=True)
class TileReads:
    """What one query-tile program of the kernel reads (per head): new-token rows
    ``first_row .. first_row + num_rows - 1`` of sequence ``seq`` and keys
    ``0 .. key_end - 1``, in ``ceil(key_end / block_n)`` key tiles."""

    seq: int
    first_row: int
    num_rows: int
    prefix_len: int
    key_end: int


def tile_reads(cu_seqlens_q: torch.Tensor, context_lens: torch.Tensor, block_m: int) -> list[TileReads]:
    """The kernel's loop bounds, in Python, for drawing and checking them.

    ``cu_seqlens_q`` int ``[num_seqs + 1]``, ``context_lens`` int ``[num_seqs]``.
    Mirrors the kernel: a tile's last key is its last row's own position.
    """
    cu = cu_seqlens_q.tolist()
    lens = context_lens.tolist()
    reads = []
    for seq, start in zip(*(t.tolist() for t in plan_query_tiles(cu_seqlens_q, block_m))):
        new_len = cu[seq + 1] - cu[seq]
        prefix_len = lens[seq] - new_len
        key_end = min(lens[seq], prefix_len + start + block_m)
        reads.append(TileReads(seq, start, min(block_m, new_len - start), prefix_len, key_end))
    return reads


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET") == "1"


def check_prefill_args(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    block_tables: torch.Tensor,
    cu_seqlens_q: torch.Tensor,
    context_lens: torch.Tensor,
    dtypes: tuple[torch.dtype, ...] = _checks.FLOAT_DTYPES,
    k_scale: torch.Tensor | None = None,
    v_scale: torch.Tensor | None = None,
) -> int:
    """Validate prefill-attention arguments; raise ``ValueError``. Returns the GQA group size.

    Shared with ``minipaged_kernels.reference.paged_prefill_attention`` (which adds float64). A
    quantized cache takes ``q`` of any of ``dtypes`` and needs its scales.
    """
    num_blocks, block_size, num_kv_heads, head_dim = _checks.check_kv_cache(
        k_cache, v_cache, dtypes + _kv_quant.QUANT_DTYPES
    )
    quant = _kv_quant.check_kv_scales(k_cache, v_cache, k_scale, v_scale)
    _checks.check_tensor("q", q, 3, dtypes if quant else (k_cache.dtype,))
    # The cache comes first: the message then names whichever argument strays from it.
    _checks.check_same_device(
        k_cache=k_cache,
        v_cache=v_cache,
        q=q,
        block_tables=block_tables,
        cu_seqlens_q=cu_seqlens_q,
        context_lens=context_lens,
    )
    if q.shape[2] != head_dim:
        raise ValueError(f"q has head_dim {q.shape[2]}, but k_cache has head_dim {head_dim}")
    if q.shape[2] > MAX_HEAD_DIM:
        raise ValueError(f"q has head_dim {q.shape[2]}, above the supported maximum {MAX_HEAD_DIM}")
    if q.stride(-1) != 1:
        raise ValueError("q must be contiguous in its last (head_dim) dimension")
    group = _checks.check_heads(q.shape[1], num_kv_heads)
    _checks.check_block_tables(block_tables, context_lens, num_blocks, block_size)
    _checks.check_cu_seqlens_q(cu_seqlens_q, q.shape[0], context_lens)
    return group


def paged_prefill_attention(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    block_tables: torch.Tensor,
    cu_seqlens_q: torch.Tensor,
    context_lens: torch.Tensor,
    scale: float | None = None,
    out: torch.Tensor | None = None,
    *,
    config: PrefillConfig | None = None,
    k_scale: torch.Tensor | None = None,
    v_scale: torch.Tensor | None = None,
) -> torch.Tensor:
    """Causal attention of packed new tokens over a paged KV cache.

    q            [total_new_tokens, num_heads, head_dim]  new tokens of all sequences, packed
    k_cache      [num_blocks, block_size, num_kv_heads, head_dim]  (new tokens' K already written)
    v_cache      [num_blocks, block_size, num_kv_heads, head_dim]
    block_tables int32 (or int64) [num_seqs, max_blocks_per_seq]  physical block per logical block
    cu_seqlens_q int32 (or int64) [num_seqs + 1]  sequence s owns q rows cu[s] .. cu[s+1]-1
    context_lens int32 (or int64) [num_seqs]  cached prefix + new tokens, each >= 1
    out          [total_new_tokens, num_heads, head_dim]  (allocated when None)

    New token j of sequence s sits at position ``context_lens[s] - new_len + j`` and
    attends to every key at a position <= its own; a sequence may have no new tokens.
    q and the caches share one dtype (fp32, fp16, bf16); ``num_heads`` is a multiple of
    ``num_kv_heads`` (query head h reads kv head ``h // group``); head_dim <= 256; any
    block size. ``scale`` defaults to ``1/sqrt(head_dim)``. ``config`` overrides the
    tile rule (tests and the notebook use it) for one launch over all sequences.

    Without ``config``, sequences with at most ``SHORT_QUERY_LEN`` new tokens (the
    decodes that ride along in a chunked-prefill step) get their own launch with
    16-row query tiles, so a one-token sequence does not pay for 64 rows.

    Under the Triton interpreter (``TRITON_INTERPRET=1``), which has no bf16
    arithmetic, bf16 inputs are upcast to fp32 around the kernel and the result
    rounded to bf16; compiled, bf16 runs natively.

    Quantized caches: ``k_cache``/``v_cache`` int8 or ``float8_e4m3fn`` with fp32
    ``k_scale``/``v_scale`` ``[num_blocks, block_size, num_kv_heads]`` or ``[1]``
    (``minipaged_kernels._kv_quant``); ``q`` fp32, fp16 or bf16.
    """
    group = check_prefill_args(
        q, k_cache, v_cache, block_tables, cu_seqlens_q, context_lens, _checks.FLOAT_DTYPES, k_scale, v_scale
    )
    scale = _checks.default_scale(q.shape[2], scale)
    out = _checks.check_kernel_out(out, q)
    if config is not None and config.block_d < q.shape[2]:
        raise ValueError(f"config.block_d {config.block_d} is smaller than head_dim {q.shape[2]}")
    if q.shape[0] == 0:
        return out
    kv = (k_cache, v_cache, k_scale, v_scale)
    if q.dtype == torch.bfloat16 and _interpreting():
        if k_scale is None:
            kv = (k_cache.float(), v_cache.float(), None, None)
        result = _launch_all(
            q.float(),
            *kv,
            block_tables,
            cu_seqlens_q,
            context_lens,
            scale,
            torch.empty(q.shape, device=q.device),
            group,
            config,
        )
        return out.copy_(result)
    return _launch_all(q, *kv, block_tables, cu_seqlens_q, context_lens, scale, out, group, config)


def _launch_all(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    k_scale: torch.Tensor | None,
    v_scale: torch.Tensor | None,
    block_tables: torch.Tensor,
    cu_seqlens_q: torch.Tensor,
    context_lens: torch.Tensor,
    scale: float,
    out: torch.Tensor,
    group: int,
    config: PrefillConfig | None,
) -> torch.Tensor:
    """One launch with ``config``, else a launch each for short and long sequences."""
    args = (q, k_cache, v_cache, k_scale, v_scale, block_tables, cu_seqlens_q, context_lens, scale, out, group)
    if config is not None:
        return _launch(*args, config, None)
    new_lens = cu_seqlens_q[1:] - cu_seqlens_q[:-1]
    short = new_lens <= SHORT_QUERY_LEN
    for is_short, include in ((True, short), (False, ~short)):
        if bool(include.any()):
            _launch(*args, choose_config(q.shape[2], q.dtype, is_short), include)
    return out


def _launch(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    k_scale: torch.Tensor | None,
    v_scale: torch.Tensor | None,
    block_tables: torch.Tensor,
    cu_seqlens_q: torch.Tensor,
    context_lens: torch.Tensor,
    scale: float,
    out: torch.Tensor,
    group: int,
    cfg: PrefillConfig,
    include: torch.Tensor | None,
) -> torch.Tensor:
    tile_seq, tile_start = (t.to(q.device) for t in plan_query_tiles(cu_seqlens_q, cfg.block_m, include))
    if tile_seq.numel() == 0:
        return out
    tables = block_tables.to(torch.int32).contiguous()
    grid = (tile_seq.numel(), q.shape[1])
    quant = _kv_quant.quant_code(k_cache.dtype)
    k_cache, k_scale = _kv_quant.kernel_views(k_cache, k_scale)
    v_cache, v_scale = _kv_quant.kernel_views(v_cache, v_scale)
    _prefill_kernel[grid](
        q,
        k_cache,
        v_cache,
        k_scale,
        v_scale,
        out,
        tables,
        cu_seqlens_q.to(torch.int32).contiguous(),
        context_lens.to(torch.int32).contiguous(),
        tile_seq,
        tile_start,
        scale * 1.4426950408889634,  # exp2 is cheaper than exp: fold log2(e) into the scale
        q.stride(0),
        q.stride(1),
        k_cache.stride(0),
        k_cache.stride(1),
        k_cache.stride(2),
        v_cache.stride(0),
        v_cache.stride(1),
        v_cache.stride(2),
        *_kv_quant.scale_strides(k_scale),
        out.stride(0),
        out.stride(1),
        tables.stride(0),
        group,
        q.shape[2],
        k_cache.shape[1],
        BLOCK_M=cfg.block_m,
        BLOCK_N=cfg.block_n,
        BLOCK_D=cfg.block_d,
        QUANT=quant,
        num_warps=cfg.num_warps,
        num_stages=cfg.num_stages,
    )
    return out


def all_configs() -> list[tuple[torch.dtype, PrefillConfig]]:
    """Every (dtype, config) pair ``choose_config`` can return for head_dim 1..256."""
    seen: dict[tuple[torch.dtype, PrefillConfig], None] = {}
    for dtype in _DTYPES:
        for head_dim in (64, 128, 256):
            for short in (False, True):
                seen[(dtype, choose_config(head_dim, dtype, short))] = None
    return list(seen)


def aot_specs() -> list[AotSpec]:
    """One spec per (dtype, tile config) the wrapper can launch.

    ``head_dim``, ``block_size`` and the GQA group size are runtime arguments, so a
    spec covers every head_dim with the same power-of-two tile and every block size.
    """
    specs = []
    for dtype, cfg in all_configs():
        for quant in (_kv_quant.QUANT_NONE, _kv_quant.QUANT_INT8, _kv_quant.QUANT_FP8):
            specs.append(_spec(dtype, cfg, quant))
    return specs


_CACHE_POINTER = {_kv_quant.QUANT_INT8: "*i8", _kv_quant.QUANT_FP8: "*u8"}


def _spec(dtype: torch.dtype, cfg: PrefillConfig, quant: int) -> AotSpec:
    """The kernel for one query dtype, tile config and cache kind (float, int8, fp8 bits)."""
    ty = _DTYPES[dtype]
    ptr = f"*{ty}"
    cache = _CACHE_POINTER.get(quant, ptr)
    signature = {
        "Q": ptr,
        "K_cache": cache,
        "V_cache": cache,
        "K_scale": "*fp32" if quant else "constexpr",
        "V_scale": "*fp32" if quant else "constexpr",
        "Out": ptr,
        "block_tables": "*i32",
        "cu_seqlens_q": "*i32",
        "context_lens": "*i32",
        "tile_seq": "*i32",
        "tile_start": "*i32",
        "scale_log2e": "fp32",
        **{
            name: "i32"
            for name in (
                "stride_qt",
                "stride_qh",
                "stride_kb",
                "stride_ks",
                "stride_kh",
                "stride_vb",
                "stride_vs",
                "stride_vh",
                "stride_sb",
                "stride_ss",
                "stride_sh",
                "stride_ot",
                "stride_oh",
                "stride_bt",
                "group_size",
                "head_dim",
                "block_size",
            )
        },
        "BLOCK_M": "constexpr",
        "BLOCK_N": "constexpr",
        "BLOCK_D": "constexpr",
        "QUANT": "constexpr",
    }
    constexprs = {"BLOCK_M": cfg.block_m, "BLOCK_N": cfg.block_n, "BLOCK_D": cfg.block_d, "QUANT": quant}
    if not quant:
        constexprs["K_scale"] = constexprs["V_scale"] = None
    kv = f" kv={_kv_quant.QUANT_NAMES[quant]}" if quant else ""
    return AotSpec(
        kernel="paged_prefill_attention",
        config=f"{ty} M{cfg.block_m} N{cfg.block_n} D{cfg.block_d} w{cfg.num_warps} s{cfg.num_stages}{kv}",
        fn=_prefill_kernel,
        signature=signature,
        constexprs=constexprs,
        num_warps=cfg.num_warps,
        num_stages=cfg.num_stages,
        in_ci=not quant or in_ci_subset(ty, cfg.block_d),
    )


def bytes_moved(shape: dict) -> int:
    """Lower bound on HBM traffic of one call: every sequence's K/V read once, Q read
    and the output written once, plus the block tables.

    ``shape`` has num_seqs, new_len, prefix_len, num_heads, num_kv_heads, head_dim,
    block_size, dtype_bytes (see ``REFERENCE_SHAPE``).
    """
    s = shape
    context = s["prefix_len"] + s["new_len"]
    kv = 2 * s["num_seqs"] * context * s["num_kv_heads"] * s["head_dim"] * s["dtype_bytes"]
    q_and_out = 2 * s["num_seqs"] * s["new_len"] * s["num_heads"] * s["head_dim"] * s["dtype_bytes"]
    tables = 4 * s["num_seqs"] * (-(-context // s["block_size"]) + 3)
    return kv + q_and_out + tables
