"""GPU timings of the kernels: ``python -m minipaged_kernels.bench [--peak-gbps 3350]``.

Each case times a kernel with ``triton.testing.do_bench`` (median) and reports the
achieved bandwidth against the case's bytes-moved floor (the module's ``bytes_moved``)
and against a PyTorch baseline doing the same job on a contiguous cache
(``scaled_dot_product_attention`` for attention, ``index_copy_`` for KV-append).
Without CUDA it says so and exits 0: interpreter timings mean nothing. Not run in CI.

Cases are generated per kernel (``kv_append_cases``, ``decode_cases``, ``prefill_cases``), one at a time
so only one case's tensors live on the GPU; a kernel adds its own generator to
``CASE_BUILDERS``.
"""

from __future__ import annotations

import argparse
import importlib
import sys
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import torch
import torch.nn.functional as F

BLOCK_SIZE = 16
# Skip a case whose K/V cache alone would exceed this many bytes.
MAX_CACHE_BYTES = 16 * 2**30

# (name, num_heads, num_kv_heads, head_dim)
MODELS = (("llama7b", 32, 32, 128), ("smollm2", 9, 3, 64))
# (batch, context) pairs spanning 1-256 sequences and 128-32k tokens.
DECODE_SHAPES = (
    (1, 128),
    (1, 4096),
    (1, 32768),
    (8, 4096),
    (16, 32768),
    (64, 1024),
    (64, 4096),
    (256, 128),
    (256, 2048),
)
APPEND_TOKENS = (1, 64, 256, 4096)


@dataclass(frozen=True)
class BenchCase:
    """One timed call: ``run`` launches the kernel, ``baseline`` the PyTorch equivalent."""

    kernel: str
    name: str
    bytes_moved: int
    run: Callable[[], object]
    baseline: Callable[[], object] | None


