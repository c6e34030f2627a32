"""Deployments of the pipeline, served from this process: ``python -m flows.serve``.

Needs a Prefect server (``prefect server start``) and ``PREFECT_API_URL`` pointing at it. While this
process runs it polls for scheduled runs, so ``prefect deployment run 'lrp-pipeline/default' -p
overrides='{"train.epochs": 1}'`` starts the pipeline here, in a subprocess, with this checkout's
code. Deployments: ``lrp-pipeline/default`` (whole pipeline) and ``<stage>/default`` for every
deployed stage of :data:`flows.stages.registry.STAGES`.
"""

from __future__ import annotations

import argparse
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from prefect import serve
from prefect.deployments.runner import EntrypointType

from flows.context import load_context
from flows.stages.registry import PIPELINE, STAGES


def deployments(params_path: str | Path, *, stages: bool = True) -> list[Any]:
    """Runner deployments whose default ``params_path`` is the absolute path of the params file."""
    params = str(Path(params_path).resolve())
    common: dict[str, Any] = {"entrypoint_type": EntrypointType.MODULE_PATH, "tags": ["lrp"]}
    result = [
        PIPELINE.to_deployment(
            name="default",
            parameters={"params_path": params},
            description="Train, explain, evaluate and report (params file plus overrides).",
            **common,
        )
    ]
    if stages:
        result += [
            s.flow.to_deployment(name="default", parameters={"params_path": params}, **common)
            for s in STAGES.values() if s.deployed
        ]
    return result


def main(argv: Sequence[str] | None = None) -> None:
    """Register the deployments and poll for their runs until interrupted."""
    parser = argparse.ArgumentParser(prog="python -m flows.serve", description=__doc__)
    parser.add_argument("--params", default="params.yaml", help="default params file")
    parser.add_argument("--limit", type=int, default=1, help="concurrent flow runs (default 1)")
    parser.add_argument("--pipeline-only", action="store_true", help="serve lrp-pipeline only")
    args = parser.parse_args(argv)
    if not os.environ.get("PREFECT_API_URL"):
        parser.error(
            "PREFECT_API_URL is not set: start `prefect server start` and "
            "`export PREFECT_API_URL=http://127.0.0.1:4200/api` first"
        )
    load_context(args.params)  # a bad params file fails here, not in the first run
    serve(*deployments(args.params, stages=not args.pipeline_only), limit=args.limit)


if __name__ == "__main__":
    main()
