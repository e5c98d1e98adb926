"""The throughput benchmark's bookkeeping (the benchmark itself is run by hand, never timed in tests)."""

from __future__ import annotations

import argparse
import random
from types import SimpleNamespace

import pytest

from minipaged.benchmarks.throughput import (
    UNIFORM,
    Workload,
    main,
    make_workload,
    positive_int,
    step_breakdown,
    summarise,
    token_agreement,
    workload_specs,
)


def test_step_breakdown_splits_prompt_steps_from_decode_steps():
    rng = random.Random()
    records = [
        SimpleNamespace(
            num_prefill_tokens=rng.randint(1, 99), num_decode_tokens=rng.randint(0, 9), duration_s=rng.uniform(0.5, 1.0)
        )
        for _ in range(3)
    ]
    decode = [SimpleNamespace(num_prefill_tokens=0, num_decode_tokens=n, duration_s=0.25) for n in (4, 2, 3)]
    line = step_breakdown(records + decode)
    prefill_s = sum(r.duration_s for r in records)
    assert line.strip() == (f"6 steps: 3 with prompt tokens {prefill_s:.1f} s, 3 decode-only 0.8 s (mean batch 3.0)")


def test_workload_lengths_stay_in_range_and_are_reproducible():
    work = make_workload(20, vocab=500, in_range=(3, 9), out_range=(2, 5), seed=7)
    assert len(work.prompts) == len(work.max_tokens) == 20
    assert all(3 <= len(p) <= 9 and all(100 <= t < 500 for t in p) for p in work.prompts)
    assert all(2 <= m <= 5 for m in work.max_tokens)
    assert work == make_workload(20, vocab=500, in_range=(3, 9), out_range=(2, 5), seed=7)
    assert work.output_tokens == sum(work.max_tokens)


def test_batch_sizes_must_be_positive():
    assert positive_int("32") == 32
    for bad in ("0", "-3"):
        with pytest.raises(argparse.ArgumentTypeError, match="must be >= 1"):
            positive_int(bad)
    with pytest.raises(SystemExit):  # argparse rejects it before any model is loaded
        main(["--static-batch-sizes", "16", "0"])
    with pytest.raises(SystemExit):
        main(["--vllm-python", "/nonexistent/python"])


def test_vllm_peer_benchmark_says_what_it_needs_without_vllm(capsys):
    import importlib.util

    from minipaged.benchmarks import vllm_peer

    if importlib.util.find_spec("vllm") is not None:
        pytest.skip("vLLM is installed here; this checks the message shown without it")
    with pytest.raises(SystemExit):
        vllm_peer.main([])
    assert "vLLM is not importable" in capsys.readouterr().err


def test_workload_choice_builds_the_peer_and_the_mixed_workloads():
    parser = argparse.ArgumentParser()
    from minipaged.benchmarks.throughput import add_workload_arguments

    add_workload_arguments(parser)
    parser.add_argument("--workload", default="both")
    args = parser.parse_args(["--num-requests", "5", "--input-len", "3", "9", "--seed", "4"])
    specs = workload_specs(args)
    assert list(specs) == ["uniform", "mixed"]
    assert specs["uniform"] == {**UNIFORM, "seed": 4}
    assert specs["mixed"] == {"num_requests": 5, "input_len": (3, 9), "output_len": (16, 256), "seed": 4}
    args.workload = "uniform"
    assert list(workload_specs(args)) == ["uniform"]
    uniform = make_workload(UNIFORM["num_requests"], 1000, UNIFORM["input_len"], UNIFORM["output_len"], 0)
    assert {len(p) for p in uniform.prompts} == {64} and set(uniform.max_tokens) == {64} and len(uniform.prompts) == 32


def test_token_agreement_counts_identical_requests_and_common_prefixes():
    ours = [[1, 2, 3, 4], [5, 6, 7, 8], [9, 9]]
    theirs = [[1, 2, 3, 4], [5, 6, 0, 8], [1, 9]]
    assert token_agreement(ours, theirs) == (1, (4 + 2 + 0) / 10)
    with pytest.raises(ValueError):
        token_agreement(ours, theirs[:2])  # one list per request, or it is a bug


def rounds(*seconds: float, latency: float = 2.0, tokens=None, **extra) -> list[dict]:
    return [dict(seconds=s, latency_s=latency, tokens=tokens, **extra) for s in seconds]


def test_summary_prints_paired_ratios_over_rounds():
    work = Workload(prompts=[[1, 2], [3]], max_tokens=[4, 6])  # 10 output tokens a round
    engine = dict(startup_s=3.0, peak_rss=2**30)
    results = {
        # vLLM's rounds drift (20, 10, 40 tok/s); minipaged's (15, 40, 120 tok/s) ran beside them
        "vLLM CPU": dict(engine, rounds=rounds(0.5, 1.0, 0.25, latency=3.0)),
        "minipaged": dict(
            engine, rounds=rounds(0.5 / 0.75, 0.25, 0.25 / 3, tokens=[[7] * 4, [8] * 6], breakdown="  steps")
        ),
        "transformers static": dict(
            engine, rounds=rounds(1.0, tokens=[[7] * 4, [8] * 5 + [0]], static={"16": 1.0}, best_batch_size=16)
        ),
        "minipaged kv int8": {"error": "exit 1: boom"},
    }
    text = "\n".join(summarise("uniform", "float32", work, results))
    assert "minipaged / vLLM CPU: 3.00x (rounds 0.75x 4.00x 3.00x)" in text
    assert "single-request latency minipaged / vLLM: 0.67x (rounds 0.67x 0.67x 0.67x)" in text
    # one transformers round against minipaged's median round (0.25 s), not its first
    assert "minipaged / transformers best static: 4.00x\n" in text
    assert "1/2 requests identical, 90.0% of tokens" in text
    assert "minipaged kv int8" in text and "failed: exit 1: boom" in text
    assert "20.0 tok/s (   0.5 s, rounds 10.0-40.0)" in text  # vLLM's median round and its spread
    assert "start-up   3.0 s" in text and "peak RSS 1.00 GiB" in text


