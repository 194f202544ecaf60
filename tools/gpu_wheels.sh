#!/usr/bin/env bash
# Download the wheels the GPU machine lacks into .whl/ (git-ignored; carried to the device run).
# Its image has torch, einops, numpy, safetensors, tqdm, aiohttp, PyYAML and pytest (Python 3.12);
# tools/gpu_check.sh installs these wheels into /tmp/site first.
set -euo pipefail
cd "$(dirname "$0")/.."
py=.venv/bin/python
pins=$($py - <<'PY'
import importlib.metadata as m
print(" ".join(f"{n}=={m.version(n)}" for n in ("diffusers", "omegaconf", "av", "ftfy", "wcwidth", "importlib_metadata", "regex")))
PY
)
rm -rf .whl && mkdir -p .whl
$py -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
    -d .whl $pins
ls .whl
