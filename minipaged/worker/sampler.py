"""Sampler: next token (and optionally its logprobs) per sequence from fp32 logits.

Per row, in vLLM's order:

1. ``logit_bias`` is added;
2. ``min_tokens``: EOS (unless ``ignore_eos``) and ``stop_token_ids`` are masked to -inf while the
   sequence has fewer output tokens than that;
3. penalties: ``repetition_penalty`` over prompt + output tokens, then ``frequency_penalty`` and
   ``presence_penalty`` over output tokens;
4. greedy rows take the argmax; the others go temperature -> top-k -> top-p -> min-p -> a draw
   from that sequence's own ``torch.Generator``, so a seeded request gives the same tokens
   whether it runs alone or in any batch.

Logprobs are those of the model's raw logits (``log_softmax`` before step 1, vLLM's default
"raw_logprobs"). A step that uses none of 1-3 runs exactly the code it always did.
"""

from __future__ import annotations

from collections.abc import Sequence, Set
from dataclasses import dataclass

import numpy as np
import torch

from minipaged.outputs import Logprob
from minipaged.sampling_params import SamplingParams


@dataclass
class SamplerOutput:
    """One entry per row: the sampled token, and its logprobs dict when the row asked for them.

    ``logprobs[i]`` maps the sampled token and the row's top-``params.logprobs`` tokens to their
    ``Logprob`` (rank 1 = the most likely token under the raw logits); ``None`` without ``logprobs``.
    """

    token_ids: list[int]
    logprobs: list[dict[int, Logprob] | None]


def sample(
    logits: torch.Tensor,
    params: Sequence[SamplingParams],
    generators: Sequence[torch.Generator],
    *,
    prompt_token_ids: Sequence[Sequence[int]],
    output_token_ids: Sequence[Sequence[int]],
    eos_token_ids: Set[int] = frozenset(),
) -> SamplerOutput:
    """Next token id of every row.

    logits: ``[num_seqs, vocab_size]`` (made float32); ``params``, ``generators``, ``prompt_token_ids``
    and ``output_token_ids`` (the tokens generated so far): one per row. ``eos_token_ids``: the model's
    EOS ids, masked by ``min_tokens``. The input tensor is never modified.
    """
    num_rows = len(params)
    if logits.dim() != 2 or logits.shape[0] != num_rows or len(generators) != num_rows:
        raise ValueError(f"logits {tuple(logits.shape)} needs one row per params ({num_rows}) and generator")
    if len(prompt_token_ids) != num_rows or len(output_token_ids) != num_rows:
        raise ValueError(
            f"prompt_token_ids ({len(prompt_token_ids)}) and output_token_ids "
            f"({len(output_token_ids)}) need one entry per row ({num_rows})"
        )
    logits = logits.float()
    raw = logits
    logits = process_logits(logits, params, prompt_token_ids, output_token_ids, eos_token_ids)
    tokens = greedy_tokens(logits)
    random_rows = [i for i, p in enumerate(params) if not p.greedy]
    if random_rows:
        rows = torch.tensor(random_rows, dtype=torch.long, device=logits.device)
        probs = filtered_probs(logits[rows], [params[i] for i in random_rows])
        for j, i in enumerate(random_rows):
            tokens[i] = draw(probs[j], generators[i])
    return SamplerOutput(tokens.tolist(), token_logprobs(raw, tokens, [p.logprobs for p in params]))


def greedy_tokens(logits: torch.Tensor) -> torch.Tensor:
    """``torch.argmax(logits, dim=-1)`` for fp32 ``[num_seqs, vocab_size]`` logits: int64 ``[num_seqs]``,
    the first maximum of each row (a NaN counts as the maximum, as in torch).

    On CPU through numpy, whose argmax is SIMD-vectorised where torch's is a scalar loop:
    over a vocabulary of ~50k logits it is an order of magnitude faster, about 1% of a
    batched decode step saved.
    """
    if logits.device.type == "cpu" and logits.dtype in (torch.float32, torch.float64) and not logits.requires_grad:
        return torch.from_numpy(logits.numpy().argmax(axis=1))
    return torch.argmax(logits, dim=-1)


def exponential_noise(n: int, generator: torch.Generator | None, device: torch.device | str = "cpu") -> torch.Tensor:
    """``[n]`` positive ``Exp(1)`` draws for the exponential race, from ``generator``.

    By inversion, ``-log(1 - U)`` for ``U ~ U[0, 1)``: on CPU several times faster than
    ``Tensor.exponential_`` over a vocabulary, a cost every sampled sequence pays at every
    step (``draw``) and verification. The rare ``U = 0`` gives 0, raised to the smallest positive float so
    ``p / e`` stays finite and still wins the race.
    """
    e = torch.rand(n, generator=generator, device=device).neg_().log1p_().neg_()
    return e.clamp_(min=torch.finfo(e.dtype).tiny)


