"""Fixtures shared by the server test modules."""

from __future__ import annotations

from pathlib import Path

import pytest

ROOT = str(Path(__file__).resolve().parents[2])


@pytest.fixture(scope="module")
def smollm2_server(tmp_path_factory):
    """``minipaged serve`` on the real SmolLM2-135M-Instruct (its default model, a 64 MiB KV cache) for the
    module's tests; skipped where SmolLM2 is not prepared (``make setup``)."""
    from minipaged.entrypoints.openai.launch import ServerProcess, free_port, minipaged_command
    from minipaged.models.loader import default_model_is_prepared

    if not default_model_is_prepared():
        pytest.skip("SmolLM2 not prepared (make setup)")
    port = free_port()
    cmd = minipaged_command(port, "--kv-cache-memory", str(64 << 20), "--log-level", "warning")
    log = tmp_path_factory.mktemp("smollm2-server") / "server.log"
    with ServerProcess(cmd, f"http://127.0.0.1:{port}", log_path=log, cwd=ROOT) as server:
        yield server


@pytest.fixture(scope="module")
def smollm2_client(smollm2_server):
    """The official ``openai`` client of ``smollm2_server``."""
    openai = pytest.importorskip("openai")
    return openai.OpenAI(base_url=smollm2_server.base_url + "/v1", api_key="unused", max_retries=0, timeout=300)
