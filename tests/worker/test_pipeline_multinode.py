"""Two "nodes" on one machine: two ``torchrun --nnodes 2`` commands meeting on 127.0.0.1, one pipeline stage
each (P=2). Node 0's rank 0 owns the engine and serves a request end to end; node 1 only runs its stage."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

from tiny_models import hf_greedy, make_prompts, tiny_hf_model

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


def _torchrun(script: Path, node_rank: int, port: int) -> subprocess.Popen:
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(Path(__file__).resolve().parents[1]), env.get("PYTHONPATH")]))
    env["OMP_NUM_THREADS"] = "1"
    argv = [sys.executable, "-m", "torch.distributed.run", "--nnodes", "2", "--node-rank", str(node_rank)]
    argv += ["--nproc-per-node", "1", "--master-addr", "127.0.0.1", "--master-port", str(port), str(script)]
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
        for node in nodes:
            if node.poll() is None:
                node.kill()
                node.wait()
    for node, (_out, err) in zip(nodes, results):
        assert node.returncode == 0, err[-3000:]
    line = next(ln for ln in results[0][0].splitlines() if ln.startswith("TOKENS"))
    hf = tiny_hf_model("llama")
    assert json.loads(line.split(" ", 1)[1]) == [hf_greedy(hf, p, 5) for p in prompts]
