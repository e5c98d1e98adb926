"""Serving benchmark: workload, arrivals and statistics by hand-checked cases; one short run against a tiny server."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest

from minipaged.benchmarks import serve as bs


def test_default_prompt_set_ships_with_the_package():
    prompts = bs.load_jsonl_prompts()
    assert len(prompts) >= 32 and all(isinstance(p, str) and p for p in prompts)


def test_jsonl_file_and_request_building(tmp_path):
    path = tmp_path / "p.jsonl"
    path.write_text('{"prompt": "a"}\n\n{"prompt": "b"}\n')
    args = bs.build_parser().parse_args(
        ["--dataset", str(path), "--num-prompts", "5", "--max-tokens", "7", "--raw-prompts"]
    )
    reqs = bs.build_requests(args, tokenizer=None)
    assert sorted(r.prompt for r in reqs) == ["a", "a", "a", "b", "b"] and {r.max_tokens for r in reqs} == {7}


class _TemplateTokenizer:
    def apply_chat_template(self, messages, tokenize, add_generation_prompt):
        assert not tokenize and add_generation_prompt
        return "".join(f"<{m['role']}>{m['content']}</{m['role']}>" for m in messages) + "<assistant>"


def test_prompts_go_through_the_chat_template_by_default(tmp_path):
    path = tmp_path / "p.jsonl"
    path.write_text('{"prompt": "hi"}\n')
    args = bs.build_parser().parse_args(["--dataset", str(path), "--num-prompts", "1"])
    assert [r.prompt for r in bs.build_requests(args, _TemplateTokenizer())] == ["<user>hi</user><assistant>"]


def test_synthetic_mix_is_seeded_and_bounded():
    a = bs.synthetic_requests(200, seed=1, max_output=100)
    assert a == bs.synthetic_requests(200, seed=1, max_output=100)
    assert a != bs.synthetic_requests(200, seed=2, max_output=100)
    outs = [r.max_tokens for r in a]
    assert 4 <= min(outs) and max(outs) <= 100
    lengths = [len(r.prompt.split()) for r in a]
    assert max(lengths) > 3 * np.median(lengths)  # a long tail, as in ShareGPT


def test_poisson_arrivals():
    assert bs.arrival_offsets(5, math.inf, 0) == [0.0] * 5
    offsets = bs.arrival_offsets(20000, 4.0, 0)
    assert offsets[0] == 0.0 and all(b >= a for a, b in zip(offsets, offsets[1:]))
    gaps = np.diff(offsets)
    assert abs(gaps.mean() - 0.25) < 0.01 and abs(gaps.std() - 0.25) < 0.01  # exponential: std == mean


def test_summarize_by_hand():
    ok = bs.RequestResult(
        ok=True, prompt_tokens=10, output_tokens=3, text="abc", ttft=0.1, e2e=0.5, chunk_times=[0.1, 0.3, 0.5]
    )
    no_usage = bs.RequestResult(ok=True, text="xyz w", ttft=0.2, e2e=0.2, chunk_times=[0.2])
    failed = bs.RequestResult(ok=False, error="HTTP 500")
    s = bs.summarize([ok, no_usage, failed], 2.0, count_tokens=lambda t: len(t.split()), prompt_tokens=[10, 4, 6])
    assert (s["successful"], s["failed"], s["errors"]) == (2, 1, ["HTTP 500"])
    assert (s["prompt_tokens"], s["output_tokens"]) == (14, 5)  # the second counted by re-tokenising
    assert s["output_throughput"] == 2.5 and s["request_throughput"] == 1.0
    assert s["ttft_ms"]["mean"] == pytest.approx(150.0)
    assert s["tpot_ms"]["mean"] == pytest.approx(100.0)  # mean of (0.5 - 0.1) / 2 and (0.2 - 0.2) / 1
    assert s["itl_ms"]["median"] == pytest.approx(200.0)
    assert s["e2e_ms"]["p99"] == pytest.approx(200 + 0.99 * 300)
    table = bs.format_table({"servers": [{"server": "x", "peak_rss_bytes": None, "runs": [{"rate": 1.0, **s}]}]})
    assert table.count("\n") == 2 and "| x | 1.0 | 2 | 1 |" in table
    assert bs.jsonable({"rate": math.inf, "r": [1.0]}) == {"rate": "inf", "r": [1.0]}


@pytest.mark.slow
def test_bench_against_a_tiny_minipaged_server(tmp_path):
    from tiny_models import SMOL_DIR, make_tiny_model_dir

    if not (SMOL_DIR / "tokenizer.json").exists():
        pytest.skip("SmolLM2 tokenizer not prepared (make setup)")
    model = make_tiny_model_dir(tmp_path / "tiny")
    out = tmp_path / "report.json"
    args = [
        "--servers",
        "minipaged",
        "--model",
        str(model),
        "--num-kv-blocks",
        "128",
        "--num-prompts",
        "6",
        "--max-tokens",
        "8",
        "--request-rate",
        "20",
        "inf",
        "--warmup",
        "1",
        "--output",
        str(out),
        "--log-dir",
        str(tmp_path / "logs"),
    ]
    assert bs.main(args) == 0
    report = json.loads(out.read_text())
    (server,) = report["servers"]
    assert server["peak_rss_bytes"] > 0
    assert [r["rate"] for r in server["runs"]] == [20.0, "inf"]
    for run in server["runs"]:
        assert run["successful"] == 6 and run["failed"] == 0
        assert 6 <= run["output_tokens"] <= 48 and run["ttft_ms"]["median"] > 0
        assert len(run["ttft_all_ms"]) == 6
