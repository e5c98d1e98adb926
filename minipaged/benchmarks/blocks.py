"""Micro-benchmark of the block manager: operations per second on a large pool.

    python -m minipaged bench blocks [--num-blocks 100000] [--block-size 16]

Fills most of a ``num_blocks`` pool with sequences, decodes one token at a time
across all of them, frees them, then re-admits the same prompts as prefix-cache
hits and forks them with copy-on-write. Prints one line per operation, so a later
change to the block manager can be compared on the same machine. A benchmark, not
a test: nothing here asserts a speed.
"""

from __future__ import annotations

import argparse
import dataclasses
import random
import time
from collections.abc import Callable
from dataclasses import dataclass

from minipaged.benchmarks.common import add_out_argument, command_line, machine_info, plain_doc, write_json_atomic
from minipaged.core.block_manager import BlockManager

PROG = "minipaged bench blocks"


@dataclass(frozen=True)
class BenchConfig:
    """The block manager's pool (``num_blocks`` of ``block_size`` tokens) and the simulated workload:
    as many ``prompt_len``-token sequences as fill ``fill_fraction`` of the pool once each has
    decoded ``decode_steps`` more tokens, one at a time."""

    num_blocks: int = 100_000
    block_size: int = 16
    prompt_len: int = 500
    decode_steps: int = 64
    fill_fraction: float = 0.7
    seed: int = 0


@dataclass(frozen=True)
class OpTiming:
    """How long ``calls`` calls of one block-manager operation took, and how many blocks they moved."""

    name: str
    calls: int
    seconds: float
    blocks_moved: int  # change in the phase's block count (used, cached or copied blocks)

    @property
    def ops_per_s(self) -> float:
        """Calls per second (infinite for a phase too fast to time)."""
        return self.calls / self.seconds if self.seconds else float("inf")


def _timed(name: str, calls: int, blocks: Callable[[], int], fn: Callable[[], None]) -> OpTiming:
    before = blocks()
    t0 = time.perf_counter()
    fn()
    dt = time.perf_counter() - t0
    return OpTiming(name, calls, dt, abs(blocks() - before))


def run(cfg: BenchConfig) -> list[OpTiming]:
    """Run every phase on a fresh manager; returns one timing per operation kind."""
    rng = random.Random(cfg.seed)
    bm = BlockManager(cfg.num_blocks, cfg.block_size)
    blocks_per_seq = bm.blocks_for(cfg.prompt_len + cfg.decode_steps)
    num_seqs = int(cfg.num_blocks * cfg.fill_fraction) // blocks_per_seq
    prompts = [[rng.randrange(50_000) for _ in range(cfg.prompt_len)] for _ in range(num_seqs)]
    used = lambda: bm.stats().used_blocks  # noqa: E731
    seqs = range(num_seqs)
    out = []

    def allocate_all() -> None:
        for s in seqs:
            bm.allocate(s, prompts[s])

    def mark_all() -> None:
        for s in seqs:
            bm.mark_computed(s, cfg.prompt_len)

    def decode() -> None:
        for _ in range(cfg.decode_steps):
            for s in seqs:
                bm.append_tokens(s, (7,))

    def free_all() -> None:
        for s in seqs:
            bm.free(s)

    out.append(_timed("allocate (miss)", num_seqs, used, allocate_all))
    out.append(_timed("mark_computed", num_seqs, lambda: len(bm.cached_block_ids()), mark_all))
    out.append(_timed("append 1 token", num_seqs * cfg.decode_steps, used, decode))
    out.append(_timed("can_append (batch)", 1, used, lambda: bm.can_append(seqs)))
    out.append(_timed("free", num_seqs, used, free_all))
    out.append(_timed("allocate (prefix hit)", num_seqs, used, allocate_all))
    out.append(_timed("fork", num_seqs, used, lambda: [bm.fork(s, ("child", s)) for s in seqs]))
    out.append(
        _timed(
            "append with copy-on-write",
            num_seqs,
            lambda: bm.stats().total_copied,
            lambda: [bm.append_tokens(("child", s), (9,)) for s in seqs],
        )
    )
    return out


def build_parser() -> argparse.ArgumentParser:
    """The benchmark's options: the pool and workload sizes of ``BenchConfig``."""
    p = argparse.ArgumentParser(prog=PROG, description=plain_doc(__doc__).splitlines()[0])
    p.add_argument("--num-blocks", type=int, default=BenchConfig.num_blocks)
    p.add_argument("--block-size", type=int, default=BenchConfig.block_size)
    p.add_argument("--prompt-len", type=int, default=BenchConfig.prompt_len)
    p.add_argument("--decode-steps", type=int, default=BenchConfig.decode_steps)
    p.add_argument("--seed", type=int, default=BenchConfig.seed)
    add_out_argument(p)
    return p


def main(argv: list[str] | None = None) -> None:
    """Parse arguments, run, print ops/s per operation."""
    a = build_parser().parse_args(argv)
    cfg = BenchConfig(a.num_blocks, a.block_size, a.prompt_len, a.decode_steps, seed=a.seed)
    print(f"block manager benchmark: {cfg}")
    timings = run(cfg)
    print(f"{'operation':28s} {'calls':>9s} {'seconds':>9s} {'ops/s':>12s} {'blocks':>9s} {'blocks/s':>12s}")
    for t in timings:
        blocks_per_s = t.blocks_moved / t.seconds if t.seconds else float("inf")
        print(
            f"{t.name:28s} {t.calls:9d} {t.seconds:9.3f} {t.ops_per_s:12,.0f} {t.blocks_moved:9d} {blocks_per_s:12,.0f}"
        )
    if a.out:
        rows = [{**dataclasses.asdict(t), "ops_per_s": t.ops_per_s} for t in timings]
        result = {"command": command_line(PROG, argv), "machine": machine_info(), "config": dataclasses.asdict(cfg)}
        write_json_atomic(a.out, result | {"operations": rows})


if __name__ == "__main__":
    main()
