"""Scheduler against a fake model that checks every KV slot it reads.

The fake worker writes (token id, position) into a slot-addressed "cache" at each
scheduled token's slot, and before sampling it reads the sequence back through its
block table: any wrong table, missed copy-on-write, bad prefix-cache hit or lost
token after preemption shows up as a mismatch. The next token is a function of the
tokens read back, so outputs must not depend on batching, budgets or preemption.
"""

from __future__ import annotations

import random

import pytest
import torch

from minipaged.core.block_manager import BlockManager
from minipaged.core.scheduler import Scheduler
from minipaged.core.sequence import Sequence, SequenceStatus
from minipaged.outputs import RequestMetrics
from minipaged.sampling_params import SamplingParams


def next_token(tokens: list[int]) -> int:
    return (sum(t * (i + 1) for i, t in enumerate(tokens)) * 7919 + len(tokens)) % 97


class FakeEngine:
    def __init__(self, num_blocks, block_size, *, max_num_seqs=64, max_num_batched_tokens=64, prefix_caching=True):
        self.bm = BlockManager(num_blocks, block_size, enable_prefix_caching=prefix_caching)
        self.sched = Scheduler(self.bm, max_num_seqs=max_num_seqs, max_num_batched_tokens=max_num_batched_tokens)
        self.cache: dict[int, tuple[int, int]] = {}
        self.arrivals = 0
        self.finished: list[Sequence] = []
        self.steps = []

    def add(self, prompt, max_tokens, priority=0):
        params = SamplingParams(temperature=0, max_tokens=max_tokens)
        seq = Sequence(
            f"r{self.arrivals}",
            0,
            list(prompt),
            params,
            torch.Generator(),
            priority,
            self.arrivals,
            RequestMetrics(arrival_time=0.0),
        )
        self.arrivals += 1
        self.sched.add(seq)
        return seq

    def step(self):
        running_before = list(self.sched.running)
        out = self.sched.schedule()
        self.steps.append((out, running_before))
        assert out.num_tokens <= self.sched.max_num_batched_tokens
        assert len(out.scheduled) <= self.sched.max_num_seqs
        for c in out.block_copies:
            for off in range(self.bm.block_size):
                src = c.src * self.bm.block_size + off
                if src in self.cache:
                    self.cache[c.dst * self.bm.block_size + off] = self.cache[src]
        for s in out.scheduled:
            seq = s.seq
            assert s.start == seq.num_computed_tokens and s.num_new_tokens >= 1
            tokens = seq.all_token_ids
            for pos, slot in zip(range(s.start, s.end), self.bm.slot_mapping(seq.seq_id, s.start, s.end)):
                self.cache[slot] = (tokens[pos], pos)
        for s in out.scheduled:
            seq = s.seq
            seq.num_computed_tokens = s.end
            self.bm.mark_computed(seq.seq_id, s.end)
            if s.completes_sequence:
                seen = [self.cache.get(self.bm.slot(seq.seq_id, p)) for p in range(s.end)]
                assert seen == [(t, p) for p, t in enumerate(seq.all_token_ids)], "KV read back differs"
                seq.output_token_ids.append(next_token([t for t, _ in seen]))
                if len(seq.output_token_ids) >= seq.params.max_tokens:
                    self.sched.finish(seq, SequenceStatus.FINISHED_LENGTH)
                    self.finished.append(seq)
        return out

    def run(self, max_steps=10_000):
        for _ in range(max_steps):
            if not self.sched.has_unfinished():
                break
            self.step()
        assert not self.sched.has_unfinished()
        stats = self.bm.stats()
        assert stats.used_blocks == 0 and stats.free_blocks == stats.num_blocks


def expected_output(prompt, max_tokens):
    tokens = list(prompt)
    for _ in range(max_tokens):
        tokens.append(next_token(tokens))
    return tokens[len(prompt) :]


def workload(seed, count=12, shared_prefix=True):
    rng = random.Random(seed)
    prefix = [rng.randrange(97) for _ in range(20)]
    jobs = []
    for _ in range(count):
        body = [rng.randrange(97) for _ in range(rng.randint(1, 40))]
        prompt = (prefix[: rng.randint(0, 20)] if shared_prefix else []) + body
        jobs.append((prompt, rng.randint(1, 30), rng.randint(0, 2)))
    return jobs


