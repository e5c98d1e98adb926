"""AsyncLLM: concurrent generate() calls batch together, equal the offline engine, cancel cleanly.

A tiny random Llama with SmolLM2's tokenizer; asyncio.run per test, no timed assertions.
"""

from __future__ import annotations

import asyncio
import random
import time

import pytest
from conftest import SMOLLM2_VOCAB as VOCAB

from minipaged import LLM, SamplingParams
from minipaged.engine.async_llm import AsyncLLM, EngineDeadError
from minipaged.errors import (
    InvalidEngineConfigError,
    InvalidPromptError,
    InvalidSamplingParamsError,
    PromptTooLongError,
)
from minipaged.models import build_model_from_hf

HANG_GUARD_S = 60.0


def engine_kwargs(**kw):
    kw.setdefault("num_kv_blocks", 48)
    kw.setdefault("block_size", 4)
    return kw


def prompts(seed: int, count: int) -> list[dict]:
    rng = random.Random(seed)
    return [{"prompt_token_ids": [rng.randrange(3, VOCAB) for _ in range(rng.randint(2, 10))]} for _ in range(count)]


def greedy(n_tokens: int, **kw) -> SamplingParams:
    return SamplingParams(temperature=0, max_tokens=n_tokens, ignore_eos=True, **kw)


def assert_idle_and_free(engine: AsyncLLM) -> None:
    stats = engine.engine_core.stats()
    assert stats.used_blocks == 0 and stats.num_running == 0 and stats.num_waiting == 0, stats
    assert not engine.processor.states and not engine._queues


async def collect(engine: AsyncLLM, prompt, params, rid=None):
    outs = [o async for o in engine.generate(prompt, params, rid)]
    texts = [o.outputs[0].text for o in outs]
    assert all(b.startswith(a) for a, b in zip(texts, texts[1:])), "cumulative text must only grow"
    assert outs[-1].finished and not any(o.finished for o in outs[:-1])
    return outs[-1]


def test_concurrent_requests_batch_and_match_offline(hf, tokenizer):
    ps = prompts(0, 12)
    lens = [random.Random(i).randint(3, 16) for i in range(12)]
    offline = LLM(build_model_from_hf(hf), tokenizer=tokenizer, **engine_kwargs(num_kv_blocks=256))
    expected = offline.generate(ps, [greedy(m) for m in lens], use_tqdm=False)

    async def main():
        engine = AsyncLLM(build_model_from_hf(hf), tokenizer=tokenizer, **engine_kwargs(num_kv_blocks=256))
        outs = await asyncio.gather(*(collect(engine, p, greedy(m)) for p, m in zip(ps, lens)))
        assert max(r.num_scheduled for r in engine.engine_core.trace) > 1  # they shared steps
        assert_idle_and_free(engine)
        await engine.shutdown()
        return outs

    got = asyncio.run(main())
    for g, e in zip(got, expected):
        assert g.outputs[0].token_ids == e.outputs[0].token_ids and g.outputs[0].text == e.outputs[0].text


def test_stop_strings_and_n_over_async_equal_offline(hf, tokenizer):
    offline = LLM(build_model_from_hf(hf), tokenizer=tokenizer, **engine_kwargs())
    p = prompts(1, 1)[0]
    full = offline.generate(p, greedy(20), use_tqdm=False)[0].outputs[0].text
    stop = full[5:8]
    params = [greedy(20, stop=[stop]), SamplingParams(n=3, temperature=0.8, seed=5, max_tokens=6)]
    expected = offline.generate([p, p], params, use_tqdm=False)

    async def main():
        engine = AsyncLLM(build_model_from_hf(hf), tokenizer=tokenizer, **engine_kwargs())
        outs = await asyncio.gather(*(collect(engine, p, sp) for sp in params))
        await engine.shutdown()
        return outs

    got = asyncio.run(main())
    assert got[0].outputs[0].text == expected[0].outputs[0].text and stop not in got[0].outputs[0].text
    assert [c.token_ids for c in got[1].outputs] == [c.token_ids for c in expected[1].outputs]


