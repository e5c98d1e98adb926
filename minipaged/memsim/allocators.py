"""KV memory strategies the simulator replays a trace against.

All strategies manage the same budget of ``budget`` KV *slots* (one slot holds one
token's keys and values for every layer). At any moment each slot is in exactly one of
these states (see :class:`MemoryBreakdown`):

* token states  -- holds the KV of a token that has been computed;
* reservation   -- reserved for a token the request *will* produce (contiguous only);
* internal      -- reserved but never going to be used: beyond the request's true final
                   length (contiguous), or the empty tail of a sequence's last block (paged);
* external      -- free, while the next waiting request needs no more slots than are free
                   in total, but no single free hole is large enough for it (first-fit).
                   Compaction would have admitted it; this is memory lost to the holes.
                   Zero by construction for paged: any free block serves any request;
* free          -- any other free slot: nobody is waiting, or the head of the queue needs
                   more slots than are free in total (no allocator could place it).

Contiguous strategies (the paper's Orca baselines) place each request's reservation in
one range of a :class:`FirstFitAllocator`; the paged strategy drives minipaged's real
:class:`~minipaged.core.block_manager.BlockManager`.
"""

from __future__ import annotations

import bisect
import math
from collections.abc import Callable, Hashable
from dataclasses import dataclass

from minipaged.memsim.traces import MAX_LEN, Request


class AllocatorError(Exception):
    """Misuse of the first-fit allocator (unknown handle, double free)."""


@dataclass(frozen=True)
class Hole:
    """A free range ``[start, start + size)`` of the address space."""

    start: int
    size: int


class FirstFitAllocator:
    """First-fit over one contiguous address space of ``capacity`` slots.

    The free list is kept sorted by start address and adjacent holes are merged on
    free, so fragmentation comes only from the allocation pattern, never from
    bookkeeping.
    """

    def __init__(self, capacity: int) -> None:
        if capacity < 1:
            raise ValueError(f"capacity must be >= 1 slot, got {capacity}")
        self.capacity = capacity
        self._starts: list[int] = [0]
        self._sizes: list[int] = [capacity]
        self._live: dict[Hashable, tuple[int, int]] = {}

    def allocate(self, handle: Hashable, size: int) -> int | None:
        """Reserve ``size`` slots at the lowest address that fits; ``None`` if no hole fits."""
        if size < 1:
            raise ValueError(f"size must be >= 1 slot, got {size}")
        if handle in self._live:
            raise AllocatorError(f"handle {handle!r} already holds a range")
        for i, hole_size in enumerate(self._sizes):
            if hole_size >= size:
                start = self._starts[i]
                if hole_size == size:
                    del self._starts[i], self._sizes[i]
                else:
                    self._starts[i] += size
                    self._sizes[i] -= size
                self._live[handle] = (start, size)
                return start
        return None

    def free(self, handle: Hashable) -> None:
        """Return ``handle``'s range to the free list, merging it with adjacent holes."""
        try:
            start, size = self._live.pop(handle)
        except KeyError:
            raise AllocatorError(f"handle {handle!r} holds no range (double free?)") from None
        i = bisect.bisect_left(self._starts, start)
        merge_prev = i > 0 and self._starts[i - 1] + self._sizes[i - 1] == start
        merge_next = i < len(self._starts) and start + size == self._starts[i]
        if merge_prev and merge_next:
            self._sizes[i - 1] += size + self._sizes[i]
            del self._starts[i], self._sizes[i]
        elif merge_prev:
            self._sizes[i - 1] += size
        elif merge_next:
            self._starts[i] = start
            self._sizes[i] += size
        else:
            self._starts.insert(i, start)
            self._sizes.insert(i, size)

    def holes(self) -> list[Hole]:
        """Free ranges in address order."""
        return [Hole(s, n) for s, n in zip(self._starts, self._sizes)]

    @property
    def free_slots(self) -> int:
        return sum(self._sizes)

    @property
    def largest_hole(self) -> int:
        return max(self._sizes, default=0)


@dataclass(frozen=True)
class MemoryBreakdown:
    """Where the KV budget's slots are at one instant; the five fields sum to the budget."""

    token_states: int
    reservation: int
    internal: int
    external: int
    free: int

    @property
    def total(self) -> int:
        return self.token_states + self.reservation + self.internal + self.external + self.free

    @property
    def allocated(self) -> int:
        """Slots handed to requests (tokens + reservation + internal)."""
        return self.token_states + self.reservation + self.internal


ReservePolicy = Callable[[Request], int]


def reserve_max(max_len: int = MAX_LEN) -> ReservePolicy:
    """Orca-Max: every request reserves the model's maximum sequence length."""
    return lambda req: max_len


def reserve_pow2(max_len: int = MAX_LEN) -> ReservePolicy:
    """Orca-Pow2: the prompt plus the true output rounded up to a power of two (< 2x), capped at max_len."""
    return lambda req: min(max_len, req.input_len + (1 << math.ceil(math.log2(req.output_len))))


def reserve_oracle() -> ReservePolicy:
    """Orca-Oracle: exactly the true final length (prompt + output); knows the future."""
    return lambda req: req.total_len


@dataclass
class _Held:
    request: Request
    tokens: int
    reserved: int


