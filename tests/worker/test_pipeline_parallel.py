"""Pipeline parallelism (P=2, and P=2 x T=2, over gloo on CPU) against one process and against transformers.

Spawning ranks costs seconds, so one engine per configuration is shared by the tests
(module fixtures); the last test of the file kills a rank of one of them. The partition
arithmetic and the config checks run without processes.
"""

from __future__ import annotations

import os
import signal
from types import SimpleNamespace

import pytest
import torch
from rank_failures import assert_killed_rank_raises
from tiny_models import assert_all_blocks_free, hf_greedy, make_prompts, tiny_hf_model
from tiny_models import greedy_token_ids as greedy  # noqa: F401  one_thread: autouse

from minipaged import LLM, SamplingParams
from minipaged.config import EngineConfig
from minipaged.engine.beam_search import BeamSearchParams
from minipaged.errors import InvalidEngineConfigError, InvalidSamplingParamsError
from minipaged.models import build_model_from_hf
from minipaged.models.pipeline import StageLayout, layer_partition, stage_state_dict
from minipaged.worker.pipeline import PipelineParallelExecutor, overlapping_batches, stage_chunk

BLOCKS = 18  # x 8 tokens: the 12-prompt batch cannot all fit, so the scheduler preempts


@pytest.fixture(scope="module")
def data():
    hf = tiny_hf_model("qwen2")  # tied embedding: the last stage holds it too
    prompts, max_tokens = make_prompts(seed=3)
    expected = [hf_greedy(hf, p, m) for p, m in zip(prompts, max_tokens)]
    return hf, prompts, max_tokens, expected


@pytest.fixture(scope="module")
def pp(data):
    """P=2, one batch in flight at a time; the 3 layers split 2 + 1."""
    llm = LLM(
        build_model_from_hf(data[0]),
        pipeline_parallel_size=2,
        num_kv_blocks=BLOCKS,
        block_size=8,
        max_concurrent_batches=1,
    )
    yield llm
    llm.shutdown()


def test_stages_hold_their_own_layers_and_kv(pp, data):
    executor = pp.engine_core.worker
    assert isinstance(executor, PipelineParallelExecutor) and executor.partition == (2, 1)
    model = executor.model
    assert model.stage.layers == range(0, 2) and len(model.model.layers) == 2
    assert model.model.norm is None and model.lm_head is None and model.model.embed_tokens is not None
    assert len(executor.worker.kv_caches) == 2  # the KV cache of stage 0's layers only
    assert len(executor.worker_pids) == 1


def test_alone_batched_preempted_prefix_cached_match_transformers(pp, data):
    _, prompts, max_tokens, expected = data
    assert greedy(pp, [prompts[0]], [max_tokens[0]]) == [expected[0]]
    hits, preemptions = pp.block_manager.stats().prefix_hits, pp.num_preemptions
    assert greedy(pp, prompts, max_tokens) == expected
    assert pp.num_preemptions > preemptions  # the 18-block cache cannot hold the batch
    assert pp.block_manager.stats().prefix_hits > hits  # odd prompts share a 40-token prefix


def test_parallel_samples_and_beam_search(pp, data):
    hf, prompts, max_tokens, expected = data
    single = LLM(build_model_from_hf(hf), num_kv_blocks=BLOCKS, block_size=8)
    out = pp.generate(
        {"prompt_token_ids": prompts[1]},
        SamplingParams(n=3, temperature=0, max_tokens=max_tokens[1], ignore_eos=True),
        use_tqdm=False,
    )[0]
    assert [c.token_ids for c in out.outputs] == [expected[1]] * 3
    params = BeamSearchParams(beam_width=3, max_tokens=6, ignore_eos=True)
    beams = [{"prompt_token_ids": p} for p in prompts[:2]]
    for a, b in zip(pp.beam_search(beams, params), single.beam_search(beams, params)):
        assert [s.tokens for s in a.sequences] == [s.tokens for s in b.sequences]
    assert_all_blocks_free(pp)


def test_prompt_logprobs_are_refused_before_anything_is_queued(pp, data):
    # Only the sampled rows travel back from the last stage, so prompt positions cannot be scored.
    _, prompts, _, _ = data
    params = SamplingParams(temperature=0, max_tokens=2, prompt_logprobs=1)
    with pytest.raises(InvalidSamplingParamsError) as err:
        pp.generate({"prompt_token_ids": prompts[0]}, params, use_tqdm=False)
    assert err.value.field == "prompt_logprobs"
    assert_all_blocks_free(pp)


def test_depth_one_never_overlaps(pp):
    timeline = pp.engine_core.worker.timeline
    assert timeline and not overlapping_batches(timeline)


