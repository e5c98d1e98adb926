"""``python -m minipaged serve``: argument parsing and the uvicorn launch."""

from __future__ import annotations

import argparse
import asyncio
import logging
import socket
from typing import Any

from minipaged.entrypoints.engine_args import add_engine_arguments, engine_kwargs
from minipaged.entrypoints.openai.serving import RequestLimits

# Far above any prompt max_model_len admits (a few bytes a token), far below what stalls the tokenizer.
DEFAULT_MAX_REQUEST_BYTES = 4 * 1024 * 1024

# How long an idle keep-alive connection stays open. It must outlast the idle expiry of client
# pools (httpx's, which the openai client uses: 5 s), so the client always drops an idle connection
# first: were the two equal (uvicorn's own default is 5 s), a client could send its next request in
# the instant the server closes the connection, and read an error instead of an answer.
DEFAULT_KEEP_ALIVE_S = 30.0

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
        "--shutdown-timeout",
        type=float,
        default=30.0,
        metavar="SECONDS",
        help="on SIGTERM / Ctrl+C, requests in flight get this long to finish, then are aborted "
        "(finish_reason 'abort'); a second signal aborts them at once (default: %(default)s)",
    )
    p.add_argument(
        "--max-request-bytes",
        type=int,
        default=DEFAULT_MAX_REQUEST_BYTES,
        metavar="BYTES",
        help="largest request body; larger ones get 413 (default: %(default)s)",
    )
    p.add_argument(
        "--timeout-keep-alive",
        type=float,
        default=DEFAULT_KEEP_ALIVE_S,
        metavar="SECONDS",
        help="close a keep-alive connection idle this long; keep it above your clients' pool expiry "
        "(httpx and the openai client: 5 s) (default: %(default)s)",
    )
    add_engine_arguments(p)
    p.set_defaults(run=run_serve)
    return p


# After the shutdown timeout's abort, how long the aborted requests get to send their last chunk.
_ABORT_GRACE_S = 5.0


def _bind(host: str, port: int) -> socket.socket:
    """A listening-ready TCP socket on ``host:port`` (``OSError`` when the port is taken)."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError:
        sock.close()
        raise
    sock.set_inheritable(True)
    return sock


def _draining_server_class() -> type:
    import uvicorn  # imported when serving starts: ``minipaged --help`` stays light

    class DrainingServer(uvicorn.Server):
        """uvicorn's server, whose shutdown is bounded: requests still running ``shutdown_timeout``
        seconds after the first signal, or at a second one, are aborted so they end with a clear
        ``finish_reason: "abort"`` instead of a cut connection."""

        def __init__(self, config: Any, *, engine: Any, shutdown_timeout: float) -> None:
            super().__init__(config)
            self.engine = engine
            self.shutdown_timeout = shutdown_timeout
            self.loop: asyncio.AbstractEventLoop | None = None
            self.draining = False

        async def startup(self, sockets: Any = None) -> None:
            self.loop = asyncio.get_running_loop()
            await super().startup(sockets=sockets)

        def handle_exit(self, sig: int, frame: Any) -> None:
            if self.loop is None or not self.draining:  # the first signal: uvicorn stops accepting, drains
                super().handle_exit(sig, frame)
            if self.loop is None:
                return
            if not self.draining:
                self.draining = True
                _log.info("shutting down: requests in flight get %.0f s to finish", self.shutdown_timeout)
                self.loop.call_soon_threadsafe(self.loop.call_later, self.shutdown_timeout, self._abort, "timeout")
            else:
                # Not uvicorn's force exit, which cuts connections mid-stream: abort, so that every
                # request still sends its last chunk, and the drain ends at once.
                self.loop.call_soon_threadsafe(self._abort, "second signal")

        def _abort(self, why: str) -> None:
            if self.engine.stats().num_running or self.engine.stats().num_waiting:
                _log.warning("shutdown %s: aborting the requests still in flight", why)
            self.engine.abort_all()

    return DrainingServer


# A server runs for days: its step trace keeps the newest steps only. Nothing in the server reads
# the trace, and each record holds the ids its step scheduled (a few KB at a full batch), so a
# long trace is memory that grows for hours before the bound levels it off.
SERVE_TRACE_STEPS = 1_000


def run_serve(args: argparse.Namespace) -> int:
    """Load the model, then serve until interrupted; returns the exit status.

    A bad engine option or model path raises the engine's typed error before anything listens
    (``python -m minipaged`` turns it into a one-line message and exit status 2). If the engine
    dies while serving, the server answers what is in flight and exits with status 1, so that a
    supervisor restarts it.

    Memory: on CPU the resident size grows over the first thousands of requests and then levels
    off. That is oneDNN, which the packed linear layers run on: it caches one primitive per row
    count and weight shape (``ONEDNN_PRIMITIVE_CACHE_CAPACITY``, default 1024) and keeps a
    scratchpad as large as the largest product seen. A smaller capacity lowers the plateau at the
    cost of rebuilding primitives for batch sizes it no longer holds. The serving path itself
    keeps nothing per request (``tests/entrypoints/test_server_soak.py`` checks it).
    """
    import uvicorn

    from minipaged.distributed import torchrun_rank
    from minipaged.engine.async_llm import AsyncLLM
    from minipaged.entrypoints.openai.app import build_app

    logging.basicConfig(level=args.log_level.upper(), format="%(levelname)s %(name)s: %(message)s")
    if getattr(args, "max_trace_steps", None) is None:
        args.max_trace_steps = SERVE_TRACE_STEPS
    launched = torchrun_rank()
    if launched is not None and launched[0] != 0:
        # Under torchrun only rank 0 listens; on every other rank building the engine runs this rank's
        # part of it until rank 0 shuts down, then ends the process.
        AsyncLLM(**engine_kwargs(args))
        return 0
    try:  # before the model loads: a port in use is reported in a second, not after a minute
        sock = _bind(args.host, args.port)
    except OSError as err:
        print(f"minipaged: error: argument --port: cannot listen on {args.host}:{args.port}: {err.strerror}")
        return 2
    engine = AsyncLLM(**engine_kwargs(args))
    config = uvicorn.Config(
        None,
        host=args.host,
        port=args.port,
        log_level=args.log_level,
        access_log=False,
        timeout_keep_alive=args.timeout_keep_alive,
        # uvicorn's own bound, a backstop: by then our abort has ended every request.
        timeout_graceful_shutdown=args.shutdown_timeout + _ABORT_GRACE_S,
    )
    server = _draining_server_class()(config, engine=engine, shutdown_timeout=args.shutdown_timeout)

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
    with sock:
        server.run(sockets=[sock])
    if not engine.is_running:
        _log.error("exiting with status 1: the engine stopped")
        return 1
    return 0
