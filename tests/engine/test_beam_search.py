"""Beam search on the paged engine vs transformers' ``generate(num_beams=k)`` on tiny random models.

Exactness: the width tests run without EOS on both sides (``ignore_eos=True`` here,
no ``eos_token_id`` there), so every beam runs to ``max_tokens``; a separate test makes
a frequent token the EOS id on both sides to exercise finished hypotheses, length
penalty and early stopping the way transformers handles them.
"""

from __future__ import annotations

import random

import pytest
import torch
from tiny_models import VOCAB, assert_all_blocks_free, make_llm, one_thread, tiny_hf_model  # noqa: F401  one_thread: autouse

from minipaged.engine.beam_search import BeamSearchParams
from minipaged.errors import InvalidSamplingParamsError


@pytest.fixture(scope="module", params=["llama", "qwen2"])
def hf(request):
    return tiny_hf_model(request.param)


def prompts_for(seed: int, count: int = 3):
    rng = random.Random(seed)
    return [[rng.randrange(3, VOCAB) for _ in range(rng.choice([3, 7, 13, 21]))] for _ in range(count)]


def hf_beams(hf, prompt, k, max_new, length_penalty=1.0, early_stopping=False, eos=None):
    """transformers' k best hypotheses: (generated tokens, sequence score)."""
    hf.generation_config.eos_token_id = None  # the config default (2) would otherwise stop beams
    ids = torch.tensor([prompt])
    out = hf.generate(
        ids,
        attention_mask=torch.ones_like(ids),
        max_new_tokens=max_new,
        num_beams=k,
        num_return_sequences=k,
        do_sample=False,
        length_penalty=length_penalty,
        early_stopping=early_stopping,
        eos_token_id=eos,
        pad_token_id=0,
        return_dict_in_generate=True,
        output_scores=True,
    )
    lengths = (out.beam_indices >= 0).sum(dim=1).tolist()
    seqs = [row[len(prompt) : len(prompt) + n].tolist() for row, n in zip(out.sequences, lengths)]
    return seqs, out.sequences_scores.tolist()


def max_ref_count(llm) -> int:
    bm = llm.block_manager
    return max(bm.ref_count(b) for b in range(bm.num_blocks))


@pytest.mark.parametrize("k", [2, 4])
def test_beams_match_transformers(hf, k):
    # EOS id None on the transformers side and ignore_eos here: every beam runs to max_tokens.
    llm = make_llm(hf, block_size=4)
    prompts = prompts_for(seed=k)
    params = BeamSearchParams(beam_width=k, max_tokens=10, length_penalty=1.0, ignore_eos=True)
    outs = llm.beam_search([{"prompt_token_ids": p} for p in prompts], params)
    for out, prompt in zip(outs, prompts):
        exp_seqs, exp_scores = hf_beams(hf, prompt, k, 10)
        assert out.prompt_token_ids == prompt
        assert [s.tokens for s in out.sequences] == exp_seqs
        got = [s.score for s in out.sequences]
        assert got == pytest.approx(exp_scores, abs=1e-4)
        assert got == sorted(got, reverse=True)
        for s in out.sequences:
            assert s.score == pytest.approx(s.cum_logprob / len(s.tokens))
            assert s.finish_reason == "length"
    assert_all_blocks_free(llm)


@pytest.mark.parametrize("length_penalty,early_stopping", [(1.0, False), (0.5, True), (2.0, "never"), (0.0, False)])
def test_eos_and_length_penalty_match_transformers(hf, length_penalty, early_stopping):
    # A likely token plays EOS on both sides so hypotheses finish at different lengths.
    prompts = prompts_for(seed=3, count=4)
    k = 3
    probe = make_llm(hf).beam_search(
        [{"prompt_token_ids": p} for p in prompts], BeamSearchParams(beam_width=k, max_tokens=12, ignore_eos=True)
    )
    eos = probe[0].sequences[0].tokens[1]  # the best beam's 2nd token: EOS is then a strong candidate
    llm = make_llm(hf, block_size=4)
    llm.engine_core.eos_token_ids = frozenset({eos})
    params = BeamSearchParams(beam_width=k, max_tokens=12, length_penalty=length_penalty, early_stopping=early_stopping)
    outs = llm.beam_search([{"prompt_token_ids": p} for p in prompts], params)
    stopped = 0
    for out, prompt in zip(outs, prompts):
        exp_seqs, exp_scores = hf_beams(hf, prompt, k, 12, length_penalty, early_stopping, eos=eos)
        assert [s.tokens for s in out.sequences] == exp_seqs
        assert [s.score for s in out.sequences] == pytest.approx(exp_scores, abs=1e-4)
        stopped += sum(s.finish_reason == "stop" for s in out.sequences)
    if length_penalty <= 1.0:  # a strong length reward (2.0) lets full-length beams win on these models
        assert stopped > 0  # finished-by-EOS hypotheses made the final ranking
    assert_all_blocks_free(llm)


