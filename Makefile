# The two commands of the README. Both set up .venv first (idempotent).
SHELL := /bin/bash
export PATH := $(CURDIR)/.venv/bin:$(PATH)
MODE ?= retail_media

.PHONY: setup setup-llama pipeline test test-fast lint

setup:
	@bash scripts/setup.sh

# setup, plus llama-cpp-python built from source and llama.cpp's converters: `loraflow export --to gguf|ollama`.
setup-llama:
	@bash scripts/setup.sh --with-llama

# The whole DAG on the embedded default through DVC, then where the results are.
pipeline: setup
	dvc repro
	loraflow report --mode $(MODE)

# Everything CI runs: lint, unit tests and the slow end-to-end runs (GPU tests skip without CUDA); the export
# test replays a GGUF on llama.cpp, hence setup-llama.
test: setup-llama
	ruff check .
	python -m pytest -q --durations=25

test-fast: setup
	python -m pytest -q -m "not slow"

lint: setup
	ruff check .
