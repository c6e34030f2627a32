"""One Prefect server for a whole run: ``python -m flows.server -- dvc repro`` (or ``dvc exp run``).

Without ``PREFECT_API_URL`` every DVC stage would start (and stop) a temporary Prefect server of
its own, seconds each. This starts one on loopback, runs the command with ``PREFECT_API_URL``
pointing at it, prints where the runs are and how much of the wall time the tasks took, then
stops it. With ``PREFECT_API_URL`` already set (``prefect server start``) it uses that server.
Next to it runs the stage server (:mod:`flows.stages.forkserver`): the stack is imported once and
every stage DVC starts runs in a fork of it, instead of paying 10-16 s of imports per stage.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as dt
import os
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator, Sequence
from pathlib import Path

os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")

from prefect.client.orchestration import get_client
from prefect.client.schemas.filters import (
    FlowRunFilter,
    FlowRunFilterStartTime,
    TaskRunFilter,
    TaskRunFilterFlowRunId,
)
from prefect.server.api.server import SubprocessASGIServer
from prefect.settings import PREFECT_API_URL, temporary_settings

from flows.stages import forkserver

STARTUP_TIMEOUT_S = 120
PAGE = 200


@contextlib.contextmanager
def prefect_server() -> Iterator[str]:
    """The API URL of a Prefect server: ``PREFECT_API_URL`` if set, else one started here."""
    url = os.environ.get("PREFECT_API_URL")
    if url:
        print(f"Prefect: using the server at {url}", file=sys.stderr)
        yield url
        return
    print("Prefect: starting one local server for the whole run (about 10 s)...", file=sys.stderr)
    server = SubprocessASGIServer()
    server.start(timeout=STARTUP_TIMEOUT_S)
    print(
        f"Prefect: server at {server.address} (UI and API while the command runs)", file=sys.stderr
    )
    try:
        yield server.api_url
    finally:
        server.stop()


@contextlib.contextmanager
def stage_server(enabled: bool = True) -> Iterator[str | None]:
    """The socket of a stage server started here (imports in the background, ~10 s)."""
    if not enabled:
        yield None
        return
    folder = Path(tempfile.mkdtemp(prefix="lrp-stages-"))
    path = folder / "stages.sock"
    proc = subprocess.Popen(
        [sys.executable, "-m", forkserver.MODULE, str(path)],
        stdin=subprocess.DEVNULL,
        start_new_session=True,  # Ctrl-C reaches stages via their caller
    )
    try:
        yield str(path)
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
        path.unlink(missing_ok=True)
        folder.rmdir()


def wait_ready(path: str, timeout: float = STARTUP_TIMEOUT_S) -> bool:
    """Whether the stage server at ``path`` accepts connections within ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if forkserver.reachable(path):
            return True
        time.sleep(0.1)
    return False


def task_seconds(api_url: str, since: float) -> tuple[int, float]:
    """Flow runs started after ``since`` (epoch s) and the summed run time of their task runs."""
    start = dt.datetime.fromtimestamp(since, tz=dt.UTC)
    with temporary_settings({PREFECT_API_URL: api_url}), get_client(sync_client=True) as client:
        runs = client.read_flow_runs(
            flow_run_filter=FlowRunFilter(start_time=FlowRunFilterStartTime(after_=start)),
            limit=200,
        )
        ids = [r.id for r in runs]
        tasks: list = []
        while ids:  # the API returns at most PAGE task runs per call
            page = client.read_task_runs(
                task_run_filter=TaskRunFilter(flow_run_id=TaskRunFilterFlowRunId(any_=ids)),
                limit=PAGE,
                offset=len(tasks),
            )
            tasks += page
            if len(page) < PAGE:
                break
    seconds = sum(t.total_run_time.total_seconds() for t in tasks)
    return len(runs), seconds


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command after ``--`` with one Prefect server; return its exit status."""
    parser = argparse.ArgumentParser(prog="python -m flows.server", description=__doc__)
    parser.add_argument("--no-stage-server", action="store_true",
                        help="every stage imports the stack itself (slower; for comparison)")
    parser.add_argument("command", nargs=argparse.REMAINDER, help="e.g. -- dvc repro")
    args = parser.parse_args(argv)
    command = args.command[1:] if args.command[:1] == ["--"] else args.command
    if not command:
        parser.error("give the command to run, e.g. python -m flows.server -- dvc repro")
    begin = time.time()
    with stage_server(enabled=not args.no_stage_server) as stages, prefect_server() as api_url:
        env = {**os.environ, "PREFECT_API_URL": api_url}
        if stages is None:
            env.pop(forkserver.ENV, None)
        elif wait_ready(stages):
            env[forkserver.ENV] = stages
        else:
            print(
                "stage server did not start: every stage imports the stack itself", file=sys.stderr
            )
        start = time.time()
        print(f"servers ready in {start - begin:.0f} s; running {' '.join(command)}",
              file=sys.stderr)
        code = subprocess.call(command, env=env)
        wall = time.time() - start
        runs, busy = task_seconds(api_url, start)
    if runs:
        print(
            f"Prefect: {runs} flow runs; tasks ran {busy:.0f} s of {wall:.0f} s wall "
            f"(overhead {100 * (1 - busy / wall):.0f}%: process start, imports, Prefect)",
            file=sys.stderr,
        )
    return code


if __name__ == "__main__":
    sys.exit(main())
