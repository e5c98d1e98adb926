"""``bench latency --workload copy`` with speculative decoding: runs, generates every token, and
reports the acceptance counters of its last run."""

from __future__ import annotations

import json

import pytest

from minipaged.config import DEFAULT_DISABLE_BY_BATCH_SIZE
from minipaged.entrypoints.cli import main


def test_latency_copy_workload_with_speculation(tmp_path, capsys):
    from tiny_models import make_tiny_model_dir

    model = make_tiny_model_dir(tmp_path / "model", max_model_len=512)
    out = tmp_path / "latency.json"
    spec = '{"method": "ngram", "num_speculative_tokens": 3, "prompt_lookup_min": 1}'
    argv = ["--batch-size", "3", "--output-len", "6", "--num-iters", "1", "--num-iters-warmup", "0"]
    argv += ["--workload", "copy", "--temperature", "0", "--model", str(model), "--speculative-config", spec]
    assert main(["bench", "latency", *argv, "--threads", "1", "--out", str(out)]) == 0
    assert "speculation (last run)" in capsys.readouterr().out
    result = json.loads(out.read_text())
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
    from tiny_models import make_tiny_model_dir

    model = make_tiny_model_dir(tmp_path / "model", max_model_len=512)
    out = tmp_path / "latency.json"
    spec = '{"method": "ngram", "num_speculative_tokens": 3, "prompt_lookup_min": 1}'
    argv = ["--batch-size", str(batch_size), "--input-len", "12", "--output-len", "5", "--num-iters", "1"]
    argv += ["--num-iters-warmup", "0", "--workload", "nomatch", "--temperature", "0", "--model", str(model)]
    assert main(["bench", "latency", *argv, "--speculative-config", spec, "--threads", "1", "--out", str(out)]) == 0
    result = json.loads(out.read_text())
    assert result["output_tokens"] == batch_size * 5 and result["prompt_tokens"] == batch_size * 12
    assert result["workload"] == "nomatch" and result["batch_size"] == batch_size
    s = result["speculation"]
    assert 0 <= s["num_accepted_tokens"] <= s["num_draft_tokens"] <= 3 * s["num_drafts"]
    # The default batch switch: a batch that large drafts nothing.
    assert s["disable_by_batch_size"] == DEFAULT_DISABLE_BY_BATCH_SIZE
    if batch_size >= DEFAULT_DISABLE_BY_BATCH_SIZE:
        assert s["num_drafts"] == 0


def test_latency_compare_plain_alternates_with_an_engine_without_speculation(tmp_path, capsys):
    from tiny_models import make_tiny_model_dir

    model = make_tiny_model_dir(tmp_path / "model", max_model_len=512)
    out = tmp_path / "latency.json"
    spec = '{"method": "ngram", "num_speculative_tokens": 3, "prompt_lookup_min": 1}'
    argv = ["--batch-size", "2", "--output-len", "5", "--num-iters", "3", "--num-iters-warmup", "0"]
    argv += ["--workload", "copy", "--temperature", "0", "--model", str(model), "--speculative-config", spec]
    assert main(["bench", "latency", *argv, "--compare-plain", "--threads", "1", "--out", str(out)]) == 0
    assert "without speculation" in capsys.readouterr().out
    result = json.loads(out.read_text())
    plain, spec_runs = result["plain"]["latencies_s"], result["latencies_s"]
    assert len(plain) == len(spec_runs) == 3 and result["plain"]["output_len"] == 5
    ratios = sorted(p / s for p, s in zip(plain, spec_runs))
    assert result["speedup_over_plain"] == pytest.approx(ratios[1])  # the median of the paired ratios


def test_latency_compare_plain_needs_speculation(capsys):
    with pytest.raises(SystemExit) as err:
        main(["bench", "latency", "--compare-plain", "--num-iters", "1"])
    assert err.value.code == 2
    assert "--compare-plain needs --speculative-config" in capsys.readouterr().err