@pytest.mark.parametrize(
    "num_blocks, budget, max_seqs, caching",
    [
        (200, 512, 64, True),  # roomy: no preemption
        (200, 7, 3, True),  # tiny budget: long prompts are chunked across many steps
        (24, 16, 8, True),  # small cache (the longest request needs 23 blocks): preemption by recompute
        (24, 16, 8, False),
    ],
)
def test_outputs_independent_of_budget_cache_and_preemption(num_blocks, budget, max_seqs, caching):
    eng = FakeEngine(num_blocks, 4, max_num_seqs=max_seqs, max_num_batched_tokens=budget, prefix_caching=caching)
    seqs = [eng.add(p, m, pri) for p, m, pri in workload(1)]
    eng.run()
    for seq, (prompt, max_tokens, _) in zip(seqs, workload(1)):
        assert seq.output_token_ids == expected_output(prompt, max_tokens)
    if num_blocks == 24:
        assert eng.sched.num_preemptions > 0


def test_chunked_prefill_shares_steps_with_decodes():
    eng = FakeEngine(100, 4, max_num_batched_tokens=10)
    short = eng.add([1, 2, 3], max_tokens=20)
    eng.step()  # prefill of the short prompt
    long = eng.add(list(range(50)), max_tokens=2)
    mixed = 0
    while long.num_computed_tokens < long.num_prompt_tokens:
        out = eng.step()
        kinds = {s.seq.request_id: s.num_new_tokens for s in out.scheduled}
        assert kinds[short.request_id] == 1  # the running decode is never starved
        assert kinds[long.request_id] == min(9, 50 - out.scheduled[1].start)
        assert out.num_decode_tokens == 1 and out.num_prefill_tokens == kinds[long.request_id]
        mixed += 1
    assert mixed == 6  # ceil(50 / 9) chunks
    eng.run()


def test_priority_then_fcfs_admission():
    eng = FakeEngine(100, 4, max_num_seqs=1)
    jobs = [([5, 6, 7], 3, 2), ([1], 2, 0), ([2, 2], 2, 1), ([9, 9, 9], 2, 0), ([4], 1, 1)]
    seqs = [eng.add(p, m, pri) for p, m, pri in jobs]
    eng.run()
    order = [r.request_id for r in eng.finished]
    expected = [r.request_id for r in sorted(seqs, key=lambda r: (r.priority, r.arrival_order))]
    assert order == expected


def test_preemption_victim_is_lowest_priority_latest_arrival():
    eng = FakeEngine(30, 2, max_num_batched_tokens=64)
    for prompt, max_tokens, pri in workload(7, count=6, shared_prefix=False):
        eng.add(prompt[:5], max_tokens + 10, pri)
    eng.run()
    assert eng.sched.num_preemptions > 0
    for out, running_before in eng.steps:
        if not out.preempted:
            continue
        keys = sorted((r.sort_key for r in running_before), reverse=True)
        assert sorted((r.sort_key for r in out.preempted), reverse=True) == keys[: len(out.preempted)]
    for seq in eng.finished:
        assert seq.output_token_ids == expected_output(seq.prompt_token_ids, seq.params.max_tokens)


def test_abort_frees_blocks_at_any_time():
    eng = FakeEngine(40, 4, max_num_batched_tokens=8)
    a = eng.add(list(range(30)), 10)
    b = eng.add([1, 2, 3], 10)
    c = eng.add([4, 5], 10)
    eng.step()  # a is mid-prefill
    eng.sched.finish(a, SequenceStatus.FINISHED_ABORTED)
    eng.step()
    eng.sched.finish(c, SequenceStatus.FINISHED_ABORTED)  # c may still be waiting or running
    assert not eng.bm.has_sequence(a.seq_id) and not eng.bm.has_sequence(c.seq_id)
    eng.run()
    assert b.output_token_ids == expected_output([1, 2, 3], 10)
    assert a.status is SequenceStatus.FINISHED_ABORTED
