"""Ahead-of-time compilation of kernel configurations for NVIDIA targets, no GPU needed.

Each kernel module exposes ``aot_specs() -> list[AotSpec]``: every configuration its
Python wrapper can pick. ``compile_spec`` builds one for a target; the report
(``python -m minipaged_kernels.report``) and ``tests/kernels/test_aot_compile.py`` walk them all.

Compilation needs the kernels defined in compiled mode: a process that imported
``kernels`` with ``TRITON_INTERPRET=1`` holds interpreter functions that
``triton.compile`` cannot take (helpers they call included), so tests compile in a
child process started with ``compile_mode_env()``.
"""

from __future__ import annotations

import os
import re
import subprocess
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

# Shared memory an SM offers one block (opt-in maximum), bytes.
SHARED_MEMORY_LIMIT = {80: 163 * 1024, 86: 99 * 1024, 89: 99 * 1024, 90: 227 * 1024}
TARGETS = (80, 90)


@dataclass(frozen=True)
class AotSpec:
    """One compilable configuration of a Triton kernel.

    ``signature`` maps every parameter name to a Triton type string ("*fp16", "i32",
    "fp32", "constexpr"); ``constexprs`` gives the constexpr values. ``in_ci``: whether the
    test suite compiles it too (``python -m minipaged_kernels.report`` always does); False only for
    quantized-cache variants outside ``in_ci_subset``, which take twice as long to build.
    """

    kernel: str
    config: str
    fn: Any
    signature: dict[str, str]
    constexprs: dict[str, Any]
    num_warps: int = 4
    num_stages: int = 2
    extra: dict[str, Any] = field(default_factory=dict)
    in_ci: bool = True


def in_ci_subset(query_dtype: str, block_d: int) -> bool:
    """The quantized-cache attention builds the test suite compiles: fp16 / bf16 queries at
    head_dim tile 64 (SmolLM2's); the report compiles every other one (int8 and fp8 share
    all code but the load and the conversion, so these catch what breaks either)."""
    return query_dtype in ("fp16", "bf16") and block_d == 64


@dataclass(frozen=True)
class CompiledSpec:
    spec: AotSpec
    capability: int
    shared_bytes: int
    registers: int | None
    spills: int | None
    cubin: bytes


def compile_mode_env() -> dict[str, str]:
    """Environment for a child process that compiles kernels (interpreter off)."""
    env = dict(os.environ)
    env["TRITON_INTERPRET"] = "0"
    env.setdefault("TRITON_DEFAULT_FP_FUSION", "1")
    return env


def compile_spec(spec: AotSpec, capability: int) -> CompiledSpec:
    """Compile ``spec`` for ``sm_<capability>`` and read its resource usage."""
    if not hasattr(spec.fn, "cache_key"):
        raise RuntimeError(
            f"{spec.kernel} was defined under TRITON_INTERPRET=1 and cannot be compiled; "
            "run the compilation in a process started with minipaged_kernels._aot.compile_mode_env()"
        )
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    src = ASTSource(fn=spec.fn, signature=spec.signature, constexprs=spec.constexprs)
    compiled = triton.compile(
        src,
        target=GPUTarget("cuda", capability, 32),
        options={"num_warps": spec.num_warps, "num_stages": spec.num_stages},
    )
    cubin = compiled.asm["cubin"]
    registers, spills = resource_usage(cubin)
    return CompiledSpec(spec, capability, int(compiled.metadata.shared), registers, spills, cubin)


def _cuobjdump() -> str | None:
    try:
        import triton.backends.nvidia as nv

        bundled = Path(nv.__file__).parent / "bin" / "cuobjdump"
        if bundled.exists():
            return str(bundled)
    except ImportError:
        pass
    for d in os.environ.get("PATH", "").split(os.pathsep):
        p = Path(d) / "cuobjdump"
        if p.exists():
            return str(p)
    return None


def resource_usage(cubin: bytes) -> tuple[int | None, int | None]:
    """Registers per thread and spilled bytes (local memory) of a cubin, or ``(None, None)``
    when no ``cuobjdump`` is available."""
    tool = _cuobjdump()
    if tool is None:
        return None, None
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        try:
            text = subprocess.run(
                [tool, "--dump-resource-usage", f.name], capture_output=True, text=True, check=True, timeout=60
            ).stdout
        except (subprocess.SubprocessError, OSError):
            return None, None
    regs = re.search(r"REG:(\d+)", text)
    local = re.search(r"LOCAL:(\d+)", text)
    return (int(regs.group(1)) if regs else None, int(local.group(1)) if local else None)
