"""Sampler: next token per sequence from fp32 logits.

Greedy rows take the argmax. The others go temperature -> top-k -> top-p -> min-p ->
a draw from that request's own ``torch.Generator``, so a seeded request gives the
same tokens whether it runs alone or in any batch.
"""
from __future__ import annotations

from typing import Sequence

import torch

from minipaged.sampling_params import SamplingParams


def sample(logits: torch.Tensor, params: Sequence[SamplingParams], generators: Sequence[torch.Generator]) -> list[int]:
    """Next token id of every row.

    logits: ``[num_seqs, vocab_size]`` float32; ``params``/``generators``: one per row.
    """
    if logits.dim() != 2 or logits.shape[0] != len(params) or len(params) != len(generators):
        raise ValueError(f"logits {tuple(logits.shape)} needs one row per params ({len(params)}) and generator")
    logits = logits.float()
    tokens = torch.argmax(logits, dim=-1)
    random_rows = [i for i, p in enumerate(params) if not p.greedy]
    if random_rows:
        rows = torch.tensor(random_rows, dtype=torch.long, device=logits.device)
        probs = filtered_probs(logits[rows], [params[i] for i in random_rows])
        for j, i in enumerate(random_rows):
            tokens[i] = torch.multinomial(probs[j], 1, generator=generators[i])[0]
    return tokens.tolist()


def filtered_probs(logits: torch.Tensor, params: Sequence[SamplingParams]) -> torch.Tensor:
    """Probabilities after temperature, top-k, top-p and min-p, renormalised.

    logits: ``[num_seqs, vocab_size]`` float32 -> ``[num_seqs, vocab_size]``.
    """
    device = logits.device
    temps = torch.tensor([p.temperature for p in params], dtype=torch.float32, device=device)
    logits = logits / temps.unsqueeze(1)
    vocab = logits.shape[-1]
    top_k = [p.top_k for p in params]
    if any(k is not None and k < vocab for k in top_k):
        ks = torch.tensor([vocab if k is None else min(k, vocab) for k in top_k], device=device)
        sorted_desc = torch.sort(logits, dim=-1, descending=True).values
        kth = sorted_desc.gather(1, (ks - 1).unsqueeze(1))
        logits = logits.masked_fill(logits < kth, float("-inf"))
    probs = torch.softmax(logits, dim=-1)
    top_p = torch.tensor([p.top_p for p in params], dtype=torch.float32, device=device)
    if bool((top_p < 1.0).any()):
        sorted_probs, order = torch.sort(probs, dim=-1, descending=True)
        mass_before = torch.cumsum(sorted_probs, dim=-1) - sorted_probs
        # Keep the smallest prefix whose mass reaches top_p (the best token always stays).
        drop_sorted = mass_before >= top_p.unsqueeze(1)
        drop = torch.zeros_like(drop_sorted).scatter(1, order, drop_sorted)
        probs = probs.masked_fill(drop, 0.0)
    min_p = torch.tensor([p.min_p for p in params], dtype=torch.float32, device=device)
    if bool((min_p > 0).any()):
        threshold = min_p.unsqueeze(1) * probs.max(dim=-1, keepdim=True).values
        probs = probs.masked_fill(probs < threshold, 0.0)
    return probs / probs.sum(dim=-1, keepdim=True)
