"""Attention backends over one paged KV cache layout.

Every layer's cache is a pair ``(k_cache, v_cache)``, each
``[num_blocks, block_size, num_kv_heads, head_dim]``; a token's slot is
``block_id * block_size + offset``. With ``kv_cache_dtype`` "int8" or "fp8_e4m3" each is a
``minipaged.attention.kv_quant.QuantizedCache`` (1-byte data plus fp32 scales), which both backends
dequantize on read. Two backends implement the same contract:

- ``"torch"``: pure PyTorch, vectorised over the batch; the default without CUDA;
- ``"triton"``: the Triton kernels in ``minipaged_kernels`` (the Triton interpreter on CPU:
  correct but slow, meant for tests and step-through).
"""

from __future__ import annotations

import os
from typing import Protocol

import torch

from minipaged.attention import kv_quant
from minipaged.attention.metadata import AttentionMetadata, build_metadata, build_positions
from minipaged.errors import InvalidEngineConfigError

BACKENDS = ("torch", "triton")


class AttentionBackend(Protocol):
    name: str

    def prepare(self, meta: AttentionMetadata, k_cache: torch.Tensor) -> AttentionMetadata:
        """Return ``meta`` with anything this backend derives once per step (for caches shaped
        like ``k_cache``) attached; the model calls it once per forward, before the layers."""
        ...

    def forward(
        self,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        k_cache: torch.Tensor,
        v_cache: torch.Tensor,
        meta: AttentionMetadata,
        scale: float,
    ) -> torch.Tensor:
        """Write ``k``/``v`` ``[T, Hkv, D]`` into the caches at ``meta.slot_mapping``, then attend
        causally over each sequence's paged prefix; ``q`` ``[T, Hq, D]`` -> ``[T, Hq, D]``."""
        ...


def get_attention_backend(name: str | None, device: torch.device | str) -> AttentionBackend:
    """The backend called ``name``; ``None`` picks ``"triton"`` on CUDA and ``"torch"`` elsewhere."""
    device = torch.device(device)
    if name is None:
        name = "triton" if device.type == "cuda" else "torch"
    if name == "torch":
        from minipaged.attention.torch_backend import TorchAttentionBackend

        return TorchAttentionBackend()
    if name == "triton":
        _ensure_triton_can_run(device)
        from minipaged.attention.triton_backend import TritonAttentionBackend

        return TritonAttentionBackend()
    raise ValueError(f"attention_backend must be one of {BACKENDS} or None, got {name!r}")


def _ensure_triton_can_run(device: torch.device) -> None:
    # Without CUDA, importing `minipaged_kernels` turns on the Triton interpreter (and makes triton's own
    # library interpretable if triton was imported first), unless TRITON_INTERPRET was set to
    # something else before: then compiled kernels would be handed CPU tensors.
    import minipaged_kernels  # noqa: F401

    if device.type != "cuda" and os.environ.get("TRITON_INTERPRET") != "1":
        raise InvalidEngineConfigError(
            "attention_backend",
            f"'triton' on {device} runs under the Triton interpreter, but TRITON_INTERPRET="
            f"{os.environ.get('TRITON_INTERPRET')!r} was set before `minipaged_kernels` was imported; unset it (or set "
            "TRITON_INTERPRET=1) before starting Python, or use attention_backend='torch'",
        )


def kv_cache_bytes_per_block(model_config, block_size: int, dtype: torch.dtype, kv_cache_dtype: str = "auto") -> int:
    """Bytes one block takes across all layers, keys and values, scales included.

    ``dtype`` is the model dtype (the cache's for ``kv_cache_dtype="auto"``); int8 adds a
    4-byte scale per (token, KV head), fp8's per-layer scales take no per-block bytes.
    """
    row = kv_quant.bytes_per_token_head(kv_cache_dtype, model_config.head_dim, dtype)
    return 2 * model_config.num_layers * block_size * model_config.num_kv_heads * row


def allocate_kv_cache(
    model_config,
    num_blocks: int,
    block_size: int,
    dtype: torch.dtype,
    device: torch.device | str,
    kv_cache_dtype: str = "auto",
) -> list[tuple[kv_quant.KVCache, kv_quant.KVCache]]:
    """One zero-filled ``(k_cache, v_cache)`` pair per layer, each ``[num_blocks, block_size, num_kv_heads, head_dim]``.

    ``kv_cache_dtype="auto"``: plain tensors of ``dtype``; "int8" / "fp8_e4m3":
    ``kv_quant.QuantizedCache`` pairs that dequantize to ``dtype`` (see ``minipaged.attention.kv_quant``).
    Zero-filled so slots a sequence has not written yet hold finite values (the torch
    backend multiplies masked-out keys' probabilities, 0, by their values).
    """
    if num_blocks < 1:
        raise ValueError(f"num_blocks must be >= 1, got {num_blocks}")
    if block_size < 1:
        raise ValueError(f"block_size must be >= 1, got {block_size}")
    if kv_cache_dtype not in kv_quant.KV_CACHE_DTYPES:
        raise ValueError(f"kv_cache_dtype must be one of {kv_quant.KV_CACHE_DTYPES}, got {kv_cache_dtype!r}")
    shape = (num_blocks, block_size, model_config.num_kv_heads, model_config.head_dim)
    if kv_cache_dtype == "auto":
        return [
            (torch.zeros(shape, dtype=dtype, device=device), torch.zeros(shape, dtype=dtype, device=device))
            for _ in range(model_config.num_layers)
        ]
    return [
        (
            kv_quant.allocate(shape, kv_cache_dtype, dtype, device),
            kv_quant.allocate(shape, kv_cache_dtype, dtype, device),
        )
        for _ in range(model_config.num_layers)
    ]


__all__ = [
    "AttentionBackend",
    "AttentionMetadata",
    "BACKENDS",
    "allocate_kv_cache",
    "build_metadata",
    "build_positions",
    "get_attention_backend",
    "kv_cache_bytes_per_block",
]
