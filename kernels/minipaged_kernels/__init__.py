"""Triton kernels for a paged KV cache, each with a naive reference in ``minipaged_kernels.reference``.

Cache layout everywhere: ``k_cache``, ``v_cache`` of shape
``[num_blocks, block_size, num_kv_heads, head_dim]``; a slot is
``block_id * block_size + offset``.

Without a CUDA device, importing this package turns on the Triton interpreter
(``TRITON_INTERPRET=1``) so the kernels run on CPU tensors, for tests and
step-through; set ``TRITON_INTERPRET`` yourself before the import to choose.

``@triton.jit`` reads the switch when a function is *defined*, not when it is called.
That holds for triton's own library too: ``tl.zeros``, ``tl.max``, ``tl.cdiv``... are
``@triton.jit`` functions of ``triton.language.standard``, defined when triton is first
imported. A process that imported triton before this package (building a transformers
model does, through ``torch._dynamo``) holds compiled-mode library functions that the
interpreter cannot call ("Cannot call @triton.jit'd outside of the scope of a kernel"),
even though our kernels, defined below, are interpreted. ``_interpret_triton_language``
converts them, leaving triton as an import under ``TRITON_INTERPRET=1`` would have.
"""

import os as _os
import sys as _sys

if "TRITON_INTERPRET" not in _os.environ:
    import torch as _torch

    if not _torch.cuda.is_available():
        _os.environ["TRITON_INTERPRET"] = "1"
_os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")


def _interpret_triton_language() -> int:
    """Swap every compiled-mode ``@triton.jit`` function of ``triton.language`` (module attributes
    and ``tl.tensor`` methods) for an interpreted one; returns how many were swapped."""
    import triton.language as tl
    from triton.runtime.interpreter import InterpretedFunction
    from triton.runtime.jit import JITFunction

    converted: dict[int, InterpretedFunction] = {}  # one replacement per function, so `is` checks still hold

    def interpreted(fn: JITFunction) -> InterpretedFunction:
        if id(fn) not in converted:
            converted[id(fn)] = InterpretedFunction(fn.fn)
        return converted[id(fn)]

    modules = [
        m for name, m in list(_sys.modules.items()) if name == "triton.language" or name.startswith("triton.language.")
    ]
    for module in modules:
        for name, value in list(vars(module).items()):
            if isinstance(value, JITFunction):
                setattr(module, name, interpreted(value))
    for name, value in list(vars(tl.tensor).items()):
        if isinstance(value, JITFunction):  # x.max(...): a plain function, so the tensor binds as `self`
            setattr(tl.tensor, name, _as_method(interpreted(value)))
    return len(converted)


def _as_method(fn):
    def method(*args, **kwargs):
        return fn(*args, **kwargs)

    method.__name__ = fn.__name__
    return method


if _os.environ.get("TRITON_INTERPRET") == "1" and "triton.language" in _sys.modules:
    _interpret_triton_language()

from minipaged_kernels import reference  # noqa: E402
from minipaged_kernels.decode_attention import paged_decode_attention  # noqa: E402
from minipaged_kernels.kv_append import kv_append  # noqa: E402
from minipaged_kernels.prefill_attention import paged_prefill_attention  # noqa: E402
from minipaged_kernels.rejection_sampler import rejection_sample  # noqa: E402

__all__ = ["kv_append", "paged_decode_attention", "paged_prefill_attention", "reference", "rejection_sample"]
