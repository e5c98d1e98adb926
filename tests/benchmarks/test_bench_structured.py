"""``bench structured`` runs end to end on a tiny batch and reports every part of a step."""

import pytest

from minipaged.benchmarks import structured
from minipaged.models.loader import default_model_is_prepared


def test_bench_structured_reports_fill_apply_accept(capsys):
    if not default_model_is_prepared():
        pytest.skip("SmolLM2 not prepared (make setup)")
    structured.main(["--batch", "2", "--steps", "3", "--warmup", "1", "--threads", "1"])
    out = capsys.readouterr().out
    for part in ("fill", "apply", "accept", "total"):
        assert f"  {part} " in out
    assert "batch=2" in out
