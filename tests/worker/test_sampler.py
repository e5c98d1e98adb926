"""Sampler vs a plain per-row reference; seeded reproducibility across batch layouts.

The vLLM-parity features (logit bias, min_tokens, penalties, logprobs) are checked against naive
per-row references and transformers' own logits processors, on fresh random logits each run.
"""

import math
import random

import pytest
import torch
from transformers import MinNewTokensLengthLogitsProcessor, RepetitionPenaltyLogitsProcessor

from minipaged.outputs import Logprob
from minipaged.sampling_params import SamplingParams
from minipaged.worker.sampler import SamplerOutput, draw, filtered_probs, greedy_tokens, process_logits
from minipaged.worker.sampler import sample as sample_with_history


def sample(logits, params, generators):
    """Token ids of ``sample`` for rows without history (no feature here needs one)."""
    empty = [[] for _ in params]
    return sample_with_history(logits, params, generators, prompt_token_ids=empty, output_token_ids=empty).token_ids


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


def test_greedy_tokens_match_torch_argmax_on_ties_nan_and_strided_rows():
    g = torch.Generator().manual_seed(1)
    logits = torch.randn(6, 2 * 1000, generator=g).round(decimals=1)[:, ::2]  # strided rows, many ties
    logits[1, 7] = float("nan")
    logits[2] = float("-inf")
    logits[3, 10:20] = 9.0  # a tie for the maximum: the first one wins
    want = torch.argmax(logits, dim=-1)
    got = greedy_tokens(logits)
    assert got.dtype == torch.int64 and got.tolist() == want.tolist()
    assert got[1] == 7 and got[2] == 0 and got[3] == 10


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
    alone = [
        sample(logits[i : i + 1], [params[i]], [torch.Generator().manual_seed(params[i].seed)])[0] for i in range(5)
    ]
    assert together == alone
    mixed = [SamplingParams(temperature=0)] + params[2:]
    again = sample(
        torch.cat([logits[:1], logits[2:]]),
        mixed,
        [torch.Generator()] + [torch.Generator().manual_seed(p.seed) for p in params[2:]],
    )
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


# ---- vLLM-parity features ------------------------------------------------------------------

VOCAB = 131


@pytest.fixture
def fresh():
    """A generator seeded afresh each run; the seed is in every failure message (``fresh.initial_seed()``)."""
    seed = random.SystemRandom().randrange(2**31)
    gen = torch.Generator().manual_seed(seed)
    return gen


def random_history(gen, rows, vocab=VOCAB, max_len=12):
    """Per row: prompt and output token ids with repeats (so counts > 1 occur)."""

    def ids():
        n = int(torch.randint(0, max_len, (1,), generator=gen))
        pool = torch.randint(0, vocab, (4,), generator=gen)  # few distinct ids -> repeats
        return [
            int(pool[int(j) % 4]) if j % 2 else int(torch.randint(0, vocab, (1,), generator=gen))
            for j in torch.randint(0, 8, (n,), generator=gen)
        ]

    return [ids() for _ in range(rows)], [ids() for _ in range(rows)]


def naive_process(x: list[float], p: SamplingParams, prompt, output, eos) -> list[float]:
    """One row, the slow obvious way: loops over token lists in vLLM's order."""
    x = list(x)
    for token, bias in (p.logit_bias or {}).items():
        x[token] += bias
    if len(output) < p.min_tokens:
        for token in set(p.stop_token_ids) | (set() if p.ignore_eos else set(eos)):
            x[token] = float("-inf")
    for token in set(prompt) | set(output):
        x[token] = x[token] / p.repetition_penalty if x[token] > 0 else x[token] * p.repetition_penalty
    for token in set(output):
        x[token] -= p.frequency_penalty * output.count(token) + p.presence_penalty
    return x


def run(logits, params, prompts, outputs, eos=frozenset(), generators=None) -> SamplerOutput:
    gens = generators or [torch.Generator().manual_seed(i) for i in range(len(params))]
    return sample_with_history(
        logits, params, gens, prompt_token_ids=prompts, output_token_ids=outputs, eos_token_ids=eos
    )


FEATURE_PARAMS = [
    SamplingParams(temperature=0, logit_bias={3: 5.0, 7: -100, 130: 2.5}),
    SamplingParams(temperature=0, min_tokens=16, stop_token_ids=[9, 11]),
    SamplingParams(temperature=0, min_tokens=16, ignore_eos=True, stop_token_ids=[12]),
    SamplingParams(temperature=0, repetition_penalty=1.7),
    SamplingParams(temperature=0, repetition_penalty=0.6),
    SamplingParams(temperature=0, presence_penalty=1.5),
    SamplingParams(temperature=0, frequency_penalty=-0.7),
    SamplingParams(
        temperature=0.8,
        top_k=30,
        presence_penalty=-2,
        frequency_penalty=2,
        repetition_penalty=1.3,
        logit_bias={1: 1.0},
        min_tokens=3,
        stop_token_ids=[2],
    ),
    SamplingParams(temperature=0),  # nothing set: must come out untouched
]


