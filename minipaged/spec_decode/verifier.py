"""From one step's logits to each speculating sequence's new tokens (the engine's side of verification).

A sequence that ran ``k`` draft tokens owns ``k + 1`` logit rows. Row ``j`` is turned into the
target distribution exactly as the ordinary sampler would turn the logits of a sequence whose
output already ended in ``d_0..d_{j-1}`` (``minipaged.worker.sampler``: logit bias, min_tokens,
penalties, then temperature / top-k / top-p / min-p, or the argmax for greedy requests), and the
rejection sampler (``minipaged.spec_decode.rejection``) decides what is kept. Its random draws
come from the sequence's own generator, so a seeded request stays reproducible.
"""

from __future__ import annotations

from collections.abc import Set
from dataclasses import dataclass

import torch

from minipaged.core.scheduler import ScheduledSequence
from minipaged.core.sequence import Sequence
from minipaged.outputs import Logprob
from minipaged.spec_decode.rejection import rejection_sample
from minipaged.worker.sampler import exponential_noise, filtered_probs, greedy_tokens, process_logits, token_logprobs


@dataclass(frozen=True)
class Verified:
    """One sequence's outcome: the accepted drafts followed by one sampled token."""

    token_ids: list[int]  # num_accepted + 1 tokens
    logprobs: list[dict[int, Logprob]] | None  # one dict per token, with SamplingParams.logprobs
    num_draft_tokens: int
    num_accepted: int


def target_probs(
    logits: torch.Tensor, seqs: list[Sequence], drafts: list[tuple[int, ...]], eos_token_ids: Set[int]
) -> torch.Tensor:
    """The distribution each verified position samples from.

    logits: ``[sum(k_i + 1), vocab]`` float32 -> probabilities of the same shape (one-hot on the
    argmax for greedy sequences).
    """
    params = [s.params for s, d in zip(seqs, drafts) for _ in range(len(d) + 1)]
    prompts = [s.prompt_token_ids for s, d in zip(seqs, drafts) for _ in range(len(d) + 1)]
    outputs = [s.output_token_ids + list(d[:j]) for s, d in zip(seqs, drafts) for j in range(len(d) + 1)]
    processed = process_logits(logits, params, prompts, outputs, eos_token_ids)
    probs = torch.zeros_like(processed)
    probs.scatter_(1, greedy_tokens(processed).unsqueeze(1).to(probs.device), 1.0)
    random_rows = [i for i, p in enumerate(params) if not p.greedy]
    if random_rows:
        index = torch.tensor(random_rows, dtype=torch.long, device=logits.device)
        probs[index] = filtered_probs(processed[index], [params[i] for i in random_rows])
    return probs


def verify(
    logits: torch.Tensor,
    seqs: list[Sequence],
    drafts: list[tuple[int, ...]],
    eos_token_ids: Set[int] = frozenset(),
    *,
    draft_probs: torch.Tensor | None = None,
    resample_residual: bool = True,
) -> list[Verified]:
    """Accept or reject every sequence's drafts.

    logits: ``[sum(k_i + 1), vocab]`` raw fp32 logits, sequence ``i``'s ``k_i + 1`` rows end to end
    (``drafts[i]`` has ``k_i`` tokens). draft_probs: ``[sum(k_i), vocab]``, the distribution each
    draft was drawn from (a draft model's), or None for drafts that are point masses (n-gram, greedy).
    """
    probs = target_probs(logits, seqs, drafts, eos_token_ids)
    device = probs.device
    vocab = probs.shape[1]
    uniforms, noise = [], []
    for seq, d in zip(seqs, drafts):
        if seq.params.greedy:  # one-hot targets decide alone; the generator is left untouched
            uniforms.append(torch.zeros(len(d), device=device))
            noise.append(torch.ones(vocab, device=device))
        else:
            uniforms.append(torch.rand(len(d), generator=seq.generator, device=device))
            noise.append(exponential_noise(vocab, seq.generator, device))
    draft_ids = torch.tensor([t for d in drafts for t in d], dtype=torch.int64, device=device)
    tokens, num_accepted = rejection_sample(
        probs,
        draft_ids,
        [len(d) for d in drafts],
        torch.cat(uniforms),
        torch.stack(noise),
        draft_probs,
        resample_residual=resample_residual,
    )
    accepted = num_accepted.tolist()
    token_rows = tokens.tolist()
    emitted = [row[: a + 1] for row, a in zip(token_rows, accepted)]
    # Logprobs of the raw logits at the positions that emitted each token.
    starts = [0]
    for d in drafts:
        starts.append(starts[-1] + len(d) + 1)
    want = [(starts[i] + j, t, seq.params.logprobs) for i, seq in enumerate(seqs) for j, t in enumerate(emitted[i])]
    logprobs = [None] * len(want)
    if any(n is not None for _, _, n in want):
        rows = torch.tensor([r for r, _, _ in want], dtype=torch.long, device=logits.device)
        toks = torch.tensor([t for _, t, _ in want], dtype=torch.long, device=logits.device)
        logprobs = token_logprobs(logits[rows].float(), toks, [n for _, _, n in want])
    out, pos = [], 0
    for seq, d, toks, a in zip(seqs, drafts, emitted, accepted):
        lps = logprobs[pos : pos + len(toks)]
        pos += len(toks)
        out.append(Verified(toks, None if seq.params.logprobs is None else lps, len(d), a))
    return out


def split_speculative(
    logits: torch.Tensor | None, sampled: list[ScheduledSequence]
) -> tuple[torch.Tensor | None, list[ScheduledSequence], torch.Tensor | None, list[ScheduledSequence]]:
    """Separate a step's sampled sequences into ordinary ones (one logit row each) and speculating ones
    (``k + 1`` rows each): ``(plain logits, plain, speculative logits, speculating)``, order kept.

    A step without drafts returns its inputs unchanged, plus ``(None, [])``.
    """
    if logits is None or not any(s.num_draft_tokens for s in sampled):
        return logits, sampled, None, []
    plain_rows, spec_rows, plain, spec = [], [], [], []
    row = 0
    for s in sampled:
        width = s.num_draft_tokens + 1
        if s.num_draft_tokens:
            spec_rows.extend(range(row, row + width))
            spec.append(s)
        else:
            plain_rows.append(row)
            plain.append(s)
        row += width

    def take(rows: list[int]) -> torch.Tensor:
        return logits[torch.tensor(rows, dtype=torch.long, device=logits.device)]

    return take(plain_rows) if plain else None, plain, take(spec_rows), spec
