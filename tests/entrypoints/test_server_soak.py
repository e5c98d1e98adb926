"""A soak of the OpenAI-compatible server: hundreds of requests at once, some abandoned, nothing kept.

Mixed ``n``, stop strings, streamed and not, chat and completions, structured outputs (JSON
schema, regex, choice); about a third of the clients hang up mid-request. After each batch the
server must be back where it was: no open stream, no extra asyncio task, every KV block free,
every engine table (request queues, detokeniser states, grammar matchers) empty, and the C heap
no larger than a bound that a leak of a few KB per request exceeds.

The server runs the model on the plain ``F.linear`` path (``packed_gemm_disabled``): oneDNN's
packed GEMM keeps a primitive cache (up to 1024 primitives, one per row count and weight shape)
and a scratchpad that grows to the largest product seen, together hundreds of MB that fill over
thousands of requests before levelling off. Bounded, but they would hide a per-request leak of
the serving path, which is what this module looks for. No timed assertions: waits only guard
against a hang.
"""

from __future__ import annotations

import asyncio
import json
import random
import socket
import sys
import time
from pathlib import Path

import pytest

pytest.importorskip("fastapi")
httpx = pytest.importorskip("httpx")

from tiny_models import SMOL_DIR, make_tiny_model_dir  # noqa: E402

from minipaged.entrypoints.openai.launch import ServerProcess, free_port  # noqa: E402

NUM_KV_BLOCKS = 64
TRACE_STEPS = 50  # the server's trace bound, reached during warm-up
PROMPTS = ["The capital of France is", "Once upon a time", "def fibonacci(n):", "1, 2, 3, 4,", "Hello"]
SCHEMA = {
    "type": "object",
    "properties": {"a": {"type": "integer"}, "b": {"enum": ["x", "y"]}},
    "required": ["a", "b"],
    "additionalProperties": False,
}
# The server, with every linear layer on PyTorch's plain path (see the module docstring).
PLAIN_GEMM_SERVE = (
    "import sys\n"
    "from minipaged.entrypoints.cli import main\n"
    "from minipaged.models.linear import packed_gemm_disabled\n"
    "with packed_gemm_disabled():\n"
    "    sys.exit(main(sys.argv[1:]))\n"
)
WARM_UP_REQUESTS = 150  # per warm-up batch (two of them)
SOAK_REQUESTS = 100  # per measured batch
MEASURED_BATCHES = 3
# C heap growth allowed per measured batch, judged on the median batch: a leak grows the heap in
# every batch, while a one-off (a table resizing, an allocator's new block) lands in one only.
# Once warm, a batch of this soak grows the heap by well under 1 KB a request (bounded caches
# still filling); a leak of 3 KB a request fails.
HEAP_BOUND_PER_REQUEST = 3_000


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    if not (SMOL_DIR / "tokenizer.json").exists():
        pytest.skip("SmolLM2 tokenizer not prepared (make setup)")
    model = make_tiny_model_dir(tmp_path_factory.mktemp("tiny-llama"), 2048)
    port = free_port()
    cmd = [sys.executable, "-c", PLAIN_GEMM_SERVE, "serve", "--host", "127.0.0.1", "--port", str(port)]
    cmd += ["--model", str(model), "--served-model-name", "tiny", "--log-level", "warning"]
    cmd += ["--num-kv-blocks", str(NUM_KV_BLOCKS), "--block-size", "16", "--max-num-seqs", "32"]
    cmd += ["--max-trace-steps", str(TRACE_STEPS)]
    log = tmp_path_factory.mktemp("server-log") / "server.log"
    root = str(Path(__file__).resolve().parents[2])
    with ServerProcess(cmd, f"http://127.0.0.1:{port}", log_path=log, cwd=root) as proc:
        yield proc


def scrape(server) -> dict[str, float]:
    from minipaged.benchmarks.serve import parse_prometheus

    return parse_prometheus(httpx.get(server.base_url + "/metrics").text)


def tables(m: dict[str, float]) -> dict[str, float]:
    prefix = 'minipaged_engine_table_entries{table="'
    return {k[len(prefix) : -2]: v for k, v in m.items() if k.startswith(prefix)}


def settled(server, idle_tasks: int | None, limit_s: float = 120.0) -> dict[str, float]:
    """Metrics once no request runs, no stream is open and (if given) the loop is back to ``idle_tasks``."""
    deadline = time.monotonic() + limit_s
    while True:
        m = scrape(server)
        quiet = m["minipaged_num_requests_running"] == 0 and m["minipaged_num_requests_waiting"] == 0
        quiet = quiet and m["minipaged_open_streams"] == 0 and tables(m)["request_queues"] == 0
        if quiet and (idle_tasks is None or m["minipaged_asyncio_tasks"] <= idle_tasks):
            return m
        assert time.monotonic() < deadline, f"server did not settle: {m}"
        time.sleep(0.1)


