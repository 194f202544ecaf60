#!/usr/bin/env bash
# Create .venv and install fifo-stream with its test dependencies.
# torch is pinned first (TORCH_SPEC to change it): an unpinned resolver would pull
# multi-GB CUDA wheels onto CPU-only machines.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PY" -m venv .venv
.venv/bin/python -m pip install -q --upgrade pip >/dev/null 2>&1 || true
.venv/bin/python -m pip install -q "${TORCH_SPEC:-torch==2.13.0}"
.venv/bin/python -m pip install -q -e '.[test]'
