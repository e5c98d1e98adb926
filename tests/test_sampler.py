"""Sampler vs a plain per-row reference; seeded reproducibility across batch layouts."""
import math

import pytest
import torch

from minipaged.sampler import filtered_probs, sample
from minipaged.sampling_params import SamplingParams


def reference_probs(logits: torch.Tensor, p: SamplingParams) -> torch.Tensor:
    """One row, written the slow obvious way: sort once, walk the tokens."""
    x = (logits.double() / p.temperature).tolist()
    order = sorted(range(len(x)), key=lambda i: -x[i])
    keep = set(order[: p.top_k] if p.top_k is not None else order)
    m = max(x)
    weights = {i: math.exp(x[i] - m) for i in keep}
    total_all = sum(math.exp(v - m) for i, v in enumerate(x) if i in keep)
    kept, mass = [], 0.0
    for i in order:
        if i not in keep:
            continue
        if mass >= p.top_p:
            break
        kept.append(i)
        mass += weights[i] / total_all
    best = max(weights[i] for i in kept)
    kept = [i for i in kept if weights[i] >= p.min_p * best]
    out = torch.zeros(len(x), dtype=torch.float64)
    z = sum(weights[i] for i in kept)
    for i in kept:
        out[i] = weights[i] / z
    return out


def test_greedy_is_argmax():
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(7, 300, generator=g)
    params = [SamplingParams(temperature=0)] * 7
    gens = [torch.Generator().manual_seed(i) for i in range(7)]
    assert sample(logits, params, gens) == torch.argmax(logits, -1).tolist()


@pytest.mark.parametrize("trial", range(4))
def test_filtered_probs_match_reference(trial):
    g = torch.Generator().manual_seed(100 + trial)
    vocab = 97
    params = [
        SamplingParams(temperature=0.7, top_k=5),
        SamplingParams(temperature=1.3, top_p=0.6),
        SamplingParams(temperature=1.0, min_p=0.2),
        SamplingParams(temperature=0.9, top_k=20, top_p=0.8, min_p=0.05),
        SamplingParams(temperature=2.0),
    ]
    logits = torch.randn(len(params), vocab, generator=g) * 3
    got = filtered_probs(logits, params)
    for row, p in enumerate(params):
        torch.testing.assert_close(got[row].double(), reference_probs(logits[row], p), atol=1e-5, rtol=1e-4)


def test_seeded_samples_do_not_depend_on_batch():
    g = torch.Generator().manual_seed(3)
    logits = torch.randn(5, 64, generator=g)
    params = [SamplingParams(temperature=1.0, seed=i) for i in range(5)]
    together = sample(logits, params, [torch.Generator().manual_seed(p.seed) for p in params])
    alone = [sample(logits[i:i + 1], [params[i]], [torch.Generator().manual_seed(params[i].seed)])[0] for i in range(5)]
    assert together == alone
    mixed = [SamplingParams(temperature=0)] + params[2:]
    again = sample(torch.cat([logits[:1], logits[2:]]), mixed,
                   [torch.Generator()] + [torch.Generator().manual_seed(p.seed) for p in params[2:]])
    assert again[1:] == together[2:]


def test_draws_follow_the_filtered_distribution():
    g = torch.Generator().manual_seed(5)
    logits = torch.randn(1, 12, generator=g)
    p = SamplingParams(temperature=0.8, top_p=0.9)
    gen = torch.Generator().manual_seed(11)
    draws = 4000
    counts = torch.zeros(12)
    for _ in range(draws):
        counts[sample(logits, [p], [gen])[0]] += 1
    expected = reference_probs(logits[0], p) * draws
    assert counts[expected == 0].sum() == 0  # filtered tokens are never drawn
    kept = expected > 0
    chi2 = float((((counts[kept] - expected[kept].float()) ** 2) / expected[kept].float()).sum())
    assert chi2 < 40, chi2  # ~11 dof: far beyond the 0.1% tail only if sampling is wrong