def draw(probs: torch.Tensor, generator: torch.Generator | None) -> int:
    """One token from ``probs [vocab_size]`` (fp32, summing to 1), from ``generator``.

    The exponential race (the exponential form of the Gumbel-max trick, as ``torch.multinomial``
    draws one sample): ``argmax(probs / q)`` with ``q ~ Exp(1)`` per token has
    ``P(argmax = i) = probs[i] / sum(probs)``. The noise comes from ``exponential_noise``, by
    inversion: ``Tensor.exponential_`` over a 49k vocabulary costs about a millisecond on CPU, for
    every sampled row at every step. The argmax runs through numpy (SIMD, see ``greedy_tokens``),
    skipping multinomial's full-vocabulary validity reductions; a row that multinomial would
    refuse (NaN, or no positive probability) ends on a token of no positive probability and is
    refused here too.
    """
    if probs.device.type != "cpu" or probs.dtype != torch.float32 or probs.dim() != 1:
        return int(torch.multinomial(probs, 1, generator=generator)[0])
    q = exponential_noise(probs.shape[0], generator)
    token = int(torch.div(probs, q, out=q).numpy().argmax())
    if not probs[token] > 0:  # NaN (argmax stops at the first one) or an all-zero row
        raise ValueError(f"cannot sample from probabilities that are NaN or all zero: {probs}")
    return token


def process_logits(
    logits: torch.Tensor,
    params: Sequence[SamplingParams],
    prompt_token_ids: Sequence[Sequence[int]],
    output_token_ids: Sequence[Sequence[int]],
    eos_token_ids: Set[int] = frozenset(),
) -> torch.Tensor:
    """Steps 1-3 of the module docstring: logit bias, min_tokens masking, penalties.

    logits: ``[num_seqs, vocab_size]`` float32 -> a new tensor of the same shape, or ``logits``
    itself when no row uses any of them.
    """
    vocab = logits.shape[1]
    bias = [(i, p.logit_bias) for i, p in enumerate(params) if p.logit_bias]
    if bias:
        rows = [i for i, b in bias for _ in b]
        cols = [t for _, b in bias for t in b]
        if max(cols) >= vocab:
            raise ValueError(f"logit_bias names token {max(cols)}, outside the vocabulary of {vocab}")
        values = torch.tensor([v for _, b in bias for v in b.values()], dtype=logits.dtype, device=logits.device)
        logits = logits.index_put((_long(rows, logits), _long(cols, logits)), values, accumulate=True)
    # Ids beyond the vocabulary can never be sampled, so there is nothing to mask for them.
    pairs = [
        (i, t)
        for i, p in enumerate(params)
        if len(output_token_ids[i]) < p.min_tokens
        for t in _min_tokens_masked_ids(p, eos_token_ids)
        if t < vocab
    ]
    if pairs:
        rows, cols = [i for i, _ in pairs], [t for _, t in pairs]
        logits = logits.index_put(
            (_long(rows, logits), _long(cols, logits)), torch.tensor(float("-inf"), device=logits.device)
        )
    penalised = [i for i, p in enumerate(params) if p.has_penalties]
    if penalised:
        logits = apply_penalties(
            logits,
            penalised,
            [params[i] for i in penalised],
            [prompt_token_ids[i] for i in penalised],
            [output_token_ids[i] for i in penalised],
        )
    return logits


def _min_tokens_masked_ids(p: SamplingParams, eos_token_ids: Set[int]) -> list[int]:
    ids = set(p.stop_token_ids)
    if not p.ignore_eos:
        ids |= set(eos_token_ids)  # with ignore_eos EOS stops nothing, so (like vLLM) it stays sampleable
    return sorted(ids)


def apply_penalties(
    logits: torch.Tensor,
    rows: Sequence[int],
    params: Sequence[SamplingParams],
    prompt_token_ids: Sequence[Sequence[int]],
    output_token_ids: Sequence[Sequence[int]],
) -> torch.Tensor:
    """Repetition, frequency and presence penalties of ``rows`` (vLLM's ``apply_penalties``).

    logits: ``[num_seqs, vocab_size]`` -> a new tensor; token counts come from one ``bincount``
    over ``row * vocab + token`` of all the rows' tokens laid end to end.
    """
    vocab = logits.shape[1]
    device = logits.device
    output_counts = _token_counts(output_token_ids, vocab, device)  # [R, vocab]
    seen = (_token_counts(prompt_token_ids, vocab, device) > 0) | (output_counts > 0)
    index = _long(rows, logits)
    x = logits[index]
    rep = torch.tensor([p.repetition_penalty for p in params], dtype=x.dtype, device=device).unsqueeze(1)
    rep = torch.where(seen, rep, torch.ones_like(rep))
    x = torch.where(x > 0, x / rep, x * rep)
    freq = torch.tensor([p.frequency_penalty for p in params], dtype=x.dtype, device=device).unsqueeze(1)
    pres = torch.tensor([p.presence_penalty for p in params], dtype=x.dtype, device=device).unsqueeze(1)
    x = x - freq * output_counts - pres * (output_counts > 0).to(x.dtype)
    out = logits.clone()
    out[index] = x
    return out


