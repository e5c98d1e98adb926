"""Speculation's back-off in the engine: a sequence whose drafts are always rejected stops getting
draft slots, probes again after a growing pause, and greedy output never changes."""

from __future__ import annotations

import pytest
from tiny_models import VOCAB, assert_all_blocks_free, make_llm, make_prompts, tiny_hf_model
from tiny_models import greedy_token_ids as generate

import minipaged.engine.core as engine_core
from minipaged import SamplingParams
from minipaged.errors import InvalidEngineConfigError

PROMPT = [5, 17, 99, 42, 7, 300, 12, 8, 5, 17, 99]
MAX_TOKENS = 30


def spec(k=3, **backoff) -> dict:
    spec = {"method": "ngram", "num_speculative_tokens": k, "prompt_lookup_min": 1, "prompt_lookup_max": 3}
    return {**spec, "disable_by_batch_size": None, **backoff}  # back-off alone, at every batch size


@pytest.fixture(scope="module")
def hf():
    return tiny_hf_model("llama")


@pytest.fixture(scope="module")
def path(hf):
    """The greedy continuation of PROMPT without speculation."""
    return generate(make_llm(hf), [PROMPT], [MAX_TOKENS])[0]


def drafts_from(path, right_after: int | None):
    """A proposer that drafts the wrong token (path's next + 1) until ``right_after`` output tokens,
    then the right continuation."""

    def propose(tokens, k, lo, hi):
        done = len(tokens) - len(PROMPT)
        if right_after is None or done < right_after:
            return [(path[done] + 1) % VOCAB] * k
        return path[done : done + k]

    return propose


def draft_steps(llm) -> list[int]:
    """Indices of the engine steps that verified drafts (one sequence: step 0 is its prefill)."""
    return [r.step for r in llm.trace if r.num_draft_tokens]


def test_always_rejected_drafts_pause_and_probe(hf, path, monkeypatch):
    monkeypatch.setattr(engine_core, "propose_ngram", drafts_from(path, None))
    llm = make_llm(hf, speculative_config=spec(backoff_after=2, backoff_min_steps=2, backoff_max_steps=4))
    assert generate(llm, [PROMPT], [MAX_TOKENS])[0] == path
    # Each step emits one token (nothing accepted): the prefill's, then one per decode step 1..29.
    # Two misses (steps 1, 2) pause 2 steps; the probe at 5 misses: pause 4 (the cap) after every probe.
    assert draft_steps(llm) == [1, 2, 5, 10, 15, 20, 25]
    assert len(llm.trace) == MAX_TOKENS
    assert len(llm.engine_core.draft_control) == 0  # the finished sequence's record is gone


def test_without_backoff_every_step_drafts(hf, path, monkeypatch):
    monkeypatch.setattr(engine_core, "propose_ngram", drafts_from(path, None))
    llm = make_llm(hf, speculative_config=spec(backoff_after=None))
    assert generate(llm, [PROMPT], [MAX_TOKENS])[0] == path
    # every decode step but the last (one token of room left: no drafts fit)
    assert draft_steps(llm) == list(range(1, MAX_TOKENS - 1))


def test_a_probe_that_is_accepted_resumes_speculation(hf, path, monkeypatch):
    monkeypatch.setattr(engine_core, "propose_ngram", drafts_from(path, 4))
    llm = make_llm(hf, speculative_config=spec(backoff_after=2, backoff_min_steps=2, backoff_max_steps=4))
    assert generate(llm, [PROMPT], [MAX_TOKENS])[0] == path
    # Wrong at steps 1, 2, paused at 3, 4; the probe at step 5 drafts the right tokens and so does every
    # later step, each emitting k + 1 = 4: 5 tokens after step 4, 29 after step 10, and step 11 has room
    # for its own token only.
    assert draft_steps(llm) == [1, 2, 5, 6, 7, 8, 9, 10]
    assert len(llm.trace) == 12
    stats = llm.engine_core.stats()
    assert stats.spec_num_accepted_tokens > 0


def test_greedy_unchanged_and_fewer_drafts_with_backoff(hf):
    prompts, max_tokens = make_prompts(seed=11)
    prompts = [p + p[: len(p) // 2] for p in prompts]  # repeats: the proposer finds matches, right or wrong
    expected = generate(make_llm(hf), prompts, max_tokens)
    counts = {}
    settings = {"off": {"backoff_after": None}, "eager": {"backoff_after": 1, "backoff_min_steps": 2}}
    for name, backoff in settings.items():
        llm = make_llm(hf, speculative_config=spec(**backoff))
        assert generate(llm, prompts, max_tokens) == expected
        counts[name] = llm.engine_core.stats().spec_num_draft_tokens
    assert 0 < counts["eager"] < counts["off"]


@pytest.mark.parametrize(
    "backoff,field",
    [
        ({"backoff_after": 0}, "speculative_config.backoff_after"),
        ({"backoff_min_steps": 0}, "speculative_config.backoff_min_steps"),
        ({"backoff_min_steps": 9, "backoff_max_steps": 4}, "speculative_config.backoff_min_steps"),
    ],
)
def test_bad_backoff_config_is_a_typed_error(hf, backoff, field):
    with pytest.raises(InvalidEngineConfigError) as err:
        make_llm(hf, speculative_config=spec(**backoff))
    assert err.value.field == field


def test_abort_forgets_a_paused_sequence(hf, path, monkeypatch):
    monkeypatch.setattr(engine_core, "propose_ngram", drafts_from(path, None))
    llm = make_llm(hf, speculative_config=spec(backoff_after=1, backoff_min_steps=8, backoff_max_steps=8))
    params = SamplingParams(temperature=0, max_tokens=MAX_TOKENS, ignore_eos=True)
    llm.add_request({"prompt_token_ids": PROMPT}, params, request_id="r")
    for _ in range(3):  # prefill, one rejected verification (pause), one paused step
        llm.step()
    control = llm.engine_core.draft_control
    assert control.is_paused(("r", 0))
    llm.abort("r")
    assert len(control) == 0
    assert_all_blocks_free(llm)
