"""Several callers on one engine: streams, generate, manual add_request/step, aborts.

Every request's output must reach the caller that submitted it exactly once, equal to what
it produces alone, and every KV block must be free afterwards. The model is a tiny random
Llama with SmolLM2's real tokenizer, so stop strings and detokenisation are the real thing.
"""

from __future__ import annotations

import random

import pytest
from conftest import SMOLLM2_VOCAB as VOCAB
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from minipaged import LLM, BeamSearchParams, SamplingParams
from minipaged.errors import InvalidPromptError, InvalidSamplingParamsError, RequestTooLargeError, UnknownRequestError
from minipaged.models import build_model_from_hf


def make_llm(hf, tokenizer=None, **kwargs) -> LLM:
    kwargs.setdefault("num_kv_blocks", 64)
    kwargs.setdefault("block_size", 4)
    return LLM(build_model_from_hf(hf), tokenizer=tokenizer, **kwargs)


def greedy(max_tokens: int, **kw) -> SamplingParams:
    return SamplingParams(temperature=0, max_tokens=max_tokens, ignore_eos=True, **kw)


def ids(tokens) -> dict:
    return {"prompt_token_ids": list(tokens)}


def rand_prompts(seed: int, count: int) -> list[list[int]]:
    rng = random.Random(seed)
    return [[rng.randrange(3, VOCAB) for _ in range(rng.randint(1, 12))] for _ in range(count)]


def assert_all_free(llm: LLM) -> None:
    stats = llm.block_manager.stats()
    assert stats.used_blocks == 0 and stats.free_blocks == stats.num_blocks, stats
    assert not llm.engine_core.has_unfinished() and not llm.processor.states and not llm._owners


# ---- 1. stop strings that span tokens never leak into the stream -------------------------
def test_stream_holds_back_stop_strings_that_span_tokens(hf, tokenizer):
    llm = make_llm(hf, tokenizer)
    prompt = ids(rand_prompts(1, 1)[0])
    full = llm.generate(prompt, greedy(24), use_tqdm=False)[0].outputs[0]
    # Stops that start inside one token and end inside a later one, at several places.
    bounds = [len(tokenizer.decode(full.token_ids[:i])) for i in range(1, len(full.token_ids))]
    cuts = [b for b in bounds if 2 <= b < len(full.text) - 3][:6]
    assert cuts, full.text
    for b in cuts:
        stop = full.text[b - 1 : b + 3]
        expected = llm.generate(prompt, greedy(24, stop=[stop]), use_tqdm=False)[0].outputs[0]
        assert expected.finish_reason == "stop" and expected.stop_reason == stop
        assert stop not in expected.text and full.text.startswith(expected.text)
        chunks = list(llm.stream(prompt, greedy(24, stop=[stop])))
        streamed = "".join(c.text for c in chunks)
        assert streamed == expected.text, (stop, streamed, expected.text)
        assert chunks[-1].finish_reason == "stop"
    assert_all_free(llm)


# ---- 2. abort inside a stream loop --------------------------------------------------------
def test_abort_inside_stream_ends_it(hf):
    llm = make_llm(hf)
    prompts = rand_prompts(2, 3)
    stream = llm.stream([ids(p) for p in prompts], greedy(30))
    seen: dict[str, list] = {}
    for chunk in stream:
        seen.setdefault(chunk.request_id, []).append(chunk)
        if len(seen[chunk.request_id]) == 3 and chunk.prompt_index == 1:
            llm.abort(chunk.request_id)
    reasons = {rid: chunks[-1].finish_reason for rid, chunks in seen.items()}
    assert sorted(reasons.values()) == ["abort", "length", "length"]
    with pytest.raises(UnknownRequestError):
        llm.abort(next(rid for rid, r in reasons.items() if r == "abort"))
    assert_all_free(llm)


