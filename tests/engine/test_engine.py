"""The whole engine vs transformers' own generate, on tiny random-weight models.

Greedy token ids must be identical to ``transformers`` ``generate`` for every prompt,
whatever the batching, prefix caching, chunking or preemption. Every test ends by
checking that all KV blocks went back to the free pool.
"""

from __future__ import annotations

import pytest
import torch
from tiny_models import NEW_TOKENS, VOCAB, assert_all_blocks_free, hf_greedy, make_llm, make_prompts, tiny_hf_model  # noqa: F401

from minipaged import LLM, SamplingParams
from minipaged.models.linear import PackedLinear, onednn_packing_available
from minipaged_kernels import cpu as cpu_kernels


@pytest.fixture(scope="module", params=["llama", "qwen2"])
def case(request):
    hf = tiny_hf_model(request.param)
    prompts, max_tokens = make_prompts(seed=7)
    expected = [hf_greedy(hf, p, m) for p, m in zip(prompts, max_tokens)]
    return request.param, hf, prompts, max_tokens, expected


def run(llm: LLM, prompts, max_tokens, **kw):
    params = [SamplingParams(temperature=0, max_tokens=m, ignore_eos=True) for m in max_tokens]
    outs = llm.generate([{"prompt_token_ids": p} for p in prompts], params, use_tqdm=False, **kw)
    assert_all_blocks_free(llm)
    return outs


@pytest.mark.parametrize(
    "setting",
    [
        dict(),  # all 12 in one batch
        dict(max_num_seqs=1),  # one request at a time
        dict(enable_prefix_caching=False),
        dict(max_num_batched_tokens=16),  # long prompts chunked, mixed with decodes
        dict(num_kv_blocks=18, block_size=8),  # forces preemption by recompute
    ],
)
def test_greedy_matches_transformers(case, setting):
    arch, hf, prompts, max_tokens, expected = case
    llm = make_llm(hf, **setting)
    outs = run(llm, prompts, max_tokens)
    for out, prompt, exp in zip(outs, prompts, expected):
        assert out.prompt_token_ids == prompt
        assert out.outputs[0].token_ids == exp
        assert out.outputs[0].finish_reason == "length"
    if setting == {} and onednn_packing_available():
        # The CPU worker swapped every projection's dense weight for its packed copy before
        # these tokens were computed, keeping the dense one for the few-row kernel where it
        # runs and otherwise saying how much it released.
        worker = llm.engine_core.worker
        layers = [m for m in worker.model.modules() if isinstance(m, PackedLinear)]
        assert layers and all(m.weight.is_mkldnn for m in layers)
        if cpu_kernels.load("gemv") is not None:
            assert worker.dense_weight_bytes_released == 0
            assert all(torch.equal(m.dense_weight, m.weight.to_dense()) for m in layers)
        else:
            assert worker.dense_weight_bytes_released == sum(m.weight.numel() * 4 for m in layers)
    if setting.get("num_kv_blocks") == 18:
        assert llm.num_preemptions > 0
        assert any(r.preemptions for r in llm.trace)
    if setting == {"max_num_seqs": 1}:
        # Requests admitted later find the shared prefix computed by earlier ones.
        assert llm.block_manager.stats().prefix_hits > 0
        assert sum(o.num_cached_tokens for o in outs) > 0


def test_batched_32_at_a_time_matches_alone(case):
    arch, hf, _, _, _ = case
    prompts, max_tokens = make_prompts(seed=11, count=40)
    batched_llm = make_llm(hf, max_num_seqs=32, num_kv_blocks=512)
    batched = run(batched_llm, prompts, max_tokens)
    assert max(r.num_scheduled for r in batched_llm.trace) == 32
    alone_llm = make_llm(hf, max_num_seqs=1)
    alone = run(alone_llm, prompts[:8], max_tokens[:8])
    for a, b in zip(alone, batched[:8]):
        assert a.outputs[0].token_ids == b.outputs[0].token_ids
    for out, p, m in zip(batched[::7], prompts[::7], max_tokens[::7]):
        assert out.outputs[0].token_ids == hf_greedy(hf, p, m)


