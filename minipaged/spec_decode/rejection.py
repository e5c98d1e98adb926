"""Rejection sampler (Leviathan et al. / Chen et al.): verify draft tokens against the target model.

Sequence ``i`` proposed ``k_i`` draft tokens ``d_0..d_{k-1}``; the target model gave probabilities
``p_0..p_k`` (``p_j`` conditioned on the drafts before ``j``), the drafter ``q_0..q_{k-1}``.
Walking the drafts in order, ``d_j`` is accepted with probability ``min(1, p_j(d_j) / q_j(d_j))``
(a uniform ``u_j`` below that ratio). At the first rejection the sequence gets one token drawn
from the residual ``norm(max(p_j - q_j, 0))`` and stops; if every draft is accepted it gets a
bonus token drawn from ``p_k``. The emitted tokens are then distributed exactly as ordinary
sampling from the target would give them.

Conventions shared with the Triton kernel (``minipaged_kernels.rejection_sampler``):

- n-gram drafts have no distribution: ``draft_probs=None`` means ``q_j`` is one-hot on ``d_j``,
  so acceptance is ``u_j < p_j(d_j)`` and the residual is ``p_j`` without ``d_j``;
- greedy rows pass a one-hot ``p`` on the argmax: a draft is accepted iff it equals the argmax,
  and the resampled or bonus token is the argmax, with the same code path;
- the single draw a sequence can need (residual or bonus) is an exponential race,
  ``argmax(r / e)`` with ``e ~ Exp(1)`` per vocabulary entry (``noise``), which picks entry ``x``
  with probability ``r(x) / sum(r)`` without normalising ``r``.
"""

from __future__ import annotations

import torch


def rejection_sample(
    target_probs: torch.Tensor,
    draft_token_ids: torch.Tensor,
    num_draft_tokens: list[int],
    uniforms: torch.Tensor,
    noise: torch.Tensor,
    draft_probs: torch.Tensor | None = None,
    *,
    resample_residual: bool = True,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Accepted drafts and the one token after them, per sequence.

    target_probs: ``[num_drafts_total + num_seqs, vocab]`` float32, sequence ``i``'s ``k_i + 1`` rows
    end to end. draft_token_ids, uniforms: ``[num_drafts_total]``. num_draft_tokens: ``k_i`` per
    sequence. noise: ``[num_seqs, vocab]`` positive (``Exp(1)`` draws). draft_probs:
    ``[num_drafts_total, vocab]`` or None (n-gram). ``resample_residual=False`` draws the token after
    a rejection from ``p_j`` itself (the wrong algorithm, kept so tests can show they catch it).

    Returns ``(tokens [num_seqs, max_k + 1] int64, num_accepted [num_seqs] int64)``: sequence ``i``
    emits ``tokens[i, : num_accepted[i] + 1]``; the entries past that are 0.
    """
    num_seqs = len(num_draft_tokens)
    max_k = max(num_draft_tokens, default=0)
    device = target_probs.device
    tokens = torch.zeros(num_seqs, max_k + 1, dtype=torch.int64, device=device)
    num_accepted = torch.zeros(num_seqs, dtype=torch.int64, device=device)
    counts = torch.tensor(num_draft_tokens, dtype=torch.int64, device=device)
    draft_starts = torch.cumsum(counts, 0) - counts  # [S] first draft index of each sequence
    row_starts = draft_starts + torch.arange(num_seqs, device=device)  # [S] first target row
    # Pad the drafts to [S, max_k] to accept all sequences' position j at once.
    pos = torch.arange(max_k, device=device)
    valid = pos.unsqueeze(0) < counts.unsqueeze(1)  # [S, max_k]
    flat = (draft_starts.unsqueeze(1) + pos).clamp(max=max(draft_token_ids.numel() - 1, 0))
    drafts = torch.where(valid, draft_token_ids[flat] if draft_token_ids.numel() else 0, 0)
    rows = row_starts.unsqueeze(1) + pos  # [S, max_k] target row of each draft
    rows = torch.where(valid, rows, 0)
    p_draft_tok = target_probs[rows, drafts]  # [S, max_k]
    if draft_probs is None:
        q_draft_tok = torch.ones_like(p_draft_tok)
    else:
        q_draft_tok = torch.where(valid, draft_probs[flat, drafts], 1.0)
    u = torch.where(valid, uniforms[flat] if uniforms.numel() else 0.0, 2.0)
    accepted = (u * q_draft_tok < p_draft_tok) & valid  # u < p / q without dividing by a zero q
    # Accepted prefix length: the first False in each row.
    run = torch.cumprod(accepted.to(torch.int64), dim=1)
    num_accepted = run.sum(dim=1) if max_k else num_accepted
    tokens[:, :max_k] = torch.where(run.bool(), drafts, 0)
    # The token after the accepted prefix: residual at a rejection, bonus from p_k otherwise.
    stop_row = row_starts + num_accepted  # [S]
    p = target_probs[stop_row]  # [S, vocab]
    rejected = num_accepted < counts
    if resample_residual and bool(rejected.any()):
        stop_draft = (draft_starts + num_accepted).clamp(max=max(draft_token_ids.numel() - 1, 0))
        if draft_probs is None:
            q = torch.zeros_like(p)
            q.scatter_(1, draft_token_ids[stop_draft].unsqueeze(1), 1.0)
        else:
            q = draft_probs[stop_draft]
        residual = torch.clamp(p - q, min=0.0)
        p = torch.where(rejected.unsqueeze(1), residual, p)
    last = torch.argmax(p / noise, dim=1)
    tokens.scatter_(1, num_accepted.unsqueeze(1), last.unsqueeze(1))
    return tokens, num_accepted
