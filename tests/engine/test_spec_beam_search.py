"""Beam search and parallel samples on an engine with speculative decoding, for both proposers.

Beam search drives the core's scheduler and ``execute`` itself and never asks for drafts (the
documented rule: it runs without speculation), so on a speculative engine its beams and scores
equal a plain engine's, no draft is verified, the draft model keeps no state for a beam, and
speculation still works for the requests after it. Parallel samples (``n > 1``) draft each on its
own: with a draft identical to the target every sampled draft is accepted (q = p). Every KV block
is free after every run.
"""

from __future__ import annotations

import pytest
from tiny_models import (  # noqa: F401 (one_thread: an autouse fixture)
    assert_all_blocks_free,
    make_llm,
    make_prompts,
    one_thread,
    tiny_hf_model,
)
from tiny_models import (
    greedy_token_ids as greedy_tokens,
)

from minipaged import SamplingParams
from minipaged.engine.beam_search import BeamSearchParams

pytestmark = pytest.mark.filterwarnings("ignore:.*has no tokenizer files")


@pytest.fixture(scope="module")
def hf():
    return tiny_hf_model("llama")


@pytest.fixture(scope="module")
def prompts():
    """Prompts that repeat a stretch of themselves, so the n-gram proposer finds matches."""
    prompts, max_tokens = make_prompts(seed=5, count=6)
    return [p + p[: len(p) // 2] for p in prompts], max_tokens


@pytest.fixture(scope="module")
def spec_configs(hf, tmp_path_factory):
    """One speculative config per proposer; the draft model is the target itself."""
    path = tmp_path_factory.mktemp("draft") / "same"
    hf.save_pretrained(path)
    return {
        "ngram": {"method": "ngram", "num_speculative_tokens": 3, "prompt_lookup_min": 1, "prompt_lookup_max": 3},
        "draft_model": {"method": "draft_model", "model": str(path), "num_speculative_tokens": 3},
    }


def beams(llm, prompts):
    params = BeamSearchParams(beam_width=3, max_tokens=8, ignore_eos=True)
    outs = llm.beam_search([{"prompt_token_ids": p} for p in prompts], params)
    assert_all_blocks_free(llm)
    return [[s.tokens for s in o.sequences] for o in outs], [s.score for o in outs for s in o.sequences]


@pytest.fixture(scope="module")
def plain(hf, prompts):
    llm = make_llm(hf, num_kv_blocks=64)
    return beams(llm, prompts[0]), greedy_tokens(llm, *prompts)


@pytest.mark.parametrize("method", ["ngram", "draft_model"])
def test_beam_search_runs_without_speculation(hf, prompts, spec_configs, plain, method):
    (plain_tokens, plain_scores), plain_greedy = plain
    llm = make_llm(hf, num_kv_blocks=64, speculative_config=spec_configs[method])
    tokens, scores = beams(llm, prompts[0])
    assert tokens == plain_tokens
    assert scores == pytest.approx(plain_scores, abs=1e-4)
    assert llm.engine_core.stats().spec_num_drafts == 0
    drafter = llm.engine_core.drafter
    assert drafter is None or drafter.num_sequences == 0
    # The same engine still speculates for ordinary requests afterwards.
    assert greedy_tokens(llm, *prompts) == plain_greedy
    stats = llm.engine_core.stats()
    assert stats.spec_num_accepted_tokens > 0
    assert drafter is None or drafter.num_sequences == 0


def test_sampled_parallel_samples_with_an_identical_draft(hf, prompts, spec_configs):
    """Each of n = 3 seeded samples draws its own drafts from the draft's distribution; with q = p
    every one is accepted, the samples still differ, and the draft forgets all of them at the end."""
    llm = make_llm(hf, num_kv_blocks=64, speculative_config=spec_configs["draft_model"])
    params = SamplingParams(n=3, temperature=1.0, seed=7, max_tokens=12, ignore_eos=True)
    outs = llm.generate([{"prompt_token_ids": p} for p in prompts[0][:3]], params, use_tqdm=False)
    assert_all_blocks_free(llm)
    assert llm.engine_core.drafter.num_sequences == 0
    for out in outs:
        samples = [tuple(c.token_ids) for c in out.outputs]
        assert len(samples) == 3 and all(len(s) == 12 for s in samples)
        assert len(set(samples)) > 1
    stats = llm.engine_core.stats()
    assert stats.spec_num_accepted_tokens >= 0.99 * stats.spec_num_draft_tokens > 0
