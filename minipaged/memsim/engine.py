"""The real engine next to the simulation: its measured KV utilisation and beam-search sharing.

The engine's per-step ``StepRecord`` (``minipaged.engine.trace``) carries the block manager's
``BlockStats`` after each step (``used_blocks``, ``tokens_stored``, ``utilization``) and
``logical_blocks``, the blocks the same sequences would hold without sharing. These
helpers turn a run into the quantities the simulator reports, so the two overlay.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

import numpy as np

from minipaged.memsim.sharing import SharingResult
from minipaged.memsim.traces import Request, Trace

if TYPE_CHECKING:
    from minipaged.engine.llm import LLM
    from minipaged.engine.trace import StepRecord


def batch_trace(input_lens: Sequence[int], output_lens: Sequence[int], name: str) -> Trace:
    """A memsim Trace of requests that all arrive at t=0, as ``LLM.generate`` submits a batch."""
    return Trace(name, tuple(Request(i, 0.0, int(a), int(b)) for i, (a, b) in enumerate(zip(input_lens, output_lens))))


def run_engine_batch(llm: LLM, prompts: Sequence[Sequence[int]], output_lens: Sequence[int]) -> list[StepRecord]:
    """Greedy-generate exactly ``output_lens[i]`` tokens for each prompt; returns the run's step records."""
    from minipaged.sampling_params import SamplingParams

    start = len(llm.trace)
    params = [SamplingParams(temperature=0.0, max_tokens=int(m), ignore_eos=True) for m in output_lens]
    llm.generate([{"prompt_token_ids": list(p)} for p in prompts], params, use_tqdm=False)
    return list(llm.trace[start:])


def step_utilization(steps: Sequence[StepRecord]) -> np.ndarray:
    """float64 [num_steps]: ``BlockStats.utilization`` after each step (token states / allocated slots)."""
    return np.array([s.utilization for s in steps], dtype=np.float64)


def measured_sharing(
    steps: Sequence[StepRecord], *, mode: str, width: int, block_size: int, name: str
) -> SharingResult:
    """Block sharing measured on an engine run, in the simulator's terms.

    Sums blocks in use (shared once) and blocks the same sequences' tables point to
    (each its own copy) over the steps, i.e. block-steps with and without sharing.
    """
    shared = sum(s.used_blocks for s in steps if s.logical_blocks)
    unshared = sum(s.logical_blocks for s in steps)
    if unshared == 0:
        raise ValueError("the steps hold no blocks; nothing to measure")
    return SharingResult(
        mode=mode,
        width=width,
        block_size=block_size,
        trace=name,
        shared_block_steps=shared,
        unshared_block_steps=unshared,
        copies=sum(s.blocks_copied for s in steps),
    )