def test_triton_backend_matches_transformers(case):
    arch, hf, prompts, max_tokens, expected = case
    picks = [0, 3, 4]  # short, long with shared prefix, and one more: the interpreter is slow
    llm = make_llm(hf, backend="triton", max_num_batched_tokens=64)
    outs = run(llm, [prompts[i] for i in picks], [min(max_tokens[i], 6) for i in picks])
    for out, i in zip(outs, picks):
        assert out.outputs[0].token_ids == expected[i][: min(max_tokens[i], 6)]


def test_parallel_samples_share_the_prompt(case):
    arch, hf, prompts, max_tokens, expected = case
    llm = make_llm(hf, block_size=4)
    greedy = SamplingParams(n=3, temperature=0, max_tokens=max_tokens[1], ignore_eos=True)
    out = llm.generate({"prompt_token_ids": prompts[1]}, greedy, use_tqdm=False)[0]
    assert [c.index for c in out.outputs] == [0, 1, 2]
    for c in out.outputs:
        assert c.token_ids == expected[1]
    assert sum(r.blocks_copied for r in llm.trace) > 0 or len(prompts[1]) % 4 == 0  # copy-on-write of the last block
    assert_all_blocks_free(llm)
    sampled = SamplingParams(n=4, temperature=1.0, seed=5, max_tokens=12, ignore_eos=True)
    first = llm.generate({"prompt_token_ids": prompts[2]}, sampled, use_tqdm=False)[0]
    again = make_llm(hf, max_num_seqs=2).generate(
        [{"prompt_token_ids": prompts[0]}, {"prompt_token_ids": prompts[2]}], [greedy, sampled], use_tqdm=False
    )[1]
    assert [c.token_ids for c in first.outputs] == [c.token_ids for c in again.outputs]
    assert len({tuple(c.token_ids) for c in first.outputs}) > 1  # different seeds give different samples
    assert_all_blocks_free(llm)


def test_stop_token_ids_and_eos(case):
    arch, hf, prompts, max_tokens, expected = case
    llm = make_llm(hf)
    i = max(range(len(prompts)), key=lambda j: max_tokens[j])
    stop = expected[i][4]
    cut = expected[i].index(stop) + 1
    params = SamplingParams(temperature=0, max_tokens=max_tokens[i], stop_token_ids=[stop], ignore_eos=True)
    out = llm.generate({"prompt_token_ids": prompts[i]}, params, use_tqdm=False)[0].outputs[0]
    assert out.token_ids == expected[i][:cut] and out.finish_reason == "stop" and out.stop_reason == stop
    # The model's EOS id ends a request unless ignore_eos: pretend the 3rd greedy token is EOS.
    eos_llm = make_llm(hf)
    eos_llm.engine_core.eos_token_ids = frozenset({expected[i][2]})
    eos_out = eos_llm.generate(
        {"prompt_token_ids": prompts[i]}, SamplingParams(temperature=0, max_tokens=max_tokens[i]), use_tqdm=False
    )[0].outputs[0]
    assert eos_out.token_ids == expected[i][: expected[i].index(expected[i][2]) + 1]
    assert eos_out.finish_reason == "stop"
    assert_all_blocks_free(llm)
    assert_all_blocks_free(eos_llm)


def test_max_model_len_ends_generation(case):
    arch, hf, prompts, max_tokens, expected = case
    i = max(range(len(prompts)), key=lambda j: len(prompts[j]))
    limit = len(prompts[i]) + 3
    llm = make_llm(hf, max_model_len=limit)
    out = llm.generate(
        {"prompt_token_ids": prompts[i]}, SamplingParams(temperature=0, max_tokens=50, ignore_eos=True), use_tqdm=False
    )[0].outputs[0]
    assert out.token_ids == hf_greedy(hf, prompts[i], 3) and out.finish_reason == "length"
    assert_all_blocks_free(llm)


