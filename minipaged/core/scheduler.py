"""Continuous-batching scheduler: which tokens of which sequences run in the next step.

Every step is decided afresh (iteration-level batching, vLLM v1 style):

1. Running sequences, best first (lower priority value, then earlier arrival), each get
   the tokens they still need to compute: 1 for a decoding sequence, the next chunk of
   its prompt for one still in (chunked) prefill. Before that, sampled tokens get KV
   slots through ``BlockManager.append_tokens``; when blocks run out the worst running
   sequence (highest priority value, then latest arrival) is preempted by recompute:
   its blocks are freed and it goes back to waiting, keeping its generated tokens so
   the recompute rebuilds exactly the same KV.
2. If nothing was preempted, waiting sequences are admitted best first while the token
   budget, ``max_num_seqs`` and the free blocks allow. Admission allocates blocks for
   all the sequence's tokens at once and learns from the prefix cache how many are
   already computed.

Prefill and decode tokens share one step, within ``max_num_batched_tokens``.

Speculative decoding: a decoding sequence carrying draft tokens (``Sequence.spec_token_ids``)
is scheduled for 1 + k tokens, its next token and the drafts, with slots for all of them; the
drafts are given up (never another sequence's blocks) when the token budget or the free blocks
do not stretch to them. The engine verifies them and rolls the block table back over the
rejected ones.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from minipaged.core.block_manager import BlockCopy, BlockManager, NoFreeBlocksError
from minipaged.core.sequence import Sequence, SequenceStatus


@dataclass(frozen=True)
class ScheduledSequence:
    """Compute tokens ``[start, start + num_new_tokens)`` of ``seq`` this step."""

    seq: Sequence
    start: int
    num_new_tokens: int  # query tokens this step, draft tokens included
    draft_token_ids: tuple[int, ...] = ()  # speculative tokens after the sequence's own, to verify

    @property
    def end(self) -> int:
        """One past the last token computed this step (the context length, drafts included)."""
        return self.start + self.num_new_tokens

    @property
    def num_draft_tokens(self) -> int:
        """Draft tokens at the end of this step's query."""
        return len(self.draft_token_ids)

    @property
    def verified_end(self) -> int:
        """One past the last of the sequence's own tokens computed this step (drafts excluded)."""
        return self.end - self.num_draft_tokens

    @property
    def prompt_logprob_positions(self) -> range:
        """Positions whose logits score prompt tokens this step (position ``q`` scores prompt token ``q + 1``).

        Positions already scored (before a preemption) are not scored again; the last prompt
        position is the sampled one, so it scores no prompt token.
        """
        scored = self.seq.prompt_logprobs
        if scored is None:
            return range(0)
        return range(max(self.start, len(scored) - 1), min(self.verified_end, self.seq.num_prompt_tokens - 1))

    @property
    def completes_sequence(self) -> bool:
        """After this step every token has KV, so the last position's logits give the next token."""
        return self.verified_end == self.seq.num_tokens


@dataclass
class SchedulerOutput:
    """One step's plan, the worker's input.

    scheduled: the sequences that run, each with its token range (running ones first, then admissions).
    block_copies: copy-on-write copies the worker must make before writing this step's KV.
    preempted: sequences sent back to waiting this step (their blocks are already freed).
    """

    scheduled: list[ScheduledSequence] = field(default_factory=list)
    block_copies: list[BlockCopy] = field(default_factory=list)
    preempted: list[Sequence] = field(default_factory=list)
    num_prefill_tokens: int = 0  # tokens of prompts (or of a recompute after preemption)
    num_decode_tokens: int = 0  # one per sequence that is generating

    @property
    def num_tokens(self) -> int:
        """Tokens computed this step, prefill and decode (at most ``max_num_batched_tokens``)."""
        return self.num_prefill_tokens + self.num_decode_tokens

    @property
    def is_empty(self) -> bool:
        """Nothing to run this step."""
        return not self.scheduled


