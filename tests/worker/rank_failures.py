"""What the tensor- and pipeline-parallel kill tests share: a rank SIGKILLed while the engine runs turns
into one ``WorkerDiedError`` naming it, within a bound, and the engine ends clean (blocks free, no process)."""

from __future__ import annotations

import signal
from collections.abc import Callable

import pytest
from tiny_models import assert_all_blocks_free

from minipaged import LLM, SamplingParams
from minipaged.worker.executor import WorkerDiedError

HANG_GUARD_S = 60  # a bound against hangs, not a measurement


def alive(pid: int) -> bool:
    """``pid`` runs (a zombie, dead but not yet reaped, counts as gone)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except (FileNotFoundError, ProcessLookupError):  # gone, or going while its entry was read
        return False


def assert_killed_rank_raises(
    llm: LLM, prompts: list[list[int]], max_tokens: list[int], kill: Callable[[list[int]], None]
) -> None:
    """Queue greedy requests, run one step, call ``kill(worker_pids)`` (which SIGKILLs rank 1 at once or arms
    something that will, mid-step), then step: a step raises ``WorkerDiedError`` naming rank 1 as killed
    by signal 9 before ``HANG_GUARD_S``, and so does every later one; aborting what is left frees every
    KV block, and no rank process is left."""
    pids = llm.engine_core.worker.worker_pids
    params = [SamplingParams(temperature=0, max_tokens=m, ignore_eos=True) for m in max_tokens]
    rids = [llm.add_request({"prompt_token_ids": p}, sp) for p, sp in zip(prompts, params)]
    llm.step()
    kill(pids)
    previous = signal.signal(signal.SIGALRM, lambda *_: pytest.fail("the engine hung on a dead rank"))
    signal.alarm(HANG_GUARD_S)
    try:
        with pytest.raises(WorkerDiedError, match=r"rank 1 \(killed by signal 9\)"):
            while llm.has_unfinished_requests():
                llm.step()
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)
    with pytest.raises(WorkerDiedError):  # and it stays dead
        llm.step()
    for rid in rids:
        if llm.engine_core.has_request(rid):
            llm.abort(rid)
    assert_all_blocks_free(llm)
    assert not any(alive(pid) for pid in pids)
