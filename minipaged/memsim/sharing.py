"""KV memory saved by block sharing: parallel sampling and beam search on the real BlockManager.

Each request of a trace is replayed on its own, token by token, through
:class:`~minipaged.core.block_manager.BlockManager` with ``fork`` / ``append_tokens`` /
``free``, so copy-on-write and reference counting are the block manager's own. At every
step we record the blocks in use (``BlockStats.used_blocks``) and, for comparison, the
blocks the same sequences would hold without sharing (each one its own copy:
``sum(ceil(len_i / block_size))``). The saving is

    1 - sum over steps of shared blocks / sum over steps of unshared blocks,

pooled over all requests, i.e. the time-averaged memory saved while they run.

* Parallel sampling (``n`` samples of one prompt): the prompt's blocks are shared by all
  samples; each sample draws its own output length (the request's own for the first,
  lengths of other requests of the trace for the rest) and is freed when it ends.
* Beam search (width ``k``): all ``k`` beams have the request's output length. At every
  step each beam is pruned with probability ``prune_prob``; every pruned beam is replaced
  by a fork of a surviving beam chosen uniformly at random (seeded), so surviving parents
  with several children share their whole history. This models the parent choice of
  beam search without a model; the real feature lives in the engine.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

from minipaged.memsim.traces import Trace

if TYPE_CHECKING:
    from minipaged.core.block_manager import BlockManager


@dataclass(frozen=True)
class SharingResult:
    """Block-steps with and without sharing over a whole trace."""

    mode: str  # "parallel" or "beam"
    width: int
    block_size: int
    trace: str
    shared_block_steps: int
    unshared_block_steps: int
    copies: int  # copy-on-write block copies the block manager asked for

    @property
    def saving(self) -> float:
        """Fraction of KV memory saved by sharing, time-averaged (0 = none, 1 = all)."""
        return 1.0 - self.shared_block_steps / self.unshared_block_steps


def _manager(num_blocks: int, block_size: int) -> BlockManager:
    from minipaged.core.block_manager import BlockManager  # the real one, never a copy

    return BlockManager(num_blocks, block_size, enable_prefix_caching=False)


def _check(width: int, block_size: int, name: str) -> None:
    if width < 1:
        raise ValueError(f"{name} must be >= 1, got {width}")
    if block_size < 1:
        raise ValueError(f"block_size must be >= 1, got {block_size}")


def parallel_sampling_savings(trace: Trace, n: int, *, block_size: int = 16, seed: int = 0) -> SharingResult:
    """Memory saved when ``n`` samples of each prompt share the prompt's blocks."""
    _check(n, block_size, "n")
    rng = np.random.default_rng(seed)
    pool = trace.output_lens()
    shared = unshared = copies = 0
    for req in trace.requests:
        outs = [req.output_len, *rng.choice(pool, size=n - 1).tolist()]
        bm = _manager(n * (-(-(req.input_len + max(outs)) // block_size) + 1), block_size)
        bm.allocate(0, [0] * req.input_len)
        for i in range(1, n):
            bm.fork(0, i)
        lens = [req.input_len] * n
        alive = set(range(n))
        while alive:
            for i in sorted(alive):
                copies += len(bm.append_tokens(i, [i]))
                lens[i] += 1
            shared += bm.stats().used_blocks
            unshared += sum(bm.blocks_for(lens[i]) for i in alive)
            for i in [i for i in alive if lens[i] >= req.input_len + outs[i]]:
                bm.free(i)
                alive.discard(i)
    return SharingResult("parallel", n, block_size, trace.name, shared, unshared, copies)


def beam_search_savings(
    trace: Trace, width: int, *, block_size: int = 16, prune_prob: float = 0.3, seed: int = 0
) -> SharingResult:
    """Memory saved when ``width`` beams share their common history through forked blocks."""
    _check(width, block_size, "width")
    if not 0.0 <= prune_prob <= 1.0:
        raise ValueError(f"prune_prob must be in [0, 1], got {prune_prob}")
    rng = np.random.default_rng(seed)
    shared = unshared = copies = 0
    for req in trace.requests:
        # room for every beam to hold its own copy plus one copy-on-write block: never the limit
        bm = _manager(width * (-(-req.total_len // block_size) + 1), block_size)
        bm.allocate(0, [0] * req.input_len)
        beams = [0]
        next_id = 1
        for _ in range(1, width):
            bm.fork(0, next_id)
            beams.append(next_id)
            next_id += 1
        for step in range(req.output_len):
            beams, next_id = _prune_and_fork(bm, beams, next_id, prune_prob, rng)
            for b in beams:
                copies += len(bm.append_tokens(b, [step]))
            shared += bm.stats().used_blocks
            unshared += width * bm.blocks_for(req.input_len + step + 1)
        for b in beams:
            bm.free(b)
    return SharingResult("beam", width, block_size, trace.name, shared, unshared, copies)


def _prune_and_fork(
    bm: BlockManager, beams: list[int], next_id: int, prune_prob: float, rng: np.random.Generator
) -> tuple[list[int], int]:
    """Prune each beam with ``prune_prob``; refill from forks of random survivors. Returns (beams, next_id)."""
    pruned = rng.random(len(beams)) < prune_prob
    if pruned.all():
        pruned[rng.integers(len(beams))] = False  # beam search always keeps its best candidate
    survivors = [b for b, p in zip(beams, pruned) if not p]
    parents = rng.choice(survivors, size=int(pruned.sum())).tolist()
    children = []
    for parent in parents:  # fork before freeing, so the history stays referenced
        bm.fork(parent, next_id)
        children.append(next_id)
        next_id += 1
    for b, p in zip(beams, pruned):
        if p:
            bm.free(b)
    return survivors + children, next_id
