"""Speculative decoding end to end on tiny random models.

Greedy output with speculation must equal the output without it token for token, whatever the
batching, prefix caching or preemption; sampled output must keep its distribution; rejected drafts
must leave no trace in the KV cache; every block is free after every run.
"""

from __future__ import annotations

import copy
import math

import pytest
import torch
from tiny_models import VOCAB, assert_all_blocks_free, make_llm, make_prompts, tiny_hf_model
from tiny_models import greedy_outputs as greedy  # noqa: F401
from tiny_models import max_greedy_z as max_z

import minipaged.engine.core as engine_core
from minipaged import SamplingParams
from minipaged.errors import InvalidEngineConfigError


def ngram(k: int, lo: int = 1, hi: int = 3) -> dict:
    # No batch switch: the batched tests keep verifying drafts with all 12 sequences running.
    return {
        "method": "ngram",
        "num_speculative_tokens": k,
        "prompt_lookup_min": lo,
        "prompt_lookup_max": hi,
        "disable_by_batch_size": None,
    }


@pytest.fixture(scope="module")
def hf():
    return tiny_hf_model("llama")


@pytest.fixture(scope="module")
def smol_dir(tmp_path_factory):
    """A tiny random Llama with SmolLM2's vocabulary and tokenizer (real text for stop strings)."""
    from tiny_models import make_tiny_model_dir

    return make_tiny_model_dir(tmp_path_factory.mktemp("smol"), max_model_len=256)


