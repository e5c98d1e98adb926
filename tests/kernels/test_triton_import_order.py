"""The Triton backend on CPU works whatever was imported first.

``@triton.jit`` picks interpreted or compiled mode when a function is defined, and
triton's own library (``tl.zeros``, ``tl.max``...) is defined when triton is first
imported. Each test runs in a fresh interpreter so the import order is really the one
under test (pytest's process has long imported triton under ``TRITON_INTERPRET=1``).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[2]

pytestmark = pytest.mark.skipif(torch.cuda.is_available(), reason="the interpreter path is the CPU one")

TRANSFORMERS_FIRST = r"""
import json, os, sys
import torch, transformers
torch.manual_seed(0)
cfg = transformers.LlamaConfig(vocab_size=120, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                               num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
hf = transformers.LlamaForCausalLM(cfg).eval()  # imports triton through torch._dynamo
from triton.runtime.jit import JITFunction
import triton.language as tl
before = {"triton_imported": "triton" in sys.modules, "compiled_zeros": isinstance(tl.zeros, JITFunction),
          "interpret": os.environ.get("TRITON_INTERPRET")}
from minipaged import LLM, SamplingParams
from minipaged.models import build_model_from_hf
params = SamplingParams(temperature=0, max_tokens=6, ignore_eos=True)
prompts = [{"prompt_token_ids": [5, 17, 3, 99, 42, 8, 61]}, {"prompt_token_ids": [7, 7, 100]}]
tokens = {}
for backend in ("triton", "torch"):
    model = build_model_from_hf(hf, attention_backend=backend)
    llm = LLM(model, attention_backend=backend, num_kv_blocks=16, block_size=4)
    tokens[backend] = [o.outputs[0].token_ids for o in llm.generate(prompts, params, use_tqdm=False)]
ids = torch.tensor([prompts[0]["prompt_token_ids"]])
hf_tokens = hf.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=6, min_new_tokens=6, do_sample=False,
                        pad_token_id=0)[0, ids.shape[1]:].tolist()
print(json.dumps({"before": before, "tokens": tokens, "hf": hf_tokens, "zeros_now": type(tl.zeros).__name__}))
"""

INTERPRETER_OFF = r"""
import json
import torch, transformers
from minipaged import LLM
from minipaged.errors import InvalidEngineConfigError
cfg = transformers.LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                               num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
from minipaged.models import build_model_from_hf
try:
    build_model_from_hf(transformers.LlamaForCausalLM(cfg), attention_backend="triton")
except InvalidEngineConfigError as e:
    print(json.dumps({"field": e.field, "message": str(e)}))
"""


def run_child(code: str, **env_overrides: str | None) -> str:
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env.update({k: v for k, v in env_overrides.items() if v is not None})
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc.stdout.strip().splitlines()[-1]


def test_triton_backend_after_transformers_imported_triton():
    out = json.loads(run_child(TRANSFORMERS_FIRST))
    # The case under test really happened: triton's library was defined in compiled mode.
    assert out["before"] == {"triton_imported": True, "compiled_zeros": True, "interpret": None}
    assert out["zeros_now"] == "InterpretedFunction"
    assert out["tokens"]["triton"] == out["tokens"]["torch"]
    assert out["tokens"]["triton"][0] == out["hf"]


def test_interpreter_switched_off_on_cpu_is_a_typed_error_saying_what_to_do():
    out = json.loads(run_child(INTERPRETER_OFF, TRITON_INTERPRET="0"))
    assert out["field"] == "attention_backend"
    assert "TRITON_INTERPRET" in out["message"] and "attention_backend='torch'" in out["message"]