def test_cancel_midway_aborts_and_frees_blocks(hf):
    async def main():
        engine = AsyncLLM(build_model_from_hf(hf), **engine_kwargs())
        engine.idle_linger_s = 0.05  # the end of the test waits for the idle thread to end
        seen: dict[int, int] = {}

        async def consume(i, p):
            async for out in engine.generate(p, greedy(40), f"r{i}"):
                seen[i] = len(out.outputs[0].token_ids)
            return out

        tasks = [asyncio.create_task(consume(i, p)) for i, p in enumerate(prompts(2, 8))]
        while len(seen) < 8 or min(seen.values()) < 3:
            await asyncio.sleep(0.01)
        for t in tasks[::2]:
            t.cancel()
        results = await asyncio.gather(*tasks, return_exceptions=True)
        await asyncio.sleep(0)  # let the loop apply the aborts
        while engine.engine_core.has_unfinished() or engine._inbox:
            await asyncio.sleep(0.01)
        assert all(isinstance(r, asyncio.CancelledError) for r in results[::2])
        assert all(len(r.outputs[0].token_ids) == 40 for r in results[1::2])
        assert_idle_and_free(engine)
        # Idle: the engine thread ends, once it has waited idle_linger_s for more work, instead of stepping.
        steps = len(engine.engine_core.trace)
        for _ in range(12000):  # a hang guard only
            if engine._thread is None:
                break
            await asyncio.sleep(0.01)
        await asyncio.sleep(0.2)
        assert len(engine.engine_core.trace) == steps and engine._thread is None
        await engine.shutdown()

    asyncio.run(main())


def test_abort_ends_generate_with_abort(hf):
    async def main():
        engine = AsyncLLM(build_model_from_hf(hf), **engine_kwargs())
        last = None
        async for out in engine.generate(prompts(3, 1)[0], greedy(50), "victim"):
            last = out
            if len(out.outputs[0].token_ids) == 2:
                await engine.abort("victim")
        await engine.abort("victim")  # idempotent
        await engine.abort("never-existed")
        assert last.finished and last.outputs[0].finish_reason == "abort"
        assert_idle_and_free(engine)
        await engine.shutdown()

    asyncio.run(main())


@pytest.mark.parametrize(
    "prompt, params, error, field",
    [
        ("", greedy(2), InvalidPromptError, "prompt"),
        ({"prompt_token_ids": [1] * 300}, greedy(2), PromptTooLongError, "prompt"),
        ({"prompt_token_ids": [VOCAB]}, greedy(2), InvalidPromptError, "prompt_token_ids"),
        ({"prompt_token_ids": [5]}, {"temperature": 0}, InvalidSamplingParamsError, "sampling_params"),
    ],
)
def test_bad_input_raises_before_anything_is_queued(hf, tokenizer, prompt, params, error, field):
    async def main():
        engine = AsyncLLM(build_model_from_hf(hf), tokenizer=tokenizer, **engine_kwargs())
        good = asyncio.create_task(collect(engine, prompts(4, 1)[0], greedy(8)))
        with pytest.raises(error) as info:
            async for _ in engine.generate(prompt, params):
                pass
        assert info.value.field == field
        out = await good  # a bad request never disturbs the others
        assert len(out.outputs[0].token_ids) == 8
        assert_idle_and_free(engine)
        await engine.shutdown()

    asyncio.run(main())


def test_duplicate_request_id_is_refused(hf):
    async def main():
        engine = AsyncLLM(build_model_from_hf(hf), **engine_kwargs())
        first = engine.generate(prompts(5, 1)[0], greedy(5), "same")
        await first.__anext__()
        with pytest.raises(InvalidPromptError):
            await engine.generate(prompts(5, 1)[0], greedy(5), "same").__anext__()
        await first.aclose()
        await engine.shutdown()
        assert_idle_and_free(engine)

    asyncio.run(main())


