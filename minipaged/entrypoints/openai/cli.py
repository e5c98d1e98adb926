"""``python -m minipaged serve``: argument parsing and the uvicorn launch."""

from __future__ import annotations

import argparse
import logging
from typing import Any

from minipaged.entrypoints.engine_args import add_engine_arguments, engine_kwargs
from minipaged.entrypoints.openai.serving import RequestLimits

# Far above any prompt max_model_len admits (a few bytes a token), far below what stalls the tokenizer.
DEFAULT_MAX_REQUEST_BYTES = 4 * 1024 * 1024

_log = logging.getLogger("minipaged.entrypoints.openai")


def add_serve_parser(subparsers: Any) -> argparse.ArgumentParser:
    """Register the ``serve`` sub-command on ``subparsers`` (from ``ArgumentParser.add_subparsers``)."""
    p = subparsers.add_parser(
        "serve", help="serve an OpenAI-compatible HTTP API (/v1/completions, /v1/chat/completions)"
    )
    p.add_argument("--served-model-name", default=None, help="name clients send as 'model' (default: the model's)")
    p.add_argument("--host", default="127.0.0.1", help="interface to listen on (default: loopback only)")
    p.add_argument("--port", type=int, default=8000, help="TCP port to listen on (default: %(default)s)")
    p.add_argument("--api-key", default=None, help="require 'Authorization: Bearer KEY' on /v1 routes")
    p.add_argument(
        "--log-level",
        default="info",
        choices=("critical", "error", "warning", "info", "debug"),
        help="(default: %(default)s)",
    )
    limits = RequestLimits()
    p.add_argument(
        "--max-n", type=int, default=limits.max_n, metavar="N", help="most samples per prompt (default: %(default)s)"
    )
    p.add_argument(
        "--max-prompts-per-request",
        type=int,
        default=limits.max_prompts,
        metavar="N",
        help="most prompts in one /v1/completions body (default: %(default)s)",
    )
    p.add_argument(
        "--max-request-bytes",
        type=int,
        default=DEFAULT_MAX_REQUEST_BYTES,
        metavar="BYTES",
        help="largest request body; larger ones get 413 (default: %(default)s)",
    )
    add_engine_arguments(p)
    p.set_defaults(run=run_serve)
    return p


def run_serve(args: argparse.Namespace) -> int:
    """Load the model, then serve until interrupted; returns the exit status.

    A bad engine option or model path raises the engine's typed error before anything listens
    (``python -m minipaged`` turns it into a one-line message and exit status 2). If the engine
    dies while serving, the server answers what is in flight and exits with status 1, so that a
    supervisor restarts it.
    """
    import uvicorn

    from minipaged.engine.async_llm import AsyncLLM
    from minipaged.entrypoints.openai.app import build_app

    logging.basicConfig(level=args.log_level.upper(), format="%(levelname)s %(name)s: %(message)s")
    engine = AsyncLLM(**engine_kwargs(args))
    config = uvicorn.Config(None, host=args.host, port=args.port, log_level=args.log_level, access_log=False)
    server = uvicorn.Server(config)

    def on_engine_dead() -> None:
        server.should_exit = True

    config.app = build_app(
        engine,
        model_name=args.served_model_name,
        api_key=args.api_key,
        on_engine_dead=on_engine_dead,
        limits=RequestLimits(max_n=args.max_n, max_prompts=args.max_prompts_per_request),
        max_request_bytes=args.max_request_bytes,
    )
    _log.info(
        "serving %s on http://%s:%d (max_model_len=%d)",
        args.served_model_name or engine.model_name,
        args.host,
        args.port,
        engine.config.max_model_len,
    )
    server.run()
    if not engine.is_running:
        _log.error("exiting with status 1: the engine stopped")
        return 1
    return 0
