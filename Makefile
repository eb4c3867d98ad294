# Each target sets up what is missing first: a virtual environment with the CPU build of PyTorch.
# GPU users: `make setup TORCH=torch` (or any CUDA build) before the first run.
VENV   ?= .venv
PY     := $(VENV)/bin/python
TORCH  ?= torch==2.13.0
SAMPLE ?= ../shared/data/tinystories

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

# The CPU quick start: the 10-minute CPU recipe (configs/cpu-10min.toml), then the story the model wrote.
# TinyStories comes from the Hugging Face hub where it is reachable, else from the local sample in $(SAMPLE).
demo: setup
	@if $(PY) -c "import sys; from gpt_tinystories.data import hub_reachable; sys.exit(not hub_reachable())"; \
	then data="--data roneneldan/TinyStories"; \
	else data="--data $(SAMPLE)/train-head.txt --val-data $(SAMPLE)/validation-first1000.txt"; \
	     echo "Hugging Face hub unreachable: training on the local sample in $(SAMPLE)"; fi; \
	$(VENV)/bin/gpt-tinystories train --config configs/cpu-10min.toml $$data --out runs/quickstart
