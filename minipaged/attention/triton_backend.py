"""Paged attention through the Triton kernels in ``minipaged_kernels`` (compiled on CUDA, interpreted on CPU).

A step whose sequences all have one new token runs the decode kernel; any step with a
longer query (prefill, chunked prefill, or a mix with decodes) runs the prefill kernel,
which handles one-token sequences as well. A quantized cache (``minipaged.attention.kv_quant``)
goes to the same kernels as its 1-byte data and fp32 scales: they quantize on write and
dequantize on read.
"""

from __future__ import annotations

import torch

import minipaged_kernels
from minipaged.attention import kv_quant
from minipaged.attention.metadata import AttentionMetadata


class TritonAttentionBackend:
    """Attention backend calling ``minipaged_kernels.kv_append`` then a paged attention kernel."""

    name = "triton"

    def prepare(self, meta: AttentionMetadata, k_cache: kv_quant.KVCache) -> AttentionMetadata:
        """Nothing to precompute: the kernels read the metadata tensors directly."""
        return meta

    def forward(
        self,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        k_cache: kv_quant.KVCache,
        v_cache: kv_quant.KVCache,
        meta: AttentionMetadata,
        scale: float,
    ) -> torch.Tensor:
        """Write ``k``, ``v`` ``[T, Hkv, D]`` at ``meta.slot_mapping``, then attend; returns ``[T, Hq, D]``."""
        k_cache, k_scale = kv_quant.data_and_scale(k_cache)
        v_cache, v_scale = kv_quant.data_and_scale(v_cache)
        scales = {"k_scale": k_scale, "v_scale": v_scale}
        minipaged_kernels.kv_append(k.contiguous(), v.contiguous(), k_cache, v_cache, meta.slot_mapping, **scales)
        q = q.contiguous()
        if meta.max_query_len == 1:
            return minipaged_kernels.paged_decode_attention(
                q, k_cache, v_cache, meta.block_tables, meta.context_lens, scale=scale, **scales
            )
        return minipaged_kernels.paged_prefill_attention(
            q, k_cache, v_cache, meta.block_tables, meta.cu_seqlens_q, meta.context_lens, scale=scale, **scales
        )
