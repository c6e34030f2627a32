"""Command line of the DVC stages: ``python -m flows.stages {data,train,explain,evaluate,report}``.

Each command runs the matching Prefect flow (so a stage shows up in a Prefect server when
``PREFECT_API_URL`` points at one; otherwise Prefect starts a temporary local server). Errors print
one clear line (file or params key named) and exit non-zero, so DVC records nothing as done.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence

STAGES = ("data", "train", "explain", "evaluate", "report")


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m flows.stages", description=__doc__)
    parser.add_argument("stage", choices=STAGES)
    parser.add_argument("--params", default="params.yaml", help="params file (default params.yaml)")
    parser.add_argument("--model", help="architecture (train, explain, evaluate)")
    parser.add_argument("--force", action="store_true", help="data: regenerate the dataset")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run one stage; return the exit status."""
    args = _parser().parse_args(argv)
    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
    os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "120")
    if args.stage in ("train", "explain", "evaluate") and not args.model:
        print(f"error: stage {args.stage!r} needs --model", file=sys.stderr)
        return 2
    # Validate params before starting Prefect: a typo fails in a second with the key named.
    from flows.config import ParamsError
    from flows.pipeline import load_context

    try:
        load_context(args.params)
    except ParamsError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2

    from flows import pipeline

    try:
        if args.stage == "data":
            pipeline.data_flow(params_path=args.params, force=args.force)
        elif args.stage == "train":
            pipeline.train_flow(params_path=args.params, model=args.model)
        elif args.stage == "explain":
            pipeline.explain_flow(params_path=args.params, model=args.model)
        elif args.stage == "evaluate":
            pipeline.evaluate_flow(params_path=args.params, model=args.model)
        else:
            pipeline.report_flow(params_path=args.params)
    except KeyboardInterrupt:
        print("interrupted: rerun the same command (or dvc repro) to resume", file=sys.stderr)
        return 130
    except Exception as exc:
        print(f"error: stage {args.stage} failed: {type(exc).__name__}: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
