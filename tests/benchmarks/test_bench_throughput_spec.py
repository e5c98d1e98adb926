"""``bench throughput`` with speculative decoding and its prompt kinds: the workloads it builds, and one
small run of plain and speculative minipaged side by side (a tiny model; nothing is timed)."""

from __future__ import annotations

import pytest

from minipaged.benchmarks.throughput import COPY_OPENING, make_workload, speculation_lines


def test_nomatch_prompts_repeat_no_token_and_keep_the_lengths():
    random_work = make_workload(10, vocab=400, in_range=(5, 60), out_range=(2, 9), seed=3)
    for round_index in (0, 1):
        work = make_workload(10, 400, (5, 60), (2, 9), 3, round_index, "nomatch")
        assert [len(p) for p in work.prompts] == [len(p) for p in random_work.prompts]
        assert work.max_tokens == random_work.max_tokens
        assert all(len(set(p)) == len(p) and all(100 <= t < 400 for t in p) for p in work.prompts)
    assert make_workload(10, 400, (5, 60), (2, 9), 3, 1, "nomatch") != make_workload(
        10, 400, (5, 60), (2, 9), 3, 2, "nomatch"
    )


def test_copy_prompts_cycle_the_texts_after_a_fresh_opening():
    texts = [[1, 2, 3], [4, 5]]
    first = make_workload(5, 400, (5, 60), (2, 9), 3, 0, "copy", texts)
    again = make_workload(5, 400, (5, 60), (2, 9), 3, 1, "copy", texts)
    for work in (first, again):
        assert [p[COPY_OPENING:] for p in work.prompts] == [texts[i % 2] for i in range(5)]
    assert [p[:COPY_OPENING] for p in first.prompts] != [p[:COPY_OPENING] for p in again.prompts]
    with pytest.raises(ValueError):
        make_workload(5, 400, (5, 60), (2, 9), 3, 0, "copy")  # no texts
    with pytest.raises(ValueError):
        make_workload(5, 400, (5, 60), (2, 9), 3, 0, "shuffled")


def test_speculation_lines_pair_the_rounds_and_compare_tokens():
    summary = {"num_drafts": 10, "num_draft_tokens": 30, "acceptance_rate": 0.5, "mean_acceptance_length": 2.5}
    spec = {"rounds": [{"seconds": 1.0, "tokens": [[1, 2], [3, 4]], "speculation": summary}]}
    plain = {"rounds": [{"seconds": 2.0, "tokens": [[1, 2], [3, 5]]}]}
    text = "\n".join(speculation_lines(spec, plain, 2))
    assert "minipaged speculative / minipaged: 2.00x" in text
    assert "acceptance rate 0.50, mean acceptance length 2.50" in text
    assert "1/2 requests identical, 75.0% before the first difference" in text


def test_throughput_runs_plain_and_speculative_minipaged_on_copy_prompts(tmp_path, capsys):
    from tiny_models import make_tiny_model_dir

    from minipaged.entrypoints.cli import main

    model = make_tiny_model_dir(tmp_path / "model", max_model_len=512)
    spec = '{"method": "ngram", "num_speculative_tokens": 3, "prompt_lookup_min": 1}'
    argv = ["--workload", "mixed", "--num-requests", "3", "--output-len", "6", "6", "--prompts", "copy"]
    argv += ["--rounds", "1", "--skip-hf", "--threads", "1", "--model", str(model), "--speculative-config", spec]
    assert main(["bench", "throughput", *argv]) == 0
    out = capsys.readouterr().out
    assert "failed" not in out, out
    assert "minipaged speculative / minipaged:" in out and "mean acceptance length" in out
    # verification keeps greedy output: the speculative engine's tokens are the plain engine's
    assert "3/3 requests identical" in out
