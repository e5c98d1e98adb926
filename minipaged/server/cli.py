"""``python -m minipaged serve``: argument parsing and the uvicorn launch."""
from __future__ import annotations

import argparse
import logging
import sys
from typing import Any

_log = logging.getLogger("minipaged.server")


def add_serve_parser(subparsers: Any) -> argparse.ArgumentParser:
    """Register the ``serve`` sub-command on ``subparsers`` (from ``ArgumentParser.add_subparsers``)."""
    p = subparsers.add_parser("serve", help="serve an OpenAI-compatible HTTP API (/v1/completions, /v1/chat/completions)")
    p.add_argument("--model", default=None, help="HF directory or .gguf file (default: embedded SmolLM2-135M-Instruct)")
    p.add_argument("--served-model-name", default=None, help="name clients send as 'model' (default: the model's)")
    p.add_argument("--host", default="127.0.0.1", help="interface to listen on (default: loopback only)")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--api-key", default=None, help="require 'Authorization: Bearer KEY' on /v1 routes")
    p.add_argument("--log-level", default="info", choices=("critical", "error", "warning", "info", "debug"))
    engine = p.add_argument_group("engine options (EngineConfig fields)")
    engine.add_argument("--dtype", default="float32")
    engine.add_argument("--block-size", type=int, default=None)
    engine.add_argument("--num-kv-blocks", type=int, default=None)
    engine.add_argument("--kv-cache-memory", type=int, default=None, help="KV cache bytes (CPU)")
    engine.add_argument("--max-num-seqs", type=int, default=None)
    engine.add_argument("--max-num-batched-tokens", type=int, default=None)
    engine.add_argument("--max-model-len", type=int, default=None)
    engine.add_argument("--attention-backend", choices=("torch", "triton"), default=None)
    engine.add_argument("--seed", type=int, default=None)
    engine.add_argument("--no-prefix-caching", action="store_true", help="disable prefix caching")
    p.set_defaults(func=run_serve)
    return p


def engine_kwargs(args: argparse.Namespace) -> dict[str, Any]:
    """The EngineConfig keywords the user set (unset ones keep EngineConfig's defaults)."""
    names = ("dtype", "block_size", "num_kv_blocks", "kv_cache_memory", "max_num_seqs", "max_num_batched_tokens",
             "max_model_len", "attention_backend", "seed")
    kwargs = {n: getattr(args, n) for n in names if getattr(args, n) is not None}
    if args.no_prefix_caching:
        kwargs["enable_prefix_caching"] = False
    return kwargs


def run_serve(args: argparse.Namespace) -> int:
    """Load the model, then serve until interrupted; returns the exit status."""
    import uvicorn

    from minipaged.server.app import build_app
    from minipaged.async_llm import AsyncLLM

    from minipaged.errors import InputError
    from minipaged.models.loader import ModelNotFoundError

    logging.basicConfig(level=args.log_level.upper(), format="%(levelname)s %(name)s: %(message)s")
    try:
        engine = AsyncLLM(args.model, **engine_kwargs(args))
    except (InputError, ModelNotFoundError) as err:  # a bad option or path: say which, no traceback
        print(f"error: {err}", file=sys.stderr)
        return 2
    app = build_app(engine, model_name=args.served_model_name, api_key=args.api_key)
    _log.info("serving %s on http://%s:%d (max_model_len=%d)", args.served_model_name or engine.model_name,
              args.host, args.port, engine.config.max_model_len)
    uvicorn.run(app, host=args.host, port=args.port, log_level=args.log_level, access_log=False)
    return 0
