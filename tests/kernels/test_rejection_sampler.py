"""Triton rejection sampler against the engine's PyTorch one and the textbook loop: the same tokens
and acceptance counts from the same random inputs, ragged vocabularies and draft counts included."""

from __future__ import annotations

import pytest
import torch

from minipaged.spec_decode.rejection import rejection_sample as torch_rejection_sample
from minipaged_kernels import reference
from minipaged_kernels.rejection_sampler import rejection_sample

POISON = -7


def case(seed: int, num_draft_tokens: list[int], vocab: int, with_draft_probs: bool, greedy: bool):
    gen = torch.Generator().manual_seed(seed)
    num_seqs, total = len(num_draft_tokens), sum(num_draft_tokens)
    target = torch.softmax(3 * torch.randn(total + num_seqs, vocab, generator=gen), dim=-1)
    if greedy:
        target = torch.nn.functional.one_hot(target.argmax(dim=1), vocab).float()
    draft_probs = torch.softmax(3 * torch.randn(total, vocab, generator=gen), dim=-1) if with_draft_probs else None
    rows, start = [], 0
    for i, k in enumerate(num_draft_tokens):
        rows += [start + i + j for j in range(k)]
        start += k
    drafts = torch.randint(0, vocab, (total,), generator=gen)
    if total:  # half the drafts are the target's likeliest token, so long accepted runs happen
        likely = torch.rand(total, generator=gen) < 0.6
        drafts = torch.where(likely, target[torch.tensor(rows)].argmax(dim=1), drafts)
    uniforms = torch.rand(total, generator=gen)
    noise = torch.ones(num_seqs, vocab) if greedy else torch.empty(num_seqs, vocab).exponential_(generator=gen)
    return target, drafts, uniforms, noise, draft_probs


@pytest.mark.parametrize(
    "num_draft_tokens,vocab,block_v",
    [([3], 37, 16), ([1, 0, 4, 2], 50, 16), ([5, 5, 1], 16, 16), ([0, 0], 9, 8), ([7, 2, 3], 200, 64)],
)
@pytest.mark.parametrize("with_draft_probs", [False, True])
@pytest.mark.parametrize("greedy", [False, True])
def test_matches_torch_and_textbook(num_draft_tokens, vocab, block_v, with_draft_probs, greedy, device):
    for seed in range(3):
        target, drafts, uniforms, noise, q = case(seed, num_draft_tokens, vocab, with_draft_probs, greedy)
        width = max(num_draft_tokens) + 1
        out_tokens = torch.full((len(num_draft_tokens), width), POISON, dtype=torch.int64, device=device)
        out_acc = torch.full((len(num_draft_tokens),), POISON, dtype=torch.int64, device=device)
        on = [t.to(device) if t is not None else None for t in (target, drafts, uniforms, noise, q)]
        tokens, accepted = rejection_sample(
            *on[:2], num_draft_tokens, *on[2:4], on[4], out_tokens=out_tokens, out_num_accepted=out_acc, block_v=block_v
        )
        want_tokens, want_acc = torch_rejection_sample(target, drafts, num_draft_tokens, uniforms, noise, q)
        text_tokens, text_acc = reference.rejection_sample(target, drafts, num_draft_tokens, uniforms, noise, q)
        assert torch.equal(accepted.cpu(), want_acc) and torch.equal(want_acc, text_acc)
        assert torch.equal(tokens.cpu(), want_tokens) and torch.equal(want_tokens, text_tokens)


def test_bad_shapes_are_value_errors():
    target = torch.rand(3, 10)
    with pytest.raises(ValueError, match="target_probs"):
        rejection_sample(target, torch.zeros(3, dtype=torch.int64), [3], torch.rand(3), torch.rand(1, 10))
    with pytest.raises(ValueError, match="noise"):
        rejection_sample(target, torch.zeros(2, dtype=torch.int64), [2], torch.rand(2), torch.rand(2, 10))
