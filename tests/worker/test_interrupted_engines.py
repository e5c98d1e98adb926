"""Ctrl-C in the middle of a parallel engine's ``generate``, then ``shutdown``: every rank stops on its own
(exit 0), promptly, instead of waiting in a collective or a send that rank 0 abandoned until it times out
and fails. A real SIGINT is sent from inside a step; each engine is its own (one per process at a time)."""

from __future__ import annotations

import os
import signal

import pytest
from tiny_models import one_thread, tiny_hf_model  # noqa: F401  one_thread: autouse

from minipaged import LLM, SamplingParams
from minipaged.models import build_model_from_hf

HANG_GUARD_S = 60  # the collectives' own timeout is 120 s: a shutdown that waits on one fails this


def _sigint_on_call(obj, name: str, call: int) -> None:
    """Wrap ``obj.name`` so that its ``call``-th call sends this process SIGINT, then runs as before."""
    original, calls = getattr(obj, name), []

    def wrapped(*args):
        calls.append(1)
        if len(calls) == call:
            os.kill(os.getpid(), signal.SIGINT)
        return original(*args)

    object.__setattr__(obj, name, wrapped)  # a frozen dataclass for the TP group


@pytest.mark.parametrize("parallel", ["tensor", "pipeline"])
def test_shutdown_after_ctrl_c_mid_generate_stops_every_rank_in_order(parallel):
    hf = tiny_hf_model("llama")
    size = {f"{parallel}_parallel_size": 2}
    llm = LLM(build_model_from_hf(hf), num_kv_blocks=64, block_size=8, max_num_seqs=3, **size)
    executor = llm.engine_core.worker
    if parallel == "tensor":  # inside a forward, between two all-reduces that rank 1 joins too
        _sigint_on_call(executor.tp, "all_reduce", 20)
    else:  # as a wait in ``collect`` returns, with two batches in flight
        _sigint_on_call(executor, "_wait", 12)
    prompts = [{"prompt_token_ids": [1 + i, 2, 3, 4 + i]} for i in range(6)]
    with pytest.raises(KeyboardInterrupt):
        llm.generate(prompts, SamplingParams(temperature=0, max_tokens=40, ignore_eos=True), use_tqdm=False)
    processes = list(executor._processes)
    previous = signal.signal(signal.SIGALRM, lambda *_: pytest.fail("the shutdown hung on what rank 0 left"))
    signal.alarm(HANG_GUARD_S)
    try:
        llm.shutdown()
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)
    assert [p.exitcode for p in processes] == [0]