def rss_bytes(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise AssertionError("no VmRSS")


def soak_body(rng: random.Random, i: int) -> tuple[str, dict]:
    body = {
        "model": "tiny",
        "max_tokens": rng.randint(1, 24),
        "n": rng.choice([1, 1, 2, 3]),
        "temperature": rng.choice([0.0, 0.8]),
        "seed": i,
        "stop": rng.choice([None, [" the"], ["e", "\n"]]),
        "stream": rng.random() < 0.6,
    }
    kind = rng.random()
    if kind < 0.15:
        body["response_format"] = {"type": "json_schema", "json_schema": {"name": "s", "schema": SCHEMA}}
    elif kind < 0.25:
        body["structured_outputs"] = {"regex": "[a-z]{1,8}( [a-z]{1,8})*"}
    elif kind < 0.3:
        body["structured_outputs"] = {"choice": ["yes", "no", "maybe"]}
    prompt = f"{PROMPTS[i % len(PROMPTS)]} {i}"
    if rng.random() < 0.3:
        body["messages"] = [{"role": "user", "content": prompt}]
        return "/v1/chat/completions", body
    body["prompt"] = prompt
    return "/v1/completions", body


def check_answer(body: dict, answer: dict) -> None:
    assert len(answer["choices"]) == body["n"]
    for choice in answer["choices"]:
        text = choice["text"] if "text" in choice else choice["message"]["content"]
        complete = choice["finish_reason"] == "stop" and choice["stop_reason"] is None  # not cut by a stop string
        if "response_format" in body and complete:
            jsonschema = pytest.importorskip("jsonschema")
            jsonschema.validate(json.loads(text), SCHEMA)
        if "choice" in body.get("structured_outputs", {}) and complete:
            assert text in ("yes", "no", "maybe")


async def soak_one(http: httpx.AsyncClient, rng: random.Random, i: int) -> None:
    path, body = soak_body(rng, i)
    hang_up = rng.random() < 0.3
    if body["stream"]:
        async with http.stream("POST", path, json=body) as r:
            assert r.status_code == 200, await r.aread()
            async for line in r.aiter_lines():
                if hang_up and line.startswith("data: {"):
                    return
        return
    task = asyncio.ensure_future(http.post(path, json=body))
    if hang_up:
        await asyncio.sleep(rng.random() * 0.2)
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
        return
    r = await task
    assert r.status_code == 200, r.text
    check_answer(body, r.json())


def soak(server, count: int, seed: int) -> None:
    async def run() -> None:
        rng = random.Random(seed)
        limits = httpx.Limits(max_connections=256)
        async with httpx.AsyncClient(base_url=server.base_url, limits=limits, timeout=300) as http:
            await asyncio.gather(*(soak_one(http, rng, i) for i in range(count)))

    asyncio.run(run())


def test_soak_at_rate_inf_with_disconnects_leaks_nothing(server, capsys):
    idle = settled(server, None)
    assert tables(idle)["grammar_matchers"] == 0
    if "minipaged_heap_in_use_bytes" not in idle:
        pytest.skip("the C heap is not glibc's: no allocator counters to check")
    soak(server, WARM_UP_REQUESTS, 0)  # warm-up: grammars compiled, the trace at its bound, lazy buffers made
    # The engine's loop task starts with the first request the server ever gets, and then stays.
    warm = settled(server, idle["minipaged_asyncio_tasks"] + 1)
    soak(server, WARM_UP_REQUESTS, 1)
    warm = settled(server, warm["minipaged_asyncio_tasks"])
    warm_rss = rss_bytes(server.pid)
    heaps = [warm["minipaged_heap_in_use_bytes"]]
    for seed in range(2, 2 + MEASURED_BATCHES):
        soak(server, SOAK_REQUESTS, seed)
        # Every stream closed and every per-request task (pumps, disconnect watchers, engine
        # iterators) ended: the loop holds exactly the tasks it held before.
        after = settled(server, warm["minipaged_asyncio_tasks"])
        assert after["minipaged_asyncio_tasks"] == warm["minipaged_asyncio_tasks"]
        assert after["minipaged_kv_blocks_used"] == 0 and after["minipaged_kv_blocks_free"] == NUM_KV_BLOCKS
        t = tables(after)
        assert t["request_queues"] == t["output_states"] == t["grammar_matchers"] == 0, t
        assert t["cached_grammars"] == 3  # one per distinct constraint of the soak
        assert t["trace_steps"] <= 2 * TRACE_STEPS
        heaps.append(after["minipaged_heap_in_use_bytes"])
    assert after.get('minipaged_request_errors_total{status="500"}', 0) == 0
    growths = sorted(b - a for a, b in zip(heaps, heaps[1:]))
    median = growths[len(growths) // 2]
    end_rss = rss_bytes(server.pid)
    with capsys.disabled():
        print(
            f"\nsoak: {MEASURED_BATCHES} batches of {SOAK_REQUESTS} requests after {2 * WARM_UP_REQUESTS} to warm up: "
            f"C heap {heaps[0] / 2**20:.2f} -> {heaps[-1] / 2**20:.2f} MiB, median batch "
            f"{median / SOAK_REQUESTS:.0f} B/request; RSS {warm_rss / 2**20:.0f} -> {end_rss / 2**20:.0f} MiB"
        )
    assert median < HEAP_BOUND_PER_REQUEST * SOAK_REQUESTS, f"C heap growth per batch of {SOAK_REQUESTS}: {growths}"
    ok = httpx.post(server.base_url + "/v1/completions", json={"model": "tiny", "prompt": "Hello", "max_tokens": 2})
    assert ok.status_code == 200, ok.text


def _get_health(sock: socket.socket) -> bytes:
    sock.sendall(b"GET /health HTTP/1.1\r\nHost: test\r\n\r\n")
    return sock.recv(4096)


def test_idle_keep_alive_connection_outlives_client_pool_expiry(server):
    """A client pool drops an idle connection after its expiry (httpx: 5 s); the server must not close it
    first, or a request sent in the same instant reads a closed connection (httpx ``ReadError``)."""
    expiry = httpx.Limits(max_connections=1).keepalive_expiry
    with socket.create_connection(("127.0.0.1", int(server.base_url.rsplit(":", 1)[1])), timeout=30) as sock:
        assert _get_health(sock).startswith(b"HTTP/1.1 200")
        time.sleep(expiry + 1.0)  # idle past the client's expiry: the client, not the server, closes first
        assert _get_health(sock).startswith(b"HTTP/1.1 200")
