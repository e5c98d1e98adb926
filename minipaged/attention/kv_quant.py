"""Quantized KV cache: keys and values stored as int8 or fp8 (e4m3) with fp32 scales.

The KV cache is what limits how many sequences run at once, so a smaller element buys
proportionally more blocks in the same ``kv_cache_memory``. ``EngineConfig.kv_cache_dtype``:

- ``"auto"``: the cache holds the model dtype (fp32 / fp16 / bf16).
- ``"int8"``: symmetric int8 with one fp32 scale per (token, KV head): ``scale =
  amax(|row|) / 127`` over the row's ``head_dim`` values, ``q = round(x / scale)``
  (round half to even), dequantized as ``q * scale``. The scales live in a side tensor
  laid out by block like the cache, ``[num_blocks, block_size, num_kv_heads]``, so a
  block's scales move with it (gather, copy-on-write) and the error of one row never
  depends on another row. Why per token and head: K rows have a few large channels whose
  size differs from token to token and head to head; one scale per layer would spend
  most of the 255 levels on the largest row ever seen. Cost: 4 bytes per ``head_dim``
  bytes (6% at head_dim 64), so 3.76x the blocks of an fp32 cache, 1.88x of fp16.
- ``"fp8_e4m3"``: ``float8_e4m3fn`` elements with one fp32 scale per layer for K and one
  for V (``[1]``, stored beside the layer's cache): ``q = fp8(clamp(x / scale, -448,
  448))``, round to nearest even; values beyond the range *saturate* at +-448 instead of
  turning into NaN (e4m3fn has no infinity). The float format carries its own exponent, so
  one scale per layer suffices for rows of different sizes as long as they stay inside the
  range; that is what makes it scale-free in memory (exactly 4x the blocks of fp32). The
  scale is fixed, 1.0 by default, as vLLM does when a checkpoint ships no KV scales; a
  calibrated scale (``amax / 448`` over K or V of a calibration run, ``calibrated_scale``)
  can be written into ``QuantizedCache.scale`` before the first step. It is never changed
  while the cache holds values, since that would silently re-scale what is stored.

Quantization happens on write and dequantization on read, and attention always reads the
dequantized values back, including the tokens written in the same step (a prefill
attends to its own rounded K/V), so the Triton kernels, the torch backend and the
references below compute on the same numbers. Accumulation stays fp32 as for "auto".

Each layer's cache stays a ``(k_cache, v_cache)`` pair: a plain tensor for "auto", a
``QuantizedCache`` (data + scale) otherwise. ``write_slots``, ``gather_blocks`` and
``copy_blocks`` are the one dispatch point for the torch backend and the worker; the
Triton backend and the torch backend's CPU decode kernel (numba) pass ``data`` and
``scale`` (``data_and_scale``) to kernels that dequantize as they read.

fp8 on GPUs: the kernels encode and decode e4m3 with integer bit operations instead of
the hardware conversion (which Triton allows only on sm_89+), so the same compiled code
runs on sm_80 and sm_90, and the interpreter (whose float->fp8 cast does not round to
nearest even) gives the same bits as ``torch``'s cast.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from minipaged.errors import InvalidEngineConfigError
from minipaged_kernels.kv_quant import (  # noqa: F401  (the scheme, re-exported for the engine)
    SCALE_BYTES,
    STORAGE,
    calibrated_scale,
    dequantize,
    quantize,
)

KV_CACHE_DTYPES = ("auto", "int8", "fp8_e4m3")
# Which scale each cache dtype gets in the engine: True = per (token, KV head), False = per layer.
PER_TOKEN_SCALE = {"int8": True, "fp8_e4m3": False}


@dataclass(frozen=True)
class QuantizedCache:
    """One layer's K (or V) cache, stored quantized.

    data:  int8 or float8_e4m3fn ``[num_blocks, block_size, num_kv_heads, head_dim]``
    scale: fp32 ``[num_blocks, block_size, num_kv_heads]`` (per token and KV head, written
           with each row) or ``[1]`` (per layer, fixed)
    compute_dtype: the dtype attention sees after dequantization (the model dtype)
    """

    data: torch.Tensor
    scale: torch.Tensor
    compute_dtype: torch.dtype

    @property
    def kind(self) -> str:
        return "int8" if self.data.dtype == torch.int8 else "fp8_e4m3"

    @property
    def shape(self) -> torch.Size:
        return self.data.shape

    @property
    def device(self) -> torch.device:
        return self.data.device

    @property
    def per_token(self) -> bool:
        return self.scale.dim() == 3


KVCache = torch.Tensor | QuantizedCache


def allocate(
    shape: tuple[int, int, int, int],
    kind: str,
    compute_dtype: torch.dtype,
    device: torch.device | str,
    per_token: bool | None = None,
) -> QuantizedCache:
    """A zero-filled quantized cache ``[num_blocks, block_size, num_kv_heads, head_dim]``.

    ``per_token=None`` takes the engine's scheme for ``kind`` (``PER_TOKEN_SCALE``); per-layer
    scales start at 1.0.
    """
    check_platform_dtype(kind)
    per_token = PER_TOKEN_SCALE[kind] if per_token is None else per_token
    data = torch.zeros(shape, dtype=STORAGE[kind], device=device)
    scale = torch.zeros(shape[:3], device=device) if per_token else torch.ones(1, device=device)
    return QuantizedCache(data, scale, compute_dtype)


def bytes_per_token_head(
    kv_cache_dtype: str, head_dim: int, model_dtype: torch.dtype, per_token: bool | None = None
) -> int:
    """Bytes one (token, KV head) row of K (or V) takes, including its scale."""
    if kv_cache_dtype == "auto":
        return head_dim * torch.empty((), dtype=model_dtype).element_size()
    per_token = PER_TOKEN_SCALE[kv_cache_dtype] if per_token is None else per_token
    return head_dim + (SCALE_BYTES if per_token else 0)


def _bits(t: torch.Tensor) -> torch.Tensor:
    """The same memory as uint8: CPU torch has no index_copy_ / index_select for float8 dtypes."""
    return t.view(torch.uint8) if t.dtype != torch.int8 else t


def write_slots(cache: KVCache, slots: torch.Tensor, x: torch.Tensor) -> None:
    """Store rows ``x [T, num_kv_heads, head_dim]`` at ``slots`` (int64 ``[T]``), quantizing if needed."""
    if isinstance(cache, torch.Tensor):
        cache.view(-1, *cache.shape[2:]).index_copy_(0, slots, x)
        return
    data, scale = quantize(x, cache.kind, None if cache.per_token else cache.scale)
    _bits(cache.data).view(-1, *cache.shape[2:]).index_copy_(0, slots, _bits(data))
    if cache.per_token:
        cache.scale.view(-1, cache.shape[2]).index_copy_(0, slots, scale)


def gather_blocks(cache: KVCache, block_ids: torch.Tensor) -> torch.Tensor:
    """Blocks ``block_ids`` (int64 ``[n]``) as ``[n, block_size, num_kv_heads, head_dim]`` in the compute dtype.

    A quantized cache gathers its 1-byte elements (and scales) first and dequantizes after,
    so the gather moves a quarter of the bytes of an fp32 one.
    """
    if isinstance(cache, torch.Tensor):
        return cache.index_select(0, block_ids)
    scale = cache.scale.index_select(0, block_ids) if cache.per_token else cache.scale
    data = _bits(cache.data).index_select(0, block_ids).view(cache.data.dtype)
    return dequantize(data, scale, cache.compute_dtype)


def copy_blocks(cache: KVCache, src: torch.Tensor, dst: torch.Tensor) -> None:
    """``cache[dst] = cache[src]`` (copy-on-write), scales included."""
    if isinstance(cache, torch.Tensor):
        cache[dst] = cache[src]
        return
    bits = _bits(cache.data)
    bits[dst] = bits[src]
    if cache.per_token:
        cache.scale[dst] = cache.scale[src]


def data_and_scale(cache: KVCache) -> tuple[torch.Tensor, torch.Tensor | None]:
    """What the Triton kernels take: the stored tensor and its scale (``None`` for a float cache)."""
    return (cache, None) if isinstance(cache, torch.Tensor) else (cache.data, cache.scale)


def nbytes(cache: KVCache) -> int:
    """Bytes a cache tensor holds, its scales included."""
    if isinstance(cache, QuantizedCache):
        return cache.data.nbytes + cache.scale.nbytes
    return cache.nbytes


def compute_dtype(cache: KVCache) -> torch.dtype:
    """The dtype attention computes in for this cache."""
    return cache.dtype if isinstance(cache, torch.Tensor) else cache.compute_dtype


def check_kv_cache_dtype(value: object) -> None:
    """Raise ``InvalidEngineConfigError`` unless ``value`` names a supported cache dtype."""
    if value not in KV_CACHE_DTYPES:
        raise InvalidEngineConfigError("kv_cache_dtype", f"must be one of {KV_CACHE_DTYPES}, got {value!r}")
    check_platform_dtype(value)


def check_platform_dtype(kv_cache_dtype: str) -> None:
    """fp8 needs ``torch.float8_e4m3fn`` (torch >= 2.1)."""
    if kv_cache_dtype == "fp8_e4m3" and STORAGE["fp8_e4m3"] is None:
        raise InvalidEngineConfigError(
            "kv_cache_dtype", f"'fp8_e4m3' needs torch.float8_e4m3fn, which torch {torch.__version__} lacks"
        )


# Compute capabilities the quantized Triton kernels are compiled and checked for
# (tests/kernels/test_aot_compile.py); fp8 uses bit operations, so sm_80 is covered too.
TRITON_MIN_CAPABILITY = (8, 0)
TRITON_MAX_HEAD_DIM = 256


def check_backend_support(kv_cache_dtype: str, backend: str, device: torch.device, head_dim: int) -> None:
    """Raise ``InvalidEngineConfigError`` when ``backend`` cannot serve a ``kv_cache_dtype`` cache here.

    The torch backend serves every dtype. The Triton kernels cover head_dim <= 256 and
    CUDA devices from sm_80 on (the architectures they are compiled for ahead of time).
    """
    if kv_cache_dtype == "auto" or backend != "triton":
        return
    if head_dim > TRITON_MAX_HEAD_DIM:
        raise InvalidEngineConfigError(
            "kv_cache_dtype", f"the Triton kernels cover head_dim <= {TRITON_MAX_HEAD_DIM}, the model has {head_dim}"
        )
    if device.type == "cuda":
        major, minor = torch.cuda.get_device_capability(device)
        if (major, minor) < TRITON_MIN_CAPABILITY:
            raise InvalidEngineConfigError(
                "kv_cache_dtype",
                f"a {kv_cache_dtype!r} cache with the triton backend needs sm_80 or newer; "
                f"{device} is sm_{major}{minor}",
            )
