"""Prefix caching: chained hashes of full blocks, and the guarded lookup.

A full block is keyed by ``hash(parent block's hash, this block's token ids)``, so a
key names the whole prefix up to and including the block, not just its own tokens:
the KV of a token depends on every token before it.

The hash is BLAKE2b with a 16-byte digest over the parent digest and the token
ids packed as little-endian int64. Why not Python's ``hash`` of a tuple: it is
64 bits with easy structured collisions (``hash(-1) == hash(-2)``), and it is only
stable across processes for ints (strings are salted per process), so cache keys
could not be logged, compared between runs, or shared between workers. BLAKE2b is
in the standard library, stable everywhere, and fast enough (one call per full
block, when it is computed).

No hash is trusted on its own. A lookup accepts a cached block only if its stored
token ids equal the prompt's and it was registered directly after the very cache
entry matched for the previous block (``parent_cache_id``). That makes a hit exact
even with a deliberately weak hash: the tests plug in a 2-bit one.
"""

from __future__ import annotations

import hashlib
import struct
from collections.abc import Callable, Sequence

from minipaged.core.block_pool import Block, BlockHash, BlockPool

HashFn = Callable[[BlockHash | None, Sequence[int]], BlockHash]


def hash_block_tokens(parent_hash: BlockHash | None, token_ids: Sequence[int]) -> BlockHash:
    """Chained 128-bit key of one full block: BLAKE2b(parent digest, int64 token ids)."""
    h = hashlib.blake2b(digest_size=16)
    h.update(parent_hash if parent_hash is not None else b"\x00" * 16)
    h.update(struct.pack(f"<{len(token_ids)}q", *token_ids))
    return h.digest()


def find_cached_prefix(
    pool: BlockPool, token_ids: Sequence[int], max_blocks: int, hash_fn: HashFn
) -> tuple[list[Block], list[BlockHash]]:
    """Longest run of cached blocks holding ``token_ids[: k * block_size]``, ``k <= max_blocks``.

    Returns the matched blocks and their chained hashes (same length). Pure: it
    changes nothing, so callers can ask before they decide.
    """
    bs = pool.block_size
    blocks: list[Block] = []
    hashes: list[BlockHash] = []
    parent_hash: BlockHash | None = None
    parent_cache_id: int | None = None
    for i in range(max_blocks):
        chunk = tuple(token_ids[i * bs : (i + 1) * bs])
        block_hash = hash_fn(parent_hash, chunk)
        block = pool.cached.get(block_hash)
        if block is None or block.token_ids != chunk or block.parent_cache_id != parent_cache_id:
            break
        blocks.append(block)
        hashes.append(block_hash)
        parent_hash, parent_cache_id = block_hash, block.cache_id
    return blocks, hashes
