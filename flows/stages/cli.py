"""Command line of the DVC stages: ``python -m flows.stages {data,train,explain,evaluate,report}``.

(:mod:`flows.stages.__main__` runs this here or in a child of the stage server.)

Each command runs the stage's Prefect flow against the server in ``PREFECT_API_URL`` (one server
for a whole ``dvc repro``: ``python -m flows.server -- dvc repro``) or, without it, a temporary
server of its own; it says which. Errors print one clear line (file or params key named) and exit
non-zero, so DVC records nothing as done.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import sys
from collections.abc import Iterator, Sequence

os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "120")

from prefect.context import SettingsContext, get_settings_context

from flows.config import ParamsError
from flows.context import load_context
from flows.stages.forkserver import HEARTBEATS_ENV
from flows.stages.registry import STAGES


@contextlib.contextmanager
def flow_settings() -> Iterator[None]:
    """Prefect settings for the stage's flow run: without heartbeats where they serve nothing.

    A flow run sends a heartbeat event every ``PREFECT_FLOWS_HEARTBEAT_FREQUENCY`` seconds (180
    by default) for automations that mark runs Crashed when their process died silently; its
    heartbeat thread sleeps in 1 s steps and the run waits for it at its end, 0.5 s per run on
    average. ``python -m flows.server`` sets ``LRP_FLOW_HEARTBEATS=off`` when it started the
    Prefect server itself: that server stops with the command, so no automation could act on
    them, and ``flows.server`` marks a run its command left unfinished Crashed itself. A
    frequency set anywhere Prefect reads settings (environment, profile, ``prefect.toml``) keeps
    them on; so does a server of your own (``PREFECT_API_URL``).
    """
    context = get_settings_context()
    flows = context.settings.flows
    if os.environ.get(HEARTBEATS_ENV) != "off" or "heartbeat_frequency" in flows.model_fields_set:
        yield
        return
    # a copy with the one value changed (prefect.settings.temporary_settings would validate
    # every setting from every source again: 0.1 s)
    settings = context.settings.model_copy(
        update={"flows": flows.model_copy(update={"heartbeat_frequency": None})}
    )
    with SettingsContext(profile=context.profile, settings=settings):
        yield


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m flows.stages", description=__doc__)
    parser.add_argument("stage", choices=list(STAGES))
    parser.add_argument("--params", default="params.yaml", help="params file (default params.yaml)")
    parser.add_argument("--model", help="architecture (stages that run per model)")
    parser.add_argument("--force", action="store_true", help="data: regenerate the dataset")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run one stage; return the exit status."""
    args = _parser().parse_args(argv)
    stage = STAGES[args.stage]
    if stage.per_model and not args.model:
        print(f"error: stage {args.stage!r} needs --model", file=sys.stderr)
        return 2
    try:  # validate params before starting Prefect: a typo fails in a second with the key named
        load_context(args.params)
    except ParamsError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    api = os.environ.get("PREFECT_API_URL")
    print(
        f"Prefect: stage {args.stage} reports to {api}"
        if api
        else f"Prefect: stage {args.stage} starts a temporary server (5-15 s; share one for the "
        "whole run: python -m flows.server -- dvc repro)",
        file=sys.stderr,
    )
    kwargs: dict[str, object] = {"params_path": args.params}
    if stage.per_model:
        kwargs["model"] = args.model
    if args.force:
        kwargs["force"] = True
    try:
        with flow_settings():
            stage.flow(**kwargs)
    except KeyboardInterrupt:
        print("interrupted: rerun the same command (or dvc repro) to resume", file=sys.stderr)
        return 130
    except Exception as exc:
        print(f"error: stage {args.stage} failed: {type(exc).__name__}: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
