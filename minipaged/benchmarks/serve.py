"""Serving benchmark: Poisson arrivals at a request rate, streamed over HTTP, latencies seen by the client.

    python -m minipaged bench serve --servers minipaged hf hf-cb --request-rate 1 4 inf

For each server (minipaged's, Hugging Face ``transformers serve`` with and without
``--continuous-batching``, or any OpenAI-compatible ``--base-url``) and each rate, it sends
the same requests (prompts from a JSONL file of ``{"prompt": ...}`` or a synthetic
ShareGPT-like length mix) to ``/v1/completions`` with ``stream=true``, and reports
successful / failed requests, duration, request and token throughput, TTFT, TPOT (time per
output token after the first), inter-token latency and end-to-end latency (mean, median,
P99) and the launched server's peak RSS. It prints a table and writes JSON (``--out``). The engine
options (``EngineConfig``'s) go to the launched minipaged server.

Only standard OpenAI fields go to peers (``transformers serve`` answers 422 to others, even
``stream_options``); output tokens are then counted by re-tokenising the streamed text.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import os
import random
import signal
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any

import numpy as np

from minipaged.benchmarks.common import machine_info, plain_doc, write_json_atomic
from minipaged.entrypoints.engine_args import add_engine_arguments, engine_argv, engine_kwargs
from minipaged.entrypoints.openai.launch import ServerProcess, free_port, minipaged_command

DEFAULT_PROMPTS = "serve_prompts.jsonl"  # in minipaged/data


# ---- workload ----------------------------------------------------------------------------
@dataclass(frozen=True)
class BenchRequest:
    """One request of the workload: its prompt text and ``max_tokens``."""

    prompt: str
    max_tokens: int


def load_jsonl_prompts(path: str | Path | None = None) -> list[str]:
    """Prompts of a JSONL file of ``{"prompt": ...}`` lines (default: the set shipped in minipaged/data)."""
    if path is None:
        text = resources.files("minipaged.data").joinpath(DEFAULT_PROMPTS).read_text()
    else:
        text = Path(path).read_text()
    return [json.loads(line)["prompt"] for line in text.splitlines() if line.strip()]


_WORDS = (
    "the of and to in is that for it as was with be by on not he this are or his from at which but have an "
    "they you were her she there been one all we their has would when if so what can more about time memory "
    "cache block paged attention request server token model batch kernel queue latency throughput"
).split()


def synthetic_requests(
    num: int, seed: int, *, mean_input_words: int = 60, mean_output: int = 64, max_output: int = 256
) -> list[BenchRequest]:
    """A ShareGPT-like mix: log-normal prompt and output lengths (long tails), random words as text."""
    rng = np.random.default_rng(seed)
    inputs = np.clip(rng.lognormal(math.log(mean_input_words) - 0.5, 1.0, num), 4, 1000).astype(int)
    outputs = np.clip(rng.lognormal(math.log(mean_output) - 0.5, 1.0, num), 4, max_output).astype(int)
    words = rng.choice(len(_WORDS), size=int(inputs.sum()))
    out, pos = [], 0
    for n_in, n_out in zip(inputs, outputs):
        out.append(BenchRequest(" ".join(_WORDS[w] for w in words[pos : pos + n_in]), int(n_out)))
        pos += n_in
    return out


def as_chat_prompts(prompts: Sequence[str], tokenizer: Any) -> list[str]:
    """Each prompt as one user turn through the model's chat template, as text for /v1/completions.

    An instruct model given a bare question in completion mode often ends it at once (SmolLM2 emits
    EOS first for most of the shipped prompts), which would measure nothing but prefill.
    """
    return [
        tokenizer.apply_chat_template([{"role": "user", "content": p}], tokenize=False, add_generation_prompt=True)
        for p in prompts
    ]


def build_requests(args: argparse.Namespace, tokenizer: Any) -> list[BenchRequest]:
    """``--num-prompts`` requests of ``--dataset`` (synthetic lengths, or JSONL prompts shuffled with
    ``--seed`` and, unless ``--raw-prompts``, put through ``tokenizer``'s chat template)."""
    if args.dataset == "synthetic":
        return synthetic_requests(args.num_prompts, args.seed, max_output=args.max_tokens)
    prompts = load_jsonl_prompts(None if args.dataset == "default" else args.dataset)
    rng = random.Random(args.seed)
    chosen = [prompts[i % len(prompts)] for i in range(args.num_prompts)]
    rng.shuffle(chosen)
    if not args.raw_prompts:
        chosen = as_chat_prompts(chosen, tokenizer)
    return [BenchRequest(p, args.max_tokens) for p in chosen]


def arrival_offsets(num: int, rate: float, seed: int) -> list[float]:
    """Send times (s from the start) of a Poisson process at ``rate`` requests/s; all zero for ``inf``."""
    if math.isinf(rate):
        return [0.0] * num
    gaps = np.random.default_rng(seed).exponential(1.0 / rate, num)
    return list(np.cumsum(gaps) - gaps[0])


# ---- client ---------------------------------------------------------------------------------
@dataclass
class RequestResult:
    """What the client saw of one streamed request: success, token counts, text, time to first token,
    end-to-end time and each content chunk's arrival (seconds after sending)."""

    ok: bool
    prompt_tokens: int | None = None
    output_tokens: int = 0
    text: str = ""
    ttft: float | None = None
    e2e: float | None = None
    chunk_times: list[float] = field(default_factory=list)  # arrival of each content chunk, s after sending
    error: str | None = None


async def send_one(
    http: Any, url: str, model: str | None, req: BenchRequest, *, usage: bool, extra: dict[str, Any]
) -> RequestResult:
    """Stream one greedy completion and time every content chunk from the moment it is sent."""
    body: dict[str, Any] = {
        "prompt": req.prompt,
        "max_tokens": req.max_tokens,
        "temperature": 0.0,
        "stream": True,
        **extra,
    }
    if model is not None:
        body["model"] = model
    if usage:
        body["stream_options"] = {"include_usage": True}
    res = RequestResult(ok=False)
    start = time.perf_counter()
    try:
        async with http.stream("POST", url, json=body) as r:
            if r.status_code != 200:
                res.error = f"HTTP {r.status_code}: {(await r.aread())[:300]!r}"
                return res
            async for line in r.aiter_lines():
                if not line.startswith("data:"):
                    continue
                data = line[len("data:") :].strip()
                if data == "[DONE]":
                    break
                event = json.loads(data)
                if "error" in event:
                    res.error = str(event["error"])[:300]
                    return res
                if event.get("usage"):
                    res.prompt_tokens = event["usage"]["prompt_tokens"]
                    res.output_tokens = event["usage"]["completion_tokens"]
                for choice in event.get("choices", []):
                    if choice.get("text"):
                        now = time.perf_counter() - start
                        res.ttft = now if res.ttft is None else res.ttft
                        res.chunk_times.append(now)
                        res.text += choice["text"]
        res.e2e = time.perf_counter() - start
        res.ok = True
    except Exception as exc:  # noqa: BLE001 -- a failed request is counted, not fatal
        res.error = f"{type(exc).__name__}: {exc}"
    return res


async def run_load(
    base_url: str,
    requests: Sequence[BenchRequest],
    rate: float,
    *,
    seed: int,
    model: str | None,
    usage: bool,
    extra: dict[str, Any] | None = None,
    on_tick: Callable[[float], Any] | None = None,
) -> tuple[list[RequestResult], float]:
    """Send ``requests`` at Poisson ``rate``; returns the results (input order) and the wall duration.

    ``on_tick(elapsed)`` is awaited about every 0.25 s while the run lasts (the notebook polls /metrics with it).
    """
    import httpx

    offsets = arrival_offsets(len(requests), rate, seed)
    limits = httpx.Limits(max_connections=len(requests) + 8, max_keepalive_connections=len(requests) + 8)
    async with httpx.AsyncClient(base_url=base_url, limits=limits, timeout=httpx.Timeout(3600.0)) as http:
        start = time.perf_counter()

        async def delayed(req: BenchRequest, at: float) -> RequestResult:
            await asyncio.sleep(max(0.0, at - (time.perf_counter() - start)))
            return await send_one(http, "/v1/completions", model, req, usage=usage, extra=extra or {})

        tasks = [asyncio.ensure_future(delayed(r, t)) for r, t in zip(requests, offsets)]
        while on_tick is not None and not all(t.done() for t in tasks):
            await on_tick(time.perf_counter() - start)
            await asyncio.wait(tasks, timeout=0.25)
        results = await asyncio.gather(*tasks)
        return list(results), time.perf_counter() - start


# ---- summary --------------------------------------------------------------------------------
def _stats(values: Sequence[float]) -> dict[str, float | None]:
    if not values:
        return {"mean": None, "median": None, "p99": None}
    arr = np.asarray(values, dtype=float) * 1000.0  # milliseconds
    return {"mean": float(arr.mean()), "median": float(np.median(arr)), "p99": float(np.percentile(arr, 99))}


def summarize(
    results: Sequence[RequestResult], duration: float, count_tokens: Callable[[str], int], prompt_tokens: Sequence[int]
) -> dict[str, Any]:
    """Throughput and latency statistics (ms) of one run; tokens counted by the server's usage when given."""
    ok = [r for r in results if r.ok]
    for r, n_prompt in zip(results, prompt_tokens):
        if r.ok and r.prompt_tokens is None:
            r.prompt_tokens, r.output_tokens = n_prompt, count_tokens(r.text)
    out_tokens = sum(r.output_tokens for r in ok)
    in_tokens = sum(r.prompt_tokens for r in ok)
    tpot = [(r.e2e - r.ttft) / (r.output_tokens - 1) for r in ok if r.ttft is not None and r.output_tokens > 1]
    itl = [b - a for r in ok for a, b in zip(r.chunk_times, r.chunk_times[1:])]
    normalized = [r.e2e / r.output_tokens for r in ok if r.output_tokens > 0]
    return {
        "successful": len(ok),
        "failed": len(results) - len(ok),
        "errors": sorted({r.error for r in results if r.error})[:5],
        "duration_s": duration,
        "prompt_tokens": in_tokens,
        "output_tokens": out_tokens,
        "request_throughput": len(ok) / duration,
        "output_throughput": out_tokens / duration,
        "total_token_throughput": (in_tokens + out_tokens) / duration,
        "ttft_ms": _stats([r.ttft for r in ok if r.ttft is not None]),
        "tpot_ms": _stats(tpot),
        "itl_ms": _stats(itl),
        "e2e_ms": _stats([r.e2e for r in ok]),
        "normalized_latency_ms_per_token": _stats(normalized),
        "ttft_all_ms": [r.ttft * 1000.0 for r in ok if r.ttft is not None],
    }


async def sweep(
    base_url: str,
    requests: Sequence[BenchRequest],
    rates: Sequence[float],
    *,
    seed: int,
    model: str | None,
    usage: bool,
    count_tokens: Callable[[str], int],
    prompt_tokens: Sequence[int],
    extra: dict[str, Any] | None = None,
    on_tick: Callable[[float], Any] | None = None,
    label: str = "",
) -> list[dict[str, Any]]:
    """One run per rate, one after the other, against the same server; a summary per run."""
    runs = []
    for rate in rates:
        results, duration = await run_load(
            base_url, requests, rate, seed=seed, model=model, usage=usage, extra=extra, on_tick=on_tick
        )
        summary = summarize(results, duration, count_tokens, prompt_tokens)
        # The machine's 1-minute load average as the run ended: on a shared machine, context for the numbers.
        runs.append({"rate": rate, **summary, "loadavg_1m": os.getloadavg()[0]})
        print(
            f"  {label} rate={rate}: {summary['successful']} ok, {summary['failed']} failed, "
            f"{summary['output_throughput']:.1f} tok/s",
            file=sys.stderr,
            flush=True,
        )
    return runs


def parse_prometheus(text: str) -> dict[str, float]:
    """``{series: value}`` of a Prometheus text exposition (label sets kept in the series name)."""
    values = {}
    for line in text.splitlines():
        if line and not line.startswith("#"):
            name, _, value = line.rpartition(" ")
            values[name] = float(value)
    return values


@dataclass
class MetricsTrace:
    """Snapshots of a minipaged server's /metrics taken during a run (pass ``tick`` as ``on_tick``)."""

    base_url: str
    rows: list[dict[str, float]] = field(default_factory=list)
    start: float = field(default_factory=time.perf_counter)

    FIELDS = {
        "running": "minipaged_num_requests_running",
        "waiting": "minipaged_num_requests_waiting",
        "kv_used": "minipaged_kv_blocks_used",
        "kv_cached": "minipaged_kv_blocks_cached",
        "kv_total": "minipaged_kv_blocks_total",
        "preemptions": "minipaged_num_preemptions_total",
        "generation_tokens": "minipaged_generation_tokens_total",
    }

    async def tick(self, _elapsed: float = 0.0) -> None:
        """Scrape the server's ``/metrics`` once and append a row of the gauges this trace follows."""
        import httpx

        async with httpx.AsyncClient(base_url=self.base_url, timeout=30) as http:
            values = parse_prometheus((await http.get("/metrics")).text)
        row = {"t": time.perf_counter() - self.start}
        row.update({key: values.get(name, float("nan")) for key, name in self.FIELDS.items()})
        self.rows.append(row)


# ---- servers --------------------------------------------------------------------------------
@dataclass
class Target:
    """One server to benchmark: launched here (``command``) or already running (``base_url`` only)."""

    name: str
    base_url: str
    command: list[str] | None = None
    usage: bool = False  # send stream_options.include_usage (minipaged, vLLM; not transformers serve)
    extra: dict[str, Any] = field(default_factory=dict)


def make_targets(args: argparse.Namespace) -> list[Target]:
    """The servers to benchmark: one launch command per ``--servers`` name (minipaged's with the engine
    options), plus ``--base-url`` when given."""
    targets = []
    model = args.model
    for name in args.servers:
        port = free_port()
        url = f"http://127.0.0.1:{port}"
        if name == "minipaged":
            extra_args = (["--model", model] if model else []) + engine_argv(engine_kwargs(args))
            targets.append(Target(name, url, minipaged_command(port, *extra_args, "--log-level", "warning"), True))
        elif name in ("hf", "hf-cb"):
            hf_model = str(hf_model_dir(Path(model) if model else _default_model_dir(), Path(args.log_dir)))
            cmd = [
                *args.hf_command.split(),
                "serve",
                hf_model,
                "--port",
                str(port),
                "--host",
                "127.0.0.1",
                "--device",
                "cpu",
                "--dtype",
                "float32",
            ]
            if name == "hf-cb":
                cmd.append("--continuous-batching")
            cmd += args.hf_args.split()
            targets.append(Target(name, url, cmd, False))
        else:
            raise SystemExit(f"unknown server {name!r}: use minipaged, hf, hf-cb (or --base-url)")
    if args.base_url:
        targets.append(Target(args.base_url_name, args.base_url.rstrip("/"), None, args.base_url_usage))
    return targets


def hf_model_dir(model: Path, scratch: Path) -> Path:
    """``model``, or where its config names no architecture (minipaged's GGUF-converted SmolLM2), a copy
    under ``scratch`` whose config.json does: ``transformers serve`` picks the model class from it.
    The other files are symlinked, not copied."""
    config = json.loads((model / "config.json").read_text())
    if config.get("architectures"):
        return model
    out = scratch / f"{model.name}-for-transformers"
    out.mkdir(parents=True, exist_ok=True)
    for item in model.iterdir():
        link = out / item.name
        if item.name != "config.json" and not link.exists():
            link.symlink_to(item.resolve())
    arch = {"llama": "LlamaForCausalLM"}.get(config.get("model_type"), "AutoModelForCausalLM")
    (out / "config.json").write_text(json.dumps({**config, "architectures": [arch]}, indent=1))
    return out


def _default_model_dir() -> Path:
    from minipaged.models.loader import ensure_default_model

    return ensure_default_model()


def served_model(base_url: str) -> str | None:
    """The first model id the server lists at /v1/models (None when it has no such route)."""
    import httpx

    try:
        data = httpx.get(base_url + "/v1/models", timeout=30).json()["data"]
        return data[0]["id"] if data else None
    except Exception:  # noqa: BLE001 -- a server without /v1/models takes requests without "model"
        return None


def load_tokenizer(model: str | None) -> Any:
    """The tokenizer of ``model`` (default: SmolLM2), for chat templating and counting tokens client-side."""
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(model or str(_default_model_dir()))


def token_counter(tokenizer: Any) -> Callable[[str], int]:
    """A function counting ``tokenizer``'s tokens in a text, special tokens left out."""
    return lambda text: len(tokenizer.encode(text, add_special_tokens=False))


def bench_target(
    target: Target,
    requests: Sequence[BenchRequest],
    rates: Sequence[float],
    args: argparse.Namespace,
    count_tokens: Callable[[str], int],
    prompt_tokens: Sequence[int],
) -> dict[str, Any]:
    """All rates against one server (launched first when it has a command); its peak RSS at the end."""
    server = None
    if target.command is not None:
        log = Path(args.log_dir) / f"{target.name}.log"
        log.parent.mkdir(parents=True, exist_ok=True)
        server = ServerProcess(target.command, target.base_url, log_path=log).start(timeout=args.startup_timeout)
    try:
        model = served_model(target.base_url)
        warm = [BenchRequest(requests[0].prompt, 8)] * args.warmup
        if warm:
            asyncio.run(
                run_load(target.base_url, warm, math.inf, seed=0, model=model, usage=target.usage, extra=target.extra)
            )
        runs = asyncio.run(
            sweep(
                target.base_url,
                requests,
                rates,
                seed=args.seed,
                model=model,
                usage=target.usage,
                extra=target.extra,
                count_tokens=count_tokens,
                prompt_tokens=prompt_tokens,
                label=target.name,
            )
        )
        rss = server.peak_rss_bytes() if server is not None else None
        return {
            "server": target.name,
            "base_url": target.base_url,
            "command": target.command,
            "peak_rss_bytes": rss,
            "runs": runs,
        }
    finally:
        if server is not None:
            server.stop()


def format_table(report: dict[str, Any]) -> str:
    """The report as a Markdown table: a row per server and rate."""
    head = (
        "server",
        "rate",
        "ok",
        "fail",
        "dur s",
        "req/s",
        "out tok/s",
        "TTFT mean/med/p99 ms",
        "TPOT mean/med/p99 ms",
        "ITL mean/med/p99 ms",
        "E2E mean/med/p99 ms",
        "peak RSS GB",
    )
    rows = []

    def trio(s: dict) -> str:
        return "/".join("-" if s[k] is None else f"{s[k]:.0f}" for k in ("mean", "median", "p99"))

    for srv in report["servers"]:
        rss = srv["peak_rss_bytes"]
        for run in srv["runs"]:
            rows.append(
                (
                    srv["server"],
                    str(run["rate"]),
                    str(run["successful"]),
                    str(run["failed"]),
                    f"{run['duration_s']:.1f}",
                    f"{run['request_throughput']:.2f}",
                    f"{run['output_throughput']:.1f}",
                    trio(run["ttft_ms"]),
                    trio(run["tpot_ms"]),
                    trio(run["itl_ms"]),
                    trio(run["e2e_ms"]),
                    "-" if rss is None else f"{rss / 2**30:.2f}",
                )
            )
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    lines += ["| " + " | ".join(r) + " |" for r in rows]
    return "\n".join(lines)


def build_parser() -> argparse.ArgumentParser:
    """The benchmark's options; the engine options are passed to the launched minipaged server."""
    p = argparse.ArgumentParser(
        prog="minipaged bench serve",
        description=plain_doc(__doc__),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--servers", nargs="*", default=["minipaged"], help="launch these: minipaged, hf, hf-cb")
    p.add_argument("--base-url", default=None, help="also benchmark this running OpenAI-compatible server")
    p.add_argument("--base-url-name", default="peer", help="its name in the report")
    p.add_argument("--base-url-usage", action="store_true", help="it accepts stream_options.include_usage")
    p.add_argument("--model", default=None, help="model directory for launched servers (default: SmolLM2-135M)")
    p.add_argument(
        "--hf-command",
        default=f"{sys.executable} -m transformers.cli.transformers",
        help="how to run the 'transformers' CLI (e.g. /work/hf-serve-venv/bin/transformers)",
    )
    p.add_argument(
        "--hf-args", default="", help="extra 'transformers serve' options, one string (e.g. --cb-num-blocks)"
    )
    p.add_argument("--dataset", default="default", help="'default' (shipped JSONL), 'synthetic', or a JSONL path")
    p.add_argument(
        "--raw-prompts",
        action="store_true",
        help="send the JSONL prompts as they are (default: through the model's chat template)",
    )
    p.add_argument("--num-prompts", type=int, default=32)
    p.add_argument("--max-tokens", type=int, default=64, help="max_tokens per request (synthetic: the cap)")
    p.add_argument("--request-rate", nargs="+", type=float, default=[math.inf], help="requests/s; 'inf' = all at once")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--warmup", type=int, default=2, help="requests sent (all at once) before the timed runs")
    p.add_argument("--startup-timeout", type=float, default=600.0)
    p.add_argument("--log-dir", default="bench_serve_logs", help="server logs go here")
    p.add_argument("--out", "--output", dest="output", default="bench_serve.json", help="write the JSON report here")
    # --model and the workload's --seed above are the benchmark's own (--model also picks the peers' model).
    add_engine_arguments(p, exclude=("model", "seed"))
    return p


def main(argv: list[str] | None = None) -> int:
    """Run the benchmark with ``argv`` (default: ``sys.argv``): each server in turn (launched, warmed up,
    swept over the rates, stopped), writing the JSON report after each; print the table. Returns 0."""
    args = build_parser().parse_args(argv)
    # SIGTERM unwinds like Ctrl-C, so the servers launched here are stopped on the way out.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    if args.num_prompts < 1 or args.max_tokens < 1:
        raise SystemExit("--num-prompts and --max-tokens must be >= 1")
    if any(r <= 0 for r in args.request_rate):
        raise SystemExit("--request-rate must be > 0 (or inf)")
    tokenizer = load_tokenizer(args.model)
    requests = build_requests(args, tokenizer)
    count_tokens = token_counter(tokenizer)
    prompt_tokens = [count_tokens(r.prompt) for r in requests]
    report = {"config": vars(args), "machine": machine_info(), "num_requests": len(requests), "servers": []}
    for target in make_targets(args):
        print(f"benchmarking {target.name} ...", file=sys.stderr, flush=True)
        try:
            result = bench_target(target, requests, args.request_rate, args, count_tokens, prompt_tokens)
        except (RuntimeError, TimeoutError, OSError) as exc:  # a server that does not start: report, go on
            result = {
                "server": target.name,
                "command": target.command,
                "error": str(exc)[-2000:],
                "runs": [],
                "peak_rss_bytes": None,
            }
            print(f"  {target.name} failed: {exc}", file=sys.stderr)
        report["servers"].append(result)
        write_json_atomic(args.output, jsonable(report))  # after each server: partial runs survive
    print(format_table(report))
    print(f"wrote {args.output}", file=sys.stderr)
    return 0


def jsonable(value: Any) -> Any:
    """``value`` with infinite floats (the ``inf`` rate) written as the string "inf", which JSON can hold."""
    if isinstance(value, float) and math.isinf(value):
        return "inf"
    if isinstance(value, dict):
        return {k: jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [jsonable(v) for v in value]
    return value


if __name__ == "__main__":
    sys.exit(main())