def test_processed_logits_match_the_naive_reference(fresh):
    eos = frozenset({0, 5})
    logits = torch.randn(len(FEATURE_PARAMS), VOCAB, generator=fresh) * 4
    prompts, outputs = random_history(fresh, len(FEATURE_PARAMS))
    before = logits.clone()
    got = process_logits(logits, FEATURE_PARAMS, prompts, outputs, eos)
    assert torch.equal(logits, before), "the caller's logits were modified"
    for row, p in enumerate(FEATURE_PARAMS):
        want = torch.tensor(naive_process(logits[row].tolist(), p, prompts[row], outputs[row], eos))
        torch.testing.assert_close(
            got[row],
            want.float(),
            rtol=1e-6,
            atol=1e-5,
            msg=lambda m, row=row, p=p: f"row {row} ({p}), seed {fresh.initial_seed()}: {m}",
        )
    assert torch.equal(got[-1], logits[-1])
    assert bool(torch.isinf(got[1, [0, 5, 9, 11]]).all()) == (len(outputs[1]) < 16)


def test_nothing_set_takes_the_old_path_bit_identically(fresh):
    logits = torch.randn(4, VOCAB, generator=fresh)
    params = [
        SamplingParams(temperature=0),
        SamplingParams(temperature=0.7, top_p=0.9, seed=1),
        SamplingParams(temperature=1.2, top_k=5, min_p=0.1),
        SamplingParams(temperature=0, stop_token_ids=[3]),
    ]
    prompts, outputs = random_history(fresh, 4)
    assert process_logits(logits, params, prompts, outputs, frozenset({3})) is logits
    out = run(logits, params, prompts, outputs, frozenset({3}))
    # With no penalty, bias or stop field in play: plain argmax or one draw from the filtered row, step by step.
    gens = [torch.Generator().manual_seed(i) for i in range(4)]
    want = torch.argmax(logits, -1)
    probs = filtered_probs(logits[[1, 2]], params[1:3])
    for j, i in enumerate([1, 2]):
        want[i] = draw(probs[j], gens[i])
    assert out.token_ids == want.tolist() and out.logprobs == [None] * 4


@pytest.mark.parametrize("penalty", [0.5, 1.0, 1.3, 2.0])
def test_repetition_penalty_matches_transformers(fresh, penalty):
    params = [SamplingParams(temperature=0, repetition_penalty=penalty)] * 6
    logits = torch.randn(6, VOCAB, generator=fresh) * 3
    prompts, outputs = random_history(fresh, 6)
    got = process_logits(logits, params, prompts, outputs)
    tokens = run(logits, params, prompts, outputs).token_ids
    hf = RepetitionPenaltyLogitsProcessor(penalty)
    for row in range(6):
        history = torch.tensor([prompts[row] + outputs[row]], dtype=torch.long)
        want = hf(history, logits[row : row + 1].clone())[0]
        torch.testing.assert_close(got[row], want, msg=lambda m: f"seed {fresh.initial_seed()}: {m}")
        assert tokens[row] == int(torch.argmax(want))


def test_min_tokens_matches_transformers_min_new_tokens(fresh):
    eos = frozenset({4, 8})
    rows = 8
    params = [SamplingParams(temperature=0, min_tokens=m, max_tokens=20) for m in (0, 1, 3, 5, 5, 7, 9, 20)]
    logits = torch.randn(rows, VOCAB, generator=fresh)
    logits[:, 4] = 50.0  # poison: EOS is the argmax everywhere, so the mask decides the token
    prompts, outputs = random_history(fresh, rows)
    got = process_logits(logits, params, prompts, outputs, eos)
    tokens = run(logits, params, prompts, outputs, eos).token_ids
    for row, p in enumerate(params):
        hf = MinNewTokensLengthLogitsProcessor(
            prompt_length_to_skip=len(prompts[row]), min_new_tokens=p.min_tokens, eos_token_id=sorted(eos)
        )
        history = torch.tensor([prompts[row] + outputs[row]], dtype=torch.long)
        want = hf(history, logits[row : row + 1].clone())[0]
        assert torch.equal(got[row], want), f"row {row}, seed {fresh.initial_seed()}"
        assert (tokens[row] == 4) == (len(outputs[row]) >= p.min_tokens)


def test_min_tokens_is_never_drawn_past_in_sampling(fresh):
    logits = torch.randn(1, 16, generator=fresh)
    logits[0, 0] = 8.0  # EOS nearly certain without the mask
    params = [SamplingParams(temperature=1.0, min_tokens=4, stop_token_ids=[1])]
    gen = torch.Generator().manual_seed(fresh.initial_seed())
    draws = [
        run(logits, params, [[2]], [[5] * k], frozenset({0}), [gen]).token_ids[0]
        for k in (0, 1, 2, 3)
        for _ in range(50)
    ]
    assert not {0, 1} & set(draws)
    after = [run(logits, params, [[2]], [[5] * 4], frozenset({0}), [gen]).token_ids[0] for _ in range(50)]
    assert 0 in after


