"""Triton kernels for a paged KV cache, each with a naive reference in ``kernels.reference``.

Cache layout everywhere: ``k_cache``, ``v_cache`` of shape
``[num_blocks, block_size, num_kv_heads, head_dim]``; a slot is
``block_id * block_size + offset``.

Without a CUDA device, importing this package turns on the Triton interpreter
(``TRITON_INTERPRET=1``) so the kernels run on CPU tensors, for tests and
step-through; set ``TRITON_INTERPRET`` yourself before the import to choose.
The switch must happen before any ``@triton.jit`` kernel is defined, hence here.
"""
import os as _os

if "TRITON_INTERPRET" not in _os.environ:
    import torch as _torch

    if not _torch.cuda.is_available():
        _os.environ["TRITON_INTERPRET"] = "1"
_os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")

from kernels import reference
from kernels.decode_attention import paged_decode_attention
from kernels.kv_append import kv_append
from kernels.prefill_attention import paged_prefill_attention

__all__ = ["kv_append", "paged_decode_attention", "paged_prefill_attention", "reference"]