def test_engine_failure_reaches_every_waiter(hf, monkeypatch):
    async def main():
        engine = AsyncLLM(build_model_from_hf(hf), **engine_kwargs())

        def broken_step():
            raise RuntimeError("poisoned step")

        monkeypatch.setattr(engine.engine_core, "step", broken_step)
        tasks = [asyncio.create_task(collect(engine, p, greedy(4))) for p in prompts(6, 3)]
        results = await asyncio.gather(*tasks, return_exceptions=True)
        assert all(isinstance(r, EngineDeadError) and "poisoned" in str(r.__cause__) for r in results)
        assert not any("poisoned" in str(r) for r in results)  # the cause is chained, not pasted into the message
        assert not engine.is_running
        with pytest.raises(EngineDeadError):
            await engine.generate(prompts(6, 1)[0], greedy(2)).__anext__()

    asyncio.run(main())


def test_a_second_event_loop_gets_a_clear_error_not_a_hang(hf):
    import threading

    engine = AsyncLLM(build_model_from_hf(hf), **engine_kwargs())
    started, release = threading.Event(), threading.Event()
    errors: list[BaseException] = []

    async def first():
        gen = engine.generate(prompts(7, 1)[0], greedy(2))
        await gen.__anext__()  # the engine loop task now lives on this thread's loop
        started.set()
        while not release.is_set():
            await asyncio.sleep(0.01)
        await gen.aclose()
        await engine.shutdown()

    thread = threading.Thread(target=lambda: asyncio.run(first()))
    thread.start()
    assert started.wait(120)

    async def second():
        try:
            await engine.generate(prompts(7, 1)[0], greedy(2)).__anext__()
        except RuntimeError as err:
            errors.append(err)

    asyncio.run(asyncio.wait_for(second(), 60))
    release.set()
    thread.join(120)
    assert len(errors) == 1 and "bound to the event loop" in str(errors[0])
    assert_idle_and_free(engine)


def test_engine_steps_while_the_event_loop_is_blocked(hf):
    """The engine thread starts each step itself: a busy event loop does not hold the next step back."""
    import threading

    async def main():
        engine = AsyncLLM(build_model_from_hf(hf), **engine_kwargs())
        gen = engine.generate(prompts(8, 1)[0], greedy(30))
        await gen.__anext__()
        steps = len(engine.engine_core.trace)
        stepped = threading.Event()

        def watch() -> None:  # another thread sees the steps; the loop is blocked below
            while len(engine.engine_core.trace) < steps + 5 and engine.engine_core.has_unfinished():
                time.sleep(0.005)
            stepped.set()

        threading.Thread(target=watch, daemon=True).start()
        assert stepped.wait(120)  # blocks the event loop: no callback, no task runs meanwhile
        assert len(engine.engine_core.trace) >= steps + 5
        outs = [o async for o in gen]
        assert outs[-1].finished and len(outs[-1].outputs[0].token_ids) == 30
        assert_idle_and_free(engine)
        await engine.shutdown()

    asyncio.run(main())


def test_a_reused_request_id_after_cancel_runs_in_order(hf):
    """Cancel then resubmit under the same id before the engine applied either: the abort comes first."""

    async def main():
        engine = AsyncLLM(build_model_from_hf(hf), **engine_kwargs())
        gen = engine.generate(prompts(9, 1)[0], greedy(20), "again")
        await gen.__anext__()
        await gen.aclose()  # queues the abort
        out = await collect(engine, prompts(9, 1)[0], greedy(7), "again")
        assert len(out.outputs[0].token_ids) == 7 and out.outputs[0].finish_reason == "length"
        assert engine.is_running
        assert_idle_and_free(engine)
        await engine.shutdown()

    asyncio.run(main())


def test_generate_after_shutdown_raises_instead_of_waiting(hf):
    async def main():
        engine = AsyncLLM(build_model_from_hf(hf), **engine_kwargs())
        await collect(engine, prompts(10, 1)[0], greedy(3))
        await engine.shutdown()
        assert engine._thread is None or not engine._thread.is_alive()
        with pytest.raises(EngineDeadError):
            await engine.generate(prompts(10, 1)[0], greedy(3)).__anext__()
        assert_idle_and_free(engine)

    asyncio.run(main())


