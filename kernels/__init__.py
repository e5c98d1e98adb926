"""Triton kernels for a paged KV cache, each with a naive reference in ``kernels.reference``.

Cache layout everywhere: ``k_cache``, ``v_cache`` of shape
``[num_blocks, block_size, num_kv_heads, head_dim]``; a slot is
``block_id * block_size + offset``.

Set ``TRITON_INTERPRET=1`` before importing this package to run the kernels on CPU
tensors with the Triton interpreter.
"""
from kernels import reference
from kernels.decode_attention import paged_decode_attention
from kernels.kv_append import kv_append
from kernels.prefill_attention import paged_prefill_attention

__all__ = ["kv_append", "paged_decode_attention", "paged_prefill_attention", "reference"]
