"""Rejection sampling for speculative decoding: one program per sequence.

Sequence ``i`` carries ``k_i`` draft tokens ``d_j`` (flat offsets ``[start_i, start_i + k_i)``) and
``k_i + 1`` rows of target probabilities ``p_j`` (rows ``start_i + i + j``). Draft ``j`` is accepted
when ``u_j * q_j(d_j) < p_j(d_j)`` (``u_j < min(1, p / q)`` without a division by zero; ``q`` is one-hot
on the draft for n-gram drafts, ``HAS_DRAFT_PROBS=False``). The program

1. loads all its drafts at once (``BLOCK_W`` lanes, ``>= max_k + 1``), computes every acceptance test
   and takes the accepted prefix as the first failing lane;
2. draws the one token after that prefix by an exponential race, ``argmax(r / noise_i)`` over the
   vocabulary in ``BLOCK_V`` chunks, where ``r`` is the residual ``max(p_j - q_j, 0)`` after a
   rejection and the bonus row ``p_k`` otherwise (the race needs no normalisation);
3. writes its whole output row in one store: accepted drafts, the drawn token, zeros after.

Same algorithm and conventions as ``minipaged.spec_decode.rejection`` (the engine's PyTorch
version) and ``minipaged_kernels.reference.rejection_sample`` (the textbook loop); greedy rows pass
one-hot targets and unit noise.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from minipaged_kernels._aot import AotSpec

# Vocabulary lanes per chunk of the race: 4 warps x 32 threads x 8 floats.
BLOCK_V = 1024
NUM_WARPS = 4
# Draft widths the AOT report builds (BLOCK_W = next power of two of max_k + 1).
BLOCK_WS = (2, 4, 8, 16, 32)


@triton.jit
def _rejection_sample_kernel(
    target_ptr,  # [num_rows, vocab] fp32
    draft_ids_ptr,  # [num_drafts] int64
    draft_probs_ptr,  # [num_drafts, vocab] fp32 (HAS_DRAFT_PROBS only)
    draft_start_ptr,  # [num_seqs] int64
    num_draft_ptr,  # [num_seqs] int64
    uniform_ptr,  # [num_drafts] fp32
    noise_ptr,  # [num_seqs, vocab] fp32
    out_tokens_ptr,  # [num_seqs, width] int64
    out_accepted_ptr,  # [num_seqs] int64
    vocab,
    width,
    stride_t,
    stride_q,
    stride_n,
    stride_o,
    HAS_DRAFT_PROBS: tl.constexpr,
    BLOCK_W: tl.constexpr,
    BLOCK_V: tl.constexpr,
):
    seq = tl.program_id(0)
    start = tl.load(draft_start_ptr + seq)
    k = tl.load(num_draft_ptr + seq)
    row0 = start + seq
    offs = tl.arange(0, BLOCK_W)
    valid = offs < k
    d = tl.load(draft_ids_ptr + start + offs, mask=valid, other=0)
    p_d = tl.load(target_ptr + (row0 + offs) * stride_t + d, mask=valid, other=0.0)
    if HAS_DRAFT_PROBS:
        q_d = tl.load(draft_probs_ptr + (start + offs) * stride_q + d, mask=valid, other=1.0)
    else:
        q_d = tl.full((BLOCK_W,), 1.0, tl.float32)
    u = tl.load(uniform_ptr + start + offs, mask=valid, other=2.0)
    accepted = (u * q_d < p_d) & valid
    # BLOCK_W > k, so lane k always fails: the minimum is the accepted prefix length.
    num_acc = tl.min(tl.where(accepted, BLOCK_W, offs), axis=0)
    rejected = num_acc < k
    d_stop = tl.sum(tl.where(offs == num_acc, d, 0), axis=0)
    stop_row = row0 + num_acc
    best_val = -1.0
    best_idx = 0
    for v0 in range(0, vocab, BLOCK_V):
        offs_v = v0 + tl.arange(0, BLOCK_V)
        in_vocab = offs_v < vocab
        p = tl.load(target_ptr + stop_row * stride_t + offs_v, mask=in_vocab, other=0.0)
        if HAS_DRAFT_PROBS:
            # Past the last draft (nothing rejected) the row index may leave the tensor: clamp it, zero q.
            q_row = tl.minimum(start + num_acc, start + k - 1)
            has_row = offs_v * 0 + k > 0  # broadcast first: the interpreter takes no scalar in a mask
            q = tl.load(draft_probs_ptr + q_row * stride_q + offs_v, mask=in_vocab & has_row, other=0.0)
            q = tl.where(rejected, q, 0.0)
        else:
            q = ((offs_v == d_stop) & rejected).to(tl.float32)
        r = tl.maximum(p - q, 0.0)
        r = tl.where(rejected, r, p)
        e = tl.load(noise_ptr + seq * stride_n + offs_v, mask=in_vocab, other=1.0)
        score = tl.where(in_vocab, r / e, -1.0)
        chunk_max = tl.max(score, axis=0)
        chunk_idx = tl.argmax(score, axis=0)
        # Strictly greater: the earliest maximum wins, as in torch.argmax.
        best_idx = tl.where(chunk_max > best_val, v0 + chunk_idx, best_idx)
        best_val = tl.maximum(best_val, chunk_max)
    row = tl.where(offs < num_acc, d, tl.where(offs == num_acc, best_idx.to(tl.int64), 0))
    tl.store(out_tokens_ptr + seq * stride_o + offs, row, mask=offs < width)
    tl.store(out_accepted_ptr + seq, num_acc.to(tl.int64))


def check_rejection_args(
    target_probs: torch.Tensor,
    draft_token_ids: torch.Tensor,
    num_draft_tokens: list[int],
    uniforms: torch.Tensor,
    noise: torch.Tensor,
    draft_probs: torch.Tensor | None,
) -> None:
    """Shapes and dtypes every implementation expects (ValueError naming the argument)."""
    num_seqs, total = len(num_draft_tokens), sum(num_draft_tokens)
    if min(num_draft_tokens, default=0) < 0:
        raise ValueError(f"num_draft_tokens must be >= 0, got {num_draft_tokens}")
    if target_probs.dim() != 2 or target_probs.shape[0] != total + num_seqs:
        raise ValueError(f"target_probs must be [{total + num_seqs}, vocab], got {tuple(target_probs.shape)}")
    vocab = target_probs.shape[1]
    if tuple(draft_token_ids.shape) != (total,) or draft_token_ids.dtype != torch.int64:
        got = f"{draft_token_ids.dtype} {tuple(draft_token_ids.shape)}"
        raise ValueError(f"draft_token_ids must be int64 [{total}], got {got}")
    if tuple(uniforms.shape) != (total,):
        raise ValueError(f"uniforms must be [{total}], got {tuple(uniforms.shape)}")
    if tuple(noise.shape) != (num_seqs, vocab):
        raise ValueError(f"noise must be [{num_seqs}, {vocab}], got {tuple(noise.shape)}")
    if draft_probs is not None and tuple(draft_probs.shape) != (total, vocab):
        raise ValueError(f"draft_probs must be [{total}, {vocab}], got {tuple(draft_probs.shape)}")
    floats = {"target_probs": target_probs, "uniforms": uniforms, "noise": noise, "draft_probs": draft_probs}
    for name, t in floats.items():
        if t is not None and t.dtype != torch.float32:
            raise ValueError(f"{name} must be float32, got {t.dtype}")


def rejection_sample(
    target_probs: torch.Tensor,
    draft_token_ids: torch.Tensor,
    num_draft_tokens: list[int],
    uniforms: torch.Tensor,
    noise: torch.Tensor,
    draft_probs: torch.Tensor | None = None,
    *,
    out_tokens: torch.Tensor | None = None,
    out_num_accepted: torch.Tensor | None = None,
    block_v: int = BLOCK_V,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Accepted drafts and the token after them per sequence (see the module docstring).

    target_probs: ``[sum(k_i) + num_seqs, vocab]`` fp32; draft_token_ids, uniforms: ``[sum(k_i)]``;
    noise: ``[num_seqs, vocab]`` positive fp32; draft_probs: ``[sum(k_i), vocab]`` or None (n-gram).
    Returns ``(tokens [num_seqs, max_k + 1] int64, num_accepted [num_seqs] int64)``; sequence ``i``
    emits ``tokens[i, : num_accepted[i] + 1]`` and the rest of its row is 0. ``out_*``: optional
    preallocated outputs of those shapes (every entry is written).
    """
    check_rejection_args(target_probs, draft_token_ids, num_draft_tokens, uniforms, noise, draft_probs)
    num_seqs = len(num_draft_tokens)
    width = max(num_draft_tokens, default=0) + 1
    device = target_probs.device
    if out_tokens is None:
        out_tokens = torch.empty(num_seqs, width, dtype=torch.int64, device=device)
    if out_num_accepted is None:
        out_num_accepted = torch.empty(num_seqs, dtype=torch.int64, device=device)
    if tuple(out_tokens.shape) != (num_seqs, width) or tuple(out_num_accepted.shape) != (num_seqs,):
        raise ValueError(f"out_tokens must be [{num_seqs}, {width}] and out_num_accepted [{num_seqs}]")
    if num_seqs == 0:
        return out_tokens, out_num_accepted
    counts = torch.tensor(num_draft_tokens, dtype=torch.int64, device=device)
    starts = torch.cumsum(counts, 0) - counts
    has_q = draft_probs is not None
    q = draft_probs if has_q else target_probs  # never read without draft probs
    target = target_probs.contiguous()
    _rejection_sample_kernel[(num_seqs,)](
        target,
        draft_token_ids.contiguous(),
        q.contiguous(),
        starts,
        counts,
        uniforms.contiguous(),
        noise.contiguous(),
        out_tokens,
        out_num_accepted,
        target.shape[1],
        width,
        target.stride(0),
        q.shape[1],
        noise.shape[1],
        out_tokens.stride(0),
        HAS_DRAFT_PROBS=has_q,
        BLOCK_W=triton.next_power_of_2(width),
        BLOCK_V=block_v,
        num_warps=NUM_WARPS,
    )
    return out_tokens, out_num_accepted


