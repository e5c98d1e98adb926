"""Speculation's batch switch (``disable_by_batch_size``): while that many sequences run, no drafts
are proposed; below it they are, and greedy output never changes."""

from __future__ import annotations

import pytest
from tiny_models import VOCAB, make_llm, make_prompts, tiny_hf_model
from tiny_models import greedy_outputs as generate

import minipaged.engine.core as engine_core
from minipaged.errors import InvalidEngineConfigError

K = 3
# Distinct first tokens, so the proposer below can tell the prompts apart.
PROMPTS = [[10 + i, 17, 99, 42, 7, 300, 12, 8, 5, 17, 99] for i in range(6)]
STAGGERED = [4, 7, 10, 13, 16, 19]  # the batch shrinks by one sequence every three steps


def spec(disable_by_batch_size, **extra) -> dict:
    return {
        "method": "ngram",
        "num_speculative_tokens": K,
        "prompt_lookup_min": 1,
        "prompt_lookup_max": 3,
        "disable_by_batch_size": disable_by_batch_size,
        **extra,
    }


@pytest.fixture(scope="module")
def hf():
    return tiny_hf_model("llama")


@pytest.fixture(scope="module")
def paths(hf):
    """Each prompt's greedy continuation without speculation (the longest run)."""
    outs = generate(make_llm(hf), PROMPTS, [max(STAGGERED)] * len(PROMPTS))
    return [o.outputs[0].token_ids for o in outs]


def wrong_drafts(paths):
    """A proposer that always drafts k tokens, the first one wrong: every verification emits one token."""

    def propose(tokens, k, lo, hi):
        for prompt, path in zip(PROMPTS, paths):
            if list(tokens[: len(prompt)]) == prompt:
                done = len(tokens) - len(prompt)
                return [(path[done] + 1) % VOCAB] * k
        raise AssertionError("unknown prompt")

    return propose


@pytest.mark.parametrize("threshold", [1, 3, 5, 7])
def test_drafts_exactly_while_fewer_than_the_threshold_run(hf, paths, monkeypatch, threshold):
    monkeypatch.setattr(engine_core, "propose_ngram", wrong_drafts(paths))
    llm = make_llm(hf, speculative_config=spec(threshold, backoff_after=None))
    outs = generate(llm, PROMPTS, STAGGERED)
    assert [o.outputs[0].token_ids for o in outs] == [p[:m] for p, m in zip(paths, STAGGERED)]
    max_tokens = {o.request_id: m for o, m in zip(outs, STAGGERED)}
    trace = list(llm.trace)
    # Step 0 prefills every prompt; step s >= 1 emits each sequence's token s + 1 (nothing is accepted).
    # Drafts for step s were proposed after step s - 1, when trace[s - 1].num_running sequences ran, and
    # only where at least two tokens were still to come (one of its own plus one draft).
    assert trace[0].num_running == len(PROMPTS)
    drafted_any = False
    for prev, record in zip(trace, trace[1:]):
        for request_id, _, num_tokens in record.scheduled:
            expected = prev.num_running < threshold and record.step <= max_tokens[request_id] - 2
            assert (num_tokens > 1) == expected, (record.step, request_id, prev.num_running)
            drafted_any |= expected
    assert drafted_any == (threshold > 1)
    assert (llm.engine_core.stats().spec_num_drafts > 0) == drafted_any


def test_at_the_threshold_no_request_reports_drafts(hf, paths, monkeypatch):
    monkeypatch.setattr(engine_core, "propose_ngram", wrong_drafts(paths))
    counts = {}
    for threshold in (len(PROMPTS), len(PROMPTS) + 1):
        llm = make_llm(hf, speculative_config=spec(threshold, backoff_after=None))
        outs = generate(llm, PROMPTS, [12] * len(PROMPTS))  # all run until the end
        counts[threshold] = [o.metrics.num_drafts for o in outs]
        assert sum(counts[threshold]) == llm.engine_core.stats().spec_num_drafts
        assert all(r.num_draft_tokens == 0 for r in llm.trace) == (threshold == len(PROMPTS))
    assert counts[len(PROMPTS)] == [0] * len(PROMPTS)
    assert all(n > 0 for n in counts[len(PROMPTS) + 1])


def test_greedy_unchanged_by_the_switch(hf):
    prompts, max_tokens = make_prompts(seed=11)
    prompts = [p + p[: len(p) // 2] for p in prompts]  # repeats: the real proposer finds matches
    expected = [o.outputs[0].token_ids for o in generate(make_llm(hf), prompts, max_tokens)]
    drafts = {}
    for threshold in (None, 6):
        llm = make_llm(hf, speculative_config=spec(threshold))
        assert [o.outputs[0].token_ids for o in generate(llm, prompts, max_tokens)] == expected
        drafts[threshold] = llm.engine_core.stats().spec_num_drafts
        trace = list(llm.trace)
        if threshold is not None:
            assert all(r.num_draft_tokens == 0 for p, r in zip(trace, trace[1:]) if p.num_running >= threshold)
    assert 0 < drafts[6] < drafts[None]


@pytest.mark.parametrize("value", [0, -2, 2.5, "8", True])
def test_bad_disable_by_batch_size_is_a_typed_error(hf, value):
    with pytest.raises(InvalidEngineConfigError) as err:
        make_llm(hf, speculative_config=spec(value))
    assert err.value.field == "speculative_config.disable_by_batch_size"
