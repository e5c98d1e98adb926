"""Tensor parallelism (TP=2 over gloo on CPU) against one process and against transformers.

One TP engine per model (spawning a rank costs seconds) with a KV cache small enough
that the batched run must preempt; every test checks that all KV blocks are free after
it. The last two tests end the shared engines (a clean shutdown for one, a killed rank
for the other), so they stay last in the file.
The sharding arithmetic itself is checked without processes, against full-size layers.
"""

from __future__ import annotations

import json
import multiprocessing
import os
import random
import signal
import threading
import time
from dataclasses import dataclass

import pytest
import torch
from rank_failures import alive, assert_killed_rank_raises
from tiny_models import assert_all_blocks_free, hf_greedy, make_prompts, tiny_hf_model
from tiny_models import greedy_token_ids as greedy  # noqa: F401  one_thread: autouse

from minipaged import LLM, SamplingParams
from minipaged.config import EngineConfig
from minipaged.core.block_manager import BlockCopy
from minipaged.distributed import CommStats
from minipaged.engine.beam_search import BeamSearchParams
from minipaged.errors import InvalidEngineConfigError
from minipaged.models import build_model_from_hf
from minipaged.models.parallel_linear import ColumnParallelLinear, RowParallelLinear, rank_slices
from minipaged.worker.executor import TensorParallelExecutor, WorkerDiedError
from minipaged.worker.worker import StepBatch

TP_BLOCKS = 18  # x 8 tokens: the 12-prompt batch cannot all fit, so the scheduler preempts


@dataclass
class Case:
    arch: str
    hf: torch.nn.Module
    tp: LLM  # tensor_parallel_size=2
    single: LLM  # the same settings in one process
    prompts: list[list[int]]
    max_tokens: list[int]
    expected: list[list[int]]  # transformers' greedy tokens


def engines(hf, **kwargs) -> tuple[LLM, LLM]:
    kwargs = dict(num_kv_blocks=TP_BLOCKS, block_size=8, **kwargs)
    return LLM(build_model_from_hf(hf), tensor_parallel_size=2, **kwargs), LLM(build_model_from_hf(hf), **kwargs)


@pytest.fixture(scope="module", params=["llama", "qwen2"])
def case(request):
    hf = tiny_hf_model(request.param)
    prompts, max_tokens = make_prompts(seed=3)
    expected = [hf_greedy(hf, p, m) for p, m in zip(prompts, max_tokens)]
    tp, single = engines(hf)
    yield Case(request.param, hf, tp, single, prompts, max_tokens, expected)
    tp.shutdown()