def _paged_cache(
    batch: int, context: int, num_kv_heads: int, head_dim: int, dtype: torch.dtype, device: torch.device
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Shuffled physical blocks holding ``batch`` sequences of ``context`` tokens."""
    blocks_per_seq = -(-context // BLOCK_SIZE)
    num_blocks = batch * blocks_per_seq
    k_cache = torch.randn(num_blocks, BLOCK_SIZE, num_kv_heads, head_dim, dtype=dtype, device=device)
    v_cache = torch.randn_like(k_cache)
    tables = torch.randperm(num_blocks, device=device).to(torch.int32).view(batch, blocks_per_seq)
    return k_cache, v_cache, tables


def kv_append_cases(device: torch.device, dtype: torch.dtype) -> Iterator[BenchCase]:
    module = importlib.import_module("minipaged_kernels.kv_append")
    for model, _, num_kv_heads, head_dim in MODELS:
        for num_tokens in APPEND_TOKENS:
            num_blocks = 2 * (-(-num_tokens // BLOCK_SIZE)) + 8
            k_cache = torch.zeros(num_blocks, BLOCK_SIZE, num_kv_heads, head_dim, dtype=dtype, device=device)
            v_cache = torch.zeros_like(k_cache)
            key = torch.randn(num_tokens, num_kv_heads, head_dim, dtype=dtype, device=device)
            value = torch.randn_like(key)
            slots = torch.randperm(num_blocks * BLOCK_SIZE, device=device)[:num_tokens]
            shape = {
                "num_tokens": num_tokens,
                "num_kv_heads": num_kv_heads,
                "head_dim": head_dim,
                "dtype_bytes": k_cache.element_size(),
            }

            def run(key=key, value=value, k_cache=k_cache, v_cache=v_cache, slots=slots):
                module.kv_append(key, value, k_cache, v_cache, slots)

            def baseline(key=key, value=value, k_cache=k_cache, v_cache=v_cache, slots=slots):
                k_cache.view(-1, *key.shape[1:]).index_copy_(0, slots, key)
                v_cache.view(-1, *value.shape[1:]).index_copy_(0, slots, value)

            yield BenchCase("kv_append", f"{model} tokens={num_tokens}", module.bytes_moved(shape), run, baseline)


def decode_cases(device: torch.device, dtype: torch.dtype) -> Iterator[BenchCase]:
    module = importlib.import_module("minipaged_kernels.decode_attention")
    for model, num_heads, num_kv_heads, head_dim in MODELS:
        for batch, context in DECODE_SHAPES:
            cache_bytes = 2 * batch * context * num_kv_heads * head_dim * torch.finfo(dtype).bits // 8
            if cache_bytes > MAX_CACHE_BYTES:
                continue
            k_cache, v_cache, tables = _paged_cache(batch, context, num_kv_heads, head_dim, dtype, device)
            lens = torch.full((batch,), context, dtype=torch.int32, device=device)
            q = torch.randn(batch, num_heads, head_dim, dtype=dtype, device=device)
            out = torch.empty_like(q)
            k_flat = torch.randn(batch, num_kv_heads, context, head_dim, dtype=dtype, device=device)
            v_flat = torch.randn_like(k_flat)
            shape = {
                "num_seqs": batch,
                "context_len": context,
                "num_heads": num_heads,
                "num_kv_heads": num_kv_heads,
                "head_dim": head_dim,
                "dtype_bytes": q.element_size(),
            }

            def run(q=q, k_cache=k_cache, v_cache=v_cache, tables=tables, lens=lens, out=out):
                module.paged_decode_attention(q, k_cache, v_cache, tables, lens, out=out)

            def baseline(q=q, k_flat=k_flat, v_flat=v_flat):
                F.scaled_dot_product_attention(q.unsqueeze(2), k_flat, v_flat, enable_gqa=True)

            yield BenchCase(
                "paged_decode_attention",
                f"{model} batch={batch} ctx={context}",
                module.bytes_moved(shape),
                run,
                baseline,
            )


# (batch, new tokens per sequence, cached prefix per sequence): prompts of 512-8k tokens,
# fresh and as a chunk behind a cached prefix.
PREFILL_SHAPES = (
    (1, 512, 0),
    (1, 2048, 0),
    (1, 8192, 0),
    (8, 1024, 0),
    (1, 512, 4096),
    (1, 2048, 6144),
    (4, 1024, 3072),
    (16, 512, 1536),
)


def prefill_cases(device: torch.device, dtype: torch.dtype) -> Iterator[BenchCase]:
    """Prefill/extend attention; the baseline is SDPA with a bottom-right causal mask on
    the same K/V gathered into a contiguous ``[batch, kv_heads, context, head_dim]``."""
    from torch.nn.attention.bias import causal_lower_right

    module = importlib.import_module("minipaged_kernels.prefill_attention")
    for model, num_heads, num_kv_heads, head_dim in MODELS:
        for batch, new_len, prefix_len in PREFILL_SHAPES:
            context = prefix_len + new_len
            k_cache, v_cache, tables = _paged_cache(batch, context, num_kv_heads, head_dim, dtype, device)
            lens = torch.full((batch,), context, dtype=torch.int32, device=device)
            cu = torch.arange(batch + 1, dtype=torch.int32, device=device) * new_len
            q = torch.randn(batch * new_len, num_heads, head_dim, dtype=dtype, device=device)
            out = torch.empty_like(q)
            q_sdpa = q.view(batch, new_len, num_heads, head_dim).transpose(1, 2).contiguous()
            k_flat, v_flat = (
                c[tables.long()].flatten(1, 2)[:, :context].transpose(1, 2).contiguous() for c in (k_cache, v_cache)
            )
            mask = causal_lower_right(new_len, context)
            shape = {
                "num_seqs": batch,
                "new_len": new_len,
                "prefix_len": prefix_len,
                "num_heads": num_heads,
                "num_kv_heads": num_kv_heads,
                "head_dim": head_dim,
                "block_size": BLOCK_SIZE,
                "dtype_bytes": q.element_size(),
            }

            def run(q=q, k_cache=k_cache, v_cache=v_cache, tables=tables, cu=cu, lens=lens, out=out):
                return module.paged_prefill_attention(q, k_cache, v_cache, tables, cu, lens, out=out)

            def baseline(q=q_sdpa, k=k_flat, v=v_flat, mask=mask):
                return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=True)

            yield BenchCase(
                "paged_prefill_attention",
                f"{model} b={batch} new={new_len} pre={prefix_len}",
                module.bytes_moved(shape),
                run,
                baseline,
            )


CASE_BUILDERS: list[Callable[[torch.device, torch.dtype], Iterator[BenchCase]]] = [
    kv_append_cases,
    decode_cases,
    prefill_cases,
]


def time_case(case: BenchCase) -> tuple[float, float | None]:
    """Median milliseconds of the kernel and of its baseline."""
    from triton.testing import do_bench

    kernel_ms = do_bench(case.run, return_mode="median")
    baseline_ms = do_bench(case.baseline, return_mode="median") if case.baseline is not None else None
    return kernel_ms, baseline_ms


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dtype", choices=("fp16", "bf16"), default="fp16")
    parser.add_argument("--peak-gbps", type=float, default=None, help="device DRAM bandwidth, for a %% column")
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        print(
            "minipaged_kernels.bench: no CUDA device here; the benchmark times compiled kernels on a GPU "
            "(interpreter timings are meaningless), so there is nothing to measure. Exiting."
        )
        return 0
    device = torch.device("cuda")
    dtype = {"fp16": torch.float16, "bf16": torch.bfloat16}[args.dtype]
    print(f"{torch.cuda.get_device_name(device)}, {args.dtype}, block_size={BLOCK_SIZE}, median of do_bench")
    print(
        f"{'kernel':<24} {'case':<28} {'floor MB':>9} {'ms':>9} {'GB/s':>8} {'%peak':>6} "
        f"{'torch ms':>9} {'torch GB/s':>10} {'speedup':>8}"
    )
    for build in CASE_BUILDERS:
        for case in build(device, dtype):
            kernel_ms, base_ms = time_case(case)
            gbps = case.bytes_moved / kernel_ms / 1e6
            peak = f"{100 * gbps / args.peak_gbps:>5.0f}%" if args.peak_gbps else f"{'-':>6}"
            base = (
                f"{base_ms:>9.4f} {case.bytes_moved / base_ms / 1e6:>10.0f} {base_ms / kernel_ms:>7.2f}x"
                if base_ms is not None
                else f"{'-':>9} {'-':>10} {'-':>8}"
            )
            print(
                f"{case.kernel:<24} {case.name:<28} {case.bytes_moved / 1e6:>9.1f} {kernel_ms:>9.4f} "
                f"{gbps:>8.0f} {peak} {base}"
            )
        torch.cuda.empty_cache()
    return 0


if __name__ == "__main__":
    sys.exit(main())
