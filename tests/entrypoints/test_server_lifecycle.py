"""The server process's life: start-up checks, a dying engine, and shutdown on signals.

Each test starts its own ``python -m minipaged serve`` (a tiny random-weight Llama with SmolLM2's
tokenizer) because each ends it. No timed assertions: waits have generous limits and only guard
against a hang.
"""

from __future__ import annotations

import json
import os
import signal
import threading
import time
from pathlib import Path

import pytest

pytest.importorskip("fastapi")
httpx = pytest.importorskip("httpx")

from tiny_models import SMOL_DIR, make_tiny_model_dir  # noqa: E402

from minipaged.entrypoints.openai.launch import ServerProcess, free_port, minipaged_command  # noqa: E402

ROOT = str(Path(__file__).resolve().parents[2])
HANG_GUARD_S = 120.0


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> Path:
    if not (SMOL_DIR / "tokenizer.json").exists():
        pytest.skip("SmolLM2 tokenizer not prepared (make setup)")
    return make_tiny_model_dir(tmp_path_factory.mktemp("tiny-llama"), 2048)


def start(model_dir: Path, tmp_path: Path, *extra: str) -> ServerProcess:
    port = free_port()
    cmd = minipaged_command(port, "--model", str(model_dir), "--num-kv-blocks", "64", *extra)
    return ServerProcess(cmd, f"http://127.0.0.1:{port}", log_path=tmp_path / "server.log", cwd=ROOT).start()


def wait_exit(proc: ServerProcess) -> int:
    try:
        return proc.proc.wait(HANG_GUARD_S)
    finally:
        proc.stop()


def generated_tokens(base_url: str) -> float:
    from minipaged.benchmarks.serve import parse_prometheus

    return parse_prometheus(httpx.get(base_url + "/metrics").text)["minipaged_generation_tokens_total"]


def wait_generating(base_url: str) -> None:
    deadline = time.monotonic() + HANG_GUARD_S
    while generated_tokens(base_url) == 0:
        assert time.monotonic() < deadline, "no token generated"
        time.sleep(0.05)


def spawned_ranks(pid: int) -> list[int]:
    """Children of ``pid`` started by multiprocessing's spawn (not its resource tracker)."""
    found = []
    for proc in Path("/proc").iterdir():
        try:
            ppid = int((proc / "stat").read_text().rsplit(")", 1)[1].split()[1])
            args = (proc / "cmdline").read_bytes()
        except (OSError, ValueError, IndexError):
            continue
        if ppid == pid and b"spawn_main" in args:
            found.append(int(proc.name))
    return found


def test_dead_tensor_parallel_rank_answers_in_flight_then_exits_nonzero(model_dir, tmp_path):
    server = start(model_dir, tmp_path, "--tensor-parallel-size", "2")
    try:
        url = server.base_url + "/v1/completions"
        body = {"prompt": "Long story:", "max_tokens": 900, "ignore_eos": True}
        answers: dict[str, httpx.Response] = {}
        in_flight = threading.Thread(target=lambda: answers.setdefault("r", httpx.post(url, json=body, timeout=300)))
        in_flight.start()
        wait_generating(server.base_url)
        (rank,) = spawned_ranks(server.pid)
        os.kill(rank, signal.SIGKILL)
        in_flight.join(HANG_GUARD_S)
        r = answers["r"]
        assert 500 <= r.status_code < 600, r.text
        err = r.json()["error"]
        assert err["code"] == r.status_code and "Traceback" not in err["message"], err
        status = wait_exit(server)
        assert status != 0, server.log_tail()
    finally:
        server.stop()


def _stream_lines(url: str, body: dict, lines: list[str]) -> None:
    with httpx.stream("POST", url, json=body, timeout=300) as r:
        lines.extend(line for line in r.iter_lines() if line)


@pytest.mark.parametrize("signals", [1, 2], ids=["sigterm-then-timeout", "second-signal"])
def test_shutdown_is_bounded_and_ends_streams_with_abort(model_dir, tmp_path, signals):
    timeout = "1" if signals == 1 else "600"  # with two signals the second one must end it, not the timeout
    server = start(model_dir, tmp_path, "--shutdown-timeout", timeout)
    try:
        lines: list[str] = []
        body = {"prompt": "Long story:", "max_tokens": 1000, "ignore_eos": True, "stream": True}
        reader = threading.Thread(target=_stream_lines, args=(server.base_url + "/v1/completions", body, lines))
        reader.start()
        wait_generating(server.base_url)
        os.kill(server.pid, signal.SIGTERM)
        if signals == 2:
            time.sleep(0.5)
            os.kill(server.pid, signal.SIGINT)
        reader.join(HANG_GUARD_S)
        assert lines[-1] == "data: [DONE]", lines[-3:]
        last = json.loads([x for x in lines if x.startswith("data: {")][-1][len("data: ") :])
        assert last["choices"][0]["finish_reason"] == "abort"
        # uvicorn re-raises the signal it caught once it has shut down: death by SIGTERM is a clean exit.
        assert wait_exit(server) in (0, -signal.SIGTERM, -signal.SIGINT, 130)
        log = server.log_tail(20000)
        assert "Traceback" not in log and "was destroyed" not in log and "CancelledError" not in log, log
    finally:
        server.stop()


def test_port_in_use_is_reported_before_the_model_loads(model_dir, tmp_path):
    import socket
    import subprocess
    import sys

    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        cmd = minipaged_command(port, "--model", str(tmp_path / "no-such-model"))  # never loaded
        done = subprocess.run(
            cmd, capture_output=True, text=True, timeout=HANG_GUARD_S, cwd=ROOT, executable=sys.executable
        )
    out = done.stdout + done.stderr
    assert done.returncode == 2 and "--port" in out and str(port) in out, out
    assert "serving" not in out


def test_tensor_parallel_script_without_main_guard_gets_a_hint(model_dir, tmp_path):
    import subprocess
    import sys

    script = tmp_path / "no_guard.py"
    script.write_text(f"from minipaged import LLM\nLLM({str(model_dir)!r}, num_kv_blocks=16, tensor_parallel_size=2)\n")
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([ROOT, ROOT + "/kernels", os.environ.get("PYTHONPATH", "")]))
    done = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=HANG_GUARD_S, env=env)
    assert done.returncode != 0
    assert 'if __name__ == "__main__":' in done.stderr, done.stderr[-3000:]