def test_presence_and_frequency_count_output_tokens_only():
    logits = torch.zeros(1, 10)
    p = SamplingParams(temperature=0, presence_penalty=0.5, frequency_penalty=0.25)
    got = process_logits(logits, [p], [[1, 1, 2]], [[2, 3, 3, 3]])[0]
    want = torch.zeros(10)
    want[2] = -0.75
    want[3] = -1.25
    assert torch.equal(got, want)


def test_logit_bias_adds_to_the_right_tokens_and_checks_the_vocab(fresh):
    logits = torch.randn(3, VOCAB, generator=fresh)
    params = [
        SamplingParams(temperature=0, logit_bias={10: 100}),
        SamplingParams(temperature=0),
        SamplingParams(temperature=0, logit_bias={int(torch.argmax(logits[2])): -100, 0: 0.5}),
    ]
    out = run(logits, params, [[]] * 3, [[]] * 3)
    assert out.token_ids[0] == 10 and out.token_ids[1] == int(torch.argmax(logits[1]))
    assert out.token_ids[2] == int(
        torch.argmax(
            logits[2] - 100 * (torch.arange(VOCAB) == torch.argmax(logits[2])) + 0.5 * (torch.arange(VOCAB) == 0)
        )
    )
    with pytest.raises(ValueError, match="vocabulary"):
        run(logits, [SamplingParams(logit_bias={VOCAB: 1.0})] * 3, [[]] * 3, [[]] * 3)


def test_history_ids_outside_the_vocabulary_are_refused():
    p = [SamplingParams(temperature=0, repetition_penalty=1.2)]
    with pytest.raises(ValueError, match="token ids"):
        run(torch.zeros(1, 8), p, [[1, 8]], [[]])
    with pytest.raises(ValueError, match="one entry per row"):
        run(torch.zeros(2, 8), p * 2, [[1]], [[], []])


@pytest.mark.parametrize("greedy", [True, False])
def test_logprobs_are_raw_log_softmax_with_ranks(fresh, greedy):
    temperature = 0.0 if greedy else 1.0
    params = [SamplingParams(temperature=temperature, logprobs=k, logit_bias={7: 100}) for k in (0, 1, 5, 20)]
    params.append(SamplingParams(temperature=temperature))
    logits = torch.randn(len(params), VOCAB, generator=fresh) * 2
    out = run(logits, params, [[]] * len(params), [[]] * len(params))
    assert out.logprobs[-1] is None
    reference = torch.log_softmax(logits.double(), dim=-1)
    for row, p in enumerate(params[:-1]):
        entry = out.logprobs[row]
        token = out.token_ids[row]
        assert token == 7  # the bias decides the token...
        order = torch.argsort(reference[row], descending=True).tolist()
        top = order[: p.logprobs]
        assert set(entry) == set(top) | {token}, f"seed {fresh.initial_seed()}"
        for t, lp in entry.items():
            assert isinstance(lp, Logprob) and lp.rank == order.index(t) + 1
            # ...but the logprobs are those of the raw logits, before the bias.
            assert math.isclose(lp.logprob, float(reference[row, t]), rel_tol=1e-5, abs_tol=1e-5)


def test_draw_follows_the_probabilities_and_its_generator(fresh):
    # Over many draws each token's frequency is within 5 sigma of its probability (a biased race, e.g.
    # noise that is not Exp(1), misses by far more); a zero-probability token never comes; twin
    # generators give the same tokens; a NaN or all-zero row is refused.
    probs = torch.softmax(torch.randn(12, generator=fresh) * 1.5, dim=0)
    probs[3] = 0.0
    probs /= probs.sum()
    trials = 40_000
    gen = torch.Generator().manual_seed(int(torch.randint(2**31, (1,), generator=fresh)))
    counts = torch.bincount(torch.tensor([draw(probs, gen) for _ in range(trials)]), minlength=12).double()
    sigma = (probs.double() * (1 - probs.double()) / trials).sqrt()
    assert counts[3] == 0
    assert ((counts / trials - probs.double()).abs() <= 5 * sigma + 1e-9).all(), (counts / trials, probs)
    seed = int(torch.randint(2**31, (1,), generator=fresh))
    ours, twin = torch.Generator().manual_seed(seed), torch.Generator().manual_seed(seed)
    row = torch.softmax(torch.randn(5000, generator=fresh), dim=0)[::2]  # strided
    assert [draw(row, ours) for _ in range(5)] == [draw(row, twin) for _ in range(5)]
    for bad in (torch.full((10,), float("nan")), torch.zeros(10)):
        with pytest.raises(ValueError, match="NaN or all zero"):
            draw(bad, torch.Generator().manual_seed(0))
