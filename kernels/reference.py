"""Naive contiguous-cache references for the kernels in this package.

Each function has the same signature as its kernel. Attention references gather a
sequence's blocks into a contiguous K/V and run a plain softmax; pass float64 inputs
for tight checks.
"""
from __future__ import annotations

import torch

from kernels._checks import FLOAT_DTYPES, check_out, default_scale
from kernels.decode_attention import check_decode_args
from kernels.kv_append import check_kv_append_args

REFERENCE_DTYPES = FLOAT_DTYPES + (torch.float64,)


def kv_append(
    key: torch.Tensor, value: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
    slot_mapping: torch.Tensor,
) -> None:
    """Reference KV-append: a Python loop over tokens, skipping negative (padding) slots.

    ``key``/``value``: ``[num_tokens, num_kv_heads, head_dim]``; caches
    ``[num_blocks, block_size, num_kv_heads, head_dim]``; ``slot_mapping`` ``[num_tokens]``.
    """
    check_kv_append_args(key, value, k_cache, v_cache, slot_mapping)
    block_size = k_cache.shape[1]
    for token, slot in enumerate(slot_mapping.tolist()):
        if slot < 0:
            continue
        block, offset = divmod(slot, block_size)
        k_cache[block, offset] = key[token]
        v_cache[block, offset] = value[token]


def _gather(cache: torch.Tensor, table: torch.Tensor, context_len: int) -> torch.Tensor:
    """A sequence's ``[context_len, num_kv_heads, head_dim]`` rows, contiguous, in token order."""
    num_blocks_used = -(-context_len // cache.shape[1])
    blocks = cache[table[:num_blocks_used].long()]
    return blocks.reshape(-1, cache.shape[2], cache.shape[3])[:context_len]


def paged_decode_attention(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    block_tables: torch.Tensor,
    context_lens: torch.Tensor,
    scale: float | None = None,
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """Reference decode attention: gather each sequence's blocks, then plain softmax.

    ``q`` ``[num_seqs, num_heads, head_dim]``; caches ``[num_blocks, block_size,
    num_kv_heads, head_dim]``; ``block_tables`` ``[num_seqs, max_blocks_per_seq]``;
    ``context_lens`` ``[num_seqs]``. Computes in float64 for float64 inputs, else in
    float32; returns ``q``'s dtype.
    """
    group = check_decode_args(q, k_cache, v_cache, block_tables, context_lens, REFERENCE_DTYPES)
    out = check_out(out, q)
    scale = default_scale(q.shape[2], scale)
    compute = torch.float64 if q.dtype == torch.float64 else torch.float32
    for seq, context_len in enumerate(context_lens.tolist()):
        k = _gather(k_cache, block_tables[seq], context_len).to(compute).repeat_interleave(group, dim=1)
        v = _gather(v_cache, block_tables[seq], context_len).to(compute).repeat_interleave(group, dim=1)
        scores = torch.einsum("hd,nhd->hn", q[seq].to(compute), k) * scale
        probs = torch.softmax(scores, dim=-1)
        out[seq] = torch.einsum("hn,nhd->hd", probs, v).to(out.dtype)
    return out


def paged_prefill_attention(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    block_tables: torch.Tensor,
    cu_seqlens_q: torch.Tensor,
    context_lens: torch.Tensor,
    scale: float | None = None,
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """Reference prefill/extend attention: per sequence, gather its blocks, build the
    full score matrix with a causal mask shifted by the cached prefix, plain softmax.

    ``q`` ``[total_new_tokens, num_heads, head_dim]`` packed by ``cu_seqlens_q``
    ``[num_seqs + 1]``; caches ``[num_blocks, block_size, num_kv_heads, head_dim]``;
    ``block_tables`` ``[num_seqs, max_blocks_per_seq]``; ``context_lens`` ``[num_seqs]``
    (prefix + new tokens). Computes in float64 for float64 inputs, else in float32;
    returns ``q``'s dtype.
    """
    from kernels.prefill_attention import check_prefill_args

    group = check_prefill_args(q, k_cache, v_cache, block_tables, cu_seqlens_q, context_lens, REFERENCE_DTYPES)
    out = check_out(out, q)
    scale = default_scale(q.shape[2], scale)
    compute = torch.float64 if q.dtype == torch.float64 else torch.float32
    cu = cu_seqlens_q.tolist()
    for seq, context_len in enumerate(context_lens.tolist()):
        begin, end = cu[seq], cu[seq + 1]
        if begin == end:
            continue
        k = _gather(k_cache, block_tables[seq], context_len).to(compute).repeat_interleave(group, dim=1)
        v = _gather(v_cache, block_tables[seq], context_len).to(compute).repeat_interleave(group, dim=1)
        scores = torch.einsum("qhd,nhd->hqn", q[begin:end].to(compute), k) * scale
        q_pos = torch.arange(context_len - (end - begin), context_len, device=q.device)
        k_pos = torch.arange(context_len, device=q.device)
        scores = scores.masked_fill(k_pos[None, None, :] > q_pos[None, :, None], float("-inf"))
        out[begin:end] = torch.einsum("hqn,nhd->qhd", torch.softmax(scores, dim=-1), v).to(out.dtype)
    return out