class Scheduler:
    """Waiting and running queues over one BlockManager."""

    def __init__(self, block_manager: BlockManager, *, max_num_seqs: int, max_num_batched_tokens: int) -> None:
        self.bm = block_manager
        self.max_num_seqs = max_num_seqs
        self.max_num_batched_tokens = max_num_batched_tokens
        self.waiting: list[Sequence] = []
        self.running: list[Sequence] = []
        self.num_preemptions = 0

    # ---- queue management -------------------------------------------------------------
    def add(self, seq: Sequence) -> None:
        """Queue a new sequence as waiting; it gets blocks when ``schedule`` admits it."""
        seq.status = SequenceStatus.WAITING
        self.waiting.append(seq)

    def add_running(self, seq: Sequence) -> None:
        """A forked child: its blocks are already in the block manager."""
        seq.status = SequenceStatus.RUNNING
        self.running.append(seq)

    def has_unfinished(self) -> bool:
        """Any sequence waiting or running."""
        return bool(self.waiting or self.running)

    def finish(self, seq: Sequence, status: SequenceStatus) -> None:
        """Take ``seq`` out of the queues and free its blocks (any time, also for abort)."""
        if seq in self.running:
            self.running.remove(seq)
        if seq in self.waiting:
            self.waiting.remove(seq)
        if self.bm.has_sequence(seq.seq_id):
            self.bm.free(seq.seq_id)
        seq.status = status

    # ---- one step -----------------------------------------------------------------
    def schedule(self) -> SchedulerOutput:
        """Decide the next step: slots and tokens for running sequences (preempting when blocks run
        out), then, if nothing was preempted, admit waiting ones into what is left of the token budget."""
        out = SchedulerOutput()
        budget = self.max_num_batched_tokens
        self.running.sort(key=lambda r: r.sort_key)
        scheduled_ids: set[int] = set()
        for seq in list(self.running):
            if budget == 0:
                break
            if seq.status is not SequenceStatus.RUNNING:  # preempted earlier in this loop
                continue
            drafts = self._drafts_within(seq, budget)
            drafts = self._reserve_slots(seq, out, scheduled_ids, drafts)
            if drafts is None:
                continue
            budget -= self._schedule_tokens(seq, budget, out, drafts)
            scheduled_ids.add(id(seq))
        if not out.preempted:
            self._admit_waiting(budget, out)
        return out

    @staticmethod
    def _drafts_within(seq: Sequence, budget: int) -> list[int]:
        """The draft tokens a decoding ``seq`` can verify this step: as many as fit beside its own token."""
        if not seq.spec_token_ids or seq.num_computed_tokens != seq.num_tokens - 1:
            return []
        return seq.spec_token_ids[: budget - 1]

    def _reserve_slots(
        self, seq: Sequence, out: SchedulerOutput, scheduled_ids: set[int], drafts: list[int]
    ) -> list[int] | None:
        """Give the sequence's sampled-but-unslotted tokens (and its drafts) KV slots, preempting
        others if needed; drafts are dropped rather than preempting anyone for them.

        Returns the drafts that got slots, or None when ``seq`` itself had to be preempted.
        """
        pending = seq.num_tokens - self.bm.num_tokens(seq.seq_id)
        if pending == 0 and not drafts:
            return drafts
        new_tokens = seq.all_token_ids[seq.num_tokens - pending :]
        while True:
            try:
                out.block_copies.extend(self.bm.append_tokens(seq.seq_id, new_tokens + drafts))
                return drafts
            except NoFreeBlocksError:
                if drafts:
                    drafts = []
                    continue
                victim = self._pick_victim(scheduled_ids)
                self._preempt(victim, out)
                if victim is seq:
                    return None

    def _pick_victim(self, scheduled_ids: set[int]) -> Sequence:
        # Sequences already scheduled this step keep their slots; the current sequence is the
        # last resort because running is sorted best-first and it is the best unscheduled one.
        candidates = [r for r in self.running if id(r) not in scheduled_ids]
        return max(candidates, key=lambda r: r.sort_key)

    def _preempt(self, seq: Sequence, out: SchedulerOutput) -> None:
        self.running.remove(seq)
        self.bm.free(seq.seq_id)
        seq.num_computed_tokens = 0
        seq.spec_token_ids = []
        seq.status = SequenceStatus.WAITING
        seq.metrics.num_preemptions += 1
        # Waiting is served by (priority, arrival), so keeping its original arrival puts the
        # victim ahead of every later arrival of its priority: the front of its queue.
        self.waiting.insert(0, seq)
        out.preempted.append(seq)
        self.num_preemptions += 1

    def _schedule_tokens(self, seq: Sequence, budget: int, out: SchedulerOutput, drafts: list[int] = ()) -> int:
        num_new = min(seq.num_tokens - seq.num_computed_tokens, budget) + len(drafts)
        out.scheduled.append(ScheduledSequence(seq, seq.num_computed_tokens, num_new, tuple(drafts)))
        seq.spec_token_ids = []  # consumed: verified this step, or given up
        if seq.num_computed_tokens >= seq.num_tokens - 1 and seq.output_token_ids:
            out.num_decode_tokens += num_new
        else:
            out.num_prefill_tokens += num_new
        return num_new

    def _admit_waiting(self, budget: int, out: SchedulerOutput) -> None:
        self.waiting.sort(key=lambda r: r.sort_key)
        while self.waiting and budget > 0 and len(self.running) < self.max_num_seqs:
            seq = self.waiting[0]
            tokens = seq.all_token_ids
            # Prompt logprobs need every prompt position's logits, so no position may come from the cache.
            use_cache = not seq.computing_prompt_logprobs
            if not self.bm.can_allocate(tokens, use_prefix_cache=use_cache):
                break  # head-of-line: a better sequence waits for blocks rather than being overtaken
            self.waiting.pop(0)
            num_cached = self.bm.allocate(seq.seq_id, tokens, use_prefix_cache=use_cache)
            seq.num_computed_tokens = num_cached
            if seq.metrics.num_preemptions == 0 and not seq.output_token_ids:
                seq.num_cached_tokens = num_cached
            seq.status = SequenceStatus.RUNNING
            self.running.append(seq)
            budget -= self._schedule_tokens(seq, budget, out)