def test_one_engine_serves_successive_event_loops(hf):
    """A loop that has returned gives way to the next (``asyncio.run`` twice, as scripts and tests do)."""
    engine = AsyncLLM(build_model_from_hf(hf), **engine_kwargs())
    first = asyncio.run(collect(engine, prompts(11, 1)[0], greedy(6)))
    second = asyncio.run(collect(engine, prompts(11, 1)[0], greedy(6)))
    assert first.outputs[0].token_ids == second.outputs[0].token_ids
    assert_idle_and_free(engine)
    asyncio.run(engine.shutdown())


def test_every_step_runs_on_one_engine_thread(hf):
    """One thread steps the model, whatever else uses the loop's thread pool (the server tokenizes there):
    torch's OpenMP team belongs to the thread that calls it, so steps spread over pool threads would
    keep several teams, whose idle workers spin on the cores the working team needs."""
    import threading

    async def main():
        engine = AsyncLLM(build_model_from_hf(hf), **engine_kwargs(num_kv_blocks=128))
        step, callers = engine.engine_core.step, set()

        def recording_step():
            callers.add(threading.get_ident())
            return step()

        engine.engine_core.step = recording_step
        busy = [asyncio.to_thread(time.sleep, 0.002 * (i % 5)) for i in range(40)]  # other users of the pool
        await asyncio.gather(*(collect(engine, p, greedy(12)) for p in prompts(12, 4)), *busy)
        assert len(callers) == 1 and threading.get_ident() not in callers
        assert_idle_and_free(engine)
        await engine.shutdown()

    asyncio.run(main())


def test_loading_leaves_the_callers_thread_without_work(hf, monkeypatch):
    """The engine is built on a thread that has ended when the constructor returns, so the caller's
    thread (a server's event loop) never owns an OpenMP team of its own beside the engine thread's;
    a load that fails there raises its own typed error here."""
    import threading

    import minipaged.engine.async_llm as async_llm

    loaders = []
    real_load = async_llm.load_engine

    def recording_load(*args, **kwargs):
        loaders.append(threading.current_thread())
        return real_load(*args, **kwargs)

    monkeypatch.setattr(async_llm, "load_engine", recording_load)
    engine = AsyncLLM(build_model_from_hf(hf), **engine_kwargs())
    assert len(loaders) == 1 and loaders[0] is not threading.current_thread() and not loaders[0].is_alive()
    out = asyncio.run(collect(engine, prompts(13, 1)[0], greedy(4)))
    assert len(out.outputs[0].token_ids) == 4
    assert_idle_and_free(engine)
    asyncio.run(engine.shutdown())
    with pytest.raises(InvalidEngineConfigError, match="block_size"):
        AsyncLLM(build_model_from_hf(hf), **engine_kwargs(block_size=0))
    assert len(loaders) == 2 and loaders[1] is not threading.current_thread()


def test_an_idle_engine_thread_waits_for_the_next_request_then_ends(hf):
    """A request that comes while the idle thread lingers is stepped by that same thread (no cold start);
    once nothing has come for ``idle_linger_s`` the thread ends, and the next request starts a new one."""
    import threading

    async def main():
        engine = AsyncLLM(build_model_from_hf(hf), **engine_kwargs())
        engine.idle_linger_s = 30.0
        step, callers = engine.engine_core.step, []

        def recording_step():
            callers.append(threading.current_thread())
            return step()

        engine.engine_core.step = recording_step
        for seed in (14, 15):  # the second arrives while the first one's thread waits
            await collect(engine, prompts(seed, 1)[0], greedy(3))
            await asyncio.sleep(0.05)
        lingering = callers[-1]
        assert len(set(callers)) == 1 and lingering.is_alive()
        engine.idle_linger_s = 0.05
        await engine.abort("nothing")  # wakes the waiting thread, which now waits 0.05 s at most
        lingering.join(HANG_GUARD_S)
        assert not lingering.is_alive() and engine._thread is None
        engine.idle_linger_s = 10 * HANG_GUARD_S
        await collect(engine, prompts(16, 1)[0], greedy(3))
        assert callers[-1] is not lingering
        assert_idle_and_free(engine)
        await asyncio.wait_for(engine.shutdown(), HANG_GUARD_S)  # it wakes the waiting thread, not waits it out
        assert not callers[-1].is_alive()

    asyncio.run(main())
