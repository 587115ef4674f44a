#!/usr/bin/env bash
# llama-cpp-python built from source into .venv, and llama.cpp's conversion scripts from the same source in
# .venv/share/llama.cpp: what `loraflow export --to gguf|ollama` and its tests need. Run by
# `scripts/setup.sh --with-llama` (make test, make setup-llama); not by `make pipeline`, which stays short.
# Idempotent: it checks what is installed, not a stamp; nothing is done when both are in place.
#   LLAMA_CPP_PYTHON  the version (default 0.3.36: the one whose vendored converters loraflow was tested with)
#   LLAMA_CMAKE_ARGS  extra CMake flags for the build (e.g. -DGGML_NATIVE=OFF for a portable build)
set -euo pipefail
cd "$(dirname "$0")/.."
VER=${LLAMA_CPP_PYTHON:-0.3.36}
PY=.venv/bin/python
cache=.venv/cache/llama-cpp
share=.venv/share/llama.cpp
quiet() { "$@" 2> >(grep -v "is ignored: it is neither a file nor a directory" >&2); }
sdist() { ls "$cache"/llama_cpp_python-"$VER".tar.gz 2>/dev/null || true; }
fetch() {
  if [ -z "$(sdist)" ]; then
    mkdir -p "$cache"
    quiet "$PY" -m pip download -q --no-deps --no-binary :all: "llama-cpp-python==$VER" -d "$cache"
  fi
  sdist
}
start=$(date +%s)
if ! "$PY" -c "import llama_cpp, sys; sys.exit(llama_cpp.__version__ != '$VER')" 2>/dev/null; then
  src=$(fetch)
  echo "setup: building llama-cpp-python $VER from source (a few minutes on 2 cores)"
  # llava (multimodal) is not used: leaving it out cuts the build time.
  CMAKE_ARGS="-DLLAVA_BUILD=OFF ${LLAMA_CMAKE_ARGS:-}" quiet "$PY" -m pip install -q "$src"
fi
# convert_hf_to_gguf.py imports sentencepiece for Llama-architecture bases even when they have no
# tokenizer.model (llama.cpp's requirements-convert_legacy_llama.txt lists it).
if ! "$PY" -c "import sentencepiece" 2>/dev/null; then
  quiet "$PY" -m pip install -q "sentencepiece>=0.1.98,<0.3.0"
fi
if [ "$(cat "$share/VERSION" 2>/dev/null)" != "$VER" ]; then
  src=$(fetch)
  mkdir -p "$(dirname "$share")"
  tmp=$(mktemp -d "${share}.tmp-XXXXXX")
  top="llama_cpp_python-$VER/vendor/llama.cpp"
  tar -xzf "$src" -C "$tmp" "$top/convert_lora_to_gguf.py" "$top/convert_hf_to_gguf.py" "$top/gguf-py" "$top/conversion"
  echo "$VER" > "$tmp/$top/VERSION"
  rm -rf "$share"
  mv "$tmp/$top" "$share"
  rm -rf "$tmp"
fi
echo "setup: llama-cpp-python $VER and llama.cpp's converters ($share) ready in $(( $(date +%s) - start )) s"
