# Two commands on a fresh machine:  `make demo` (the main job) and `make test` (the test suite).
PY ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
# PyTorch first, from pip's configured index unless TORCH_INDEX names another. Where that index is
# the public PyPI, `torch` on Linux is the multi-GB CUDA build: for the CPU build pass
# TORCH_INDEX=https://download.pytorch.org/whl/cpu (a CUDA one: .../whl/cu126).
TORCH_SPEC ?= torch==2.13.0
TORCH_INDEX ?=
PRESET ?= quick

.PHONY: venv demo test lint typecheck check bench clean

$(BIN)/.installed: pyproject.toml
	$(PY) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q $(if $(TORCH_INDEX),--index-url $(TORCH_INDEX)) "$(TORCH_SPEC)"
	$(BIN)/python -m pip install -q -e ".[dev]"
	touch $@

venv: $(BIN)/.installed

demo: venv
	$(BIN)/domainmerge demo --preset $(PRESET) --out demo_out --force

test: venv
	$(BIN)/python -m pytest -n 2 tests

lint: venv
	$(BIN)/ruff check src tests benchmarks
	# the import layers of docs/CONTRACTS.md: no upward import, no cycle (a second, reads sources only)
	$(BIN)/python -m pytest -q -n 0 -p no:cacheprovider tests/test_layers.py

typecheck: venv
	$(BIN)/mypy

check: lint typecheck test

clean:
	rm -rf $(VENV) demo_out .pytest_cache .mypy_cache .ruff_cache