def test_ranks_hold_half_the_heads_and_kv_cache(case):
    executor = case.tp.engine_core.worker
    assert isinstance(executor, TensorParallelExecutor) and len(executor.worker_pids) == 1
    k_cache, v_cache = executor.worker.kv_caches[0]
    cfg = case.tp.model_config
    assert k_cache.shape == v_cache.shape == (TP_BLOCKS, 8, cfg.num_kv_heads // 2, cfg.head_dim)
    assert executor.kv_cache_bytes_per_rank * 2 == case.single.engine_core.worker.kv_cache_bytes
    attn = executor.worker.model.model.layers[0].self_attn
    assert (attn.num_heads, attn.num_kv_heads) == (cfg.num_heads // 2, cfg.num_kv_heads // 2)
    assert isinstance(attn.qkv_proj, ColumnParallelLinear) and isinstance(attn.o_proj, RowParallelLinear)
    shards = rank_slices(cfg, 2)
    assert shards[0].params == sum(p.numel() for p in executor.worker.model.parameters())
    assert rank_slices(cfg, 1)[0].params == sum(p.numel() for p in case.single.engine_core.worker.model.parameters())
    assert shards[1].kv_heads == (cfg.num_kv_heads // 2, cfg.num_kv_heads)
    assert shards[0].kv_bytes_per_token * 8 * TP_BLOCKS == executor.kv_cache_bytes_per_rank


def test_alone_matches_single_process_and_transformers(case):
    picks = [0, 1, 5]
    for i in picks:  # one request at a time
        got = greedy(case.tp, [case.prompts[i]], [case.max_tokens[i]])[0]
        assert got == case.expected[i]
    assert greedy(case.single, [case.prompts[i] for i in picks], [case.max_tokens[i] for i in picks]) == [
        case.expected[i] for i in picks
    ]


def test_batched_under_preemption_matches(case):
    before = case.tp.num_preemptions
    assert greedy(case.tp, case.prompts, case.max_tokens) == case.expected
    assert case.tp.num_preemptions > before  # the 18-block cache cannot hold the batch
    assert greedy(case.single, case.prompts, case.max_tokens) == case.expected


def test_prefix_cache_hits_match(case):
    # Odd prompts share a 40-token prefix: later ones reuse the blocks computed by earlier ones.
    hits = case.tp.block_manager.stats().prefix_hits
    odd = list(range(1, len(case.prompts), 2))[:3]
    for i in odd:
        out = case.tp.generate(
            {"prompt_token_ids": case.prompts[i]},
            SamplingParams(temperature=0, max_tokens=case.max_tokens[i], ignore_eos=True),
            use_tqdm=False,
        )[0]
        assert out.outputs[0].token_ids == case.expected[i]
    assert case.tp.block_manager.stats().prefix_hits > hits
    assert_all_blocks_free(case.tp)


def test_parallel_samples_and_seeded_sampling(case):
    i = 1
    out = case.tp.generate(
        {"prompt_token_ids": case.prompts[i]},
        SamplingParams(n=3, temperature=0, max_tokens=case.max_tokens[i], ignore_eos=True),
        use_tqdm=False,
    )[0]
    assert [c.token_ids for c in out.outputs] == [case.expected[i]] * 3
    sampled = SamplingParams(n=3, temperature=1.0, seed=11, max_tokens=10, ignore_eos=True)
    tp_out, single_out = (
        llm.generate({"prompt_token_ids": case.prompts[2]}, sampled, use_tqdm=False)[0]
        for llm in (case.tp, case.single)
    )
    assert [c.token_ids for c in tp_out.outputs] == [c.token_ids for c in single_out.outputs]
    assert len({tuple(c.token_ids) for c in tp_out.outputs}) > 1
    assert_all_blocks_free(case.tp)


def test_beam_search_matches_single_process(case):
    params = BeamSearchParams(beam_width=3, max_tokens=6, ignore_eos=True)
    prompts = [{"prompt_token_ids": p} for p in case.prompts[:2]]
    tp_outs, single_outs = case.tp.beam_search(prompts, params), case.single.beam_search(prompts, params)
    for a, b in zip(tp_outs, single_outs):
        assert [s.tokens for s in a.sequences] == [s.tokens for s in b.sequences]
        assert [s.score for s in a.sequences] == pytest.approx([s.score for s in b.sequences], abs=1e-4)
    assert_all_blocks_free(case.tp)


def test_communication_is_counted(case):
    stats: CommStats = case.tp.engine_core.worker.tp.stats
    layers = case.tp.model_config.num_layers
    # Two all-reduces per layer per step (after o_proj and down_proj), one broadcast per step at least.
    assert stats.all_reduces % (2 * layers) == 0 and stats.all_reduces >= 2 * layers * len(case.tp.trace)
    assert stats.broadcasts >= len(case.tp.trace)


@pytest.mark.parametrize("tp, dim", [(3, "num_attention_heads"), (4, "num_key_value_heads")])
def test_tp_size_must_divide_heads(tp, dim):
    hf = tiny_hf_model("llama")  # 4 query heads, 2 KV heads
    with (
        pytest.warns(RuntimeWarning, match="CPU cores"),
        pytest.raises(InvalidEngineConfigError, match=f"does not divide the model's {dim}") as err,
    ):
        LLM(build_model_from_hf(hf), tensor_parallel_size=tp, num_kv_blocks=8)
    assert err.value.field == "tensor_parallel_size"


def test_tp_size_checks_devices(monkeypatch):
    for bad in (0, -2, "2", 1.5, True):
        with pytest.raises(InvalidEngineConfigError, match="tensor_parallel_size"):
            EngineConfig(tensor_parallel_size=bad)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    with pytest.raises(InvalidEngineConfigError, match="2 ranks need 2 GPUs; 1 visible"):
        EngineConfig(device="cuda", tensor_parallel_size=2)
    monkeypatch.setattr(os, "cpu_count", lambda: 1)
    with pytest.warns(RuntimeWarning, match="exceeds the 1 CPU cores"):
        EngineConfig(device="cpu", tensor_parallel_size=2)


def test_step_batch_round_trips_through_one_tensor():
    rng = random.Random(0)
    for _ in range(20):
        seqs = rng.randint(0, 6)
        query = [rng.randint(1, 9) for _ in range(seqs)]
        batch = StepBatch(
            input_ids=tuple(rng.randrange(1000) for _ in range(sum(query))),
            query_lens=tuple(query),
            context_lens=tuple(q + rng.randint(0, 30) for q in query),
            block_tables=tuple(tuple(rng.randrange(64) for _ in range(rng.randint(1, 5))) for _ in range(seqs)),
            copies=tuple(BlockCopy(rng.randrange(64), rng.randrange(64)) for _ in range(rng.randint(0, 3))),
            sample_rows=tuple(sorted(rng.sample(range(max(sum(query), 1)), k=min(seqs, sum(query))))),
        )
        packed = batch.pack()
        assert packed.dtype == torch.int64 and packed.dim() == 1
        padded = torch.cat([packed, torch.full((7,), -5, dtype=torch.int64)])  # the channel's unused tail
        assert StepBatch.unpack(padded) == batch


class _SumGroup:
    """A stand-in group for one rank of ``world_size``: all_reduce records the partial instead of summing."""

    def __init__(self, rank: int, world_size: int) -> None:
        self.rank, self.world_size, self.is_driver = rank, world_size, rank == 0
        self.partials: list[torch.Tensor] = []

    def all_reduce(self, x: torch.Tensor) -> torch.Tensor:
        self.partials.append(x.clone())
        return x


@pytest.mark.parametrize("world", [2, 4])
def test_parallel_linears_reassemble_the_full_layer(world):
    torch.manual_seed(world)
    x = torch.randn(5, 16)
    sizes = (8, 4, 4)  # q | k | v of a fused projection
    full_w, full_b = torch.randn(sum(sizes), 16), torch.randn(sum(sizes))
    full_out = x @ full_w.T + full_b
    pieces = list(full_out.split(sizes, dim=1))
    per_rank = []
    for rank in range(world):
        layer = ColumnParallelLinear(16, sizes, True, _SumGroup(rank, world))
        with torch.no_grad():
            layer.weight.copy_(layer.shard_weight(full_w))
            layer.bias.copy_(layer.shard_bias(full_b))
        per_rank.append(layer(x).split([s // world for s in sizes], dim=1))
    for piece, full_piece in enumerate(pieces):  # each piece is its ranks' slices side by side
        torch.testing.assert_close(torch.cat([r[piece] for r in per_rank], dim=1), full_piece)
    row_w, row_b = torch.randn(6, 16), torch.randn(6)
    partial_sum = torch.zeros(5, 6)
    for rank in range(world):
        group = _SumGroup(rank, world)
        layer = RowParallelLinear(16, 6, True, group)
        with torch.no_grad():
            layer.weight.copy_(layer.shard_weight(row_w))
            layer.bias.copy_(layer.shard_bias(row_b))
        layer(x[:, rank * 16 // world : (rank + 1) * 16 // world])
        partial_sum += group.partials[0]
    torch.testing.assert_close(partial_sum + row_b, x @ row_w.T + row_b)


def test_single_process_has_no_tensor_parallel_machinery():
    hf = tiny_hf_model("qwen2")
    llm = LLM(build_model_from_hf(hf), num_kv_blocks=16)
    assert type(llm.engine_core.worker).__name__ == "Worker" and llm.engine_core.worker.model.tp is None
    layer = llm.engine_core.worker.model.model.layers[0]
    assert type(layer.self_attn.o_proj).__name__ == "PackedLinear"


# ---- these end the shared engines or need them ended: keep them last ----------------------------------------------
def test_shutdown_leaves_no_processes(case):
    if case.arch != "llama":
        pytest.skip("the qwen2 engine ends with a killed rank instead")
    pids = case.tp.engine_core.worker.worker_pids
    assert all(alive(pid) for pid in pids)
    # One tensor-parallel engine per process: a second is refused before it spawns anything,
    # and the running one is unharmed.
    with pytest.raises(InvalidEngineConfigError, match="another tensor-parallel engine"):
        LLM(build_model_from_hf(case.hf), tensor_parallel_size=2, num_kv_blocks=TP_BLOCKS, block_size=8)
    assert greedy(case.tp, case.prompts[:2], case.max_tokens[:2]) == case.expected[:2]
    case.tp.shutdown()
    case.tp.shutdown()  # idempotent
    assert not any(alive(pid) for pid in pids)
    with pytest.raises(RuntimeError, match="shut down"):
        case.tp.generate({"prompt_token_ids": case.prompts[0]}, SamplingParams(max_tokens=2), use_tqdm=False)
    assert_all_blocks_free(case.tp)


def test_quantized_kv_cache_splits_by_head(case):
    """An int8 cache (scales per token and KV head) splits with its heads: TP=2 gives the
    single-process int8 engine's tokens, each rank holding half of its bytes, scales included."""
    if case.arch != "llama":
        pytest.skip("needs the shared llama engine shut down (the shutdown test)")
    kwargs = dict(num_kv_blocks=TP_BLOCKS, block_size=8, kv_cache_dtype="int8")
    single = LLM(build_model_from_hf(case.hf), **kwargs)
    with LLM(build_model_from_hf(case.hf), tensor_parallel_size=2, **kwargs) as tp:
        pids = tp.engine_core.worker.worker_pids
        assert greedy(tp, case.prompts, case.max_tokens) == greedy(single, case.prompts, case.max_tokens)
        assert tp.engine_core.worker.kv_cache_bytes_per_rank * 2 == single.engine_core.worker.kv_cache_bytes
    assert not any(alive(pid) for pid in pids)  # leaving the with-block stopped the ranks


def test_model_already_run_by_a_single_process_engine(case):
    """A CPU engine packs its model's weights for oneDNN in place; the same model object
    handed afterwards to a TP engine is sharded from the exact dense values."""
    if case.arch != "llama":
        pytest.skip("needs the shared llama engine shut down (the shutdown test)")
    model = build_model_from_hf(case.hf)
    kwargs = dict(num_kv_blocks=TP_BLOCKS, block_size=8)
    single = LLM(model, **kwargs)
    expected = greedy(single, case.prompts[:3], case.max_tokens[:3])
    with LLM(model, tensor_parallel_size=2, **kwargs) as tp:
        assert greedy(tp, case.prompts[:3], case.max_tokens[:3]) == expected


def test_rank_killed_while_starting_raises(case):
    """A rank that dies before joining (OOM killer, import error) is an error at once, not a timeout."""
    if case.arch != "llama":
        pytest.skip("needs the shared llama engine shut down (the test before)")
    known = {p.pid for p in multiprocessing.active_children()}
    stop = threading.Event()

    def kill_new_children() -> None:
        while not stop.is_set():
            for child in multiprocessing.active_children():
                if child.pid not in known:
                    os.kill(child.pid, signal.SIGKILL)
                    return
            time.sleep(0.01)

    killer = threading.Thread(target=kill_new_children, daemon=True)
    killer.start()
    start = time.monotonic()
    try:
        with pytest.raises(WorkerDiedError, match=r"rank 1 \(killed by signal 9\)"):
            llm = LLM(build_model_from_hf(case.hf), tensor_parallel_size=2, num_kv_blocks=16, block_size=8)
            # Killed just after joining: then the first step finds it dead.
            llm.generate({"prompt_token_ids": case.prompts[0]}, SamplingParams(max_tokens=2), use_tqdm=False)
    finally:
        stop.set()
        killer.join()
    assert time.monotonic() - start < 60
    assert not torch.distributed.is_initialized()  # left for the next engine


def test_killed_rank_raises_instead_of_hanging(case):
    """Kill rank 1 in the middle of a step, as rank 0 enters an all-reduce: that step raises, blocks are
    freed, no process is left."""
    if case.arch != "qwen2":
        pytest.skip("the llama engine ends with a clean shutdown instead")
    group = case.tp.engine_core.worker.tp
    all_reduce, calls = group.all_reduce, []

    def arm(pids: list[int]) -> None:
        def kill_then_reduce(x):  # the third all-reduce of the next step: layer 1's attention output
            calls.append(1)
            if len(calls) == 3:
                os.kill(pids[0], signal.SIGKILL)
            return all_reduce(x)

        object.__setattr__(group, "all_reduce", kill_then_reduce)  # the group is a frozen dataclass

    assert_killed_rank_raises(case.tp, case.prompts[:4], case.max_tokens[:4], arm)
    assert len(calls) == 3  # the step that lost its rank raised; no further collective was tried


TORCHRUN_SCRIPT = """
import json, sys
import torch
from minipaged import LLM, SamplingParams
from minipaged.models import build_model_from_hf
from tiny_models import tiny_hf_model

llm = LLM(build_model_from_hf(tiny_hf_model("qwen2")), tensor_parallel_size=2, num_kv_blocks=32, block_size=8)
# Only rank 0 gets here: on rank 1, LLM(...) served rank 0's steps and then ended the process.
outs = llm.generate([{{"prompt_token_ids": p}} for p in {prompts!r}],
                    SamplingParams(temperature=0, max_tokens=5, ignore_eos=True), use_tqdm=False)
print("TOKENS", json.dumps([o.outputs[0].token_ids for o in outs]))
llm.shutdown()
"""


def test_torchrun_launch_spawns_nothing(tmp_path):
    """Under torchrun every rank runs the script; rank 0's LLM is the engine, the others serve it."""
    import socket
    import subprocess
    import sys
    from pathlib import Path

    prompts, _ = make_prompts(seed=9, count=2)
    script = tmp_path / "tp_script.py"
    script.write_text(TORCHRUN_SCRIPT.format(prompts=prompts))
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")}
    # The script imports the tests' tiny_models; the caller's own PYTHONPATH entries stay behind them.
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(Path(__file__).resolve().parents[1]), env.get("PYTHONPATH")]))
    with socket.socket() as s:  # torchrun's store needs a concrete port
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--nproc-per-node",
            "2",
            "--master-addr",
            "127.0.0.1",
            "--master-port",
            str(port),
            str(script),
        ],
        capture_output=True,
        text=True,
        timeout=300,
        env=env,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    line = next(ln for ln in done.stdout.splitlines() if ln.startswith("TOKENS"))
    hf = tiny_hf_model("qwen2")
    assert json.loads(line.split(" ", 1)[1]) == [hf_greedy(hf, p, 5) for p in prompts]


NO_GUARD_SCRIPT = """
from minipaged import LLM
from minipaged.models import build_model_from_hf
from tiny_models import tiny_hf_model

LLM(build_model_from_hf(tiny_hf_model("qwen2")), tensor_parallel_size=2, num_kv_blocks=32, block_size=8)
print("ENGINE BUILT")
"""


def test_script_without_main_guard_fails_with_one_clear_error(tmp_path):
    """Each spawned rank re-imports the script; a missing guard is one error with the fix, not a traceback per rank."""
    import subprocess
    import sys
    from pathlib import Path

    script = tmp_path / "no_guard.py"
    script.write_text(NO_GUARD_SCRIPT)
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(Path(__file__).resolve().parents[1]), env.get("PYTHONPATH")]))
    done = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=300, env=env)
    assert done.returncode != 0 and "ENGINE BUILT" not in done.stdout
    assert done.stderr.count("Traceback") == 1, done.stderr[-3000:]
    assert "InvalidEngineConfigError: tensor_parallel_size:" in done.stderr
    assert 'if __name__ == "__main__":' in done.stderr
