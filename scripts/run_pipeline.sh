#!/usr/bin/env bash
# The main command: set up (first run only) and run the default pipeline, offline.
#   scripts/run_pipeline.sh            # venv + synthetic data + dvc repro
#   scripts/run_pipeline.sh --force    # dvc repro --force (rerun every stage)
# Needs python3.11 and access to a package index (pip); no other network.
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT="$PWD"
PY="${PYTHON:-python3}"

echo "==> environment (.venv; installs on first run only)"
./scripts/setup.sh
export PATH="$ROOT/.venv/bin:$PATH"          # dvc.yaml stages call `python`
export PREFECT_SERVER_ANALYTICS_ENABLED="${PREFECT_SERVER_ANALYTICS_ENABLED:-false}"
export PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS="${PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS:-120}"

if [ ! -d .dvc ]; then
  echo "==> dvc init"
  dvc init -q
  dvc config core.analytics false
fi

DATA_ROOT="$(python -c 'from flows.config import load_params; print(load_params().data.root)')"
if [ ! -e "$DATA_ROOT/manifest.json" ] && [ -z "$(ls -A "$DATA_ROOT" 2>/dev/null)" ]; then
  echo "==> generating the synthetic dataset in $DATA_ROOT (deterministic)"
  python -m flows.stages data
fi
# data.dvc records the dataset's hash (a no-op when it already matches).
[ -d data ] && dvc add -q data

START=$(date +%s)
# One Prefect server for every stage (instead of a temporary one per stage); prints the task time.
if [ "${1:-}" = "--force" ]; then
  python -m flows.server -- dvc repro --force
else
  python -m flows.server -- dvc repro
fi
END=$(date +%s)

echo
echo "==> pipeline finished in $((END - START)) s"
dvc status
dvc metrics show
cat <<MSG

Results
  models       outputs/models/        relevance shards  outputs/relevance/<model>/
  metrics      metrics/<model>/*.json per-image scores  outputs/eval/<model>/scores.csv
  figures      outputs/report/<model>/ (heatmaps, curves, conservation histograms), outputs/report/summary.md
  plots        dvc plots show   (static PNG curves, offline HTML in dvc_plots/)
  compare      python -m flows.server -- dvc exp run -S explain.composite=epsilon; dvc exp show --md --only-changed
  study        python -m flows.studies.otsuki_table --model small_resnet   (writes outputs/studies/)

MLflow UI (runs, metrics, per-image tables, heatmaps, models):
  .venv/bin/mlflow ui --backend-store-uri sqlite:///$ROOT/mlflow.db --port 5000
  then open http://127.0.0.1:5000 (experiment "lrp-at-scale")

dvc.lock changes after every run (epoch timings, data file times, MLflow run ids: README);
metrics/ repeat on one machine, not across CPUs (training is not bit-exact across them).
MSG
