"""``bench latency --workload copy`` with speculative decoding: runs, generates every token, and
reports the acceptance counters of its last run."""

from __future__ import annotations

import json

import pytest

from minipaged.config import DEFAULT_DISABLE_BY_BATCH_SIZE
from minipaged.entrypoints.cli import main

SPEC = '{"method": "ngram", "num_speculative_tokens": 3, "prompt_lookup_min": 1}'


def run_latency(tmp_path, workload: str, batch_size: int, output_len: int, *extra: str) -> dict:
    """``bench latency`` of a tiny model with n-gram speculation (k = 3), greedy, one thread, no warm-up;
    returns its JSON result."""
    from tiny_models import make_tiny_model_dir

    model = make_tiny_model_dir(tmp_path / "model", max_model_len=512)
    out = tmp_path / "latency.json"
    argv = ["--batch-size", str(batch_size), "--output-len", str(output_len), "--num-iters-warmup", "0"]
    argv += ["--workload", workload, "--temperature", "0", "--model", str(model), "--speculative-config", SPEC]
    assert main(["bench", "latency", *argv, *extra, "--threads", "1", "--out", str(out)]) == 0
    return json.loads(out.read_text())


def test_latency_copy_workload_with_speculation(tmp_path, capsys):
    result = run_latency(tmp_path, "copy", 3, 6, "--num-iters", "1")
    assert "speculation (last run)" in capsys.readouterr().out
    assert result["output_tokens"] == 3 * 6 and result["workload"] == "copy"
    s = result["speculation"]
    # A random-weight model rarely repeats its prompt, so drafts may be few or none; the counters agree.
    assert 0 <= s["num_accepted_tokens"] <= s["num_draft_tokens"] <= 3 * s["num_drafts"]
    if s["num_drafts"]:
        assert s["mean_acceptance_length"] == 1 + s["num_accepted_tokens"] / s["num_drafts"]
    else:
        assert s["mean_acceptance_length"] is None and s["acceptance_rate"] is None


def test_nomatch_prompts_repeat_no_token():
    from minipaged.benchmarks.latency import nomatch_prompts
    from minipaged.spec_decode.ngram import propose_ngram

    prompts = nomatch_prompts(16, 40, vocab_size=500)
    assert len(prompts) == 16 and all(len(p) == len(set(p)) == 40 and all(0 <= t < 500 for t in p) for p in prompts)
    assert all(propose_ngram(p, 4, 1, 4) == [] for p in prompts)  # prompt lookup finds nothing
    assert prompts == nomatch_prompts(16, 40, vocab_size=500)


@pytest.mark.parametrize("batch_size", [4, 16])
def test_latency_nomatch_workload_batched_with_speculation(tmp_path, batch_size):
    result = run_latency(tmp_path, "nomatch", batch_size, 5, "--input-len", "12", "--num-iters", "1")
    assert result["output_tokens"] == batch_size * 5 and result["prompt_tokens"] == batch_size * 12
    assert result["workload"] == "nomatch" and result["batch_size"] == batch_size
    s = result["speculation"]
    assert 0 <= s["num_accepted_tokens"] <= s["num_draft_tokens"] <= 3 * s["num_drafts"]
    # The default batch switch: a batch that large drafts nothing.
    assert s["disable_by_batch_size"] == DEFAULT_DISABLE_BY_BATCH_SIZE
    if batch_size >= DEFAULT_DISABLE_BY_BATCH_SIZE:
        assert s["num_drafts"] == 0


def test_latency_compare_plain_alternates_with_an_engine_without_speculation(tmp_path, capsys):
    result = run_latency(tmp_path, "copy", 2, 5, "--num-iters", "3", "--compare-plain")
    assert "without speculation" in capsys.readouterr().out
    plain, spec_runs = result["plain"]["latencies_s"], result["latencies_s"]
    assert len(plain) == len(spec_runs) == 3 and result["plain"]["output_len"] == 5
    ratios = sorted(p / s for p, s in zip(plain, spec_runs))
    assert result["speedup_over_plain"] == pytest.approx(ratios[1])  # the median of the paired ratios


def test_latency_compare_plain_needs_speculation(capsys):
    with pytest.raises(SystemExit) as err:
        main(["bench", "latency", "--compare-plain", "--num-iters", "1"])
    assert err.value.code == 2
    assert "--compare-plain needs --speculative-config" in capsys.readouterr().err
