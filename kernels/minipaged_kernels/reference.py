"""Naive contiguous-cache references for the kernels in this package.

Each function has the same signature as its kernel. Attention references gather a
sequence's blocks into a contiguous K/V and run a plain softmax; pass float64 inputs
for tight checks.

Quantized caches (int8 / fp8 e4m3 with ``k_scale``/``v_scale``, see ``minipaged_kernels._kv_quant``):
``kv_append`` quantizes with ``minipaged_kernels.kv_quant.quantize`` (the scheme's definition) and
the attention references dequantize the whole cache into ``q``'s dtype first
(``minipaged_kernels.kv_quant.dequantize``; float64 for tight checks), then run unchanged.
"""

from __future__ import annotations

import torch

from minipaged_kernels import kv_quant
from minipaged_kernels._checks import FLOAT_DTYPES, check_out, default_scale
from minipaged_kernels._kv_quant import QUANT_INT8
from minipaged_kernels.decode_attention import check_decode_args
from minipaged_kernels.kv_append import check_kv_append_args

REFERENCE_DTYPES = FLOAT_DTYPES + (torch.float64,)


def kv_append(
    key: torch.Tensor,
    value: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    slot_mapping: torch.Tensor,
    k_scale: torch.Tensor | None = None,
    v_scale: torch.Tensor | None = None,
) -> None:
    """Reference KV-append: a Python loop over tokens, skipping negative (padding) slots.

    ``key``/``value``: ``[num_tokens, num_kv_heads, head_dim]``; caches
    ``[num_blocks, block_size, num_kv_heads, head_dim]``; ``slot_mapping`` ``[num_tokens]``.
    A quantized cache stores ``kv_quant.quantize`` of each row (and its per-token scale).
    """
    quant = check_kv_append_args(key, value, k_cache, v_cache, slot_mapping, k_scale, v_scale, REFERENCE_DTYPES)
    block_size = k_cache.shape[1]
    for token, slot in enumerate(slot_mapping.tolist()):
        if slot < 0:
            continue
        block, offset = divmod(slot, block_size)
        for cache, scale, rows in ((k_cache, k_scale, key), (v_cache, v_scale, value)):
            if not quant:
                cache[block, offset] = rows[token]
                continue
            per_token = scale.dim() == 3
            data, row_scale = kv_quant.quantize(
                rows[token], "int8" if quant == QUANT_INT8 else "fp8_e4m3", None if per_token else scale
            )
            cache[block, offset] = data
            if per_token:
                scale[block, offset] = row_scale


def dequantized(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    k_scale: torch.Tensor | None,
    v_scale: torch.Tensor | None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The caches in ``q``'s dtype: quantized ones times their scales, float ones as they are."""
    if k_scale is None:
        return k_cache, v_cache
    return (kv_quant.dequantize(k_cache, k_scale, q.dtype), kv_quant.dequantize(v_cache, v_scale, q.dtype))


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
    *,
    k_scale: torch.Tensor | None = None,
    v_scale: torch.Tensor | None = None,
) -> torch.Tensor:
    """Reference decode attention: gather each sequence's blocks, then plain softmax.

    ``q`` ``[num_seqs, num_heads, head_dim]``; caches ``[num_blocks, block_size,
    num_kv_heads, head_dim]``; ``block_tables`` ``[num_seqs, max_blocks_per_seq]``;
    ``context_lens`` ``[num_seqs]``. Computes in float64 for float64 inputs, else in
    float32; returns ``q``'s dtype. A quantized cache is dequantized first (``dequantized``).
    """
    group = check_decode_args(q, k_cache, v_cache, block_tables, context_lens, REFERENCE_DTYPES, k_scale, v_scale)
    k_cache, v_cache = dequantized(q, k_cache, v_cache, k_scale, v_scale)
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
    *,
    k_scale: torch.Tensor | None = None,
    v_scale: torch.Tensor | None = None,
) -> torch.Tensor:
    """Reference prefill/extend attention: per sequence, gather its blocks, build the
    full score matrix with a causal mask shifted by the cached prefix, plain softmax.

    ``q`` ``[total_new_tokens, num_heads, head_dim]`` packed by ``cu_seqlens_q``
    ``[num_seqs + 1]``; caches ``[num_blocks, block_size, num_kv_heads, head_dim]``;
    ``block_tables`` ``[num_seqs, max_blocks_per_seq]``; ``context_lens`` ``[num_seqs]``
    (prefix + new tokens). Computes in float64 for float64 inputs, else in float32;
    returns ``q``'s dtype. A quantized cache is dequantized first (``dequantized``).
    """
    from minipaged_kernels.prefill_attention import check_prefill_args

    group = check_prefill_args(
        q, k_cache, v_cache, block_tables, cu_seqlens_q, context_lens, REFERENCE_DTYPES, k_scale, v_scale
    )
    k_cache, v_cache = dequantized(q, k_cache, v_cache, k_scale, v_scale)
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


def rejection_sample(
    target_probs: torch.Tensor,
    draft_token_ids: torch.Tensor,
    num_draft_tokens: list[int],
    uniforms: torch.Tensor,
    noise: torch.Tensor,
    draft_probs: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Speculative decoding's rejection sampling, the textbook algorithm one draft at a time.

    Sequence ``i`` owns draft tokens ``[start_i, start_i + k_i)`` and target rows
    ``[start_i + i, start_i + i + k_i + 1)``. Draft ``j`` is accepted when ``u_j < min(1, p(d) / q(d))``
    (``q`` one-hot on the draft when ``draft_probs`` is None); at the first rejection one token is
    drawn from ``norm(max(p - q, 0))``, after ``k_i`` acceptances from the last row (the bonus). A
    draw from a distribution ``r`` is ``argmax(r / noise[i])`` (an exponential race, so every
    implementation draws the same token from the same noise).

    Returns ``(tokens [num_seqs, max_k + 1] int64, num_accepted [num_seqs] int64)``; entries past
    ``num_accepted[i] + 1`` are 0.
    """
    num_seqs = len(num_draft_tokens)
    max_k = max(num_draft_tokens, default=0)
    tokens = torch.zeros(num_seqs, max_k + 1, dtype=torch.int64)
    num_accepted = torch.zeros(num_seqs, dtype=torch.int64)
    start = 0
    for i, k in enumerate(num_draft_tokens):
        row = start + i
        emitted: list[int] = []
        for j in range(k):
            d = int(draft_token_ids[start + j])
            p = target_probs[row + j].double().cpu()
            if draft_probs is None:
                q = torch.zeros_like(p)
                q[d] = 1.0
            else:
                q = draft_probs[start + j].double().cpu()
            if float(uniforms[start + j]) < min(1.0, float(p[d] / q[d])):
                emitted.append(d)
                continue
            residual = torch.clamp(p - q, min=0.0)
            residual = residual / residual.sum()
            emitted.append(int(torch.argmax(residual / noise[i].double().cpu())))
            break
        else:
            p = target_probs[row + k].double().cpu()
            emitted.append(int(torch.argmax(p / noise[i].double().cpu())))
        num_accepted[i] = len(emitted) - 1
        tokens[i, : len(emitted)] = torch.tensor(emitted)
        start += k
    return tokens, num_accepted