def _token_counts(token_ids: Sequence[Sequence[int]], vocab: int, device: torch.device) -> torch.Tensor:
    """``[len(token_ids), vocab]`` float32: how often each token occurs in each row's list."""
    lengths = torch.tensor([len(t) for t in token_ids], dtype=torch.long)
    flat = torch.tensor([t for row in token_ids for t in row], dtype=torch.long)
    if flat.numel() and (int(flat.min()) < 0 or int(flat.max()) >= vocab):
        raise ValueError(f"token ids must be in [0, {vocab}), got {int(flat.min())}..{int(flat.max())}")
    rows = torch.repeat_interleave(torch.arange(len(token_ids)), lengths)
    counts = torch.bincount(rows * vocab + flat, minlength=len(token_ids) * vocab)
    return counts.view(len(token_ids), vocab).to(device=device, dtype=torch.float32)


def token_logprobs(
    raw_logits: torch.Tensor, tokens: torch.Tensor, num_logprobs: Sequence[int | None]
) -> list[dict[int, Logprob] | None]:
    """Per row: ``None``, or the sampled token's and the top-``k`` tokens' raw log-probabilities.

    raw_logits: ``[num_seqs, vocab_size]`` float32 before any processing; tokens: ``[num_seqs]``.
    The sampled token's rank is 1 + the number of tokens strictly more likely.
    """
    out: list[dict[int, Logprob] | None] = [None] * len(num_logprobs)
    wanted = [i for i, k in enumerate(num_logprobs) if k is not None]
    if not wanted:
        return out
    index = _long(wanted, raw_logits)
    logprobs = torch.log_softmax(raw_logits[index], dim=-1)  # [W, vocab]
    chosen = tokens[index].unsqueeze(1)
    chosen_logprob = logprobs.gather(1, chosen)  # [W, 1]
    ranks = (logprobs > chosen_logprob).sum(dim=1) + 1
    k_max = max(num_logprobs[i] for i in wanted)
    top = torch.topk(logprobs, k_max, dim=-1) if k_max else None
    chosen_list, chosen_lp, ranks_list = chosen[:, 0].tolist(), chosen_logprob[:, 0].tolist(), ranks.tolist()
    top_ids = top.indices.tolist() if top is not None else [[] for _ in wanted]
    top_lps = top.values.tolist() if top is not None else [[] for _ in wanted]
    for j, i in enumerate(wanted):
        entry = {chosen_list[j]: Logprob(chosen_lp[j], ranks_list[j])}
        k = num_logprobs[i]
        for rank, (token, lp) in enumerate(zip(top_ids[j][:k], top_lps[j][:k]), start=1):
            entry.setdefault(token, Logprob(lp, rank))
        out[i] = entry
    return out


def _long(values: Sequence[int], like: torch.Tensor) -> torch.Tensor:
    return torch.tensor(values, dtype=torch.long, device=like.device)


def filtered_probs(logits: torch.Tensor, params: Sequence[SamplingParams]) -> torch.Tensor:
    """Probabilities after temperature, top-k, top-p and min-p, renormalised.

    logits: ``[num_seqs, vocab_size]`` float32 -> ``[num_seqs, vocab_size]``.
    """
    device = logits.device
    # Each filter is skipped when no row uses it (checked on the host: a tensor's .any() is a sync);
    # dividing by a temperature of 1 is exact, so skipping it changes nothing.
    if any(p.temperature != 1.0 for p in params):
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
    if any(np.float32(p.top_p) < 1.0 for p in params):  # as the fp32 comparison below sees it
        top_p = torch.tensor([p.top_p for p in params], dtype=torch.float32, device=device)
        sorted_probs, order = torch.sort(probs, dim=-1, descending=True)
        mass_before = torch.cumsum(sorted_probs, dim=-1) - sorted_probs
        # Keep the smallest prefix whose mass reaches top_p (the best token always stays).
        drop_sorted = mass_before >= top_p.unsqueeze(1)
        drop = torch.zeros_like(drop_sorted).scatter(1, order, drop_sorted)
        probs = probs.masked_fill(drop, 0.0)
    if any(p.min_p > 0 for p in params):
        min_p = torch.tensor([p.min_p for p in params], dtype=torch.float32, device=device)
        threshold = min_p.unsqueeze(1) * probs.max(dim=-1, keepdim=True).values
        probs = probs.masked_fill(probs < threshold, 0.0)
    return probs / probs.sum(dim=-1, keepdim=True)
