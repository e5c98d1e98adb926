"""AsyncLLM over a tensor-parallel engine: which thread builds and steps it, and how it ends.

The ranks torch spawns end when the thread that spawned them ends, and the engine thread must be
the only thread that has run torch's parallel work; so one engine thread builds the engine, steps
every request however long the engine sits idle, and shuts the ranks down at ``shutdown``.
"""

from __future__ import annotations

import asyncio
import random
import threading

import pytest
from rank_failures import alive

import minipaged.engine.async_llm as async_llm
from minipaged import LLM, SamplingParams
from minipaged.engine.async_llm import AsyncLLM
from minipaged.errors import InvalidEngineConfigError
from minipaged.models import build_model_from_hf

HANG_GUARD_S = 60.0
KWARGS = {"num_kv_blocks": 48, "block_size": 4}


def prompts(seed: int, count: int, vocab_size: int) -> list[dict]:
    rng = random.Random(seed)
    return [
        {"prompt_token_ids": [rng.randrange(3, vocab_size) for _ in range(rng.randint(2, 10))]} for _ in range(count)
    ]


def greedy(n_tokens: int) -> SamplingParams:
    return SamplingParams(temperature=0, max_tokens=n_tokens, ignore_eos=True)


def test_one_thread_builds_steps_and_shuts_down_a_tensor_parallel_engine(hf, monkeypatch):
    loaders, real_load = [], async_llm.load_engine

    def recording_load(*args, **kwargs):
        loaders.append(threading.current_thread())
        return real_load(*args, **kwargs)

    monkeypatch.setattr(async_llm, "load_engine", recording_load)
    monkeypatch.setattr(async_llm, "IDLE_LINGER_S", 0.05)  # a one-process engine's thread would end in each gap
    batch = prompts(21, 3, hf.config.vocab_size)
    single = LLM(build_model_from_hf(hf), **KWARGS)
    expected = [o.outputs[0].token_ids for o in single.generate(batch, greedy(5), use_tqdm=False)]

    async def main() -> None:
        engine = AsyncLLM(build_model_from_hf(hf), tensor_parallel_size=2, **KWARGS)
        builder = loaders[-1]
        assert builder is not threading.current_thread() and builder.is_alive()
        pids = engine.engine_core.worker.worker_pids
        step, steppers = engine.engine_core.step, []

        def recording_step():
            steppers.append(threading.current_thread())
            return step()

        engine.engine_core.step = recording_step
        outs = []
        for prompt in batch:  # one at a time, each after an idle gap
            outs.append([o async for o in engine.generate(prompt, greedy(5))][-1])
            await asyncio.sleep(0.2)
        assert [o.outputs[0].token_ids for o in outs] == expected
        assert set(steppers) == {builder} and builder.is_alive() and all(alive(pid) for pid in pids)
        stats = engine.stats()
        assert stats.used_blocks == 0 and stats.num_running == 0, stats
        await asyncio.wait_for(engine.shutdown(), HANG_GUARD_S)
        assert not builder.is_alive() and not any(alive(pid) for pid in pids)

    asyncio.run(main())


def engine_threads() -> list[threading.Thread]:
    return [t for t in threading.enumerate() if t.name == "minipaged-engine"]


def test_a_failed_parallel_build_raises_on_the_caller_and_leaves_nothing(hf):
    with pytest.raises(InvalidEngineConfigError, match="block_size"):
        AsyncLLM(build_model_from_hf(hf), tensor_parallel_size=2, **{**KWARGS, "block_size": 0})
    assert not engine_threads()


def test_a_failure_after_the_build_stops_the_engine_thread_and_its_ranks(hf, monkeypatch):
    """Once built, the engine thread serves; if the constructor fails after that, it must still end,
    and take the ranks down with it, since no one holds the engine to shut it down."""
    from minipaged.engine.core import EngineCore

    pids = []

    def fail(core):
        pids.extend(core.worker.worker_pids)
        raise RuntimeError("after the build")

    monkeypatch.setattr(EngineCore, "cap_max_model_len_to_cache", fail)
    with pytest.raises(RuntimeError, match="after the build"):
        AsyncLLM(build_model_from_hf(hf), tensor_parallel_size=2, **KWARGS)
    assert pids
    for thread in engine_threads():
        thread.join(HANG_GUARD_S)
    assert not engine_threads() and not any(alive(pid) for pid in pids)
