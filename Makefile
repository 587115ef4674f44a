# The two commands of the README. Both set up .venv first (idempotent).
SHELL := /bin/bash
export PATH := $(CURDIR)/.venv/bin:$(PATH)
MODE ?= retail_media

.PHONY: setup pipeline test test-fast lint

setup:
	@bash scripts/setup.sh

# The whole DAG on the embedded default through DVC, then where the results are.
pipeline: setup
	dvc repro
	loraflow report --mode $(MODE)

# Everything CI runs: lint, unit tests and the slow end-to-end runs (GPU tests skip without CUDA).
test: setup
	ruff check .
	python -m pytest -q --durations=25

test-fast: setup
	python -m pytest -q -m "not slow"

lint: setup
	ruff check .
