"""Block manager: per-sequence block tables over a shared pool of physical KV blocks.

The scheduler asks it whether a sequence fits (``can_allocate``/``can_append``),
the engine tells it what happened (``allocate``, ``append_tokens``,
``mark_computed``, ``fork``, ``free``), and the worker reads block tables and slot
mappings from it. It is pure Python (no torch), so it can be tested and plotted
on its own.

Logical block ``i`` of a sequence holds token positions ``[i * block_size,
(i + 1) * block_size)``; the block table maps it to a physical block, so token
position ``p`` lives in cache slot ``table[p // block_size] * block_size + p %
block_size`` of a cache shaped ``[num_blocks, block_size, num_kv_heads, head_dim]``.

Sharing is by reference counts. A block shared by several sequences is never
written: appending into a shared, partially filled last block first moves the
appender onto a private copy (copy-on-write, reported as a ``BlockCopy`` the
worker performs before it writes). Full blocks whose KV is computed become
prefix-cache entries (``minipaged.core.prefix_cache``) and stay reusable after their
sequences are freed, until the pool needs them back (least recently used first).

Every method that can run out of blocks checks first and raises
``NoFreeBlocksError`` before it changes anything.
"""

from __future__ import annotations

import operator
from collections import OrderedDict
from collections.abc import Hashable, Iterable, Sequence
from dataclasses import dataclass, field

from minipaged.core.block_pool import Block, BlockHash, BlockPool
from minipaged.core.prefix_cache import HashFn, find_cached_prefix, hash_block_tokens

# How many freed sequence ids are remembered to tell "already freed" apart from
# "never seen"; bounded so a long-running server does not grow without limit.
# Older ids still raise UnknownSequenceError, the base class.
FINISHED_IDS_REMEMBERED = 65536


class BlockManagerError(Exception):
    """Base class of every error the block manager raises on purpose."""


class NoFreeBlocksError(BlockManagerError):
    """Not enough free blocks for the sequence; the call changed nothing."""


class UnknownSequenceError(BlockManagerError):
    """The sequence id is not held here (never allocated, or already freed)."""


class DuplicateSequenceError(BlockManagerError):
    """allocate/fork onto a sequence id that is already held."""


class SequenceFinishedError(UnknownSequenceError):
    """The sequence was freed: it cannot be appended to, forked or freed again."""


@dataclass(frozen=True)
class BlockCopy:
    """Copy physical block ``src`` into ``dst`` (all layers, all slots) before writing new KV."""

    src: int
    dst: int


@dataclass(frozen=True)
class BlockStats:
    """A snapshot of pool occupancy and cumulative counters (block and token counts)."""

    num_blocks: int
    block_size: int
    free_blocks: int  # allocatable now, including cached blocks that would be evicted
    used_blocks: int  # ref_count > 0
    cached_blocks: int  # free but still holding a reusable computed full block
    tokens_stored: int  # tokens in used blocks; a block shared by k sequences counts once
    utilization: float  # tokens_stored / (used_blocks * block_size); 1.0 when nothing is used
    internal_fragmentation: float  # 1 - utilization: empty slots inside used blocks
    prefix_queries: int  # tokens asked for by allocate (cumulative)
    prefix_hits: int  # of those, tokens served from the prefix cache (cumulative)
    hit_rate: float  # prefix_hits / prefix_queries; 0.0 before any query
    total_allocated: int  # blocks taken from the free pool, fresh or revived (cumulative)
    total_freed: int  # blocks returned to the free pool (cumulative)
    total_copied: int  # copy-on-write block copies (cumulative)
    total_evicted: int = 0  # cached blocks whose prefix was dropped to reuse them (cumulative)


@dataclass
class _Sequence:
    """One sequence's view: its block table and tokens, plus its prefix-cache chain.

    ``block_hashes[i]``/``cache_ids[i]`` describe full computed block ``i`` as the
    prefix cache knows it; they grow as ``mark_computed`` registers blocks.
    """

    blocks: list[Block]
    token_ids: list[int]
    block_hashes: list[BlockHash] = field(default_factory=list)
    cache_ids: list[int] = field(default_factory=list)


