"""The throughput benchmark's bookkeeping (the benchmark itself is run by hand, never timed in tests)."""
from __future__ import annotations

import argparse
import random
from types import SimpleNamespace

import pytest

from minipaged.bench import main, make_workload, positive_int, step_breakdown


def test_step_breakdown_splits_prompt_steps_from_decode_steps():
    rng = random.Random()
    records = [SimpleNamespace(num_prefill_tokens=rng.randint(1, 99), num_decode_tokens=rng.randint(0, 9),
                               duration_s=rng.uniform(0.5, 1.0)) for _ in range(3)]
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


def test_vllm_peer_benchmark_says_what_it_needs_without_vllm(capsys):
    import importlib.util

    from minipaged import bench_vllm

    if importlib.util.find_spec("vllm") is not None:
        pytest.skip("vLLM is installed here; this checks the message shown without it")
    with pytest.raises(SystemExit):
        bench_vllm.main([])
    assert "vLLM is not importable" in capsys.readouterr().err
