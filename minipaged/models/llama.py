"""A Llama-family decoder over a paged KV cache: Llama, Mistral, SmolLM2 and Qwen2.

The model takes a flat batch of new tokens from many sequences (see
``minipaged.attention.metadata``) rather than a padded ``[batch, seq]`` tensor, so
prefill chunks and decode tokens share one forward pass. Differences from the
Hugging Face modules are for speed and do not change the formulas: q/k/v are one
matmul (``qkv_proj``), gate/up are one matmul (``gate_up_proj``), the rotary cos/sin
tables are precomputed once and indexed by position, the residual stream travels beside
the hidden state so that each RMSNorm does the residual add too, and on CPU the linears
multiply by oneDNN pre-packed weights (``minipaged.models.linear``), which sums in a
different order than transformers' MKL path (differences of a few fp32 ulps). fp32 CPU
runs do RMSNorm (+ add) and RoPE in numba (``minipaged_kernels.cpu.fused_ops``), within an ulp
or so of the PyTorch formulas used everywhere else; bf16 CPU runs do both there, bit-equal.
"""

from __future__ import annotations

import math
from types import ModuleType
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import nn

from minipaged.attention import AttentionBackend
from minipaged.attention.metadata import AttentionMetadata
from minipaged.models.config import ModelConfig
from minipaged.models.linear import PackedWeight, linear
from minipaged.models.parallel_linear import column_linear, row_linear
from minipaged.models.quantization.layers import install_quant_linears
from minipaged_kernels import cpu as cpu_kernels

if TYPE_CHECKING:
    from minipaged.distributed import TensorParallelGroup


def _fused_ops() -> ModuleType | None:
    """The fused CPU ops module (``minipaged_kernels.cpu.fused_ops``), ``None`` without numba."""
    return cpu_kernels.load("fused_ops")


