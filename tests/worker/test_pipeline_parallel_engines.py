"""Pipeline-parallel engines of their own (one engine per process at a time, so they are not run beside
``test_pipeline_parallel``'s shared one): a batch queue of depth 2, P=2 x T=2, and a checkpoint read per stage."""

from __future__ import annotations

import pytest
from rank_failures import alive
from tiny_models import greedy_token_ids as greedy  # noqa: F401  one_thread: autouse
from tiny_models import hf_greedy, make_prompts, tiny_hf_model

from minipaged import LLM
from minipaged.models import build_model_from_hf
from minipaged.worker.pipeline import overlapping_batches, stage_busy_seconds

BLOCKS = 18


@pytest.fixture(scope="module")
def data():
    hf = tiny_hf_model("llama")  # untied head: only the last stage holds it
    prompts, max_tokens = make_prompts(seed=5)
    expected = [hf_greedy(hf, p, m) for p, m in zip(prompts, max_tokens)]
    return hf, prompts, max_tokens, expected


def test_long_prompt_in_chunks_through_the_pipeline(data):
    hf, prompts, max_tokens, expected = data
    long = max(range(len(prompts)), key=lambda i: len(prompts[i]))
    with LLM(
        build_model_from_hf(hf),
        pipeline_parallel_size=2,
        num_kv_blocks=64,
        block_size=8,
        max_num_batched_tokens=16,  # the longest prompt takes several steps
        max_num_seqs=3,  # the 12 prompts make several batches, so two are in flight at once
    ) as llm:
        assert greedy(llm, prompts, max_tokens) == expected
        assert greedy(llm, [prompts[long]], [max_tokens[long]]) == [expected[long]]
        executor = llm.engine_core.worker
        assert executor.max_concurrent_batches == 2
        # Depth 2: stage 0 ran one batch while stage 1 ran another.
        assert overlapping_batches(executor.timeline)
        assert all(b > 0 for b in stage_busy_seconds(executor.timeline, 2))


def test_pipeline_with_tensor_parallel_stages(data):
    hf, prompts, max_tokens, expected = data
    with pytest.warns(RuntimeWarning, match="CPU cores"):
        llm = LLM(
            build_model_from_hf(hf),
            pipeline_parallel_size=2,
            tensor_parallel_size=2,
            num_kv_blocks=BLOCKS,
            block_size=8,
        )
    with llm:
        executor = llm.engine_core.worker
        assert len(executor.worker_pids) == 3 and executor.groups.tp.world_size == 2
        k_cache = executor.worker.kv_caches[0][0]
        assert k_cache.shape[2] == llm.model_config.num_kv_heads // 2
        assert greedy(llm, prompts, max_tokens) == expected
        pids = executor.worker_pids
    assert not any(alive(pid) for pid in pids)


def test_checkpoint_directory_is_read_per_stage(data, tmp_path):
    hf, prompts, max_tokens, expected = data
    hf.save_pretrained(tmp_path)
    with LLM(str(tmp_path), pipeline_parallel_size=2, num_kv_blocks=BLOCKS, block_size=8) as llm:
        assert greedy(llm, prompts[:3], max_tokens[:3]) == expected[:3]
        assert sum(p.numel() for p in llm.model.parameters()) < sum(p.numel() for p in hf.parameters())
