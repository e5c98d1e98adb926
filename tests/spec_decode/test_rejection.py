"""The engine's rejection sampler: equal to the textbook algorithm on the same random inputs, and
exact in distribution (the first emitted token is distributed as the target's first row)."""

from __future__ import annotations

import pytest
import torch

from minipaged.spec_decode.rejection import rejection_sample
from minipaged.worker.sampler import exponential_noise
from minipaged_kernels import reference


def random_case(gen: torch.Generator, num_draft_tokens: list[int], vocab: int, with_draft_probs: bool):
    """Peaked random targets whose drafts are often their likely tokens, so both branches run."""
    num_seqs, total = len(num_draft_tokens), sum(num_draft_tokens)
    target = torch.softmax(3 * torch.randn(total + num_seqs, vocab, generator=gen), dim=-1)
    draft_probs = torch.softmax(3 * torch.randn(total, vocab, generator=gen), dim=-1) if with_draft_probs else None
    drafts = torch.randint(0, vocab, (total,), generator=gen)
    likely = torch.rand(total, generator=gen) < 0.5
    rows, start = [], 0  # target row of each draft: sequence i's rows begin at start_i + i
    for i, k in enumerate(num_draft_tokens):
        rows += [start + i + j for j in range(k)]
        start += k
    if total:
        drafts = torch.where(likely, target[torch.tensor(rows)].argmax(dim=1), drafts)
    uniforms = torch.rand(total, generator=gen)
    noise = torch.empty(num_seqs, vocab).exponential_(generator=gen)
    return target, drafts, uniforms, noise, draft_probs


@pytest.mark.parametrize("with_draft_probs", [False, True])
@pytest.mark.parametrize("num_draft_tokens", [[1], [3, 0, 5], [2, 2, 2, 1], [0], [5, 4, 1, 0, 3, 2]])
def test_matches_textbook(num_draft_tokens, with_draft_probs):
    gen = torch.Generator().manual_seed(len(num_draft_tokens) * 10 + int(with_draft_probs))
    for _ in range(20):
        target, drafts, uniforms, noise, q = random_case(gen, num_draft_tokens, 37, with_draft_probs)
        got = rejection_sample(target, drafts, num_draft_tokens, uniforms, noise, q)
        want = reference.rejection_sample(target, drafts, num_draft_tokens, uniforms, noise, q)
        assert torch.equal(got[1], want[1])
        assert torch.equal(got[0], want[0])


def test_greedy_one_hot_accepts_only_the_argmax():
    vocab = 11
    argmax = torch.tensor([3, 5, 7, 1])  # four positions: three drafts and the bonus
    target = torch.nn.functional.one_hot(argmax, vocab).float()
    ones = torch.ones(1, vocab)
    zeros = torch.zeros(3)
    tokens, acc = rejection_sample(target, torch.tensor([3, 5, 7]), [3], zeros, ones)
    assert acc.tolist() == [3] and tokens.tolist() == [[3, 5, 7, 1]]
    tokens, acc = rejection_sample(target, torch.tensor([3, 4, 7]), [3], zeros, ones)
    assert acc.tolist() == [1] and tokens[0, :2].tolist() == [3, 5]


def _first_token_counts(resample_residual: bool, with_draft_probs: bool, trials: int = 40000):
    """Counts of the first emitted token over ``trials`` independent sequences sharing one target."""
    vocab = 8
    gen = torch.Generator().manual_seed(0)
    p = torch.tensor([0.45, 0.2, 0.1, 0.1, 0.05, 0.05, 0.03, 0.02])
    bonus = torch.full((vocab,), 1.0 / vocab)
    target = torch.stack([p, bonus]).repeat(trials, 1)  # each sequence: one draft row and the bonus row
    if with_draft_probs:
        q = torch.tensor([0.1, 0.5, 0.1, 0.1, 0.1, 0.05, 0.03, 0.02])
        drafts = torch.multinomial(q, trials, replacement=True, generator=gen)
        draft_probs = q.repeat(trials, 1)
    else:
        drafts = torch.zeros(trials, dtype=torch.long)  # the n-gram draft is the likeliest token
        draft_probs = None
    uniforms = torch.rand(trials, generator=gen)
    noise = torch.empty(trials, vocab).exponential_(generator=gen)
    tokens, _ = rejection_sample(
        target, drafts, [1] * trials, uniforms, noise, draft_probs, resample_residual=resample_residual
    )
    return torch.bincount(tokens[:, 0], minlength=vocab).double(), p.double()


def chi_square(counts: torch.Tensor, probs: torch.Tensor) -> float:
    expected = probs * counts.sum()
    return float(((counts - expected) ** 2 / expected).sum())


# df = 7; P(chi2 > 35) ~ 1e-5: a correct sampler passes essentially always, and the seeds are fixed anyway.
CHI2_BOUND = 35.0


@pytest.mark.parametrize("with_draft_probs", [False, True])
def test_first_token_is_distributed_as_the_target(with_draft_probs):
    counts, p = _first_token_counts(True, with_draft_probs)
    assert chi_square(counts, p) < CHI2_BOUND


@pytest.mark.parametrize("with_draft_probs", [False, True])
def test_the_distribution_check_catches_a_missing_residual(with_draft_probs):
    counts, p = _first_token_counts(False, with_draft_probs)
    assert chi_square(counts, p) > 10 * CHI2_BOUND


def test_exponential_noise_is_exp1_positive_and_seeded():
    n = 200_000
    e = exponential_noise(n, torch.Generator().manual_seed(3))
    assert e.shape == (n,) and e.dtype == torch.float32
    assert bool(torch.isfinite(e).all()) and bool((e > 0).all())
    # Exp(1): mean 1 and P(e > x) = exp(-x); 5 standard errors each
    assert abs(float(e.mean()) - 1.0) < 5 / n**0.5
    for x in (0.1, 1.0, 3.0):
        p = torch.exp(torch.tensor(-x)).item()
        assert abs(float((e > x).float().mean()) - p) < 5 * (p * (1 - p) / n) ** 0.5
    assert torch.equal(e, exponential_noise(n, torch.Generator().manual_seed(3)))
