"""Speculative decoding in the core layer: the scheduler gives drafts slots within the budget (and
gives drafts up before preempting anyone), and the block manager rolls rejected ones back."""

from __future__ import annotations

import pytest
import torch

from minipaged.core.block_manager import BlockManager
from minipaged.core.scheduler import Scheduler
from minipaged.core.sequence import Sequence
from minipaged.outputs import RequestMetrics
from minipaged.sampling_params import SamplingParams


def test_truncate_returns_draft_only_blocks():
    bm = BlockManager(8, 4)
    bm.allocate("a", list(range(10)))  # blocks: 4 + 4 + 2
    table = bm.block_table("a")
    slots = bm.slot_mapping("a", 0, 10)
    bm.append_tokens("a", [50, 51, 52, 53, 54, 55, 56])  # drafts fill block 3 and open blocks 4, 5
    assert len(bm.block_table("a")) == 5 and bm.num_free_blocks == 3
    bm.truncate("a", 12)  # two drafts accepted
    assert bm.block_table("a") == table
    assert bm.token_ids("a") == list(range(10)) + [50, 51]
    assert bm.slot_mapping("a", 0, 10) == slots
    assert bm.num_free_blocks == 5 and bm.stats().tokens_stored == 12
    bm.truncate("a", 9)  # everything rejected, down into the middle of block 3
    assert len(bm.block_table("a")) == 3 and bm.stats().tokens_stored == 9
    bm.append_tokens("a", [60, 61, 62])  # the next appends reuse the freed slots
    assert bm.token_ids("a")[-3:] == [60, 61, 62] and bm.stats().tokens_stored == 12
    bm.free("a")
    assert bm.num_free_blocks == 8 and bm.stats().tokens_stored == 0


def test_truncate_refuses_published_blocks_and_growth():
    bm = BlockManager(8, 4)
    bm.allocate("a", list(range(9)))
    bm.mark_computed("a", 8)  # blocks 0 and 1 are now prefix-cache entries
    with pytest.raises(ValueError, match="prefix cache"):
        bm.truncate("a", 7)
    with pytest.raises(ValueError, match="exceeds"):
        bm.truncate("a", 10)
    bm.truncate("a", 8)
    bm.free("a")
    assert bm.num_free_blocks == 8


def test_truncate_after_copy_on_write_keeps_the_sibling():
    bm = BlockManager(8, 4)
    bm.allocate("a", list(range(6)))
    bm.fork("a", "b")
    copies = bm.append_tokens("b", [7, 8, 9])  # b writes into the shared partial block: a private copy
    assert len(copies) == 1
    bm.truncate("b", 6)
    assert bm.token_ids("a") == bm.token_ids("b") == list(range(6))
    assert bm.block_table("a")[1] != bm.block_table("b")[1]
    bm.free("a")
    bm.free("b")
    assert bm.num_free_blocks == 8


def decoding_sequence(bm: BlockManager, scheduler: Scheduler, prompt: list[int], name: str) -> Sequence:
    """A running sequence whose prompt is computed and that sampled one token (not yet slotted)."""
    seq = Sequence(name, 0, list(prompt), SamplingParams(), torch.Generator(), 0, 0, RequestMetrics(0.0))
    scheduler.add(seq)
    scheduler.schedule()
    seq.num_computed_tokens = len(prompt)
    seq.output_token_ids.append(1)
    return seq


def test_drafts_take_slots_and_budget():
    bm = BlockManager(16, 4)
    scheduler = Scheduler(bm, max_num_seqs=4, max_num_batched_tokens=4)
    seq = decoding_sequence(bm, scheduler, [3, 4, 5, 6, 7], "a")
    seq.spec_token_ids = [8, 9, 10, 11, 12]
    out = scheduler.schedule()
    (s,) = out.scheduled
    assert s.draft_token_ids == (8, 9, 10)  # the budget of 4 holds the sequence's token and 3 drafts
    assert (s.start, s.num_new_tokens, s.verified_end, s.end) == (5, 4, 6, 9)
    assert s.completes_sequence and out.num_decode_tokens == 4
    assert bm.num_tokens(seq.seq_id) == 9 and seq.spec_token_ids == []


def test_drafts_are_given_up_rather_than_preempting():
    bm = BlockManager(4, 4)
    scheduler = Scheduler(bm, max_num_seqs=4, max_num_batched_tokens=64)
    a = decoding_sequence(bm, scheduler, list(range(7)), "a")  # 2 blocks, its next token fits
    b = decoding_sequence(bm, scheduler, list(range(10, 17)), "b")  # 2 blocks
    a.spec_token_ids = [1, 2, 3, 4]  # would need a third block for a
    out = scheduler.schedule()
    assert not out.preempted
    assert [s.draft_token_ids for s in out.scheduled] == [(), ()]
    assert bm.num_free_blocks == 0 and bm.num_tokens(a.seq_id) == bm.num_tokens(b.seq_id) == 8
