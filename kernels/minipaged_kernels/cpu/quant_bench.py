"""CPU timings of the weight-only quantized few-row linear against dense ones.

    python -m minipaged_kernels.cpu.quant_bench [--rows 1 4 16] [--repeats 200] [--threads N]

For each SmolLM2-135M linear shape (``K x N``: 576 x 1536 up-projection, 1536 x 576
down-projection, 576 x 576 attention projection) and row count, the median time of:
dense fp32 ``F.linear``, the numba dense few-row loop (``cpu.gemv``, up to its ``MAX_ROWS``),
bf16 ``F.linear``, and ``cpu.quant_gemv.matmul`` on W8 and W4 packed weights (groups of
128), ``dequantize_into`` followed by an fp32 GEMM (the many-row path), and ``cpu.int4_aten``
on bf16 rows (PyTorch's int4 kernel, a 16-bit model's path). Each method cycles
through copies of its weight filling ``--working-set-mb`` of fp32, so weights come from memory
as a model's layers do (a single small weight would sit in cache and hide what packing saves).
Prints a table with each time's speed-up over dense fp32; measure on an otherwise idle machine.
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from minipaged_kernels.quant_formats import PackedWeight, pack_int32

# SmolLM2-135M's linear shapes, (in_features K, out_features N).
SHAPES = ((576, 1536), (1536, 576), (576, 576))
ROWS = (1, 4, 16)
GROUP_SIZE = 128


@dataclass(frozen=True)
class Timing:
    """Median seconds per call of one method at one shape and row count."""

    method: str
    in_features: int
    out_features: int
    rows: int
    seconds: float


def random_packed(k: int, n: int, bits: int, group_size: int = GROUP_SIZE, seed: int = 0) -> PackedWeight:
    """A random asymmetric packed weight ``[K, N]`` (timings do not depend on the values)."""
    gen = torch.Generator().manual_seed(seed)
    q = torch.randint(0, 1 << bits, (k, n), generator=gen, dtype=torch.int32)
    groups = -(-k // group_size)  # SmolLM2's K = 576 ends in a half group of 128
    zeros = torch.randint(1, 1 << bits, (groups, n), generator=gen, dtype=torch.int32)  # 0: no GPTQ v1 encoding
    scales = (torch.rand(groups, n, generator=gen) * 0.02).to(torch.bfloat16)
    return PackedWeight(pack_int32(q, bits), scales, zeros, None, bits, group_size, k, n)


def median_seconds(fn: Callable[[], object], repeats: int) -> float:
    """Median wall time of ``fn`` over ``repeats`` calls, after a few warm-up calls (JIT, caches)."""
    for _ in range(5):
        fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def _cycle(items: list) -> Callable[[], object]:
    """A function that returns the next of ``items`` on each call, round and round."""
    state = {"i": 0}

    def next_item():
        state["i"] = (state["i"] + 1) % len(items)
        return items[state["i"]]

    return next_item


def _prepared_call(fn, x, weight_and_arrays, out):
    """``fn`` (``quant_gemv.matmul`` with rows ``x``, or ``dequantize_into`` for ``x=None``) on a
    ``(PackedWeight, PreparedWeight)`` pair, writing into ``out``."""
    pw, prepared = weight_and_arrays
    if x is None:
        return fn(pw, out, prepared=prepared)
    return fn(x, pw, out=out, prepared=prepared)


def _methods(k: int, n: int, rows: int, copies: int) -> dict[str, Callable[[], object]]:
    """The timed calls for one shape and row count, each cycling through ``copies`` weights (so that
    with enough copies every call reads its weight from memory, as a model's layers do, not from cache);
    methods that do not apply are left out."""
    from minipaged_kernels.cpu import gemv, int4_aten, quant_gemv

    gen = torch.Generator().manual_seed(1)
    x = torch.randn(rows, k, generator=gen)
    x_bf16 = x.bfloat16()
    dense = [torch.randn(n, k, generator=gen) / k**0.5 for _ in range(copies)]
    fp32, bf16 = _cycle(dense), _cycle([w.bfloat16() for w in dense])
    del dense
    methods = {
        "fp32 F.linear": lambda: F.linear(x, fp32()),
        "bf16 F.linear": lambda: F.linear(x_bf16, bf16()),
    }
    if gemv.available() and rows <= gemv.MAX_ROWS:
        methods["fp32 cpu.gemv"] = lambda: gemv.linear_unchecked(x, fp32())
    if quant_gemv.available():
        out = torch.empty(rows, n)
        for bits in (8, 4):
            # each weight with its prepared arrays, as a model's QuantLinear keeps them
            weights = [random_packed(k, n, bits, seed=c) for c in range(copies)]
            packed = _cycle([(pw, quant_gemv.prepare(pw)) for pw in weights])
            name = f"W{bits} g{GROUP_SIZE} quant_gemv"
            methods[name] = lambda p=packed: _prepared_call(quant_gemv.matmul, x, p(), out)
        buffer = torch.empty(k, n)
        methods[f"W4 g{GROUP_SIZE} dequantize_into+mm"] = lambda p=packed: torch.mm(
            x, _prepared_call(quant_gemv.dequantize_into, None, p(), buffer)
        )
    if int4_aten.available():  # bf16 rows: ATen's int4 kernel, as a 16-bit model's QuantLinear runs it
        weights = [int4_aten.pack(random_packed(k, n, 4, seed=c), torch.bfloat16) for c in range(copies)]
        aten = _cycle(weights)
        methods[f"W4 g{GROUP_SIZE} int4_aten (bf16)"] = lambda: int4_aten.matmul(x_bf16, aten())
    return methods


def run(rows: tuple[int, ...] = ROWS, shapes=SHAPES, repeats: int = 200, working_set_mb: float = 0.0) -> list[Timing]:
    """Time every method at every shape and row count; returns the timings. ``working_set_mb``: cycle
    through enough fp32 weight copies to fill that many MB (0: one copy, which stays in cache)."""
    timings = []
    with torch.inference_mode():
        for k, n in shapes:
            for m in rows:
                copies = max(1, round(working_set_mb * 1e6 / (4 * k * n)))
                for name, fn in _methods(k, n, m, copies).items():
                    timings.append(Timing(name, k, n, m, median_seconds(fn, repeats)))
    return timings


def format_table(timings: list[Timing]) -> str:
    """One line per (shape, rows, method): microseconds and speed-up over fp32 ``F.linear``."""
    base = {(t.in_features, t.out_features, t.rows): t.seconds for t in timings if t.method == "fp32 F.linear"}
    lines = [f"{'K x N':>11} {'rows':>4}  {'method':<30} {'us':>9} {'vs fp32':>8}"]
    for t in timings:
        ref = base[(t.in_features, t.out_features, t.rows)]
        shape = f"{t.in_features}x{t.out_features}"
        lines.append(f"{shape:>11} {t.rows:>4}  {t.method:<30} {t.seconds * 1e6:>9.1f} {ref / t.seconds:>7.2f}x")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, nargs="+", default=list(ROWS))
    parser.add_argument("--repeats", type=int, default=200)
    parser.add_argument(
        "--working-set-mb",
        type=float,
        default=256.0,
        help="cycle through fp32 weight copies of this many MB, past the last-level cache, as a model's layers "
        "are (0: one copy, cache-resident)",
    )
    parser.add_argument("--threads", type=int, default=None, help="torch (and numba) threads; default: torch's")
    args = parser.parse_args(argv)
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    print(f"threads: {torch.get_num_threads()}")
    print(format_table(run(tuple(args.rows), SHAPES, args.repeats, args.working_set_mb)))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
