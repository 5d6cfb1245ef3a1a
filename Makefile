# Two entry points that do all set-up on a fresh machine (see README):
#   make demo   -- create .venv, install r1, run the default CPU experiment (r1-launch)
#   make test   -- create .venv, install r1 + test tools, run the whole test suite
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed

.PHONY: demo test install lint bench clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	# torch first and pinned: 2.13.0 resolves to the local CPU wheel; anything else pulls CUDA wheels.
	$(BIN)/pip install -q torch==2.13.0
	$(BIN)/pip install -q -e '.[dev]'
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(BIN)/r1-launch

test: $(STAMP)
	$(BIN)/python -m pytest -q tests

lint: $(STAMP)
	$(BIN)/ruff check r1 launcher tests benchmarks

bench: $(STAMP)
	$(BIN)/python benchmarks/grpo_step.py

clean:
	rm -rf $(VENV) outputs .r1_cache
