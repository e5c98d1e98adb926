"""Compile every kernel configuration for sm_80 and sm_90 and print its resource use.

    python -m minipaged_kernels.report              # tables on stdout
    python -m minipaged_kernels.report --json F     # also write the rows to F
    python -m minipaged_kernels.report --ci         # only the specs the test suite compiles (AotSpec.in_ci)

Configurations come from each kernel module's ``aot_specs()``; the bytes-moved column
is the module's ``bytes_moved(REFERENCE_SHAPE)``, the floor a call of that shape must
move. Registers and spills come from ``cuobjdump --dump-resource-usage`` (the copy
bundled with Triton), ``unknown`` when it is missing. No GPU is needed.

Compilation needs kernels defined in compiled mode, so when this process has the
interpreter on (``kernels`` turns it on without CUDA) it re-runs itself in a child
process with ``TRITON_INTERPRET=0``.
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib
import json
import os
import subprocess
import sys
import time
from dataclasses import dataclass

from minipaged_kernels._aot import SHARED_MEMORY_LIMIT, TARGETS, AotSpec, compile_mode_env, compile_spec

KERNEL_MODULES = (
    "minipaged_kernels.kv_append",
    "minipaged_kernels.decode_attention",
    "minipaged_kernels.prefill_attention",
    "minipaged_kernels.quant_linear",
    "minipaged_kernels.token_bitmask",
    "minipaged_kernels.rejection_sampler",
)


@dataclass(frozen=True)
class Row:
    kernel: str
    config: str
    target: int
    shared_bytes: int | None
    shared_limit: int
    registers: int | None
    spills: int | None
    bytes_moved: int | None
    compile_s: float
    error: str | None


def discover(ci: bool = False) -> list[tuple[object, AotSpec]]:
    """``(module, spec)`` for every configuration of every kernel module (``ci``: those with ``in_ci``)."""
    found = []
    for name in KERNEL_MODULES:
        module = importlib.import_module(name)
        found.extend((module, spec) for spec in module.aot_specs() if spec.in_ci or not ci)
    return found


def _bytes_moved(module: object) -> int | None:
    shape = getattr(module, "REFERENCE_SHAPE", None)
    fn = getattr(module, "bytes_moved", None)
    return fn(shape) if shape is not None and fn is not None else None


def compile_all(targets: tuple[int, ...] = TARGETS, ci: bool = False) -> list[Row]:
    """Compile every discovered spec for every target; a failure becomes a row with ``error``."""
    rows = []
    for module, spec in discover(ci):
        moved = _bytes_moved(module)
        for target in targets:
            start = time.perf_counter()
            try:
                c = compile_spec(spec, target)
                shared, regs, spills, error = c.shared_bytes, c.registers, c.spills, None
            except Exception as exc:  # noqa: BLE001 - a failed config is reported, not fatal
                shared, regs, spills, error = None, None, None, f"{type(exc).__name__}: {exc}"[:300]
            rows.append(
                Row(
                    spec.kernel,
                    spec.config,
                    target,
                    shared,
                    SHARED_MEMORY_LIMIT[target],
                    regs,
                    spills,
                    moved,
                    time.perf_counter() - start,
                    error,
                )
            )
    return rows


def _fmt(value: int | None) -> str:
    return "unknown" if value is None else str(value)


def format_rows(rows: list[Row]) -> str:
    """One table per kernel: config x target with shared memory, registers, spills, bytes moved."""
    lines = []
    for kernel in dict.fromkeys(r.kernel for r in rows):
        lines.append(f"\n== {kernel}")
        lines.append(
            f"{'config':<28} {'target':>6} {'shared B':>9} {'limit B':>8} {'regs':>7} "
            f"{'spill B':>7} {'moved/call':>12} {'compile':>8}"
        )
        for r in (r for r in rows if r.kernel == kernel):
            if r.error is not None:
                lines.append(f"{r.config:<28} {'sm_' + str(r.target):>6}  FAILED: {r.error}")
                continue
            over = "  OVER LIMIT" if r.shared_bytes > r.shared_limit else ""
            moved = "unknown" if r.bytes_moved is None else f"{r.bytes_moved / 1e6:.1f} MB"
            lines.append(
                f"{r.config:<28} {'sm_' + str(r.target):>6} {r.shared_bytes:>9} {r.shared_limit:>8} "
                f"{_fmt(r.registers):>7} {_fmt(r.spills):>7} {moved:>12} {r.compile_s:>7.2f}s{over}"
            )
    return "\n".join(lines)


def _reference_shapes() -> str:
    lines = ["bytes moved per call, for each kernel's REFERENCE_SHAPE:"]
    for name in KERNEL_MODULES:
        module = importlib.import_module(name)
        shape = getattr(module, "REFERENCE_SHAPE", None)
        lines.append(f"  {name}: {shape if shape is not None else 'no reference shape'}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", help="also write the rows as JSON to this path")
    parser.add_argument("--ci", action="store_true", help="only the configurations the test suite compiles")
    args = parser.parse_args(argv)
    if os.environ.get("TRITON_INTERPRET") == "1":
        child = [sys.executable, "-m", "minipaged_kernels.report", *(sys.argv[1:] if argv is None else argv)]
        return subprocess.run(child, env=compile_mode_env()).returncode
    start = time.perf_counter()
    rows = compile_all(ci=args.ci)
    print(_reference_shapes())
    print(format_rows(rows))
    failed = [r for r in rows if r.error is not None or r.shared_bytes > r.shared_limit]
    print(f"\n{len(rows)} compilations in {time.perf_counter() - start:.1f}s, {len(failed)} failed or over limit")
    if args.json:
        with open(args.json, "w") as f:
            json.dump([dataclasses.asdict(r) for r in rows], f, indent=1)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
