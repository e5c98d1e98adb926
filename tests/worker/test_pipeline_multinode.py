"""Two "nodes" on one machine: two ``torchrun --nnodes 2`` commands meeting on 127.0.0.1, one pipeline stage
each (P=2). Node 0's rank 0 owns the engine; node 1 only runs its stage.

- a request served end to end, by a script and by ``minipaged serve`` over HTTP;
- a requested stop (SIGINT to rank 0, to rank 1, or Ctrl-C on node 0's torchrun) ends every rank in order:
  exit 0, no traceback from any rank;
- a failure (a node or a rank SIGKILLed, while idle or while a request is in flight) ends the other side
  with a clear error and a non-zero status, and leaves no process behind.

Every process a test starts runs in its own session and is killed, with its whole tree, at teardown.
"""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from rank_failures import alive
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

# After one request, either idle (no receive pending that a dead peer could fail: only the heartbeat
# notices) or busy (long requests back to back: the kill lands while stages exchange a batch).
KILL_SCRIPT = """
import sys, time
from minipaged import LLM, SamplingParams
from minipaged.models import build_model_from_hf
from tiny_models import tiny_hf_model

llm = LLM(build_model_from_hf(tiny_hf_model("llama")), pipeline_parallel_size=2, num_kv_blocks=32, block_size=8,
          peer_timeout_s=10)
llm.generate([{"prompt_token_ids": [1, 2, 3, 4]}], SamplingParams(temperature=0, max_tokens=3), use_tqdm=False)
print("SERVED", flush=True)
while sys.argv[1] == "idle":
    time.sleep(0.1)
while True:
    print("GENERATING", flush=True)
    llm.generate([{"prompt_token_ids": [1, 2, 3, 4]}], SamplingParams(max_tokens=200, ignore_eos=True),
                 use_tqdm=False)
"""

HANG_GUARD_S = 240  # a bound against hangs, not a measurement


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


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


def _kill_sessions(pids: list[int]) -> None:
    """SIGKILL every process in ``pids`` and the sessions they lead (torchrun starts each rank in its own)."""
    for pid in pids:
        for kill in (os.killpg, os.kill):
            try:
                kill(pid, signal.SIGKILL)
            except (ProcessLookupError, PermissionError):
                pass


class TwoNodes:
    """Node 0's and node 1's ``torchrun`` running ``command`` (a script path or ``--module ...`` arguments),
    their output in files under ``logs``, and every process they started (``started``)."""

    def __init__(self, command: Path | list[str], logs: Path) -> None:
        env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")}
        tests = str(Path(__file__).resolve().parents[1])
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [tests, env.get("PYTHONPATH")]))
        env["OMP_NUM_THREADS"] = "1"
        port = _free_port()
        self.logs = logs
        self.agents: list[subprocess.Popen] = []
        for node in (0, 1):
            argv = [sys.executable, "-m", "torch.distributed.run", "--nnodes", "2", "--node-rank", str(node)]
            argv += ["--nproc-per-node", "1", "--master-addr", "127.0.0.1", "--master-port", str(port)]
            argv += [str(command)] if isinstance(command, Path) else command
            with open(logs / f"node{node}.out", "w") as out, open(logs / f"node{node}.err", "w") as err:
                self.agents.append(
                    subprocess.Popen(argv, stdout=out, stderr=err, text=True, env=env, start_new_session=True)
                )
        self.started = [agent.pid for agent in self.agents]

    def out(self, node: int) -> str:
        return (self.logs / f"node{node}.out").read_text()

    def err(self, node: int) -> str:
        return (self.logs / f"node{node}.err").read_text()

    def rank_pid(self, node: int) -> int:
        """The pid of ``node``'s one rank (the agent's child), remembered in ``started``."""
        kids = _children(self.agents[node].pid)
        self.started += kids
        assert kids, self.err(node)[-3000:]
        return kids[0]

    def wait_until(self, ready, what: str) -> None:
        """Poll ``ready()`` while both agents run; fail with node 0's log if one ends or the guard passes."""
        deadline = time.monotonic() + HANG_GUARD_S
        while not ready():
            ended = [node for node, agent in enumerate(self.agents) if agent.poll() is not None]
            assert not ended, f"node {ended[0]} ended before {what}:\n{self.err(ended[0])[-3000:]}"
            assert time.monotonic() < deadline, f"never {what}"
            time.sleep(0.2)

    def wait_for_line(self, node: int, text: str) -> None:
        self.wait_until(lambda: text in self.out(node), f"printed {text!r}")

    def wait(self, node: int, timeout_s: float = 120) -> int:
        """``node``'s torchrun exit status, within ``timeout_s`` (a hang guard)."""
        return self.agents[node].wait(timeout=timeout_s)

    def assert_no_process_left(self) -> None:
        """Every process either node started ends (the reaped agents' ranks may still be exiting)."""
        deadline = time.monotonic() + 15
        while any(alive(pid) for pid in self.started) and time.monotonic() < deadline:
            time.sleep(0.1)
        assert not [pid for pid in self.started if alive(pid)]

    def close(self) -> None:
        for agent in self.agents:
            self.started += _children(agent.pid)
        _kill_sessions(self.started)
        for agent in self.agents:
            agent.kill()
            agent.wait()


