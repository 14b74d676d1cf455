#!/usr/bin/env bash
# Create benchmarks/.kvpress-venv: a venv *separate* from the project's, with NVIDIA kvpress 0.5.5.
# kvpress 0.5.x pins transformers < 5.3 (it brings 5.2.0) and fails on kvpolicy's transformers 5.23
# (KeyError: 'cache_position'), so it cannot share .venv. torch is pinned first to the CPU build already used by the
# project (an unpinned torch pulls several GB of CUDA packages).
# Usage: bash benchmarks/setup_kvpress_venv.sh     (idempotent; PYTHON=python3.11 to choose the interpreter)
set -euo pipefail
cd "$(dirname "$0")"
PYTHON=${PYTHON:-python3}
VENV=.kvpress-venv
if [ ! -x "$VENV/bin/python" ]; then
  "$PYTHON" -m venv "$VENV"
fi
"$VENV/bin/python" -m pip install --quiet --upgrade pip
"$VENV/bin/python" -m pip install --quiet torch==2.13.0
"$VENV/bin/python" -m pip install --quiet kvpress==0.5.5 psutil
"$VENV/bin/python" - <<'PY'
import importlib.metadata as m
for p in ("torch", "transformers", "kvpress"):
    print(f"{p}=={m.version(p)}")
PY
