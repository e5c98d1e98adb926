"""Physical KV blocks, their reference counts, and the O(1) free queue.

A physical block is one ``[block_size, num_kv_heads, head_dim]`` slab of every
layer's KV cache; this module only does the bookkeeping (which block is free, who
holds it, what prefix it caches), never touches tensors.

The free queue is a doubly linked list threaded through the ``Block`` objects
themselves (the idea of vLLM v1's ``FreeKVCacheBlockQueue``), so that handing a
block out, returning it, and pulling a cached block out of the *middle* of the
queue when a later request hits it are all O(1). A deque would make that revive
O(n) (it has to search), which is what nano-vllm does.

Queue order is the eviction order. Blocks that cache nothing are kept at the
front, so they are reused first and a cached prefix is only evicted when no plain
free block is left; cached blocks join at the back when freed, so the front of
the cached part is the least recently used one.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field

BlockHash = bytes


@dataclass(eq=False, slots=True)
class Block:
    """One physical KV block: identity, sharing count and prefix-cache record.

    ``num_tokens`` counts filled slots. ``block_hash``/``token_ids``/``cache_id``/
    ``parent_cache_id`` are set only while the block is registered in the prefix
    cache (full and computed); ``cache_id`` names that registration uniquely so a
    child block can prove which exact parent its KV was computed after.
    """

    block_id: int
    ref_count: int = 0
    num_tokens: int = 0
    block_hash: BlockHash | None = None
    token_ids: tuple[int, ...] | None = None
    cache_id: int | None = None
    parent_cache_id: int | None = None
    # Free-queue links; None when the block is not in the queue (or at an end).
    prev: Block | None = field(default=None, repr=False)
    next: Block | None = field(default=None, repr=False)
    in_free_queue: bool = False

    @property
    def is_cached(self) -> bool:
        """True while this block is a registered prefix-cache entry."""
        return self.block_hash is not None

    def clear_cache_record(self) -> None:
        """Forget the prefix this block cached (it is about to hold new tokens)."""
        self.block_hash = None
        self.token_ids = None
        self.cache_id = None
        self.parent_cache_id = None


class FreeBlockQueue:
    """Doubly linked list of free blocks with O(1) push/pop at both ends and O(1) remove."""

    def __init__(self, blocks: list[Block]) -> None:
        self._head: Block | None = None
        self._tail: Block | None = None
        self._len = 0
        for block in blocks:
            self.append(block)

    def __len__(self) -> int:
        return self._len

    def __iter__(self) -> Iterator[Block]:
        node = self._head
        while node is not None:
            yield node
            node = node.next

    def append(self, block: Block) -> None:
        """Add ``block`` at the back (evicted last)."""
        assert not block.in_free_queue, f"block {block.block_id} is already free"
        block.prev, block.next = self._tail, None
        if self._tail is None:
            self._head = block
        else:
            self._tail.next = block
        self._tail = block
        block.in_free_queue = True
        self._len += 1

    def appendleft(self, block: Block) -> None:
        """Add ``block`` at the front (handed out first)."""
        assert not block.in_free_queue, f"block {block.block_id} is already free"
        block.prev, block.next = None, self._head
        if self._head is None:
            self._tail = block
        else:
            self._head.prev = block
        self._head = block
        block.in_free_queue = True
        self._len += 1

    def popleft(self) -> Block:
        """Remove and return the front block."""
        if self._head is None:
            raise IndexError("pop from an empty free block queue")
        block = self._head
        self.remove(block)
        return block

    def remove(self, block: Block) -> None:
        """Unlink ``block`` from wherever it sits in the queue."""
        assert block.in_free_queue, f"block {block.block_id} is not free"
        if block.prev is None:
            self._head = block.next
        else:
            block.prev.next = block.next
        if block.next is None:
            self._tail = block.prev
        else:
            block.next.prev = block.prev
        block.prev = block.next = None
        block.in_free_queue = False
        self._len -= 1


class BlockPool:
    """All physical blocks, the free queue, and the hash -> block prefix-cache index.

    Counters here are cumulative and only ever grow, so a caller can diff them.
    """

    def __init__(self, num_blocks: int, block_size: int) -> None:
        self.num_blocks = num_blocks
        self.block_size = block_size
        self.blocks = [Block(i) for i in range(num_blocks)]
        self.free_queue = FreeBlockQueue(self.blocks)
        self.cached: dict[BlockHash, Block] = {}
        self.num_cached_free = 0
        self.tokens_stored = 0
        self.total_allocated = 0
        self.total_freed = 0
        self.total_evicted = 0

    @property
    def num_free(self) -> int:
        """Blocks in the free queue (plain and cached)."""
        return len(self.free_queue)

    def take_fresh(self, n: int) -> list[Block]:
        """Pop ``n`` free blocks (evicting cached prefixes LRU-first); each comes back held once, empty."""
        assert n <= self.num_free, f"asked for {n} blocks, {self.num_free} free"
        out = []
        for _ in range(n):
            block = self.free_queue.popleft()
            if block.is_cached:
                self._evict(block)
            block.ref_count = 1
            block.num_tokens = 0
            out.append(block)
        self.total_allocated += n
        return out

    def share(self, block: Block) -> None:
        """Take one more reference to ``block``; a free cached block is revived in O(1)."""
        if block.ref_count == 0:
            self.free_queue.remove(block)
            if block.is_cached:
                self.num_cached_free -= 1
            self.tokens_stored += block.num_tokens
            self.total_allocated += 1
        block.ref_count += 1

    def release(self, block: Block) -> None:
        """Drop one reference; at zero the block goes back to the free queue."""
        assert block.ref_count > 0, f"block {block.block_id} released more often than held"
        block.ref_count -= 1
        if block.ref_count > 0:
            return
        self.tokens_stored -= block.num_tokens
        self.total_freed += 1
        if block.is_cached:
            self.free_queue.append(block)
            self.num_cached_free += 1
        else:
            block.num_tokens = 0
            self.free_queue.appendleft(block)

    def register(
        self,
        block: Block,
        block_hash: BlockHash,
        token_ids: tuple[int, ...],
        cache_id: int,
        parent_cache_id: int | None,
    ) -> None:
        """Make the (used, full) ``block`` the cache entry for ``block_hash``, replacing any older entry."""
        old = self.cached.get(block_hash)
        if old is not None:
            self._drop_entry(old)
        block.block_hash = block_hash
        block.token_ids = token_ids
        block.cache_id = cache_id
        block.parent_cache_id = parent_cache_id
        self.cached[block_hash] = block

    def _drop_entry(self, block: Block) -> None:
        """Remove ``block``'s cache record; a free block loses its reusable content."""
        del self.cached[block.block_hash]
        block.clear_cache_record()
        if block.in_free_queue:
            self.num_cached_free -= 1
            # A free block that caches nothing must sit with the plain blocks at the front.
            block.num_tokens = 0
            self.free_queue.remove(block)
            self.free_queue.appendleft(block)

    def _evict(self, block: Block) -> None:
        del self.cached[block.block_hash]
        block.clear_cache_record()
        self.num_cached_free -= 1
        self.total_evicted += 1