def aot_specs() -> list[AotSpec]:
    """Every configuration the wrapper launches at the default ``BLOCK_V``: draft width x whether drafts
    carry probabilities (n-gram drafts do not)."""
    specs = []
    for block_w in BLOCK_WS:
        for has_q in (False, True):
            signature = {
                "target_ptr": "*fp32",
                "draft_ids_ptr": "*i64",
                "draft_probs_ptr": "*fp32",
                "draft_start_ptr": "*i64",
                "num_draft_ptr": "*i64",
                "uniform_ptr": "*fp32",
                "noise_ptr": "*fp32",
                "out_tokens_ptr": "*i64",
                "out_accepted_ptr": "*i64",
                **{name: "i32" for name in ("vocab", "width", "stride_t", "stride_q", "stride_n", "stride_o")},
                "HAS_DRAFT_PROBS": "constexpr",
                "BLOCK_W": "constexpr",
                "BLOCK_V": "constexpr",
            }
            specs.append(
                AotSpec(
                    kernel="rejection_sample",
                    config=f"BLOCK_W={block_w} {'draft probs' if has_q else 'n-gram'}",
                    fn=_rejection_sample_kernel,
                    signature=signature,
                    constexprs={"HAS_DRAFT_PROBS": has_q, "BLOCK_W": block_w, "BLOCK_V": BLOCK_V},
                    num_warps=NUM_WARPS,
                    num_stages=1,
                )
            )
    return specs