def test_summary_compares_each_kv_cache_dtype_with_the_float_cache():
    work = Workload(prompts=[[1, 2], [3]], max_tokens=[4, 6])
    engine = dict(startup_s=3.0, peak_rss=2**30)
    results = {
        "minipaged": dict(engine, rounds=rounds(0.5, tokens=[[7] * 4, [8] * 6])),  # 20 tok/s
        "minipaged kv int8": dict(engine, rounds=rounds(0.4, tokens=[[7] * 4, [8] * 2 + [9] * 4])),  # 25 tok/s
    }
    text = "\n".join(summarise("mixed", "float32", work, results))
    assert "minipaged kv int8 / minipaged: 1.25x;" in text
    assert "1/2 requests identical, 60.0% before the first difference" in text
    with pytest.raises(SystemExit):  # an unknown cache dtype is refused before any engine starts
        main(["--kv-cache-dtype", "auto", "int4"])


def test_rounds_keep_the_lengths_and_change_the_token_ids():
    first = make_workload(12, vocab=5000, in_range=(3, 40), out_range=(2, 9), seed=5)
    assert first == make_workload(12, vocab=5000, in_range=(3, 40), out_range=(2, 9), seed=5, round_index=0)
    later = [make_workload(12, vocab=5000, in_range=(3, 40), out_range=(2, 9), seed=5, round_index=i) for i in (1, 2)]
    for work in later:
        assert work.max_tokens == first.max_tokens
        assert [len(p) for p in work.prompts] == [len(p) for p in first.prompts]
        assert all(100 <= t < 5000 for p in work.prompts for t in p)
    assert len({tuple(map(tuple, w.prompts)) for w in [first, *later]}) == 3


_FAKE_ENGINE = r"""
import sys, time
from minipaged.benchmarks.throughput import RoundServer, Workload
name, fail_at = sys.argv[1], int(sys.argv[2])
path = sys.argv[sys.argv.index("--result-json") + 1]
buffer = [0] * 2_000_000  # ~16 MB resident, for the RSS sampler to see

def run_round(work):
    index = work.prompts[0][0]
    if index == fail_at:
        print(f"{name} boom at round {index}", flush=True)
        sys.exit(3)
    time.sleep(0.3)  # long enough for the RSS sampler
    return {"seconds": 0.1, "latency_s": 0.1, "tokens": [[index]], "done_ns": time.monotonic_ns(), "name": name}

RoundServer(path, lambda index: Workload([[index]], [1])).serve(run_round)
"""


def test_engines_take_turns_and_a_failed_one_is_reported():
    """Real child processes speaking the round protocol: each is started once, rounds rotate
    the order, a child that dies mid-way is reported with its output and the others go on."""
    import sys

    from minipaged.benchmarks.throughput import run_engines

    child = [sys.executable, "-c", _FAKE_ENGINE]
    engines = {"a": (child + ["a", "99"], None), "b": (child + ["b", "99"], None), "c": (child + ["c", "1"], None)}
    results = run_engines(engines, rounds=3)
    assert "exit 3" in results["c"]["error"] and "c boom at round 1" in results["c"]["error"]
    for name in "ab":
        r = results[name]
        assert [x["tokens"] for x in r["rounds"]] == [[[0]], [[1]], [[2]]]
        assert 0 < r["startup_s"] < 120 and r["peak_rss"] > 16 * 2**20
    done = sorted((x["done_ns"], x["name"]) for name in "ab" for x in results[name]["rounds"])
    assert [n for _, n in done] == ["a", "b", "b", "a", "a", "b"]  # round 0 a b (c), round 1 b (c dies) a, round 2 a b


def test_vllm_child_imports_no_numba():
    """``bench_vllm`` runs inside vLLM's CPU build, whose start-up scans every loaded module's
    attributes and fails on llvmlite's (``'_lib_fn_wrapper' object has no attribute 'get'``):
    importing it, and the model loader it uses, must not load numba."""
    import subprocess
    import sys

    code = (
        "import sys, minipaged.benchmarks.vllm_peer; "
        "print(sorted(m for m in ('numba', 'llvmlite') if m in sys.modules))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


def test_throughput_takes_the_engine_tensor_parallel_size_and_every_config_dtype_name():
    from minipaged.benchmarks.throughput import build_parser
    from minipaged.config import DTYPES
    from minipaged.entrypoints.engine_args import engine_argv, engine_kwargs

    args = build_parser().parse_args(["--tensor-parallel-size", "2", "--dtype", *DTYPES])
    # The children get it with the other engine options, as add_engine_arguments parses it back.
    assert "--tensor-parallel-size" in engine_argv(engine_kwargs(args))
    assert engine_kwargs(args)["tensor_parallel_size"] == 2
    assert args.dtype == list(DTYPES)
