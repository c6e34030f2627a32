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
  # LXT (AttnLRP's authors) is the ViT test oracle; its own dependencies (transformers, open_clip)
  # are not needed: tests/test_vit_lxt.py loads its rule modules from the installed sources
  .venv/bin/python -m pip install -q --no-deps lxt==2.1
  touch "$stamp"
fi