@pytest.fixture
def two_nodes(tmp_path) -> Iterator:
    """``two_nodes(command)`` starts a ``TwoNodes``; all of them are killed, with their trees, at teardown."""
    launched: list[TwoNodes] = []

    def launch(command: Path | list[str]) -> TwoNodes:
        launched.append(TwoNodes(command, tmp_path))
        return launched[-1]

    yield launch
    for nodes in launched:
        nodes.close()


def _minipaged_tracebacks(err: str) -> list[str]:
    """Traceback frames in minipaged's own code (torchrun's agents log tracebacks of their own)."""
    return [line for line in err.splitlines() if re.search(r'File ".*minipaged/', line)]


def test_two_nodes_serve_a_request(tmp_path, two_nodes):
    prompts, _ = make_prompts(seed=9, count=2)
    script = tmp_path / "pp_script.py"
    script.write_text(SCRIPT.format(prompts=prompts))
    nodes = two_nodes(script)
    for node in (0, 1):
        assert nodes.wait(node, HANG_GUARD_S) == 0, nodes.err(node)[-3000:]
    line = next(ln for ln in nodes.out(0).splitlines() if ln.startswith("TOKENS"))
    hf = tiny_hf_model("llama")
    assert json.loads(line.split(" ", 1)[1]) == [hf_greedy(hf, p, 5) for p in prompts]


# What the surviving side may say: a receive from the dead rank failed (the engine's error, or a stage's),
# its heartbeat stopped, or the store on node 0 went with node 0.
LOST_PEER = re.compile(
    r"WorkerDiedError: a pipeline-parallel message or collective failed \(a rank of this torchrun job stopped"
    r"|minipaged: rank \d of 2 stopped answering: no heartbeat for 10 s"
    r"|minipaged: rank 1 lost the rendezvous store at 127\.0\.0\.1:\d+ \(the node hosting it, node 0, is gone"
)


@pytest.mark.parametrize(
    "victim, state",
    [("node 1", "idle"), ("node 0", "idle"), ("rank 1", "busy"), ("node 0", "busy")],
)
def test_a_killed_node_or_rank_ends_the_other_side(tmp_path, two_nodes, victim, state):
    """SIGKILL a whole node (its torchrun and its rank, as a node that loses power) or one rank; the other
    node ends with a clear error and a non-zero status in bounded time, and no process is left."""
    script = tmp_path / "kill_script.py"
    script.write_text(KILL_SCRIPT)
    nodes = two_nodes([str(script), state])
    nodes.wait_for_line(0, "SERVED" if state == "idle" else "GENERATING")
    ranks = [nodes.rank_pid(0), nodes.rank_pid(1)]
    assert len(nodes.started) == 4  # two agents, one rank each
    dead = int(victim[-1])
    if victim.startswith("node"):
        _kill_sessions([nodes.agents[dead].pid, ranks[dead]])
    else:
        os.kill(ranks[dead], signal.SIGKILL)
    survivor = 1 - dead
    status = nodes.wait(survivor)
    err = nodes.err(survivor)
    assert status != 0, err[-3000:]
    assert LOST_PEER.search(err), err[-3000:]
    if (victim, state) == ("node 1", "idle"):  # nothing pending on rank 0: only the heartbeat can tell
        assert "minipaged: rank 1 of 2 stopped answering: no heartbeat for 10 s" in err
    nodes.assert_no_process_left()