@pytest.fixture(scope="module")
def prompts():
    """Mixed prompts; most repeat a stretch of themselves, so the n-gram proposer finds matches."""
    prompts, max_tokens = make_prompts(seed=11)
    prompts = [p + p[: len(p) // 2] if i % 3 else p for i, p in enumerate(prompts)]
    return prompts, max_tokens


@pytest.fixture(scope="module")
def expected(hf, prompts):
    outs = greedy(make_llm(hf), *prompts)
    return [o.outputs[0].token_ids for o in outs]


SETTINGS = {
    "batched": dict(),
    "alone": dict(max_num_seqs=1),
    "chunked": dict(max_num_batched_tokens=16),  # prefill chunks and drafts share a small budget
    "no_prefix_cache": dict(enable_prefix_caching=False),
    "preemption": dict(num_kv_blocks=24, block_size=8),
}


@pytest.mark.parametrize("k", [1, 3, 5])
@pytest.mark.parametrize("setting", list(SETTINGS))
def test_greedy_equals_no_speculation(hf, prompts, expected, k, setting):
    llm = make_llm(hf, speculative_config=ngram(k), **SETTINGS[setting])
    outs = greedy(llm, *prompts)
    assert [o.outputs[0].token_ids for o in outs] == expected
    stats = llm.engine_core.stats()
    assert stats.spec_num_drafts > 0 and stats.spec_num_accepted_tokens > 0  # speculation did happen
    if setting == "preemption":
        assert stats.num_preemptions > 0


def test_prefix_cache_never_holds_rejected_drafts(hf, prompts, expected):
    llm = make_llm(hf, speculative_config=ngram(3))
    first = greedy(llm, *prompts)
    again = greedy(llm, *prompts)  # served partly from the prefix cache the first run filled
    assert [o.outputs[0].token_ids for o in first] == expected
    assert [o.outputs[0].token_ids for o in again] == expected
    assert llm.block_manager.stats().prefix_hits > 0
    # Every cached block holds tokens found at its block-aligned place in some real sequence.
    bs = llm.block_manager.block_size
    sequences = [p + e for p, e in zip(prompts[0], expected)]
    chunks = {tuple(s[i : i + bs]) for s in sequences for i in range(0, len(s) - bs + 1, bs)}
    pool = llm.block_manager._pool
    cached = [pool.blocks[b].token_ids for b in llm.block_manager.cached_block_ids()]
    assert cached and all(c in chunks for c in cached)


def test_n_greater_than_one(hf, prompts, expected):
    llm = make_llm(hf, speculative_config=ngram(3))
    outs = greedy(llm, *prompts, n=2)
    for out, exp in zip(outs, expected):
        assert [c.token_ids for c in out.outputs] == [exp, exp]


def test_rejected_drafts_leave_no_trace(hf, prompts, monkeypatch):
    """Drafts that are always wrong: every step rolls back; the logprobs of every emitted token
    equal those of a run that never saw a draft (so the KV of the rejected tokens was never read)."""
    plain = greedy(make_llm(hf), *prompts, logprobs=3)
    monkeypatch.setattr(engine_core, "propose_ngram", lambda tokens, k, lo, hi: [(tokens[-1] + 1) % VOCAB] * k)
    llm = make_llm(hf, speculative_config=ngram(4), block_size=4)
    spec = greedy(llm, *prompts, logprobs=3)
    stats = llm.engine_core.stats()
    assert stats.spec_num_draft_tokens > 0 and stats.spec_num_accepted_tokens < stats.spec_num_draft_tokens
    for a, b in zip(plain, spec):
        assert a.outputs[0].token_ids == b.outputs[0].token_ids
        for la, lb in zip(a.outputs[0].logprobs, b.outputs[0].logprobs):
            assert la.keys() == lb.keys()
            for t in la:
                assert math.isclose(la[t].logprob, lb[t].logprob, abs_tol=1e-4)


def test_metrics(hf, prompts):
    llm = make_llm(hf, speculative_config=ngram(3))
    outs = greedy(llm, *prompts)
    stats = llm.engine_core.stats()
    assert sum(o.metrics.num_drafts for o in outs) == stats.spec_num_drafts
    assert sum(o.metrics.num_accepted_tokens for o in outs) == stats.spec_num_accepted_tokens
    for o in outs:
        m = o.metrics
        assert sum(m.accepted_per_position) == m.num_accepted_tokens
        assert m.accepted_per_position == sorted(m.accepted_per_position, reverse=True)  # a prefix is accepted
        if m.num_drafts:
            assert m.mean_acceptance_length == 1 + m.num_accepted_tokens / m.num_drafts
            assert 0 <= m.acceptance_rate <= 1
        else:
            assert m.acceptance_rate is None


# ---- sampling keeps its distribution -------------------------------------------------------
PROMPT = [5, 17, 99, 42, 7, 300, 12, 8]
TRIALS = 600


@pytest.fixture(scope="module")
def peaked(hf):
    """The tiny model with a sharpened head: its likeliest tokens carry 25-50% of the mass, so drafts
    of them are accepted often and rejected often."""
    model = copy.deepcopy(hf)
    with torch.no_grad():
        model.lm_head.weight.mul_(40)
    greedy_path = greedy(make_llm(model), [PROMPT], [8])[0].outputs[0].token_ids
    return model, greedy_path


def sampled_tokens(model, greedy_path, monkeypatch, speculate: bool, resample_residual: bool = True):
    """The first 4 tokens of TRIALS seeded samples; with speculation the drafts are the greedy path."""
    kwargs = {}
    if speculate:
        kwargs["speculative_config"] = ngram(3)

        def oracle(tokens, k, lo, hi):
            done = len(tokens) - len(PROMPT)
            return greedy_path[done : done + k]

        monkeypatch.setattr(engine_core, "propose_ngram", oracle)
        if not resample_residual:
            import minipaged.spec_decode.verifier as verifier

            original = verifier.rejection_sample
            monkeypatch.setattr(
                verifier, "rejection_sample", lambda *a, **kw: original(*a, **{**kw, "resample_residual": False})
            )
    llm = make_llm(model, max_num_seqs=256, **kwargs)
    params = [SamplingParams(temperature=1.0, max_tokens=4, ignore_eos=True, seed=s) for s in range(TRIALS)]
    outs = llm.generate([{"prompt_token_ids": PROMPT}] * TRIALS, params, use_tqdm=False)
    assert_all_blocks_free(llm)
    if speculate:
        stats = llm.engine_core.stats()
        assert 0 < stats.spec_num_accepted_tokens < stats.spec_num_draft_tokens  # both branches ran
    return torch.tensor([o.outputs[0].token_ids for o in outs])


# |z| < 4 fails a correct sampler with probability ~2e-4 per position (and the seeds are fixed).
Z_BOUND = 4.0


def test_sampling_distribution_unchanged(peaked, monkeypatch):
    model, greedy_path = peaked
    plain = sampled_tokens(model, greedy_path, monkeypatch, speculate=False)
    spec = sampled_tokens(model, greedy_path, monkeypatch, speculate=True)
    assert max_z(plain, spec, greedy_path) < Z_BOUND


def test_sampling_check_catches_a_missing_residual(peaked, monkeypatch):
    model, greedy_path = peaked
    plain = sampled_tokens(model, greedy_path, monkeypatch, speculate=False)
    wrong = sampled_tokens(model, greedy_path, monkeypatch, speculate=True, resample_residual=False)
    assert max_z(plain, wrong, greedy_path) > Z_BOUND


# ---- bad input -------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "config,field",
    [
        ({"method": "ngram", "num_speculative_tokens": 0}, "speculative_config.num_speculative_tokens"),
        ({"method": "medusa"}, "speculative_config.method"),
        ({"method": "ngram", "prompt_lookup_min": 5, "prompt_lookup_max": 2}, "speculative_config.prompt_lookup_min"),
        ({"method": "ngram", "lookahead": 3}, "speculative_config"),
        ({"method": "draft_model"}, "speculative_config.model"),
        ("ngram", "speculative_config"),
    ],
)
def test_bad_config_is_a_typed_error(hf, config, field):
    with pytest.raises(InvalidEngineConfigError) as err:
        make_llm(hf, speculative_config=config)
    assert err.value.field == field


def test_speculation_with_pipeline_stages_is_refused_before_any_rank_starts(hf):
    with pytest.raises(InvalidEngineConfigError) as err:
        make_llm(hf, speculative_config=ngram(2), pipeline_parallel_size=2)
    assert err.value.field == "speculative_config"


def test_async_stream_equals_no_speculation(hf, prompts, expected):
    """Through AsyncLLM's stream (the server's path): several tokens may arrive in one chunk."""
    import asyncio

    from minipaged.engine.async_llm import AsyncLLM
    from minipaged.models import build_model_from_hf

    async def main():
        engine = AsyncLLM(
            build_model_from_hf(hf, attention_backend="torch"),
            num_kv_blocks=256,
            block_size=8,
            speculative_config=ngram(3),
        )

        async def one(i, p, m):
            params = SamplingParams(temperature=0, max_tokens=m, ignore_eos=True)
            stream = engine.generate({"prompt_token_ids": p}, params, f"r{i}")
            chunks = [o.outputs[0].token_ids[:] async for o in stream]
            assert all(a == b[: len(a)] for a, b in zip(chunks, chunks[1:]))  # cumulative
            return chunks

        results = await asyncio.gather(*(one(i, p, m) for i, (p, m) in enumerate(zip(*prompts))))
        stats = engine.engine_core.stats()
        assert stats.used_blocks == 0 and stats.spec_num_accepted_tokens > 0
        await engine.shutdown()
        return results

    results = asyncio.run(main())
    assert [chunks[-1] for chunks in results] == expected
    assert any(len(b) - len(a) > 1 for chunks in results for a, b in zip(chunks, chunks[1:]))


def test_stop_string_inside_an_accepted_run(smol_dir, monkeypatch):
    """Several tokens arrive in one step; a stop string completed by one of them ends the completion
    at that token, token ids included, exactly as without speculation."""
    from minipaged import LLM

    def make(**kw):
        return LLM(str(smol_dir), num_kv_blocks=128, attention_backend="torch", **kw)

    prompt = {"prompt_token_ids": list(range(400, 413))}
    plain = make().generate(prompt, SamplingParams(temperature=0, max_tokens=24, ignore_eos=True), use_tqdm=False)
    path = plain[0].outputs[0].token_ids
    text = plain[0].outputs[0].text
    stop = text[len(text) // 2 : len(text) // 2 + 3]
    params = SamplingParams(temperature=0, max_tokens=24, ignore_eos=True, stop=[stop], logprobs=1)
    expected = make().generate(prompt, params, use_tqdm=False)[0].outputs[0]
    # drafts that are always right: whole runs are accepted, so the stop string lands inside one
    monkeypatch.setattr(
        engine_core, "propose_ngram", lambda t, k, lo, hi: path[len(t) - len(prompt["prompt_token_ids"]) :][:k]
    )
    llm = make(speculative_config=ngram(5))
    got = llm.generate(prompt, params, use_tqdm=False)[0].outputs[0]
    assert llm.engine_core.stats().spec_num_accepted_tokens > 0
    assert (got.text, got.token_ids, got.finish_reason, got.stop_reason) == (
        expected.text,
        expected.token_ids,
        "stop",
        stop,
    )
    assert len(got.logprobs) == len(got.token_ids)
    assert_all_blocks_free(llm)