# ---- without processes ----------------------------------------------------------------------------------------
def test_layer_partition():
    assert layer_partition(3, 2) == (2, 1)
    assert layer_partition(10, 4) == (2, 3, 3, 2)  # the remainder goes to the middle stages
    assert layer_partition(30, 4) == (7, 8, 8, 7)
    assert layer_partition(7, 3) == (2, 3, 2)
    for layers in range(1, 40):
        for stages in range(1, layers + 1):
            parts = layer_partition(layers, stages)
            assert sum(parts) == layers and max(parts) - min(parts) <= 1
    assert layer_partition(5, 2, (1, 4)) == (1, 4)
    with pytest.raises(InvalidEngineConfigError, match="sums to 4 layers; the model has 5") as err:
        layer_partition(5, 2, (1, 3))
    assert err.value.field == "pipeline_layer_partition"
    with pytest.raises(InvalidEngineConfigError, match="a stage would be empty") as err:
        layer_partition(3, 4)
    assert err.value.field == "pipeline_parallel_size"


def test_each_tensor_parallel_rank_sends_its_slice_of_the_residual_stream():
    hidden = torch.randn(5, 12)  # [num_tokens, hidden_size]
    for tp_size in (2, 3, 4):
        chunks = [stage_chunk(hidden, SimpleNamespace(rank=r, world_size=tp_size)) for r in range(tp_size)]
        assert all(c.numel() == hidden.numel() // tp_size and c.is_contiguous() for c in chunks)
        assert all(c.data_ptr() != chunks[0].data_ptr() for c in chunks[1:])  # different parts, no copies sent twice
        assert torch.equal(torch.cat(chunks).view_as(hidden), hidden)  # the receivers' all-gather rebuilds it
    # Without tensor parallelism, or when T does not divide the tensor, the whole tensor goes.
    assert torch.equal(stage_chunk(hidden, None), hidden)
    assert stage_chunk(torch.randn(5, 7), SimpleNamespace(rank=1, world_size=2)).shape == (5, 7)


def test_stage_state_dicts_cover_the_model_once(data):
    model = build_model_from_hf(data[0])
    config = model.config
    full = model.state_dict()
    seen: dict[str, int] = {}
    for index in range(2):
        stage = StageLayout.of(index, (2, 1))
        for name in stage_state_dict(config, stage, full):
            global_name = name
            if name.startswith("model.layers."):
                i, rest = name.removeprefix("model.layers.").split(".", 1)
                global_name = f"model.layers.{int(i) + stage.layers.start}.{rest}"
            seen[global_name] = seen.get(global_name, 0) + 1
    assert set(seen) == set(full)
    assert seen.pop("model.embed_tokens.weight") == 2  # tied: first stage looks up, last multiplies
    assert set(seen.values()) == {1}


def test_bad_pipeline_config(monkeypatch):
    for bad in (0, -1, "2", True):
        with pytest.raises(InvalidEngineConfigError) as err:
            EngineConfig(pipeline_parallel_size=bad)
        assert err.value.field == "pipeline_parallel_size"
    with pytest.raises(InvalidEngineConfigError, match=r"needs 2 positive layer counts, got \[1, 1, 1\]") as err:
        layer_partition(3, 2, EngineConfig(pipeline_layer_partition=(1, 1, 1)).pipeline_layer_partition)
    assert err.value.field == "pipeline_layer_partition"
    for bad in ("2,x", (2, 0), [1.5, 2]):
        with pytest.raises(InvalidEngineConfigError) as err:
            EngineConfig(pipeline_parallel_size=2, pipeline_layer_partition=bad)
        assert err.value.field == "pipeline_layer_partition"
    assert EngineConfig(pipeline_parallel_size=2, pipeline_layer_partition="1,2").pipeline_layer_partition == (1, 2)
    with pytest.raises(InvalidEngineConfigError) as err:
        EngineConfig(max_concurrent_batches=0)
    assert err.value.field == "max_concurrent_batches"
    for bad in (0, -1.0, "30", True):
        with pytest.raises(InvalidEngineConfigError) as err:
            EngineConfig(peer_timeout_s=bad)
        assert err.value.field == "peer_timeout_s"
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 3)
    with pytest.raises(InvalidEngineConfigError, match="2 x 2 ranks need 4 GPUs; 3 visible") as err:
        EngineConfig(device="cuda", pipeline_parallel_size=2, tensor_parallel_size=2)
    assert err.value.field == "pipeline_parallel_size"
    hf = tiny_hf_model("llama")  # 3 layers
    with pytest.raises(InvalidEngineConfigError, match="sums to 4 layers") as err:
        LLM(build_model_from_hf(hf), pipeline_parallel_size=2, pipeline_layer_partition=(2, 2), num_kv_blocks=8)
    with pytest.raises(InvalidEngineConfigError, match="stage would be empty"), pytest.warns(RuntimeWarning):
        LLM(build_model_from_hf(hf), pipeline_parallel_size=4, num_kv_blocks=8)


# ---- ends the shared engine: keep last ---------------------------------------------------------------------------
def test_killed_stage_raises_instead_of_hanging(pp, data):
    """Kill stage 1's rank between two steps: the next step raises at once, not after a timeout."""
    _, prompts, max_tokens, _ = data
    assert_killed_rank_raises(pp, prompts[:4], max_tokens[:4], lambda pids: os.kill(pids[0], signal.SIGKILL))