# ---- 3. interleaved streams, generate and manual requests ---------------------------------
def test_two_streams_interleaved_get_every_token(hf):
    llm = make_llm(hf)
    a, b = rand_prompts(3, 2)
    alone = [o.outputs[0].token_ids for o in make_llm(hf).generate([ids(a), ids(b)], greedy(12), use_tqdm=False)]
    sa, sb = llm.stream(ids(a), greedy(12)), llm.stream(ids(b), greedy(12))
    got: dict[str, list[int]] = {"a": [], "b": []}
    live = {"a": sa, "b": sb}
    while live:
        for name in list(live):
            chunk = next(live[name], None)
            if chunk is None:
                del live[name]
            else:
                got[name].extend(chunk.token_ids)
    assert [got["a"], got["b"]] == alone
    assert_all_free(llm)


def test_manual_request_swept_up_by_generate_is_returned_by_step(hf):
    llm = make_llm(hf)
    p, q = rand_prompts(4, 2)
    rid = llm.add_request(ids(p), greedy(8))
    out = llm.generate(ids(q), greedy(20), use_tqdm=False)  # runs the manual request to completion too
    assert out[0].outputs[0].finish_reason == "length"
    assert llm.has_unfinished_requests()  # its output still waits for step()
    done = llm.step()
    assert [o.request_id for o in done] == [rid] and len(done[0].outputs[0].token_ids) == 8
    assert llm.step() == [] and not llm.has_unfinished_requests()
    assert_all_free(llm)


def test_stream_then_generate_then_close(hf):
    llm = make_llm(hf)
    p, q = rand_prompts(5, 2)
    stream = llm.stream(ids(p), greedy(30))
    first = next(stream)
    out = llm.generate(ids(q), greedy(5), use_tqdm=False)  # steps the stream's request as well
    assert len(out[0].outputs[0].token_ids) == 5
    rest = list(stream)  # the tokens produced meanwhile were buffered, not lost
    assert len(first.token_ids) + sum(len(c.token_ids) for c in rest) == 30
    stream2 = llm.stream(ids(p), greedy(30))
    next(stream2)
    llm.generate(ids(q), greedy(3), use_tqdm=False)
    stream2.close()  # aborts its request; nothing raises
    assert_all_free(llm)


# ---- 4. a batch is validated whole, then submitted ----------------------------------------
def test_batch_is_atomic_and_ids_never_collide(hf):
    llm = make_llm(hf)
    llm.add_request(ids([5, 6]), greedy(2), request_id="3")
    outs = llm.generate([ids(p) for p in rand_prompts(6, 5)], greedy(2), use_tqdm=False)  # auto ids skip "3"
    assert len({o.request_id for o in outs}) == 5 and "3" not in {o.request_id for o in outs}
    with pytest.raises(InvalidPromptError) as info:
        llm.add_request(ids([7]), greedy(2), request_id="3")
    assert info.value.field == "request_id"
    with pytest.raises(InvalidPromptError):
        llm.generate([ids([5]), ids([VOCAB + 1])], greedy(2), use_tqdm=False)
    assert [o.request_id for o in llm.step()] == ["3"]
    assert_all_free(llm)


# ---- 5/6. beam search: max_model_len, and caches generate copes with -------------------------
def test_beam_search_stops_at_max_model_len(hf):
    llm = make_llm(hf, max_model_len=32)
    out = llm.beam_search(ids(range(3, 33)), BeamSearchParams(beam_width=3, max_tokens=40, ignore_eos=True))[0]
    assert all(len(out.prompt_token_ids) + len(s.tokens) <= 32 for s in out.sequences)
    assert max(len(s.tokens) for s in out.sequences) == 32 - len(out.prompt_token_ids)
    full = make_llm(hf, num_kv_blocks=128).beam_search(
        ids(range(3, 253)), BeamSearchParams(beam_width=2, max_tokens=20, ignore_eos=True)
    )[0]
    assert all(250 + len(s.tokens) <= 256 for s in full.sequences)
    assert_all_free(llm)


