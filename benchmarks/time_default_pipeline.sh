#!/usr/bin/env bash
# Time the default pipeline (issue 13) on a fresh clone of this checkout, stage by stage.
#   benchmarks/time_default_pipeline.sh [DEST] [REF]
# DEST (default /tmp/pipe-<ref>) must not exist; REF (default HEAD) is the commit to clone.
# Runs what scripts/run_pipeline.sh runs after its setup, with this checkout's venv python:
#   python -m flows.stages data && dvc add data && python -m flows.server -- dvc repro
# Every output line gets the seconds since the start; DEST/timing.log keeps them and
# DEST/stages.txt lists the seconds between DVC's "Running stage" lines. Wrap it in
# `flock /work/.timing.lock` on a shared machine, and record `uptime` before and after.
set -euo pipefail
SRC="$(cd "$(dirname "$0")/.." && pwd)"
REF="${2:-HEAD}"
SHA="$(git -C "$SRC" rev-parse --short "$REF")"
DEST="${1:-/tmp/pipe-$SHA}"
PY="${PYTHON:-python}"
[ -e "$DEST" ] && { echo "$DEST exists" >&2; exit 2; }
git clone -q "$SRC" "$DEST"
git -C "$DEST" checkout -q "$SHA"
cd "$DEST"
export PYTHONPATH="$DEST" PREFECT_HOME="$DEST/.prefect-home"
export PREFECT_SERVER_ANALYTICS_ENABLED=false PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS=120
export DVC_NO_ANALYTICS=1 TQDM_DISABLE=1 PYTHONUNBUFFERED=1 MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR=false
stamp() {
  "$PY" -u -c '
import sys, time
t0 = float(sys.argv[1])
for line in sys.stdin:
    sys.stdout.write(f"{time.time() - t0:8.1f} {line}")
' "$1"
}
{
  echo "code $SHA, $(date -Is), $(nproc) cores, torch threads $("$PY" -c 'import torch; print(torch.get_num_threads())')"
  echo "uptime before: $(uptime)"
  T0=$(date +%s.%N)
  "$PY" -m flows.stages data 2>&1 | stamp "$T0"
  dvc add -q data 2>&1 | stamp "$T0"
  T1=$(date +%s.%N)
  echo "data + dvc add: $(echo "$T1 - $T0" | bc) s"
  "$PY" -m flows.server -- dvc repro 2>&1 | stamp "$T1"
  T2=$(date +%s.%N)
  echo "flows.server -- dvc repro: $(echo "$T2 - $T1" | bc) s"
  echo "uptime after: $(uptime)"
} 2>&1 | tee "$DEST/timing.log"
# seconds from each "Running stage" line to the next (the last stage ends at the server's summary)
"$PY" - "$DEST/timing.log" > "$DEST/stages.txt" <<'EOF'
import re, sys
marks = []
for line in open(sys.argv[1]):
    m = re.match(r"\s*([\d.]+) (?:Running stage '([^']+)'|Prefect: \d+ flow runs)", line)
    if m:
        marks.append((float(m.group(1)), m.group(2) or "end"))
for (t, name), (t_next, _) in zip(marks, marks[1:]):
    print(f"{name:28s} {t_next - t:7.1f} s")
EOF
cat "$DEST/stages.txt"