def _healthy(httpx, port: int) -> bool:
    try:
        return httpx.get(f"http://127.0.0.1:{port}/health", timeout=5).status_code == 200
    except httpx.HTTPError:
        return False


@pytest.mark.parametrize("stop", ["rank 0", "rank 1", "node 0's torchrun"])
def test_serve_under_torchrun_answers_and_stops_in_order(tmp_path, two_nodes, stop):
    """``minipaged serve`` on both nodes: rank 0 listens and answers, node 1 runs its stage. SIGINT, to either
    rank or as Ctrl-C on node 0's torchrun (which passes it to its rank), drains the server and shuts every
    rank down in order: exit 0, no traceback from minipaged. Only a torchrun that itself got the signal
    reports it (torchrun's own ``SignalException``; no rank can change that)."""
    httpx = pytest.importorskip("httpx")
    if not (SMOL_DIR / "tokenizer.json").exists():
        pytest.skip("SmolLM2 tokenizer not prepared (make setup)")
    model_dir = make_tiny_model_dir(tmp_path / "tiny")
    with LLM(str(model_dir), num_kv_blocks=64) as llm:  # the one-process answer to compare with
        params = SamplingParams(temperature=0, max_tokens=8, ignore_eos=True)
        expected = llm.generate(["Hello there"], params, use_tqdm=False)[0].outputs[0].text
    http_port = _free_port()
    serve = ["--module", "minipaged", "serve", "--model", str(model_dir), "--pipeline-parallel-size", "2"]
    serve += ["--num-kv-blocks", "64", "--port", str(http_port)]
    nodes = two_nodes(serve)
    nodes.wait_until(lambda: _healthy(httpx, http_port), "served /health")
    body = {"model": "tiny", "prompt": "Hello there", "max_tokens": 8, "temperature": 0, "ignore_eos": True}
    reply = httpx.post(f"http://127.0.0.1:{http_port}/v1/completions", json=body, timeout=120)
    assert reply.status_code == 200, reply.text
    assert reply.json()["choices"][0]["text"] == expected
    ranks = [nodes.rank_pid(0), nodes.rank_pid(1)]
    target = {"rank 0": ranks[0], "rank 1": ranks[1], "node 0's torchrun": nodes.agents[0].pid}[stop]
    os.kill(target, signal.SIGINT)
    statuses = [nodes.wait(0), nodes.wait(1)]
    assert "shutting down: requests in flight get" in nodes.err(0)
    for node in (0, 1):
        assert not _minipaged_tracebacks(nodes.err(node)), nodes.err(node)[-3000:]
        assert "stopped answering" not in nodes.err(node) and "WorkerDiedError" not in nodes.err(node)
    if stop == "rank 1":
        assert "minipaged: rank 1 got SIGINT; asking rank 0 to shut the engine down" in nodes.err(1)
        assert "minipaged: rank 1 got SIGINT; shutting the engine down" in nodes.err(0)
    if stop == "node 0's torchrun":
        assert statuses[1] == 0, nodes.err(1)[-3000:]
        assert "SignalException: Process" in nodes.err(0)
    else:
        assert statuses == [0, 0], (nodes.err(0)[-3000:], nodes.err(1)[-3000:])
    nodes.assert_no_process_left()
