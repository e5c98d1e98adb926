"""``minipaged bench quant-accuracy`` on a tiny model: its perplexity is transformers' own loss, and it
reports every scheme asked for with agreements that are fractions (fp32 agreeing with itself)."""

from __future__ import annotations

import json
import math

import pytest
import torch

from minipaged.benchmarks import quant_accuracy
from tests.tiny_models import SMOL_DIR, make_tiny_model_dir

pytestmark = pytest.mark.skipif(
    not (SMOL_DIR / "tokenizer.json").is_file(), reason="SmolLM2 tokenizer files come from `make setup`"
)


def test_score_is_transformers_mean_loss(tmp_path):
    from transformers import AutoModelForCausalLM

    src = make_tiny_model_dir(tmp_path / "src", max_model_len=256)
    model = AutoModelForCausalLM.from_pretrained(str(src), dtype=torch.float32).eval()
    ids = torch.randint(3, 49152, (41,), generator=torch.Generator().manual_seed(0)).tolist()
    nll, preds = quant_accuracy.score(model, ids, window=40)  # one window: 40 predicted tokens
    with torch.no_grad():
        want = model(input_ids=torch.tensor([ids[:-1]]), labels=torch.tensor([ids[:-1]])).loss
        # transformers shifts the labels itself: its loss covers 39 of our 40 predictions
        logits = model(input_ids=torch.tensor([ids[:-1]])).logits[0]
    last = -torch.log_softmax(logits[-1], -1)[ids[-1]]
    assert nll == pytest.approx((float(want) * 39 + float(last)) / 40, rel=1e-5)
    assert torch.equal(preds, logits.argmax(-1))


def test_bench_reports_each_scheme(tmp_path, capsys):
    src = make_tiny_model_dir(tmp_path / "src", max_model_len=256)
    out = tmp_path / "acc.json"
    argv = ["--model", str(src), "--schemes", "w4-g64-rtn", "w4-g64-gptq-desc-act", "--prompts", "2"]
    argv += ["--max-tokens", "3", "--calibration-samples", "2", "--no-progress", "--out", str(out)]
    assert quant_accuracy.main(argv) == 0
    rows = json.loads(out.read_text())["rows"]
    assert [r["scheme"] for r in rows] == ["fp32", "w4-g64-rtn", "w4-g64-gptq-desc-act"]
    assert rows[0]["top1_agreement"] == rows[0]["greedy_agreement"] == 1.0
    for r in rows:
        assert math.isfinite(r["perplexity"]) and r["perplexity"] > 1
        assert 0 <= r["top1_agreement"] <= 1 and 0 <= r["greedy_agreement"] <= 1
    assert rows[1]["perplexity"] != rows[0]["perplexity"]
    assert "| w4-g64-rtn |" in capsys.readouterr().out