def _check_count(name: str, value: object, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise ValueError(f"{name} must be an int, got {type(value).__name__}")
    if value < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {value}")
    return value


def _check_token_ids(token_ids: Sequence[int], *, allow_empty: bool) -> list[int]:
    if isinstance(token_ids, (str, bytes)):
        raise ValueError("token_ids must be a sequence of ints, got a string")
    try:
        tokens = [operator.index(t) for t in token_ids]
    except TypeError as exc:
        raise ValueError(f"token_ids must be a sequence of ints: {exc}") from None
    if not tokens and not allow_empty:
        raise ValueError("token_ids must not be empty")
    if tokens and min(tokens) < 0:
        raise ValueError(f"token_ids must be >= 0, got {min(tokens)}")
    return tokens


class BlockManager:
    """Block tables, ref-counted sharing, copy-on-write and prefix caching over ``num_blocks`` blocks."""

    def __init__(
        self,
        num_blocks: int,
        block_size: int,
        *,
        enable_prefix_caching: bool = True,
        watermark_blocks: int = 0,
        hash_fn: HashFn | None = None,
    ) -> None:
        """``hash_fn`` (default BLAKE2b, ``hash_block_tokens``) exists so tests can force collisions."""
        _check_count("num_blocks", num_blocks, 1)
        _check_count("block_size", block_size, 1)
        _check_count("watermark_blocks", watermark_blocks, 0)
        if watermark_blocks > num_blocks:
            raise ValueError(f"watermark_blocks={watermark_blocks} exceeds num_blocks={num_blocks}")
        if not isinstance(enable_prefix_caching, bool):
            raise ValueError(f"enable_prefix_caching must be a bool, got {enable_prefix_caching!r}")
        if hash_fn is not None and not callable(hash_fn):
            raise ValueError(f"hash_fn must be callable(parent_hash, token_ids) -> bytes, got {hash_fn!r}")
        self._num_blocks = num_blocks
        self._block_size = block_size
        self._enable_prefix_caching = enable_prefix_caching
        self._watermark_blocks = watermark_blocks
        self._hash_fn: HashFn = hash_fn if hash_fn is not None else hash_block_tokens
        self._pool = BlockPool(num_blocks, block_size)
        self._seqs: dict[Hashable, _Sequence] = {}
        self._finished: OrderedDict[Hashable, None] = OrderedDict()
        self._next_cache_id = 0
        self._prefix_queries = 0
        self._prefix_hits = 0
        self._total_copied = 0

    @property
    def num_blocks(self) -> int:
        """Physical blocks in the pool."""
        return self._num_blocks

    @property
    def block_size(self) -> int:
        """Token slots per block."""
        return self._block_size

    @property
    def enable_prefix_caching(self) -> bool:
        """Whether computed full blocks are reused by later requests."""
        return self._enable_prefix_caching

    @property
    def watermark_blocks(self) -> int:
        """Blocks can_allocate keeps free, so running sequences can still grow."""
        return self._watermark_blocks

    @property
    def num_free_blocks(self) -> int:
        """Blocks allocatable now, counting cached blocks that would be evicted."""
        return self._pool.num_free

    def blocks_for(self, num_tokens: int) -> int:
        """ceil(num_tokens / block_size)."""
        _check_count("num_tokens", num_tokens, 0)
        return -(-num_tokens // self._block_size)

    # ---- admission ---------------------------------------------------------------

    def _plan_allocation(
        self, tokens: list[int], use_prefix_cache: bool = True
    ) -> tuple[list[Block], list[BlockHash], int]:
        """Cache hits for ``tokens``, their hashes, and how many free blocks allocating would take."""
        if self._enable_prefix_caching and use_prefix_cache:
            # Never the block holding the last token: at least one token must be computed.
            max_hit = (len(tokens) - 1) // self._block_size
            hits, hashes = find_cached_prefix(self._pool, tokens, max_hit, self._hash_fn)
        else:
            hits, hashes = [], []
        revived = sum(1 for b in hits if b.ref_count == 0)
        return hits, hashes, self.blocks_for(len(tokens)) - len(hits) + revived

    def can_allocate(self, token_ids: Sequence[int], *, use_prefix_cache: bool = True) -> bool:
        """Whether ``allocate`` would succeed and still leave ``watermark_blocks`` free."""
        tokens = _check_token_ids(token_ids, allow_empty=False)
        _, _, needed = self._plan_allocation(tokens, use_prefix_cache)
        return needed <= self._pool.num_free - self._watermark_blocks

    def _blocks_needed(self, seq: _Sequence, num_tokens: int) -> tuple[int, bool]:
        """(new blocks incl. a copy-on-write block, whether the last block must be copied)."""
        if num_tokens == 0:
            return 0, False
        length = len(seq.token_ids)
        cow = length % self._block_size != 0 and seq.blocks[-1].ref_count > 1
        grow = self.blocks_for(length + num_tokens) - len(seq.blocks)
        return grow + int(cow), cow

    def blocks_needed_to_append(self, seq_id: Hashable, num_tokens: int = 1) -> int:
        """Free blocks ``append_tokens(seq_id, num_tokens tokens)`` would take, incl. a copy-on-write block."""
        _check_count("num_tokens", num_tokens, 0)
        return self._blocks_needed(self._get(seq_id), num_tokens)[0]

    def can_append(self, seq_ids: Iterable[Hashable], num_tokens: int = 1) -> bool:
        """Whether every sequence in ``seq_ids`` can append ``num_tokens`` tokens, all together.

        Appends may dip into the watermark (it exists to protect running
        sequences from new admissions). Siblings that share one partial last
        block need one copy fewer than their number when all of them append:
        the last one left holds the block alone.
        """
        _check_count("num_tokens", num_tokens, 0)
        needed = 0
        sharers: dict[int, int] = {}
        for seq_id in dict.fromkeys(seq_ids):
            seq = self._get(seq_id)
            grow, cow = self._blocks_needed(seq, num_tokens)
            needed += grow - int(cow)
            if cow:
                sharers[seq.blocks[-1].block_id] = sharers.get(seq.blocks[-1].block_id, 0) + 1
        for block_id, count in sharers.items():
            needed += min(count, self._pool.blocks[block_id].ref_count - 1)
        return needed <= self._pool.num_free

    # ---- mutations ---------------------------------------------------------------

    def allocate(self, seq_id: Hashable, token_ids: Sequence[int], *, use_prefix_cache: bool = True) -> int:
        """Create ``seq_id`` holding ``token_ids``; returns how many leading tokens' KV is already cached.

        The count is a multiple of ``block_size`` and at most ``len(token_ids) - 1`` (0 with
        ``use_prefix_cache=False``: every token is computed, its full blocks still published after).
        ``token_ids`` may be a prompt or, after a preemption, prompt + generated tokens.
        """
        if seq_id in self._seqs:
            raise DuplicateSequenceError(f"sequence {seq_id!r} is already allocated")
        tokens = _check_token_ids(token_ids, allow_empty=False)
        hits, hashes, needed = self._plan_allocation(tokens, use_prefix_cache)
        if needed > self._pool.num_free:
            raise NoFreeBlocksError(f"sequence {seq_id!r} needs {needed} free blocks, {self._pool.num_free} are free")
        # Revive hits before taking fresh blocks, so taking cannot evict a hit.
        for block in hits:
            self._pool.share(block)
        num_cached = len(hits) * self._block_size
        fresh = self._pool.take_fresh(self.blocks_for(len(tokens)) - len(hits))
        self._fill(fresh, len(tokens) - num_cached)
        self._seqs[seq_id] = _Sequence(hits + fresh, tokens, hashes, [b.cache_id for b in hits])
        self._finished.pop(seq_id, None)
        self._prefix_queries += len(tokens)
        self._prefix_hits += num_cached
        return num_cached

    def _fill(self, blocks: list[Block], num_tokens: int) -> None:
        """Record ``num_tokens`` tokens written in order into empty ``blocks``."""
        for block in blocks:
            block.num_tokens = min(self._block_size, num_tokens)
            num_tokens -= block.num_tokens
        self._pool.tokens_stored += sum(b.num_tokens for b in blocks)

    def append_tokens(self, seq_id: Hashable, token_ids: Sequence[int]) -> list[BlockCopy]:
        """Append generated ``token_ids`` to ``seq_id``, giving each a slot.

        Returns the copies (at most one) the worker must do before writing the new
        tokens' KV. Raises NoFreeBlocksError, changing nothing, if blocks run out.
        """
        seq = self._get(seq_id)
        tokens = _check_token_ids(token_ids, allow_empty=True)
        needed, cow = self._blocks_needed(seq, len(tokens))
        if needed > self._pool.num_free:
            raise NoFreeBlocksError(
                f"sequence {seq_id!r} needs {needed} free blocks to append, {self._pool.num_free} are free"
            )
        if not tokens:
            return []
        copies = []
        if cow:
            src = seq.blocks[-1]
            (dst,) = self._pool.take_fresh(1)
            self._fill([dst], src.num_tokens)
            self._pool.release(src)
            seq.blocks[-1] = dst
            copies.append(BlockCopy(src.block_id, dst.block_id))
            self._total_copied += 1
        remaining = len(tokens)
        last = seq.blocks[-1] if seq.blocks else None
        if last is not None and last.num_tokens < self._block_size:
            room = min(self._block_size - last.num_tokens, remaining)
            last.num_tokens += room
            self._pool.tokens_stored += room
            remaining -= room
        fresh = self._pool.take_fresh(self.blocks_for(remaining))
        self._fill(fresh, remaining)
        seq.blocks.extend(fresh)
        seq.token_ids.extend(tokens)
        return copies

    def truncate(self, seq_id: Hashable, num_tokens: int) -> None:
        """Keep only the first ``num_tokens`` tokens of ``seq_id`` (speculative decoding's rollback).

        Rejected draft tokens leave: blocks that held only them go back to the pool, and the
        KV they left in the kept last block is overwritten by the next tokens appended there.
        Blocks already registered in the prefix cache cannot be cut.
        """
        seq = self._get(seq_id)
        _check_count("num_tokens", num_tokens, 0)
        if num_tokens > len(seq.token_ids):
            raise ValueError(f"num_tokens={num_tokens} exceeds the {len(seq.token_ids)} tokens of {seq_id!r}")
        if num_tokens < len(seq.block_hashes) * self._block_size:
            raise ValueError(f"num_tokens={num_tokens} would cut blocks of {seq_id!r} published to the prefix cache")
        keep = self.blocks_for(num_tokens)
        for block in reversed(seq.blocks[keep:]):
            self._pool.release(block)
        del seq.blocks[keep:]
        del seq.token_ids[num_tokens:]
        if keep:
            last = seq.blocks[-1]
            filled = num_tokens - (keep - 1) * self._block_size
            self._pool.tokens_stored -= last.num_tokens - filled
            last.num_tokens = filled

    def mark_computed(self, seq_id: Hashable, num_computed_tokens: int) -> None:
        """KV of positions ``< num_computed_tokens`` is written: register full blocks up to there.

        Only full, computed blocks become prefix-cache entries, so no request can
        ever reuse a block whose KV has not been written yet.
        """
        seq = self._get(seq_id)
        _check_count("num_computed_tokens", num_computed_tokens, 0)
        if num_computed_tokens > len(seq.token_ids):
            raise ValueError(
                f"num_computed_tokens={num_computed_tokens} exceeds the "
                f"{len(seq.token_ids)} tokens of sequence {seq_id!r}"
            )
        if not self._enable_prefix_caching:
            return
        bs = self._block_size
        for i in range(len(seq.block_hashes), num_computed_tokens // bs):
            parent_hash = seq.block_hashes[-1] if i else None
            parent_id = seq.cache_ids[-1] if i else None
            chunk = tuple(seq.token_ids[i * bs : (i + 1) * bs])
            block_hash = self._hash_fn(parent_hash, chunk)
            block = seq.blocks[i]
            entry = self._pool.cached.get(block_hash)
            if entry is not None and entry.token_ids == chunk and entry.parent_cache_id == parent_id:
                cache_id = entry.cache_id  # this exact prefix is cached already (maybe by a sibling)
            elif block.is_cached:
                break  # the block already caches another record; keep it rather than churn
            else:
                cache_id = self._next_cache_id
                self._next_cache_id += 1
                self._pool.register(block, block_hash, chunk, cache_id, parent_id)
            seq.block_hashes.append(block_hash)
            seq.cache_ids.append(cache_id)

    def fork(self, parent_id: Hashable, child_id: Hashable) -> None:
        """Create ``child_id`` sharing every block and token of ``parent_id`` (for n > 1 sampling, beams)."""
        parent = self._get(parent_id)
        if child_id in self._seqs:
            raise DuplicateSequenceError(f"sequence {child_id!r} is already allocated")
        for block in parent.blocks:
            self._pool.share(block)
        self._seqs[child_id] = _Sequence(
            list(parent.blocks), list(parent.token_ids), list(parent.block_hashes), list(parent.cache_ids)
        )
        self._finished.pop(child_id, None)

    def free(self, seq_id: Hashable) -> None:
        """Release ``seq_id``'s blocks; blocks nobody holds return to the pool (cached ones stay reusable)."""
        seq = self._get(seq_id)
        del self._seqs[seq_id]
        # Last block first: among one sequence's cached blocks the deepest is evicted
        # first, because a prefix is only reusable while its earlier blocks remain.
        for block in reversed(seq.blocks):
            self._pool.release(block)
        self._finished[seq_id] = None
        if len(self._finished) > FINISHED_IDS_REMEMBERED:
            self._finished.popitem(last=False)

    # ---- queries -----------------------------------------------------------------

    def _get(self, seq_id: Hashable) -> _Sequence:
        seq = self._seqs.get(seq_id)
        if seq is not None:
            return seq
        if seq_id in self._finished:
            raise SequenceFinishedError(f"sequence {seq_id!r} was already freed")
        raise UnknownSequenceError(f"sequence {seq_id!r} is not held by this block manager")

    def has_sequence(self, seq_id: Hashable) -> bool:
        """Whether ``seq_id`` currently holds blocks here."""
        return seq_id in self._seqs

    def block_table(self, seq_id: Hashable) -> list[int]:
        """Physical block ids of ``seq_id`` in logical order (a copy)."""
        return [b.block_id for b in self._get(seq_id).blocks]

    def num_tokens(self, seq_id: Hashable) -> int:
        """Tokens ``seq_id`` holds (prompt + appended)."""
        return len(self._get(seq_id).token_ids)

    def token_ids(self, seq_id: Hashable) -> list[int]:
        """The tokens of ``seq_id`` (a copy)."""
        return list(self._get(seq_id).token_ids)

    def slot(self, seq_id: Hashable, position: int) -> int:
        """Cache slot of token ``position``: ``table[p // block_size] * block_size + p % block_size``."""
        seq = self._get(seq_id)
        _check_count("position", position, 0)
        if position >= len(seq.token_ids):
            raise ValueError(f"position={position} is past the {len(seq.token_ids)} tokens of {seq_id!r}")
        bs = self._block_size
        return seq.blocks[position // bs].block_id * bs + position % bs

    def slot_mapping(self, seq_id: Hashable, start: int, end: int) -> list[int]:
        """Cache slots of token positions ``[start, end)`` of ``seq_id``."""
        seq = self._get(seq_id)
        _check_count("start", start, 0)
        _check_count("end", end, start)
        if end > len(seq.token_ids):
            raise ValueError(f"end={end} is past the {len(seq.token_ids)} tokens of {seq_id!r}")
        bs = self._block_size
        return [seq.blocks[p // bs].block_id * bs + p % bs for p in range(start, end)]

    def ref_count(self, block_id: int) -> int:
        """How many block tables hold physical block ``block_id``."""
        _check_count("block_id", block_id, 0)
        if block_id >= self._num_blocks:
            raise ValueError(f"block_id={block_id} out of range [0, {self._num_blocks})")
        return self._pool.blocks[block_id].ref_count

    def free_block_ids(self) -> list[int]:
        """Free blocks in the order they would be handed out (plain ones, then cached ones LRU-first)."""
        return [b.block_id for b in self._pool.free_queue]

    def cached_block_ids(self) -> list[int]:
        """Blocks (free or in use) currently registered as prefix-cache entries."""
        return sorted(b.block_id for b in self._pool.cached.values())

    def stats(self) -> BlockStats:
        """Occupancy now and cumulative counters (O(1))."""
        pool = self._pool
        used = self._num_blocks - pool.num_free
        utilization = pool.tokens_stored / (used * self._block_size) if used else 1.0
        return BlockStats(
            num_blocks=self._num_blocks,
            block_size=self._block_size,
            free_blocks=pool.num_free,
            used_blocks=used,
            cached_blocks=pool.num_cached_free,
            tokens_stored=pool.tokens_stored,
            utilization=utilization,
            internal_fragmentation=1.0 - utilization,
            prefix_queries=self._prefix_queries,
            prefix_hits=self._prefix_hits,
            hit_rate=self._prefix_hits / self._prefix_queries if self._prefix_queries else 0.0,
            total_allocated=pool.total_allocated,
            total_freed=pool.total_freed,
            total_copied=self._total_copied,
            total_evicted=pool.total_evicted,
        )