@pytest.mark.parametrize("num_blocks", [6, 9])
def test_beam_search_on_a_tiny_cache_matches_a_large_one(hf, num_blocks):
    prompt = ids([11, 12, 13, 14, 15])
    params = BeamSearchParams(beam_width=4, max_tokens=8, ignore_eos=True)
    expected = make_llm(hf, num_kv_blocks=256).beam_search(prompt, params)[0]
    llm = make_llm(hf, num_kv_blocks=num_blocks, block_size=4)
    got = llm.beam_search(prompt, params)[0]
    assert [s.tokens for s in got.sequences] == [s.tokens for s in expected.sequences]
    assert [s.score for s in got.sequences] == pytest.approx([s.score for s in expected.sequences], rel=1e-5)
    assert_all_free(llm)


def test_beam_search_refuses_what_one_beam_cannot_hold(hf):
    llm = make_llm(hf, num_kv_blocks=2, block_size=4)
    with pytest.raises(RequestTooLargeError):
        llm.beam_search(ids([5, 6, 7, 8, 9]), BeamSearchParams(beam_width=2, max_tokens=8))


# ---- 7. max_num_seqs holds for n > 1 --------------------------------------------------------
def test_max_num_seqs_counts_forked_samples(hf):
    prompts = [ids(p) for p in rand_prompts(9, 2)]
    params = SamplingParams(n=4, temperature=1.0, seed=11, max_tokens=4, ignore_eos=True)
    wide = make_llm(hf, num_kv_blocks=128).generate(prompts, params, use_tqdm=False)
    llm = make_llm(hf, max_num_seqs=2, num_kv_blocks=128)
    narrow = llm.generate(prompts, params, use_tqdm=False)
    assert max(r.num_running for r in llm.trace) <= 2 and max(r.num_scheduled for r in llm.trace) <= 2
    assert [[c.token_ids for c in o.outputs] for o in narrow] == [[c.token_ids for c in o.outputs] for o in wide]
    assert_all_free(llm)


# ---- 9/10. clear, typed errors ---------------------------------------------------------------
@pytest.mark.parametrize(
    "call, field",
    [
        (lambda llm: llm.generate(5, use_tqdm=False), "prompts"),
        (lambda llm: llm.generate(None, use_tqdm=False), "prompts"),
        (lambda llm: llm.generate([], use_tqdm=False), "prompts"),
        (lambda llm: llm.generate(ids([5]), {"temperature": 0}, use_tqdm=False), "sampling_params"),
        (lambda llm: llm.generate(ids([5]), greedy(2), priority="high", use_tqdm=False), "priority"),
        (lambda llm: llm.generate(ids([5]), greedy(2, stop_token_ids=[10**9]), use_tqdm=False), "stop_token_ids"),
        (lambda llm: llm.chat([[]]), "messages[0]"),
        (lambda llm: llm.chat([{"role": "user"}]), "messages"),
        (lambda llm: llm.chat("hello"), "messages"),
    ],
)
def test_bad_calls_get_typed_errors(hf, tokenizer, call, field):
    llm = make_llm(hf, tokenizer)
    with pytest.raises((InvalidPromptError, InvalidSamplingParamsError)) as info:
        call(llm)
    assert info.value.field == field, info.value
    assert_all_free(llm)


def test_stop_strings_need_a_tokenizer(hf):
    llm = make_llm(hf)
    with pytest.raises(InvalidSamplingParamsError) as info:
        llm.generate(ids([5]), greedy(2, stop=["x"]), use_tqdm=False)
    assert info.value.field == "stop"


def test_numpy_token_ids_are_accepted(hf):
    np = pytest.importorskip("numpy")
    llm = make_llm(hf)
    prompt = rand_prompts(10, 1)[0]
    a = llm.generate({"prompt_token_ids": np.array(prompt, dtype=np.int64)}, greedy(4), use_tqdm=False)
    b = llm.generate(ids(prompt), greedy(4), use_tqdm=False)
    assert a[0].outputs[0].token_ids == b[0].outputs[0].token_ids and a[0].prompt_token_ids == prompt


