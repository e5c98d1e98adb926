"""Property-based test: random allocate / append / compute / fork / free / preempt / evict
sequences against the block manager, with every invariant checked after every step.

The test plays the worker over a toy physical memory: when a token is computed it
writes, into that token's slot, the whole prefix up to it (a stand-in for its KV,
which depends on every earlier token), and it performs each BlockCopy it is given.
Reading a sequence back through its block table must then give its own prefixes:
that catches a wrong prefix-cache hit, a missed copy-on-write, or two sequences
writing one slot. A tiny vocabulary and small pools make prefix hits, collisions
(with a 2-bit hash half the time) and evictions frequent.

Not derandomized: each run explores new cases. The seed is printed (pytest -s) and
can be pinned with BM_HYPOTHESIS_SEED=<seed> to replay a failure.
"""

from __future__ import annotations

import copy
import os
import random
from collections.abc import Sequence

from hypothesis import HealthCheck, seed, settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    RuleBasedStateMachine,
    initialize,
    invariant,
    precondition,
    rule,
    run_state_machine_as_test,
)

from minipaged.core.block_manager import (
    BlockManager,
    NoFreeBlocksError,
    SequenceFinishedError,
    UnknownSequenceError,
)

SEED = int(os.environ.get("BM_HYPOTHESIS_SEED", random.SystemRandom().randrange(2**32)))
VOCAB = 3


def weak_hash(parent: bytes | None, tokens: Sequence[int]) -> bytes:
    """Four possible keys: nearly every lookup meets a colliding entry."""
    return bytes([(sum(tokens) + (parent[0] if parent else 0)) % 4])


def tokens_strategy(min_size: int, max_size: int) -> st.SearchStrategy[list[int]]:
    return st.lists(st.integers(0, VOCAB - 1), min_size=min_size, max_size=max_size)


