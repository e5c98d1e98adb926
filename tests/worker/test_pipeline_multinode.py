"""Two "nodes" on one machine: two ``torchrun --nnodes 2`` commands meeting on 127.0.0.1, one pipeline stage
each (P=2). Node 0's rank 0 owns the engine and serves a request end to end; node 1 only runs its stage.
Then node 1 is killed while node 0's engine waits for work: node 0 must end on its own, saying which rank
it lost, and leave no process behind.

Every process a test starts runs in its own session and is killed, with its whole tree, in a ``finally``.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
from tiny_models import SMOL_DIR, hf_greedy, make_prompts, make_tiny_model_dir, tiny_hf_model

from minipaged import LLM, SamplingParams

SCRIPT = """
import json
from minipaged import LLM, SamplingParams
from minipaged.models import build_model_from_hf
from tiny_models import tiny_hf_model

llm = LLM(build_model_from_hf(tiny_hf_model("llama")), pipeline_parallel_size=2, num_kv_blocks=32, block_size=8)
# Only rank 0 (node 0) gets here: on node 1, LLM(...) served its stage and then ended the process.
outs = llm.generate([{{"prompt_token_ids": p}} for p in {prompts!r}],
                    SamplingParams(temperature=0, max_tokens=5, ignore_eos=True), use_tqdm=False)
print("TOKENS", json.dumps([o.outputs[0].token_ids for o in outs]))
llm.shutdown()
"""


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


IDLE_SCRIPT = """
import time
from minipaged import LLM, SamplingParams
from minipaged.models import build_model_from_hf
from tiny_models import tiny_hf_model

llm = LLM(build_model_from_hf(tiny_hf_model("llama")), pipeline_parallel_size=2, num_kv_blocks=32, block_size=8,
          peer_timeout_s=10)
llm.generate([{"prompt_token_ids": [1, 2, 3, 4]}], SamplingParams(temperature=0, max_tokens=3), use_tqdm=False)
print("SERVED", flush=True)
while True:  # an idle engine: no receive is pending that a dead peer could fail
    time.sleep(0.1)