class RMSNorm(nn.Module):
    def __init__(self, hidden_size: int, eps: float) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(hidden_size))
        self.eps = eps

    def forward(self, x: torch.Tensor, residual: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Add the residual stream, then normalise: ``(rms_norm(x + residual), x + residual)``,
        each ``[T, hidden]`` (``x`` alone without ``residual``); statistics in fp32 as in transformers.

        The sum is written into ``x``. Taking the add here lets fp32 CPU runs do both in one
        pass (``minipaged_kernels.cpu.fused_ops``, vLLM's ``fused_add_rms_norm``).
        """
        if (fused := _fused_ops()) is not None:
            if fused.norm_applies_to(x, self.weight, residual):
                return fused.add_rms_norm(x, self.weight, self.eps, residual)
            if fused.bf16_norm_applies_to(x, self.weight, self.eps, residual):
                return fused.add_rms_norm_bf16(x, self.weight, self.eps, residual)
        if residual is not None:
            x = x.add_(residual)
        if x.dtype == torch.float32:
            return F.rms_norm(x, self.weight.shape, self.weight, self.eps), x
        # torch normalises 16-bit rows in fp32 and rounds once (the same bits as x.float() in, .to() out),
        # then the weight multiplies in the model dtype, as transformers' LlamaRMSNorm does.
        return self.weight * F.rms_norm(x, self.weight.shape, None, self.eps), x


def rope_inverse_frequencies(config: ModelConfig) -> torch.Tensor:
    """``[head_dim // 2]`` fp32 inverse frequencies, with linear or Llama-3 scaling when configured."""
    dim = config.head_dim
    inv_freq = 1.0 / (config.rope_theta ** (torch.arange(0, dim, 2, dtype=torch.int64).float() / dim))
    scaling = config.rope_scaling
    if scaling is None:
        return inv_freq
    factor = float(scaling["factor"])
    if scaling["rope_type"] == "linear":
        return inv_freq / factor
    # Llama 3.1: keep high frequencies, divide low ones by `factor`, interpolate in between.
    low, high = float(scaling["low_freq_factor"]), float(scaling["high_freq_factor"])
    old_len = scaling["original_max_position_embeddings"]
    wavelen = 2 * math.pi / inv_freq
    scaled = torch.where(wavelen > old_len / low, inv_freq / factor, inv_freq)
    smooth = (old_len / wavelen - low) / (high - low)
    smoothed = (1 - smooth) * scaled / factor + smooth * scaled
    is_medium = ~(wavelen < old_len / high) * ~(wavelen > old_len / low)
    return torch.where(is_medium, smoothed, scaled)


class RotaryEmbedding(nn.Module):
    """Precomputed cos/sin tables ``[max_positions, head_dim // 2]`` indexed by token position."""

    def __init__(self, config: ModelConfig, dtype: torch.dtype) -> None:
        super().__init__()
        # Real values even when the model is built under torch.device("meta") (the loader does).
        with torch.device("cpu"):
            inv_freq = rope_inverse_frequencies(config)
            positions = torch.arange(config.max_position_embeddings, dtype=torch.float32)
            freqs = positions[:, None] * inv_freq[None, :]
        self.register_buffer("cos", freqs.cos().to(dtype), persistent=False)
        self.register_buffer("sin", freqs.sin().to(dtype), persistent=False)

    def forward(self, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``positions [T]`` -> ``(cos, sin)``, each ``[T, 1, head_dim // 2]`` (broadcast over heads)."""
        if positions.numel() and int(positions.max()) >= self.cos.shape[0]:
            raise ValueError(
                f"positions reach {int(positions.max())}, beyond max_position_embeddings={self.cos.shape[0]}"
            )
        return self.cos[positions].unsqueeze(1), self.sin[positions].unsqueeze(1)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate ``x [T, H, head_dim]`` (rotate-half convention, as transformers' Llama); a new tensor,
    or ``x`` itself rotated in place on fp32 and bf16 CPU runs (``minipaged_kernels.cpu.fused_ops.rope_``)."""
    if (fused := _fused_ops()) is not None and fused.rope_applies_to(x, cos, sin):
        return fused.rope_(x, cos, sin)
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1)


class Attention(nn.Module):
    def __init__(self, config: ModelConfig, backend: AttentionBackend, tp: TensorParallelGroup | None = None) -> None:
        super().__init__()
        # With tensor parallelism this rank computes 1/N of the query and KV heads.
        tp_size = 1 if tp is None else tp.world_size
        self.num_heads, self.num_kv_heads = config.num_heads // tp_size, config.num_kv_heads // tp_size
        self.head_dim = config.head_dim
        self.scale = config.head_dim**-0.5
        self.backend = backend
        q_size, kv_size = self.num_heads * self.head_dim, self.num_kv_heads * self.head_dim
        self.split_sizes = (q_size, kv_size, kv_size)
        full_q, full_kv = config.num_heads * self.head_dim, config.num_kv_heads * self.head_dim
        self.qkv_proj = column_linear(config.hidden_size, (full_q, full_kv, full_kv), config.attention_bias, tp)
        self.o_proj = row_linear(full_q, config.hidden_size, config.o_proj_bias, tp)

    def forward(
        self,
        x: torch.Tensor,
        cos: torch.Tensor,
        sin: torch.Tensor,
        kv_cache: tuple[torch.Tensor, torch.Tensor],
        meta: AttentionMetadata,
    ) -> torch.Tensor:
        """``x [T, hidden]`` -> ``[T, hidden]``; writes this step's K/V into ``kv_cache``."""
        num_tokens = x.shape[0]
        qkv = self.qkv_proj(x)
        q_size, kv_size, _ = self.split_sizes
        # q and k share positions, so one rotation covers both heads' worth of columns.
        qk = apply_rope(qkv[:, : q_size + kv_size].view(num_tokens, -1, self.head_dim), cos, sin)
        q, k = qk[:, : self.num_heads], qk[:, self.num_heads :]
        v = qkv[:, q_size + kv_size :].view(num_tokens, self.num_kv_heads, self.head_dim)
        out = self.backend.forward(q, k, v, kv_cache[0], kv_cache[1], meta, self.scale)
        return self.o_proj(out.reshape(num_tokens, -1))


class MLP(nn.Module):
    def __init__(self, config: ModelConfig, tp: TensorParallelGroup | None = None) -> None:
        super().__init__()
        inter = config.intermediate_size
        self.gate_up_proj = column_linear(config.hidden_size, (inter, inter), False, tp)
        self.down_proj = row_linear(inter, config.hidden_size, False, tp)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate, up = self.gate_up_proj(x).chunk(2, dim=-1)
        return self.down_proj(F.silu(gate).mul_(up))


class DecoderLayer(nn.Module):
    def __init__(self, config: ModelConfig, backend: AttentionBackend, tp: TensorParallelGroup | None = None) -> None:
        super().__init__()
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.self_attn = Attention(config, backend, tp)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.mlp = MLP(config, tp)

    def forward(
        self,
        x: torch.Tensor,
        residual: torch.Tensor | None,
        cos: torch.Tensor,
        sin: torch.Tensor,
        kv_cache: tuple[torch.Tensor, torch.Tensor],
        meta: AttentionMetadata,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Pre-norm residual block: ``(x, residual)`` -> ``(mlp_out, residual)``, each ``[T, hidden]``.

        The hidden state is ``x + residual`` (``x`` alone for the first layer's ``None``);
        the add is left to the next RMSNorm, which does it in the same pass.
        """
        x, residual = self.input_layernorm(x, residual)
        x, residual = self.post_attention_layernorm(self.self_attn(x, cos, sin, kv_cache, meta), residual)
        return self.mlp(x), residual


class DecoderStack(nn.Module):
    """Embedding, decoder layers and final norm (transformers' ``model.model``)."""

    def __init__(
        self,
        config: ModelConfig,
        backend: AttentionBackend,
        dtype: torch.dtype,
        tp: TensorParallelGroup | None = None,
    ) -> None:
        super().__init__()
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)  # replicated under TP
        self.layers = nn.ModuleList(DecoderLayer(config, backend, tp) for _ in range(config.num_layers))
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.rotary_emb = RotaryEmbedding(config, dtype)


class CausalLM(nn.Module):
    """Llama-family causal LM over a paged KV cache (Llama / Mistral / SmolLM2, and Qwen2 with q/k/v bias)."""

    def __init__(
        self,
        config: ModelConfig,
        attention_backend: AttentionBackend,
        dtype: torch.dtype = torch.float32,
        tp: TensorParallelGroup | None = None,
    ) -> None:
        super().__init__()
        self.config = config  # the whole model's shape, also on a tensor-parallel rank
        self.tp = tp  # None: one process; else this rank's group (1/N of the heads and MLP features)
        self.attention_backend = attention_backend
        self.model = DecoderStack(config, attention_backend, dtype, tp)
        # Holds the untied head's weight only: compute_logits multiplies by lm_head_weight,
        # tied or not, through one packed copy. Under TP only rank 0 samples, so only it holds one.
        has_own_head = not config.tie_word_embeddings and (tp is None or tp.is_driver)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False) if has_own_head else None
        self._lm_head_packed = PackedWeight()
        if config.quantization is not None:
            install_quant_linears(self, config.quantization, dtype, tp)

    @property
    def lm_head_weight(self) -> torch.Tensor:
        if self.lm_head is None and not self.config.tie_word_embeddings:
            raise RuntimeError("only tensor-parallel rank 0 holds the untied LM head (the other ranks never sample)")
        return self.model.embed_tokens.weight if self.lm_head is None else self.lm_head.weight

    @torch.inference_mode()
    def forward(
        self,
        input_ids: torch.Tensor,
        positions: torch.Tensor,
        kv_caches: list[tuple[torch.Tensor, torch.Tensor]],
        meta: AttentionMetadata,
    ) -> torch.Tensor:
        """One step: ``input_ids``, ``positions`` int64 ``[T]`` -> final hidden states ``[T, hidden_size]``.

        ``kv_caches`` holds one ``(k_cache, v_cache)`` pair per layer, each
        ``[num_blocks, block_size, num_kv_heads, head_dim]``; this step's K/V are written
        at ``meta.slot_mapping`` before attention reads them.
        """
        self._check_inputs(input_ids, positions, kv_caches, meta)
        meta = self.attention_backend.prepare(meta, kv_caches[0][0])
        cos, sin = self.model.rotary_emb(positions)
        h, residual = self.model.embed_tokens(input_ids), None
        for layer, kv_cache in zip(self.model.layers, kv_caches):
            h, residual = layer(h, residual, cos, sin, kv_cache, meta)
        return self.model.norm(h, residual)[0]

    @torch.inference_mode()
    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """``hidden [N, hidden_size]`` (only the rows that need a next token) -> fp32 ``[N, vocab_size]``."""
        return linear(hidden, self.lm_head_weight, None, self._lm_head_packed).float()

    def _check_inputs(self, input_ids, positions, kv_caches, meta: AttentionMetadata) -> None:
        if input_ids.dim() != 1 or positions.shape != input_ids.shape:
            raise ValueError(
                "input_ids and positions must both be [num_tokens]; "
                f"got {tuple(input_ids.shape)} and {tuple(positions.shape)}"
            )
        if meta.slot_mapping.shape != input_ids.shape:
            raise ValueError(
                f"meta.slot_mapping has shape {tuple(meta.slot_mapping.shape)}, expected {tuple(input_ids.shape)}"
            )
        if len(kv_caches) != self.config.num_layers:
            raise ValueError(f"kv_caches has {len(kv_caches)} layers, the model has {self.config.num_layers}")