def test_stream_and_abort(case):
    arch, hf, prompts, max_tokens, expected = case
    llm = make_llm(hf)
    params = [SamplingParams(temperature=0, max_tokens=m, ignore_eos=True) for m in max_tokens[:3]]
    got: dict[int, list[int]] = {0: [], 1: [], 2: []}
    finished = set()
    for chunk in llm.stream([{"prompt_token_ids": p} for p in prompts[:3]], params):
        got[chunk.prompt_index].extend(chunk.token_ids)
        if chunk.finish_reason is not None:
            finished.add(chunk.prompt_index)
    assert finished == {0, 1, 2}
    assert [got[k] for k in range(3)] == expected[:3]
    assert_all_blocks_free(llm)
    # Abort mid-flight: one request mid-prefill, one decoding; the others finish unchanged.
    llm = make_llm(hf, max_num_batched_tokens=16)
    ids = [
        llm.add_request({"prompt_token_ids": p}, SamplingParams(temperature=0, max_tokens=m, ignore_eos=True))
        for p, m in zip(prompts[:4], max_tokens[:4])
    ]
    done = {}
    for _ in range(4):
        done.update({o.request_id: o for o in llm.step()})
    llm.abort(ids[3])
    llm.abort(ids[0]) if ids[0] not in done else None
    while llm.has_unfinished_requests():
        done.update({o.request_id: o for o in llm.step()})
    for k in (1, 2):
        assert done[ids[k]].outputs[0].token_ids == expected[k]
    assert ids[3] not in done
    assert_all_blocks_free(llm)
    # Closing a stream early aborts what it started.
    stream = llm.stream({"prompt_token_ids": prompts[5]}, SamplingParams(temperature=0, max_tokens=20, ignore_eos=True))
    next(stream)
    stream.close()
    assert_all_blocks_free(llm)


def test_trace_records_every_step(case):
    arch, hf, prompts, max_tokens, expected = case
    llm = make_llm(hf, num_kv_blocks=18, max_num_batched_tokens=32)
    run(llm, prompts, max_tokens)
    df = llm.trace.to_dataframe()
    assert len(df) == len(llm.trace) > 0
    assert (df.num_prefill_tokens + df.num_decode_tokens <= 32).all()
    assert int(df.preemptions.sum()) == llm.num_preemptions
    assert int(df.num_finished.sum()) == len(prompts)
    # Each request's first token comes from a prefill; each later one from one decode token (or a recompute).
    assert int(df.num_decode_tokens.sum()) <= sum(max_tokens) - len(prompts)
    assert df.used_blocks.iloc[-1] == 0 and df.used_blocks.max() <= 18


def test_bounded_trace_keeps_the_newest_steps(case):
    arch, hf, prompts, max_tokens, expected = case
    full = make_llm(hf, num_kv_blocks=18, max_num_batched_tokens=32)
    run(full, prompts, max_tokens)
    steps = len(full.trace)
    bound = max(steps // 5, 1)
    assert steps > 2 * bound  # the run is long enough to trim at least once
    llm = make_llm(hf, num_kv_blocks=18, max_num_batched_tokens=32, max_trace_steps=bound)
    outs = run(llm, prompts, max_tokens)
    assert [o.outputs[0].token_ids for o in outs] == expected
    kept = list(llm.trace)
    assert llm.trace.num_steps == steps and bound <= len(kept) <= 2 * bound
    # The kept records are the last steps, numbered as in the unbounded trace, and equal to them but for timing.
    assert [r.step for r in kept] == list(range(steps - len(kept), steps))
    strip = lambda r: (r.scheduled, r.used_blocks, r.num_finished)  # noqa: E731
    assert [strip(r) for r in kept] == [strip(r) for r in full.trace[-len(kept) :]]
    assert [r.step for r in llm.trace.since(steps - 3)] == [steps - 3, steps - 2, steps - 1]
    assert llm.trace.since(0) == kept  # steps already dropped are simply gone
