"""Test-wide setup: run Triton kernels in the interpreter when no GPU is present.

TRITON_INTERPRET must be set before any ``@triton.jit`` kernel is defined, so this
runs before the test modules import ``kernels``.
"""
import os

if "TRITON_INTERPRET" not in os.environ:
    import torch

    if not torch.cuda.is_available():
        os.environ["TRITON_INTERPRET"] = "1"
os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")

import pytest  # noqa: E402
import torch  # noqa: E402


@pytest.fixture
def device() -> torch.device:
    """Where kernel tests put tensors: CPU under the interpreter, else CUDA."""
    if os.environ.get("TRITON_INTERPRET") == "1" or not torch.cuda.is_available():
        return torch.device("cpu")
    return torch.device("cuda")