def test_beams_share_blocks_and_free_them(hf):
    k = 4
    llm = make_llm(hf, block_size=4, num_kv_blocks=64)
    prompt = prompts_for(seed=5, count=1)[0] * 2  # a longer prompt: many shared blocks
    seen_refs: list[int] = []
    runner_step = llm.engine_core.record_step

    def spy(*args, **kwargs):
        runner_step(*args, **kwargs)
        seen_refs.append(max_ref_count(llm))

    llm.engine_core.record_step = spy
    out = llm.beam_search({"prompt_token_ids": prompt}, BeamSearchParams(beam_width=k, max_tokens=9, ignore_eos=True))[
        0
    ]
    assert len(out.sequences) == k
    assert max(seen_refs) >= 2  # blocks held by several beams at once
    decode = [r for r in llm.trace if r.logical_blocks and r.num_running >= 2]
    assert decode and all(r.used_blocks < r.logical_blocks for r in decode)
    alone = k * llm.block_manager.blocks_for(len(prompt) + 9)
    assert max(r.used_blocks for r in llm.trace) < alone
    assert sum(r.blocks_copied for r in llm.trace) > 0  # copy-on-write of shared last blocks
    assert sum(r.blocks_freed for r in llm.trace) > 0
    assert all(0.0 <= r.sharing_saving < 1.0 for r in llm.trace)
    assert_all_blocks_free(llm)


def test_beam_search_under_preemption_matches(hf):
    # A cache too small for all beams of 3 prompts at once: beams get preempted and recomputed.
    prompts = prompts_for(seed=9, count=3)
    params = BeamSearchParams(beam_width=2, max_tokens=10, ignore_eos=True)
    roomy = make_llm(hf, block_size=4).beam_search([{"prompt_token_ids": p} for p in prompts], params)
    tight = make_llm(hf, block_size=4, num_kv_blocks=14)
    outs = tight.beam_search([{"prompt_token_ids": p} for p in prompts], params)
    assert tight.num_preemptions > 0
    for a, b in zip(roomy, outs):
        assert [s.tokens for s in a.sequences] == [s.tokens for s in b.sequences]
    assert_all_blocks_free(tight)


@pytest.mark.parametrize(
    "field,kwargs",
    [
        ("beam_width", dict(beam_width=0, max_tokens=4)),
        ("beam_width", dict(beam_width=True, max_tokens=4)),
        ("max_tokens", dict(beam_width=2, max_tokens=0)),
        ("length_penalty", dict(beam_width=2, max_tokens=4, length_penalty=float("nan"))),
        ("length_penalty", dict(beam_width=2, max_tokens=4, length_penalty="1")),
        ("ignore_eos", dict(beam_width=2, max_tokens=4, ignore_eos=1)),
        ("early_stopping", dict(beam_width=2, max_tokens=4, early_stopping="always")),
        ("early_stopping", dict(beam_width=2, max_tokens=4, early_stopping=1)),
    ],
)
def test_validation(field, kwargs):
    with pytest.raises(InvalidSamplingParamsError) as err:
        BeamSearchParams(**kwargs)
    assert err.value.field == field


def test_bad_prompt_and_params_type(hf):
    llm = make_llm(hf)
    with pytest.raises(TypeError):
        llm.beam_search({"prompt_token_ids": [5, 6]}, {"beam_width": 2})
    with pytest.raises(ValueError) as err:
        llm.beam_search({"prompt_token_ids": [5, VOCAB]}, BeamSearchParams(beam_width=2, max_tokens=3))
    assert err.value.field == "prompt_token_ids"
    assert_all_blocks_free(llm)


def test_trace_blocks_and_measured_sharing(hf):
    # The trace's block numbers are the block manager's own, and the memsim helpers read them back.
    from minipaged.memsim import PagedStrategy, SimConfig, simulate
    from minipaged.memsim.engine import batch_trace, measured_sharing, run_engine_batch, step_utilization

    llm = make_llm(hf, block_size=4, num_kv_blocks=24, enable_prefix_caching=False)
    prompts = prompts_for(seed=2, count=6)
    outs = [random.Random(i).randint(3, 12) for i in range(6)]
    steps = run_engine_batch(llm, prompts, outs)
    util = step_utilization(steps)
    for r, u in zip(steps, util):
        assert u == (r.tokens_stored / (r.used_blocks * 4) if r.used_blocks else 1.0)
        assert r.logical_blocks == r.used_blocks  # no prefix caching, no forks: nothing is shared
    # The simulator replays the same batch on the same BlockManager: same first-step utilisation.
    replay = simulate(batch_trace([len(p) for p in prompts], outs, "t"), PagedStrategy(96, 4), SimConfig(budget=96))
    assert replay.series.utilization()[0] == pytest.approx(util[0])
    start = len(llm.trace)
    llm.beam_search(
        [{"prompt_token_ids": p} for p in prompts[:2]], BeamSearchParams(beam_width=4, max_tokens=8, ignore_eos=True)
    )
    beam_steps = llm.trace[start:]
    res = measured_sharing(beam_steps, mode="beam", width=4, block_size=4, name="tiny")
    used = sum(r.used_blocks for r in beam_steps if r.logical_blocks)
    assert res.saving == pytest.approx(1 - used / sum(r.logical_blocks for r in beam_steps)) and res.saving > 0.2
    with pytest.raises(ValueError):
        measured_sharing([], mode="beam", width=4, block_size=4, name="empty")
    assert_all_blocks_free(llm)
