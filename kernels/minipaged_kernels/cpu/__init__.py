"""CPU twins of the Triton kernels, JIT-compiled by numba (an optional dependency), and ``int4_aten``,
which hands 4-bit weights to PyTorch's own int4 CPU kernel.

Import them through :func:`load`: it imports a kernel module on first use and answers
``None`` when it cannot run here (numba missing, or an op this PyTorch lacks), so callers keep
their pure-PyTorch path as the fallback.
Importing this package loads nothing: vLLM's CPU build, which the peer benchmark imports
beside the engine, must not find numba already loaded.
"""

from __future__ import annotations

import functools
import importlib
from types import ModuleType

KERNELS = ("decode_attention", "fused_ops", "gemv", "int4_aten", "quant_gemv")


@functools.cache
def load(name: str) -> ModuleType | None:
    """``minipaged_kernels.cpu.<name>`` when it can run here (numba imports), else ``None``."""
    if name not in KERNELS:
        raise ValueError(f"unknown CPU kernel {name!r}; expected one of {KERNELS}")
    try:
        module = importlib.import_module(f"{__name__}.{name}")
    except ImportError:
        return None
    return module if module.available() else None
