# Each target sets up what is missing first: a virtual environment with the CPU build of PyTorch.
# GPU users: `make setup TORCH=torch` (or any CUDA build) before the first run.
VENV  ?= .venv
PY    := $(VENV)/bin/python
TORCH ?= torch==2.13.0

.PHONY: setup test lint demo

setup: $(VENV)/.installed

# Pin torch explicitly: an unpinned `torch` would pull a multi-GB CUDA build on a CPU-only machine.
$(VENV)/.installed: pyproject.toml
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install --quiet "$(TORCH)"
	$(PY) -m pip install --quiet -e ".[dev]"
	touch $@

test: setup
	$(VENV)/bin/ruff check .
	$(PY) -m pytest

lint: setup
	$(VENV)/bin/ruff check . && $(VENV)/bin/ruff format --check .