class ContiguousStrategy:
    """Each request reserves one contiguous range up front, sized by ``policy``.

    The range never grows, so a running request never has to be preempted; the cost is
    reservation and internal fragmentation, and external fragmentation from the holes
    that first-fit leaves between ranges of different sizes.
    """

    preempts = False

    def __init__(self, name: str, budget: int, policy: ReservePolicy) -> None:
        self.name = name
        self.budget = budget
        self.policy = policy
        self.allocator = FirstFitAllocator(budget)
        self._held: dict[Hashable, _Held] = {}

    def need(self, req: Request, num_tokens: int) -> int:
        """Slots the request needs to be admitted."""
        return max(self.policy(req), num_tokens)

    def fits_ever(self, req: Request) -> bool:
        """Could the request run in an otherwise empty memory?"""
        return self.need(req, req.total_len) <= self.budget

    def try_admit(self, seq_id: Hashable, req: Request, num_tokens: int) -> bool:
        """Reserve the request's range and store its first ``num_tokens`` tokens; False if no hole fits."""
        size = self.need(req, req.total_len)
        if self.allocator.allocate(seq_id, size) is None:
            return False
        self._held[seq_id] = _Held(req, num_tokens, size)
        return True

    def append(self, seq_id: Hashable) -> bool:
        """One more token; always fits in the reservation."""
        self._held[seq_id].tokens += 1
        return True

    def release(self, seq_id: Hashable) -> None:
        self.allocator.free(seq_id)
        del self._held[seq_id]

    def snapshot(self, head: tuple[Request, int] | None) -> MemoryBreakdown:
        """Classify every slot; ``head`` is the first waiting (request, tokens) or None."""
        tokens = sum(h.tokens for h in self._held.values())
        future = sum(h.request.total_len - h.tokens for h in self._held.values())
        beyond = sum(h.reserved - h.request.total_len for h in self._held.values())
        free = self.allocator.free_slots
        external = 0
        if head is not None:
            need = self.need(*head)
            if need <= free and need > self.allocator.largest_hole:
                external = free
        return MemoryBreakdown(tokens, future, beyond, external, free - external)


def orca_max(budget: int, max_len: int = MAX_LEN) -> ContiguousStrategy:
    return ContiguousStrategy("Orca-Max", budget, reserve_max(max_len))


def orca_pow2(budget: int, max_len: int = MAX_LEN) -> ContiguousStrategy:
    return ContiguousStrategy("Orca-Pow2", budget, reserve_pow2(max_len))


def orca_oracle(budget: int) -> ContiguousStrategy:
    return ContiguousStrategy("Orca-Oracle", budget, reserve_oracle())


class PagedStrategy:
    """minipaged's own BlockManager over ``budget // block_size`` blocks.

    Blocks are taken one at a time as tokens arrive, so nothing is reserved ahead and
    the only waste is the empty tail of each sequence's last block. Prefix caching is
    off: synthetic traces have no shared text, and a cache would only blur the numbers.
    A running sequence can find no free block for its next token; the simulator then
    preempts (frees and later recomputes) the most recently admitted one, as vLLM does.
    """

    preempts = True

    def __init__(self, budget: int, block_size: int, *, watermark_blocks: int = 0) -> None:
        from minipaged.core.block_manager import BlockManager  # the real one, never a copy

        if block_size < 1:
            raise ValueError(f"block_size must be >= 1, got {block_size}")
        if budget % block_size:
            raise ValueError(f"budget ({budget} slots) must be a multiple of block_size ({block_size})")
        self.name = f"paged (block {block_size})"
        self.budget = budget
        self.block_size = block_size
        self.watermark_blocks = watermark_blocks
        self.manager = BlockManager(
            budget // block_size, block_size, enable_prefix_caching=False, watermark_blocks=watermark_blocks
        )

    def need(self, req: Request, num_tokens: int) -> int:
        return self.manager.blocks_for(num_tokens) * self.block_size

    def fits_ever(self, req: Request) -> bool:
        # Admission keeps the watermark free, and a preempted request is readmitted with
        # up to total_len - 1 tokens: only this bound guarantees it can always come back.
        return self.manager.blocks_for(req.total_len) + self.watermark_blocks <= self.manager.num_blocks

    def try_admit(self, seq_id: Hashable, req: Request, num_tokens: int) -> bool:
        tokens = [0] * num_tokens  # contents are irrelevant with prefix caching off
        if not self.manager.can_allocate(tokens):
            return False
        self.manager.allocate(seq_id, tokens)
        return True

    def append(self, seq_id: Hashable) -> bool:
        from minipaged.core.block_manager import NoFreeBlocksError

        try:
            self.manager.append_tokens(seq_id, [0])
        except NoFreeBlocksError:
            return False
        return True

    def release(self, seq_id: Hashable) -> None:
        self.manager.free(seq_id)

    def snapshot(self, head: tuple[Request, int] | None) -> MemoryBreakdown:
        stats = self.manager.stats()
        used = stats.used_blocks * self.block_size
        return MemoryBreakdown(
            token_states=stats.tokens_stored,
            reservation=0,
            internal=used - stats.tokens_stored,
            external=0,
            free=self.budget - used,
        )


Strategy = ContiguousStrategy | PagedStrategy
