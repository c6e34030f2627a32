"""Orchestration overhead of the pipeline: a tiny ``dvc repro`` and ``dvc exp run``, with and
without the stage server, each in a fresh copy of the project (issue 13).

"Overhead outside flows" is the command's wall time not spent inside the stages' Prefect flow runs
(DVC's own work, process starts, imports); "outside tasks" also counts the flows' own code and
Prefect's bookkeeping; both as ``python -m flows.server`` prints them. "With servers" adds
starting and stopping the Prefect and stage servers; "process total" adds importing flows.server.

    python benchmarks/bench_pipeline.py            # both modes, markdown table
    python benchmarks/bench_pipeline.py --config default --modes stage-server
    python benchmarks/bench_pipeline.py --modes stage-server --repeat 3   # the host is shared
"""

from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests"))

from pipeline_helpers import (  # noqa: E402
    GIT,
    copy_project,
    env,
    init_project,
    run,
    tiny_params,
    write_params,
)

MODES = {"stage-server": [], "no-stage-server": ["--no-stage-server"]}
NUM = r"(\d+(?:\.\d+)?)"
SUMMARY = re.compile(rf"Prefect: (\d+) flow runs; flows ran {NUM} s, tasks {NUM} s of {NUM} s wall"
                     rf".*servers {NUM} s")


def _project(root: Path, config: str) -> dict[str, str]:
    """A fresh project copy with its dataset added to DVC; the environment to run it in."""
    copy_project(root)
    if config == "tiny":
        write_params(root / "params.yaml", tiny_params(root))
    e = env(root, **GIT)
    init_project(root, e)
    run(["git", "add", "-A"], root, e)
    run(["git", "commit", "-qm", "init"], root, e)
    return e


def _timed(cmd: list[str], root: Path, e: dict[str, str]) -> dict[str, float]:
    load_before = os.getloadavg()[0]
    start = time.time()
    out = run(cmd, root, e, timeout=3600)
    total = time.time() - start
    found = SUMMARY.search(out)
    if not found:
        raise RuntimeError(f"no Prefect summary line in the output of {' '.join(cmd)}:\n{out}")
    runs, flows, tasks, wall, with_servers = (float(g) for g in found.groups())
    return {"runs": int(runs), "flow_s": flows, "task_s": tasks, "wall_s": wall,
            "servers_s": with_servers, "total_s": total,
            "load": f"{load_before:.1f} -> {os.getloadavg()[0]:.1f}"}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--config", choices=("tiny", "default"), default="tiny")
    parser.add_argument("--modes", nargs="+", choices=list(MODES), default=list(MODES))
    parser.add_argument("--repeat", type=int, default=1,
                        help="run every mode this many times, one row each (the host is shared)")
    args = parser.parse_args()
    rows = []
    for mode in [m for _ in range(args.repeat) for m in args.modes]:
        with tempfile.TemporaryDirectory(prefix="bench-pipeline-") as tmp:
            root = Path(tmp) / "project"
            e = _project(root, args.config)
            server = ["python", "-m", "flows.server", *MODES[mode], "--"]
            rows.append((mode, "dvc repro", _timed([*server, "dvc", "repro"], root, e)))
            run(["git", "add", "-A"], root, e)
            run(["git", "commit", "-qm", "repro"], root, e)
            exp = [*server, "dvc", "exp", "run", "-S", "explain.composite=epsilon"]
            rows.append((mode, "dvc exp run -S explain.composite=epsilon", _timed(exp, root, e)))
    code = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO, capture_output=True,
                          text=True, check=False).stdout.strip()
    print(f"config: {args.config}; code {code}; {time.strftime('%Y-%m-%d')}")
    print("| mode | command | load (1 min) | flow runs | in flows s | in tasks s | command wall s "
          "| outside flows s | overhead outside flows | outside tasks | with servers s "
          "| process total s |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |")
    for mode, what, r in rows:
        print(f"| {mode} | `{what}` | {r['load']} | {r['runs']} | {r['flow_s']:.1f} | "
              f"{r['task_s']:.1f} | {r['wall_s']:.1f} | {r['wall_s'] - r['flow_s']:.1f} | "
              f"{100 * (1 - r['flow_s'] / r['wall_s']):.0f}% | "
              f"{100 * (1 - r['task_s'] / r['wall_s']):.0f}% | {r['servers_s']:.1f} | "
              f"{r['total_s']:.0f} |")


if __name__ == "__main__":
    main()