"""


def _children(pid: int) -> list[int]:
    """Every live descendant of ``pid`` (from /proc)."""
    parents: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat") as f:
                    fields = f.read().rsplit(")", 1)[1].split()
            except OSError:
                continue
            if fields[0] != "Z":
                parents.setdefault(int(fields[1]), []).append(int(entry))
    found, todo = [], [pid]
    while todo:
        kids = parents.get(todo.pop(), [])
        found += kids
        todo += kids
    return found


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def _kill_tree(pids: list[int]) -> None:
    """SIGKILL every process in ``pids`` and the sessions they lead (torchrun starts each rank in its own)."""
    for pid in pids:
        for kill in (os.killpg, os.kill):
            try:
                kill(pid, signal.SIGKILL)
            except (ProcessLookupError, PermissionError):
                pass


def _torchrun(script: Path | list[str], node_rank: int, port: int) -> subprocess.Popen:
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(Path(__file__).resolve().parents[1]), env.get("PYTHONPATH")]))
    env["OMP_NUM_THREADS"] = "1"
    argv = [sys.executable, "-m", "torch.distributed.run", "--nnodes", "2", "--node-rank", str(node_rank)]
    argv += ["--nproc-per-node", "1", "--master-addr", "127.0.0.1", "--master-port", str(port)]
    argv += [str(script)] if isinstance(script, Path) else script
    return subprocess.Popen(
        argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env, start_new_session=True
    )


def test_two_nodes_serve_a_request(tmp_path):
    prompts, _ = make_prompts(seed=9, count=2)
    script = tmp_path / "pp_script.py"
    script.write_text(SCRIPT.format(prompts=prompts))
    port = _free_port()
    nodes = [_torchrun(script, rank, port) for rank in (0, 1)]
    try:
        results = [node.communicate(timeout=300) for node in nodes]
    finally:
        _kill_tree([pid for node in nodes for pid in _children(node.pid)] + [node.pid for node in nodes])
        for node in nodes:
            node.kill()
            node.communicate()
    for node, (_out, err) in zip(nodes, results):
        assert node.returncode == 0, err[-3000:]
    line = next(ln for ln in results[0][0].splitlines() if ln.startswith("TOKENS"))
    hf = tiny_hf_model("llama")
    assert json.loads(line.split(" ", 1)[1]) == [hf_greedy(hf, p, 5) for p in prompts]


def test_a_killed_node_ends_the_other_with_the_lost_rank_named(tmp_path):
    script = tmp_path / "idle_script.py"
    script.write_text(IDLE_SCRIPT)
    port = _free_port()
    nodes = [_torchrun(script, rank, port) for rank in (0, 1)]
    started: list[int] = [node.pid for node in nodes]
    try:
        line = nodes[0].stdout.readline()
        while line and "SERVED" not in line:
            line = nodes[0].stdout.readline()
        assert "SERVED" in line, nodes[0].communicate(timeout=30)[1][-3000:]
        started += _children(nodes[0].pid) + _children(nodes[1].pid)
        assert len(started) == 4  # two agents, one rank each
        # SIGKILL node 1's agent: its rank lives in a session of its own and must notice and exit by itself.
        os.killpg(nodes[1].pid, signal.SIGKILL)
        _out, err = nodes[0].communicate(timeout=60)
        assert nodes[0].returncode != 0
        assert "rank 1 of 2 stopped answering: no heartbeat for 10 s" in err, err[-3000:]
        deadline = time.monotonic() + 10  # the reaped agents' ranks may still be exiting
        while any(_alive(pid) for pid in started) and time.monotonic() < deadline:
            time.sleep(0.1)
        assert not [pid for pid in started if _alive(pid)]
    finally:
        for node in nodes:
            started += _children(node.pid)
        _kill_tree(started)
        for node in nodes:
            node.kill()
            node.communicate()


def test_serve_under_torchrun_answers_over_http(tmp_path):
    """``minipaged serve`` on both nodes: rank 0 listens and answers, node 1 runs its stage; Ctrl-C on rank 0
    drains the server and shuts node 1 down in order."""
    httpx = pytest.importorskip("httpx")
    if not (SMOL_DIR / "tokenizer.json").exists():
        pytest.skip("SmolLM2 tokenizer not prepared (make setup)")
    model_dir = make_tiny_model_dir(tmp_path / "tiny")
    with LLM(str(model_dir), num_kv_blocks=64) as llm:  # the one-process answer to compare with
        params = SamplingParams(temperature=0, max_tokens=8, ignore_eos=True)
        expected = llm.generate(["Hello there"], params, use_tqdm=False)[0].outputs[0].text
    port, http_port = _free_port(), _free_port()
    serve = ["--module", "minipaged", "serve", "--model", str(model_dir), "--pipeline-parallel-size", "2"]
    serve += ["--num-kv-blocks", "64", "--port", str(http_port)]
    nodes = [_torchrun(serve, rank, port) for rank in (0, 1)]
    started = [node.pid for node in nodes]
    try:
        deadline = time.monotonic() + 240  # a hang guard, not a measurement
        while not _healthy(httpx, http_port):
            assert all(node.poll() is None for node in nodes), nodes[0].communicate()[1][-3000:]
            assert time.monotonic() < deadline, "the server never came up"
            time.sleep(0.5)
        body = {"model": "tiny", "prompt": "Hello there", "max_tokens": 8, "temperature": 0, "ignore_eos": True}
        reply = httpx.post(f"http://127.0.0.1:{http_port}/v1/completions", json=body, timeout=120)
        assert reply.status_code == 200, reply.text
        assert reply.json()["choices"][0]["text"] == expected
        started += _children(nodes[0].pid) + _children(nodes[1].pid)
        rank0 = _children(nodes[0].pid)[0]
        os.kill(rank0, signal.SIGINT)
        results = [node.communicate(timeout=120) for node in nodes]
        assert nodes[1].returncode == 0, results[1][1][-3000:]  # told to stop by rank 0, not lost
        assert "shutting down" in results[0][1]
        deadline = time.monotonic() + 10
        while any(_alive(pid) for pid in started) and time.monotonic() < deadline:
            time.sleep(0.1)
        assert not [pid for pid in started if _alive(pid)]
    finally:
        for node in nodes:
            started += _children(node.pid)
        _kill_tree(started)
        for node in nodes:
            node.kill()
            node.communicate()


def _healthy(httpx, port: int) -> bool:
    try:
        return httpx.get(f"http://127.0.0.1:{port}/health", timeout=5).status_code == 200
    except httpx.HTTPError:
        return False