class BlockManagerMachine(RuleBasedStateMachine):
    """Model: each live sequence's tokens and how many of them the 'worker' has computed."""

    @initialize(
        num_blocks=st.integers(4, 24),
        block_size=st.integers(1, 5),
        caching=st.booleans() | st.just(True),
        weak=st.booleans(),
        watermark=st.integers(0, 2),
    )
    def setup(self, num_blocks, block_size, caching, weak, watermark):
        self.bm = BlockManager(
            num_blocks,
            block_size,
            enable_prefix_caching=caching,
            watermark_blocks=watermark,
            hash_fn=weak_hash if weak else None,
        )
        self.bs = block_size
        self.memory: list[object] = [None] * (num_blocks * block_size)
        self.tokens: dict[int, list[int]] = {}
        self.computed: dict[int, int] = {}
        self.freed: set[int] = set()
        self.history: list[list[int]] = []  # token lists seen, to build prompts that share prefixes
        self.next_id = 0

    # ---- helpers -----------------------------------------------------------------------

    def _snapshot(self):
        bm = self.bm
        return (
            bm.stats(),
            bm.free_block_ids(),
            bm.cached_block_ids(),
            [bm.ref_count(b) for b in range(bm.num_blocks)],
            {s: (bm.block_table(s), bm.token_ids(s)) for s in self.tokens},
        )

    def _new_id(self) -> int:
        self.next_id += 1
        return self.next_id

    def _admit(self, seq_id: int, prompt: list[int]) -> None:
        before = self._snapshot()
        fits = self.bm.can_allocate(prompt)
        try:
            cached = self.bm.allocate(seq_id, prompt)
        except NoFreeBlocksError:
            assert not fits
            assert self._snapshot() == before
            return
        assert cached % self.bs == 0 and 0 <= cached <= len(prompt) - 1
        if not self.bm.enable_prefix_caching:
            assert cached == 0
        self.tokens[seq_id] = list(prompt)
        self.computed[seq_id] = cached
        self.freed.discard(seq_id)
        self.history.append(list(prompt))

    def _compute(self, seq_id: int, upto: int) -> None:
        tokens = self.tokens[seq_id]
        start = self.computed[seq_id]
        if upto > start:
            for pos, slot in zip(range(start, upto), self.bm.slot_mapping(seq_id, start, upto)):
                self.memory[slot] = tuple(tokens[: pos + 1])
            self.computed[seq_id] = upto
        self.bm.mark_computed(seq_id, upto)

    # ---- rules -------------------------------------------------------------------------

    @rule(data=st.data(), suffix=tokens_strategy(0, 12), prefill=st.booleans())
    def allocate(self, data, suffix, prefill):
        prefix: list[int] = []
        if self.history and data.draw(st.integers(0, 2), label="share a prefix") > 0:
            source = data.draw(st.sampled_from(self.history), label="source")
            prefix = source[: data.draw(st.integers(0, len(source)), label="prefix len")]
        prompt = prefix + suffix
        if not prompt:
            prompt = [0]
        seq_id = self._new_id()
        self._admit(seq_id, prompt)
        if prefill and seq_id in self.tokens:  # the engine computes the prompt in the same step
            self._compute(seq_id, len(prompt))

    @precondition(lambda self: self.tokens)
    @rule(data=st.data(), new=tokens_strategy(1, 6))
    def append(self, data, new):
        self.append_to(data.draw(st.sampled_from(sorted(self.tokens)), label="seq"), new)

    def append_to(self, seq_id: int, new: list[int]) -> None:
        needed = self.bm.blocks_needed_to_append(seq_id, len(new))
        free = self.bm.num_free_blocks
        assert self.bm.can_append([seq_id], len(new)) == (needed <= free)
        before = self._snapshot()
        try:
            copies = self.bm.append_tokens(seq_id, new)
        except NoFreeBlocksError:
            assert needed > free
            assert self._snapshot() == before
            return
        assert needed <= free and self.bm.num_free_blocks == free - needed
        assert len(copies) <= 1
        for c in copies:
            self.memory[c.dst * self.bs : (c.dst + 1) * self.bs] = self.memory[c.src * self.bs : (c.src + 1) * self.bs]
        self.tokens[seq_id] += new

    @precondition(lambda self: self.tokens)
    @rule(data=st.data(), all_but_last=st.booleans())
    def compute(self, data, all_but_last):
        # Decoding computes a sampled token's KV one step after it is appended.
        seq_id = data.draw(st.sampled_from(sorted(self.tokens)), label="seq")
        n = len(self.tokens[seq_id])
        self._compute(seq_id, max(self.computed[seq_id], n - 1 if all_but_last else n))

    @precondition(lambda self: self.tokens)
    @rule(data=st.data())
    def fork(self, data):
        parent = data.draw(st.sampled_from(sorted(self.tokens)), label="parent")
        child = self._new_id()
        free = self.bm.num_free_blocks
        self.bm.fork(parent, child)
        assert self.bm.num_free_blocks == free  # sharing takes no block
        self.tokens[child] = list(self.tokens[parent])
        self.computed[child] = self.computed[parent]

    @precondition(lambda self: self.tokens)
    @rule(data=st.data(), token=st.integers(0, VOCAB - 1))
    def fork_and_diverge(self, data, token):
        """Parallel sampling: fork, then the child samples its own token (copy-on-write if shared)."""
        self.fork(data)
        self.append_to(self.next_id, [token])

    @precondition(lambda self: self.tokens)
    @rule(data=st.data())
    def free(self, data):
        seq_id = data.draw(st.sampled_from(sorted(self.tokens)), label="seq")
        self.history.append(self.tokens.pop(seq_id))
        del self.computed[seq_id]
        self.bm.free(seq_id)
        self.freed.add(seq_id)

    @precondition(lambda self: self.tokens)
    @rule(data=st.data())
    def preempt_and_readmit(self, data):
        """Free a running sequence and re-admit it with prompt + generated tokens (recompute)."""
        seq_id = data.draw(st.sampled_from(sorted(self.tokens)), label="seq")
        tokens = self.tokens.pop(seq_id)
        del self.computed[seq_id]
        self.bm.free(seq_id)
        self.freed.add(seq_id)
        self._admit(seq_id, tokens)

    @precondition(lambda self: self.tokens)
    @rule(data=st.data(), num_tokens=st.integers(1, 3))
    def can_append_matches_doing_it(self, data, num_tokens):
        group = data.draw(st.lists(st.sampled_from(sorted(self.tokens)), min_size=1, max_size=6), label="group")
        predicted = self.bm.can_append(group, num_tokens)
        trial = copy.deepcopy(self.bm)
        try:
            for seq_id in dict.fromkeys(group):
                trial.append_tokens(seq_id, [0] * num_tokens)
            succeeded = True
        except NoFreeBlocksError:
            succeeded = False
        assert predicted == succeeded

    @precondition(lambda self: self.freed)
    @rule(data=st.data())
    def misuse_a_freed_sequence(self, data):
        seq_id = data.draw(st.sampled_from(sorted(self.freed)), label="seq")
        before = self._snapshot()
        for call in (
            lambda: self.bm.free(seq_id),
            lambda: self.bm.append_tokens(seq_id, [1]),
            lambda: self.bm.fork(seq_id, self._new_id()),
        ):
            try:
                call()
                raise AssertionError("a freed sequence was accepted")
            except SequenceFinishedError:
                pass
        assert self._snapshot() == before

    @rule()
    def free_by_stranger(self):
        before = self._snapshot()
        try:
            self.bm.free("stranger")
            raise AssertionError("a stranger freed a sequence")
        except UnknownSequenceError:
            pass
        assert self._snapshot() == before

    # ---- invariants --------------------------------------------------------------------

    @invariant()
    def tables_match_the_model(self):
        for seq_id, tokens in self.tokens.items():
            assert self.bm.token_ids(seq_id) == tokens
            assert len(self.bm.block_table(seq_id)) == self.bm.blocks_for(len(tokens))

    @invariant()
    def free_used_and_ref_counts_are_consistent(self):
        bm = self.bm
        holders = [0] * bm.num_blocks
        for seq_id in self.tokens:
            for b in bm.block_table(seq_id):
                holders[b] += 1
        used = {b for b, h in enumerate(holders) if h}
        free = bm.free_block_ids()
        assert len(set(free)) == len(free)
        assert not used & set(free)  # never both free and used
        assert len(free) + len(used) == bm.num_blocks  # nothing lost
        assert [bm.ref_count(b) for b in range(bm.num_blocks)] == holders
        st_ = bm.stats()
        assert st_.free_blocks == len(free) == bm.num_free_blocks and st_.used_blocks == len(used)
        assert st_.total_allocated - st_.total_freed == len(used)
        cached = set(bm.cached_block_ids())
        assert st_.cached_blocks == len(cached & set(free))
        # Plain free blocks are handed out before any cached one is evicted.
        flags = [b in cached for b in free]
        assert flags == sorted(flags)

    @invariant()
    def token_counts_and_utilization(self):
        fill: dict[int, int] = {}
        for seq_id, tokens in self.tokens.items():
            for i, b in enumerate(self.bm.block_table(seq_id)):
                filled = min(self.bs, len(tokens) - i * self.bs)
                assert fill.setdefault(b, filled) == filled
        st_ = self.bm.stats()
        assert st_.tokens_stored == sum(fill.values())
        expected = sum(fill.values()) / (len(fill) * self.bs) if fill else 1.0
        assert abs(st_.utilization - expected) < 1e-12
        assert abs(st_.internal_fragmentation - (1 - expected)) < 1e-12

    @invariant()
    def every_sequence_reads_back_its_own_kv(self):
        for seq_id, n in self.computed.items():
            tokens = self.tokens[seq_id]
            got = [self.memory[s] for s in self.bm.slot_mapping(seq_id, 0, n)]
            assert got == [tuple(tokens[: p + 1]) for p in range(n)], seq_id

    def teardown(self):
        if not hasattr(self, "bm"):
            return
        for seq_id in list(self.tokens):
            self.bm.free(seq_id)
        st_ = self.bm.stats()
        assert st_.free_blocks == self.bm.num_blocks and st_.used_blocks == 0
        assert st_.tokens_stored == 0 and st_.total_allocated == st_.total_freed


def test_block_manager_state_machine():
    print(f"hypothesis seed {SEED} (replay with BM_HYPOTHESIS_SEED={SEED})")
    machine = seed(SEED)(BlockManagerMachine)
    run_state_machine_as_test(
        machine,
        settings=settings(
            max_examples=150,
            stateful_step_count=100,
            deadline=None,
            suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much],
        ),
    )
