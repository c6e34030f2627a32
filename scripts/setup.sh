#!/usr/bin/env bash
# Create .venv (if missing) with the project and its pipeline/test dependencies.
# torch/torchvision come first and pinned: on this project's machines pip takes them from local disk.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3.11}
command -v "$PY" >/dev/null 2>&1 || PY=python3
if [ ! -x .venv/bin/python ]; then
  "$PY" -m venv .venv
fi
stamp=.venv/.lrp-installed
if [ ! -f "$stamp" ] || [ pyproject.toml -nt "$stamp" ]; then
  .venv/bin/python -m pip install -q torch==2.14.1 torchvision==0.29.1
  .venv/bin/python -m pip install -q -e '.[pipeline,baselines,dev]'
  touch "$stamp"
fi