# ---- random interleavings: delivered exactly once, equal to alone, nothing leaks -----------------
@pytest.fixture(scope="module")
def reference(hf):
    prompts = rand_prompts(12, 6)
    lens = [3, 9, 5, 12, 7, 4]
    outs = make_llm(hf, num_kv_blocks=128).generate(
        [ids(p) for p in prompts], [greedy(m) for m in lens], use_tqdm=False
    )
    return prompts, lens, [o.outputs[0].token_ids for o in outs]


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    ops=st.lists(
        st.tuples(st.sampled_from(["add", "step", "abort", "stream", "next", "generate"]), st.integers(0, 5)),
        min_size=1,
        max_size=25,
    )
)
def test_random_interleavings(hf, reference, ops):
    prompts, lens, expected = reference
    llm = make_llm(hf, num_kv_blocks=10, block_size=4, max_num_seqs=3)  # small: preemption happens
    manual: dict[str, int] = {}
    aborted: set[str] = set()
    got: dict[str, list[int]] = {}
    streams: list = []
    stream_tokens: dict[tuple[int, str], list[int]] = {}
    finished_streams: dict[tuple[int, str], str] = {}
    for op, k in ops:
        if op == "add":
            manual[llm.add_request(ids(prompts[k]), greedy(lens[k]))] = k
        elif op == "step":
            for out in llm.step():
                assert out.request_id not in got, "delivered twice"
                got[out.request_id] = out.outputs[0].token_ids
        elif op == "abort" and manual:
            rid = sorted(manual)[k % len(manual)]
            if rid not in got and rid not in aborted:
                llm.abort(rid)
                aborted.add(rid)
        elif op == "stream":
            streams.append((k, llm.stream(ids(prompts[k]), greedy(lens[k]))))
        elif op == "next" and streams:
            sid = k % len(streams)
            chunk = next(streams[sid][1], None)
            if chunk is not None:
                key = (sid, chunk.request_id)
                assert key not in finished_streams
                stream_tokens.setdefault(key, []).extend(chunk.token_ids)
                if chunk.finish_reason:
                    finished_streams[key] = chunk.finish_reason
        elif op == "generate":
            out = llm.generate(ids(prompts[k]), greedy(lens[k]), use_tqdm=False)[0]
            assert out.outputs[0].token_ids == expected[k]
    for sid, (_, stream) in enumerate(streams):  # drain what is left
        for chunk in stream:
            stream_tokens.setdefault((sid, chunk.request_id), []).extend(chunk.token_ids)
    while llm.has_unfinished_requests():
        for out in llm.step():
            assert out.request_id not in got, "delivered twice"
            got[out.request_id] = out.outputs[0].token_ids
    assert set(got) == set(manual) - aborted
    for rid, tokens in got.items():
        assert tokens == expected[manual[rid]]
    for (sid, _), tokens in stream_tokens.items():
        assert tokens == expected[streams[sid][0]]
    assert_all_free(llm)


def test_logit_bias_ids_outside_the_vocabulary_are_refused(hf):
    llm = make_llm(hf)
    with pytest.raises(InvalidPromptError) as info:
        llm.generate(ids([5]), greedy(2, logit_bias={VOCAB + 3: 1.0}), use_tqdm=False)
    assert info.value.field == "logit_bias"
    assert_all_free(llm)


def test_seed_overflow_is_refused_before_anything_is_queued(hf):
    llm = make_llm(hf)
    with pytest.raises(InvalidSamplingParamsError):
        llm.generate([ids([5]), ids([6])], SamplingParams(seed=2**70), use_tqdm=False)
    with pytest.raises(InvalidSamplingParamsError):
        SamplingParams(seed=2**64 - 1, n=2)
    assert_all_free(llm)
