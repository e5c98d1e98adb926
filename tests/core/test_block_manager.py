"""Unit tests of the block manager: tables and slots, errors, copy-on-write, prefix caching, admission.

Correctness of sharing is checked against a toy physical memory: the test plays
the worker, writing into each token's slot, when it is computed, a stand-in for its
KV (the whole prefix up to it, since real KV depends on every earlier token),
performing the BlockCopy ops it is given, then reading every sequence back.
"""

from __future__ import annotations

import random

import pytest

from minipaged.core.block_manager import (
    BlockCopy,
    BlockManager,
    DuplicateSequenceError,
    NoFreeBlocksError,
    SequenceFinishedError,
    UnknownSequenceError,
)
from minipaged.core.block_pool import Block, FreeBlockQueue


class ToyWorker:
    """Plays the worker against a flat slot array of ``num_blocks * block_size`` entries."""

    def __init__(self, bm: BlockManager) -> None:
        self.bm = bm
        self.memory: list[object] = [None] * (bm.num_blocks * bm.block_size)
        self.computed: dict[object, int] = {}

    def allocate(self, seq_id, tokens) -> int:
        cached = self.bm.allocate(seq_id, tokens)
        self.computed[seq_id] = cached
        return cached

    def append(self, seq_id, tokens) -> list[BlockCopy]:
        copies = self.bm.append_tokens(seq_id, tokens)
        bs = self.bm.block_size
        for c in copies:
            self.memory[c.dst * bs : (c.dst + 1) * bs] = self.memory[c.src * bs : (c.src + 1) * bs]
        return copies

    def compute(self, seq_id, upto: int | None = None) -> None:
        tokens = self.bm.token_ids(seq_id)
        upto = len(tokens) if upto is None else upto
        start = self.computed[seq_id]
        for pos, slot in zip(range(start, upto), self.bm.slot_mapping(seq_id, start, upto)):
            self.memory[slot] = tuple(tokens[: pos + 1])
        self.computed[seq_id] = max(start, upto)
        self.bm.mark_computed(seq_id, upto)

    def fork(self, parent, child) -> None:
        self.bm.fork(parent, child)
        self.computed[child] = self.computed[parent]

    def free(self, seq_id) -> None:
        self.bm.free(seq_id)
        del self.computed[seq_id]

    def read_back(self, seq_id) -> list[object]:
        n = self.computed[seq_id]
        return [self.memory[s] for s in self.bm.slot_mapping(seq_id, 0, n)]

    def check_all(self) -> None:
        for seq_id, n in self.computed.items():
            tokens = self.bm.token_ids(seq_id)
            assert self.read_back(seq_id) == [tuple(tokens[: p + 1]) for p in range(n)], seq_id


def snapshot(bm: BlockManager, seq_ids) -> tuple:
    return (
        bm.stats(),
        bm.free_block_ids(),
        bm.cached_block_ids(),
        [bm.ref_count(b) for b in range(bm.num_blocks)],
        {s: (bm.block_table(s), bm.token_ids(s)) for s in seq_ids},
    )


def rand_tokens(rng: random.Random, n: int, vocab: int = 1000) -> list[int]:
    return [rng.randrange(vocab) for _ in range(n)]


# ---- construction and validation -----------------------------------------------------


@pytest.mark.parametrize(
    "kwargs, name",
    [
        (dict(num_blocks=0, block_size=16), "num_blocks"),
        (dict(num_blocks=4, block_size=0), "block_size"),
        (dict(num_blocks=4.0, block_size=16), "num_blocks"),
        (dict(num_blocks=4, block_size=16, watermark_blocks=-1), "watermark_blocks"),
        (dict(num_blocks=4, block_size=16, watermark_blocks=5), "watermark_blocks"),
        (dict(num_blocks=4, block_size=16, enable_prefix_caching=1), "enable_prefix_caching"),
        (dict(num_blocks=4, block_size=16, hash_fn="blake2b"), "hash_fn"),
    ],
)
def test_constructor_rejects_bad_arguments(kwargs, name):
    with pytest.raises(ValueError, match=name):
        BlockManager(**kwargs)


