"""Engine options of the command line, shared by every subcommand (``generate``, ``serve``).

``add_engine_arguments`` adds them to a parser and ``engine_kwargs`` turns the parsed ones back
into ``LLM(...)`` / ``AsyncLLM(...)`` keywords, so each subcommand spells them alike.
"""

from __future__ import annotations

import argparse
from typing import Any

from minipaged.attention.kv_quant import KV_CACHE_DTYPES


def byte_size(text: str) -> int:
    """``1073741824``, ``512M``, ``1G``, ``2GiB`` -> bytes (binary multiples)."""
    units = {"": 1, "k": 1 << 10, "m": 1 << 20, "g": 1 << 30, "t": 1 << 40}
    value = text.strip().lower().removesuffix("ib").removesuffix("b")
    unit = value[-1:] if value[-1:] in units else ""
    try:
        number = float(value[: len(value) - len(unit)])
    except ValueError:
        raise argparse.ArgumentTypeError(f"invalid size {text!r} (bytes, or with K/M/G/T, e.g. 512M)") from None
    return int(number * units[unit])


def add_engine_arguments(parser: argparse.ArgumentParser) -> None:
    """Options that build the engine (``LLM(...)`` keywords); shared by every subcommand."""
    group = parser.add_argument_group("engine")
    group.add_argument(
        "--model", default=None, help="HF directory or .gguf file (default: embedded SmolLM2-135M-Instruct)"
    )
    group.add_argument("--dtype", default="float32", help="float32 (default), bfloat16 or float16")
    group.add_argument("--attention-backend", choices=("torch", "triton"), default=None)
    group.add_argument("--block-size", type=int, default=None, help="tokens per KV block (default 16)")
    group.add_argument("--num-kv-blocks", type=int, default=None, help="KV cache size in blocks")
    group.add_argument(
        "--kv-cache-memory",
        type=byte_size,
        default=None,
        help="KV cache size in bytes on CPU, e.g. 512M or 2G (default 1G)",
    )
    group.add_argument("--max-num-seqs", type=int, default=None, help="most sequences in one step (default 128)")
    group.add_argument(
        "--max-num-batched-tokens", type=int, default=None, help="token budget of one step (default 2048)"
    )
    group.add_argument("--max-model-len", type=int, default=None, help="longest prompt + output (default: the model's)")
    group.add_argument("--no-prefix-caching", action="store_true", help="do not reuse KV blocks of shared prefixes")
    group.add_argument(
        "--kv-cache-dtype",
        choices=KV_CACHE_DTYPES,
        default=None,
        help="KV cache storage: auto (the model dtype, default), int8 or fp8_e4m3 (see minipaged.attention.kv_quant)",
    )
    group.add_argument(
        "--tensor-parallel-size",
        type=int,
        default=None,
        help="processes that each hold 1/N of every layer's heads and KV cache (default 1)",
    )


def engine_kwargs(args: argparse.Namespace) -> dict[str, Any]:
    """``LLM(...)`` keywords from ``add_engine_arguments``' options; unset options keep the engine's defaults."""
    names = (
        "dtype",
        "attention_backend",
        "block_size",
        "num_kv_blocks",
        "kv_cache_memory",
        "max_num_seqs",
        "max_num_batched_tokens",
        "max_model_len",
        "kv_cache_dtype",
        "tensor_parallel_size",
    )
    kwargs = {name: getattr(args, name) for name in names if getattr(args, name) is not None}
    if args.no_prefix_caching:
        kwargs["enable_prefix_caching"] = False
    return kwargs