def test_bad_token_ids_and_positions_name_the_argument():
    bm = BlockManager(4, 4)
    with pytest.raises(ValueError, match="token_ids"):
        bm.allocate("a", [])
    with pytest.raises(ValueError, match="token_ids"):
        bm.allocate("a", [1, -2])
    with pytest.raises(ValueError, match="token_ids"):
        bm.allocate("a", [1.5])
    with pytest.raises(ValueError, match="token_ids"):
        bm.can_allocate("abc")
    bm.allocate("a", [1, 2, 3])
    with pytest.raises(ValueError, match="position"):
        bm.slot("a", 3)
    with pytest.raises(ValueError, match="end"):
        bm.slot_mapping("a", 0, 4)
    with pytest.raises(ValueError, match="num_computed_tokens"):
        bm.mark_computed("a", 4)
    with pytest.raises(ValueError, match="num_tokens"):
        bm.blocks_needed_to_append("a", -1)
    assert not bm.has_sequence("b") and bm.has_sequence("a")


# ---- block tables and slots ----------------------------------------------------------


def test_tables_grow_one_block_at_a_time_and_slots_follow_the_formula():
    rng = random.Random(1)
    bs = 16
    bm = BlockManager(64, bs, enable_prefix_caching=False)
    lengths = {s: rng.randint(1, 70) for s in range(5)}
    for s, n in lengths.items():
        assert bm.allocate(s, rand_tokens(rng, n)) == 0
    for _ in range(40):
        s = rng.randrange(5)
        before = bm.block_table(s)
        bm.append_tokens(s, rand_tokens(rng, 1))
        lengths[s] += 1
        after = bm.block_table(s)
        assert after[: len(before)] == before
        assert len(after) - len(before) == (1 if lengths[s] % bs == 1 else 0)
    all_slots = []
    for s, n in lengths.items():
        table = bm.block_table(s)
        assert len(table) == -(-n // bs) == bm.blocks_for(n) and bm.num_tokens(s) == n
        slots = bm.slot_mapping(s, 0, n)
        assert slots == [table[p // bs] * bs + p % bs for p in range(n)]
        assert slots == [bm.slot(s, p) for p in range(n)]
        all_slots += slots
    assert len(set(all_slots)) == len(all_slots)  # no two tokens share a slot
    assert bm.num_free_blocks == 64 - sum(bm.blocks_for(n) for n in lengths.values())


def test_block_table_and_token_ids_are_copies():
    bm = BlockManager(4, 4)
    bm.allocate("a", [1, 2, 3, 4, 5])
    bm.block_table("a").append(3)
    bm.token_ids("a").append(9)
    assert bm.block_table("a") == [0, 1] and bm.token_ids("a") == [1, 2, 3, 4, 5]


# ---- error paths ---------------------------------------------------------------------


def test_free_by_non_owner_double_free_and_use_after_free_raise_typed_errors():
    bm = BlockManager(8, 4)
    with pytest.raises(UnknownSequenceError):
        bm.free("never")
    bm.allocate("a", [1, 2, 3])
    with pytest.raises(DuplicateSequenceError):
        bm.allocate("a", [4])
    bm.fork("a", "b")
    with pytest.raises(DuplicateSequenceError):
        bm.fork("a", "b")
    bm.free("a")
    for call in (
        lambda: bm.free("a"),
        lambda: bm.append_tokens("a", [1]),
        lambda: bm.fork("a", "c"),
        lambda: bm.block_table("a"),
    ):
        with pytest.raises(SequenceFinishedError):
            call()
    assert issubclass(SequenceFinishedError, UnknownSequenceError)
    assert bm.token_ids("b") == [1, 2, 3]  # the child is unaffected by the parent's free
    bm.free("b")
    assert bm.num_free_blocks == 8
    bm.allocate("a", [7])  # an id may be reused after its free (re-admission after preemption)
    assert bm.token_ids("a") == [7]


def test_no_free_blocks_leaves_everything_unchanged():
    rng = random.Random(2)
    bm = BlockManager(6, 4)
    w = ToyWorker(bm)
    w.allocate("a", rand_tokens(rng, 9))  # 3 blocks
    w.compute("a")
    w.fork("a", "b")  # shares them
    w.allocate("c", rand_tokens(rng, 8))  # 2 blocks -> 1 free left
    w.compute("c")
    seqs = ["a", "b", "c"]
    before = snapshot(bm, seqs)
    with pytest.raises(NoFreeBlocksError):
        bm.allocate("d", rand_tokens(rng, 5))
    with pytest.raises(NoFreeBlocksError):
        bm.append_tokens("a", rand_tokens(rng, 4))  # copy-on-write + 1 more block = 2 needed
    with pytest.raises(NoFreeBlocksError):
        bm.append_tokens("c", rand_tokens(rng, 5))
    assert snapshot(bm, seqs) == before
    assert not bm.has_sequence("d")
    assert bm.blocks_needed_to_append("a", 4) == 2
    assert bm.blocks_needed_to_append("a", 3) == 1  # copy only
    assert bm.blocks_needed_to_append("c", 4) == 1
    w.check_all()


# ---- fork and copy-on-write ----------------------------------------------------------


def test_fork_shares_everything_and_append_into_shared_partial_block_copies_it():
    rng = random.Random(3)
    bs = 4
    bm = BlockManager(16, bs)
    w = ToyWorker(bm)
    w.allocate("p", rand_tokens(rng, 10))  # blocks: full, full, 2/4
    w.compute("p")
    w.fork("p", "c")
    table = bm.block_table("p")
    assert bm.block_table("c") == table and bm.token_ids("c") == bm.token_ids("p")
    assert [bm.ref_count(b) for b in table] == [2, 2, 2]
    assert bm.blocks_needed_to_append("c", 1) == 1
    copies = w.append("c", [777])
    assert len(copies) == 1 and copies[0].src == table[2]
    new_table = bm.block_table("c")
    assert copies[0].dst == new_table[2] and copies[0].dst not in table
    assert new_table[:2] == table[:2]  # full blocks stay shared
    assert [bm.ref_count(b) for b in table] == [2, 2, 1]
    assert bm.stats().total_copied == 1
    # The parent now holds its partial block alone: appending writes in place.
    assert w.append("p", [555]) == [] and bm.block_table("p") == table
    w.compute("p")
    w.compute("c")
    w.check_all()
    assert w.read_back("c")[-1][-1] == 777 and w.read_back("p")[-1][-1] == 555


def test_append_to_shared_full_last_block_allocates_without_copy():
    bm = BlockManager(8, 4)
    bm.allocate("p", list(range(8)))
    bm.fork("p", "c")
    assert bm.blocks_needed_to_append("c", 1) == 1
    assert bm.append_tokens("c", [9]) == []
    assert bm.block_table("c")[:2] == bm.block_table("p")
    assert len(bm.block_table("c")) == 3 and bm.stats().total_copied == 0


def test_can_append_counts_sibling_copies_exactly():
    bm = BlockManager(5, 4)
    bm.allocate("a", [1, 2])  # one partial block
    bm.fork("a", "b")
    bm.fork("a", "c")  # ref count 3
    assert bm.num_free_blocks == 4
    # All three append: two copies (the last one left holds the block alone).
    assert bm.blocks_needed_to_append("a") == 1
    assert bm.can_append(["a", "b", "c"])
    bm2 = BlockManager(3, 4)
    bm2.allocate("a", [1, 2])
    bm2.fork("a", "b")
    bm2.fork("a", "c")
    assert bm2.can_append(["a", "b", "c"])  # 2 free, 2 copies needed
    assert bm2.can_append(["a", "a", "b"])  # duplicates count once
    bm2.allocate("x", [5])
    assert not bm2.can_append(["a", "b", "c"])  # 1 free, 2 copies needed
    assert bm2.can_append(["a"])
    bm2.free("x")
    assert len(bm2.append_tokens("a", [9])) == 1 and len(bm2.append_tokens("b", [9])) == 1
    assert bm2.num_free_blocks == 0 and bm2.ref_count(bm2.block_table("c")[0]) == 1
    assert bm2.append_tokens("c", [9]) == []


# ---- prefix caching ------------------------------------------------------------------


def test_prefix_hit_reuses_computed_full_blocks_only():
    rng = random.Random(4)
    bs = 4
    bm = BlockManager(32, bs)
    w = ToyWorker(bm)
    prompt = rand_tokens(rng, 13)
    w.allocate("a", prompt)
    assert bm.allocate("early", prompt) == 0  # nothing computed yet: no reuse
    bm.free("early")
    w.compute("a", 6)  # block 0 full and computed, block 1 not
    assert bm.allocate("half", prompt) == bs
    assert bm.block_table("half")[0] == bm.block_table("a")[0]
    bm.free("half")
    w.compute("a")
    other = prompt[:12] + rand_tokens(rng, 7)
    assert w.allocate("b", other) == 12
    assert bm.block_table("b")[:3] == bm.block_table("a")[:3]
    assert bm.block_table("b")[3] not in bm.block_table("a")
    w.compute("b")
    w.check_all()
    st = bm.stats()
    assert st.prefix_queries == 13 * 3 + 19 and st.prefix_hits == bs + 12
    assert st.hit_rate == pytest.approx((bs + 12) / (13 * 3 + 19))


@pytest.mark.parametrize("length, expected_blocks", [(1, 0), (4, 0), (5, 1), (8, 1), (9, 2), (12, 2)])
def test_block_holding_the_last_token_is_never_reused(length, expected_blocks):
    """nano-vllm #144: a fully cached prompt left nothing to compute. Here >= 1 token always is."""
    bm = BlockManager(16, 4)
    w = ToyWorker(bm)
    tokens = list(range(100, 100 + length))
    w.allocate("a", tokens)
    w.compute("a")
    cached = w.allocate("b", tokens)
    assert cached == expected_blocks * 4 and cached <= length - 1
    assert bm.slot_mapping("b", cached, length)  # a non-empty query
    w.compute("b")
    w.check_all()


def test_preempted_sequence_reallocated_with_generated_tokens_rehits_cache():
    """nano-vllm #207/#211: after preemption, prompt + generated tokens re-hit the cache."""
    rng = random.Random(5)
    bs = 4
    bm = BlockManager(12, bs)
    w = ToyWorker(bm)
    prompt = rand_tokens(rng, 6)
    w.allocate("s", prompt)
    w.compute("s")
    generated = []
    for _ in range(9):  # decode: the newest token's KV is computed one step later
        tok = rng.randrange(1000)
        generated.append(tok)
        w.append("s", [tok])
        w.compute("s", bm.num_tokens("s") - 1)
    full = bm.token_ids("s")
    assert full == prompt + generated
    bm.free("s")
    del w.computed["s"]
    cached = w.allocate("s", full)  # re-admission with the same id
    assert cached == 12 and cached % bs == 0 and cached <= len(full) - 1
    assert len(bm.block_table("s")) == bm.blocks_for(len(full))
    w.compute("s")
    for _ in range(5):  # and it keeps decoding
        w.append("s", [rng.randrange(1000)])
        w.compute("s")
    w.check_all()
    assert bm.num_tokens("s") == len(full) + 5


def test_cached_blocks_survive_free_and_are_revived_from_the_middle_of_the_queue():
    rng = random.Random(6)
    bs = 4
    bm = BlockManager(10, bs)
    w = ToyWorker(bm)
    prompts = {s: rand_tokens(rng, 9) for s in "abc"}
    for s, p in prompts.items():
        w.allocate(s, p)
        w.compute(s)
    for s in "abc":
        w.free(s)
    st = bm.stats()
    assert st.free_blocks == 10 and st.used_blocks == 0 and st.cached_blocks == 6
    free_before = bm.free_block_ids()
    b_blocks = [b for b in free_before if b in set(bm.cached_block_ids())][2:4]  # b's, mid-queue
    assert w.allocate("b2", prompts["b"]) == 8
    revived = bm.block_table("b2")[:2]
    assert set(revived) == set(b_blocks)
    assert bm.free_block_ids() == [b for b in free_before if b not in revived][1:]  # 1 fresh taken
    assert bm.stats().cached_blocks == 4
    w.compute("b2")
    w.check_all()


def test_eviction_is_lru_and_drops_the_hash_entry():
    rng = random.Random(7)
    bs = 4
    bm = BlockManager(8, bs)
    w = ToyWorker(bm)
    old, new = rand_tokens(rng, 9), rand_tokens(rng, 9)
    for s, p in (("old", old), ("new", new)):
        w.allocate(s, p)
        w.compute(s)
        w.free(s)
    assert bm.stats().cached_blocks == 4
    old_blocks = bm.cached_block_ids()
    # 5 blocks: the 4 plain free ones, then the least recently used cached block,
    # which is the deepest cached block of "old" (freed first, last block first).
    w.allocate("x", rand_tokens(rng, 20))
    evicted = set(old_blocks) - set(bm.cached_block_ids())
    assert len(evicted) == 1 and evicted <= set(bm.block_table("x"))
    assert bm.stats().cached_blocks == 3 and bm.stats().total_evicted == 1
    w.free("x")
    assert w.allocate("new2", new) == 8  # the newer prefix is untouched
    assert w.allocate("old2", old) == 4  # old's chain is broken at its evicted second block
    w.compute("old2")
    w.compute("new2")
    w.check_all()


def test_collisions_never_give_wrong_hits():
    """With a 2-bit hash most keys collide; token ids and the parent link must catch every one."""
    rng = random.Random(8)
    bs = 2
    weak = lambda parent, tokens: bytes([(hash(tokens) + (parent or b"\0")[0]) % 4])  # noqa: E731
    bm = BlockManager(40, bs, hash_fn=weak)
    w = ToyWorker(bm)
    hits = 0
    for i in range(150):
        prompt = [rng.randrange(3) for _ in range(rng.randint(1, 9))]
        sid = f"s{i}"
        while not bm.can_allocate(prompt):
            w.free(next(iter(w.computed)))
        hits += w.allocate(sid, prompt) > 0
        w.compute(sid)
        w.check_all()  # a wrong hit would read back another prefix's values
    assert hits > 10  # the guard does not simply disable the cache


def test_same_block_after_a_different_parent_is_not_a_hit():
    """[X, B] must not serve [A, B] even when hash(X) == hash(A): the parent link is checked."""
    # Every first block collides; deeper keys ignore the parent entirely.
    weak = lambda parent, tokens: b"root" if parent is None else bytes(tokens)  # noqa: E731
    bm = BlockManager(8, 2, hash_fn=weak)
    w = ToyWorker(bm)
    w.allocate("xb", [7, 7, 1, 2, 0])
    w.compute("xb")  # caches [7 7] and [1 2]-after-[7 7]
    assert w.allocate("a", [3, 3, 9]) == 0  # [7 7] sits under "root": tokens differ, miss
    w.compute("a")  # [3 3] replaces it under "root"
    assert w.allocate("ab", [3, 3, 1, 2, 0]) == 2  # [1 2] was computed after [7 7], not [3 3]
    w.compute("ab")
    w.check_all()


def test_prefix_caching_can_be_switched_off():
    bm = BlockManager(8, 4, enable_prefix_caching=False)
    bm.allocate("a", list(range(9)))
    bm.mark_computed("a", 9)
    assert bm.cached_block_ids() == []
    assert bm.allocate("b", list(range(9))) == 0
    bm.free("a")
    bm.free("b")
    assert bm.stats().cached_blocks == 0 and bm.enable_prefix_caching is False


# ---- admission -----------------------------------------------------------------------


def test_can_allocate_counts_hits_revivals_and_watermark():
    bs = 4
    bm = BlockManager(6, bs, watermark_blocks=1)
    prompt = list(range(13))  # 4 blocks
    assert bm.can_allocate(prompt)
    bm.allocate("a", prompt)
    bm.mark_computed("a", 13)
    # 2 free. A fresh 13-token prompt needs 4: no. The same prompt needs 1 (3 hits in use).
    assert not bm.can_allocate(list(range(50, 63)))
    assert bm.can_allocate(prompt)
    bm.allocate("x", [99] * 4)  # 1 free left == watermark
    assert not bm.can_allocate(prompt)  # would eat the watermark
    assert bm.can_append(["a"])  # appends may use it
    bm.free("x")
    bm.free("a")  # 6 free, 3 of them cached
    assert bm.can_allocate(prompt)
    with pytest.raises(NoFreeBlocksError):
        bm.allocate("big", list(range(100, 128)))  # 7 blocks > 6
    assert not bm.can_allocate(list(range(100, 128)))
    assert bm.allocate("a", prompt) == 12 and bm.num_free_blocks == 2


# ---- statistics ----------------------------------------------------------------------


def test_stats_are_computed_from_the_tables():
    rng = random.Random(9)
    bs = 8
    bm = BlockManager(30, bs)
    w = ToyWorker(bm)
    for s in range(4):
        w.allocate(s, rand_tokens(rng, rng.randint(1, 30)))
        w.compute(s)
    w.fork(0, "f")
    w.append("f", [1, 2, 3])
    w.append(1, rand_tokens(rng, 5))
    live = [0, 1, 2, 3, "f"]
    fill = {}
    for s in live:
        n = bm.num_tokens(s)
        for i, b in enumerate(bm.block_table(s)):
            filled = min(bs, n - i * bs)
            assert fill.setdefault(b, filled) == filled  # a shared block has one fill
    st = bm.stats()
    assert st.used_blocks == len(fill) == st.num_blocks - st.free_blocks
    assert st.tokens_stored == sum(fill.values())
    assert st.utilization == pytest.approx(sum(fill.values()) / (len(fill) * bs))
    assert st.internal_fragmentation == pytest.approx(1 - st.utilization)
    assert st.total_allocated - st.total_freed == st.used_blocks
    for s in live:
        w.free(s)
    st = bm.stats()
    assert st.used_blocks == 0 and st.tokens_stored == 0 and st.utilization == 1.0
    assert st.free_blocks == 30 and st.total_allocated == st.total_freed


def test_hits_are_revived_before_fresh_blocks_are_taken():
    """If fresh blocks were popped first, the least recently used hit could be evicted and handed out twice."""
    bm = BlockManager(4, 2)
    w = ToyWorker(bm)
    for s, p in (("a", [1, 2, 5]), ("b", [3, 4, 6])):
        w.allocate(s, p)
        w.compute(s)
    w.free("a")
    w.free("b")
    w.allocate("c", [7, 7, 7, 7])  # takes both plain free blocks
    a_first = bm.free_block_ids()[0]  # a's cached block is now first in line for eviction
    assert w.allocate("d", [1, 2, 8]) == 2
    table = bm.block_table("d")
    assert table[0] == a_first and table[1] != a_first and bm.ref_count(a_first) == 1
    w.compute("d")
    w.check_all()


def test_free_queue_links_stay_consistent_under_removal_from_anywhere():
    rng = random.Random(10)
    blocks = [Block(i) for i in range(12)]
    queue = FreeBlockQueue(blocks)
    model = list(range(12))
    for _ in range(300):
        op = rng.randrange(4)
        if op == 0 and model:
            assert queue.popleft().block_id == model.pop(0)
        elif op == 1 and model:
            victim = rng.choice(model)
            queue.remove(blocks[victim])
            model.remove(victim)
        else:
            out = [i for i in range(12) if i not in model]
            if out:
                i = rng.choice(out)
                (queue.append if op == 2 else queue.appendleft)(blocks[i])
                model.append(i) if op == 2 else model.insert(0, i)
        assert [b.block_id for b in queue] == model and len(queue) == len(model)
        assert all(b.in_free_queue == (b.block_id in model) for b in blocks)
    with pytest.raises(IndexError):
        FreeBlockQueue([]).popleft()
