"""One Prefect server for a whole run: ``python -m flows.server -- dvc repro`` (or ``dvc exp run``).

Without ``PREFECT_API_URL`` every DVC stage would start (and stop) a temporary Prefect server of
its own, seconds each. This starts one on loopback (``prefect server start``, UI included), runs
the command with ``PREFECT_API_URL`` pointing at it, prints where the runs are and how much of the
wall time the flows and tasks took, then stops it. With ``PREFECT_API_URL`` already set (a server
the user runs) it uses that server. Next to it runs the stage server
(:mod:`flows.stages.forkserver`): the stack is imported once and every stage DVC starts runs in a
fork of it, instead of paying 10-16 s of imports per stage.

Standard library only: both servers import their stacks in their own processes, in parallel,
while this one just waits (the Prefect REST API is read with ``urllib``).
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as dt
import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path

from flows.stages import forkserver

STARTUP_TIMEOUT_S = 180
PAGE = 200


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _api(url: str, path: str, body: dict | None = None, timeout: float = 30) -> object:
    """GET (no body) or POST a JSON body to the Prefect REST API; the decoded reply."""
    data = None if body is None else json.dumps(body).encode()
    request = urllib.request.Request(f"{url.rstrip('/')}/{path}", data=data,
                                     headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=timeout) as reply:
        return json.loads(reply.read() or b"null")


def _wait_healthy(url: str, proc: subprocess.Popen, log: Path, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"the Prefect server exited with code {proc.returncode}:\n"
                               f"{log.read_text()[-3000:]}")
        with contextlib.suppress(OSError, ValueError):
            _api(url, "health", timeout=2)
            return
        time.sleep(0.2)
    raise RuntimeError(f"the Prefect server did not answer within {timeout:.0f} s "
                       f"(PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS); log:\n"
                       f"{log.read_text()[-3000:]}")


def warm_up(api_url: str) -> None:
    """Let a fresh server do its first-request work before the first flow run waits for it.

    The server builds each router's request models on the first request that reaches it; the
    first flow run's ``/admin/version`` passes nearly all of them (0.5 s). A request to a path
    that no route serves passes all of them; then the calls a flow run makes, read-only.
    Nothing is created (nothing shows in the UI); errors are left to the real calls.
    """
    with contextlib.suppress(OSError, ValueError):  # the path that exists nowhere: 404
        _api(api_url, "flows-server-warm-up")
    with contextlib.suppress(OSError, ValueError):
        for path in ("flows/filter", "flow_runs/filter", "task_runs/filter"):
            _api(api_url, path, {"limit": 1})


@contextlib.contextmanager
def prefect_server() -> Iterator[tuple[str, Callable[[], None], bool]]:
    """A Prefect server's API URL, a call that waits until it answers, and whether it was
    started here: the server in ``PREFECT_API_URL`` if set, else one started here (in the
    background: the caller starts other things while it imports), which stops with the
    command."""
    url = os.environ.get("PREFECT_API_URL")
    if url:
        print(f"Prefect: using the server at {url}", file=sys.stderr)
        yield url, lambda: None, False
        return
    base = f"http://127.0.0.1:{_free_port()}"
    print(f"Prefect: starting one local server for the whole run at {base} (UI and API while "
          "the command runs)...", file=sys.stderr)
    with tempfile.TemporaryDirectory(prefix="lrp-prefect-") as tmp:
        log = Path(tmp) / "server.log"
        host, port = base.removeprefix("http://").split(":")
        env = {**os.environ, "PREFECT_UI_API_URL": f"{base}/api",
               "PREFECT_SERVER_ANALYTICS_ENABLED": "false"}
        with log.open("w") as out:
            proc = subprocess.Popen(
                [sys.executable, "-m", "prefect", "server", "start", "--host", host, "--port", port],
                env=env, stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT,
                start_new_session=True,  # Ctrl-C goes to the command; the server is stopped below
            )
        timeout = float(os.environ.get("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS",
                                       STARTUP_TIMEOUT_S))
        try:
            yield f"{base}/api", lambda: _wait_healthy(f"{base}/api", proc, log, timeout), True
        finally:
            _stop(proc)


def _stop(proc: subprocess.Popen) -> None:
    proc.terminate()
    try:
        proc.wait(timeout=15)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


@contextlib.contextmanager
def stage_server(api_url: str, enabled: bool = True) -> Iterator[str | None]:
    """The socket of a stage server started here (it imports in the background), its Prefect
    settings made for ``api_url`` (so its stages need not reload them)."""
    if not enabled:
        yield None
        return
    with tempfile.TemporaryDirectory(prefix="lrp-stages-") as tmp:
        path = str(Path(tmp) / "stages.sock")
        proc = subprocess.Popen(
            [sys.executable, "-m", forkserver.MODULE, path],
            env={**os.environ, "PREFECT_API_URL": api_url}, stdin=subprocess.DEVNULL, start_new_session=True,  # stages get Ctrl-C via their caller
        )
        try:
            yield path
        finally:
            _stop(proc)


def wait_ready(path: str, timeout: float = STARTUP_TIMEOUT_S) -> bool:
    """Whether the stage server at ``path`` accepts connections within ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if forkserver.reachable(path):
            return True
        time.sleep(0.1)
    return False


def run_seconds(api_url: str, since: float) -> tuple[int, float, float]:
    """Flow runs started after ``since`` (epoch s), their summed run time and their tasks'."""
    start = dt.datetime.fromtimestamp(since, tz=dt.UTC).isoformat()
    runs = _api(api_url, "flow_runs/filter",
                {"flow_runs": {"start_time": {"after_": start}}, "limit": PAGE})
    ids = [r["id"] for r in runs]
    tasks: list = []
    while ids:  # the API returns at most PAGE task runs per call
        page = _api(api_url, "task_runs/filter",
                    {"flow_runs": {"id": {"any_": ids}}, "limit": PAGE, "offset": len(tasks)})
        tasks += page
        if len(page) < PAGE:
            break
    return (len(runs), sum(r["total_run_time"] for r in runs),
            sum(t["total_run_time"] for t in tasks))


def crash_unfinished(api_url: str, since: float) -> list[str]:
    """Mark Crashed the flow runs created after ``since`` (epoch s) that are still Pending or
    Running, not from a deployment: their command has exited, so their processes have too
    (killed without a chance to report, e.g. SIGKILL or out of memory). Their names."""
    start = dt.datetime.fromtimestamp(since, tz=dt.UTC).isoformat()
    runs = _api(api_url, "flow_runs/filter", {
        "flow_runs": {"expected_start_time": {"after_": start},
                      "state": {"type": {"any_": ["PENDING", "RUNNING"]}},
                      "deployment_id": {"is_null_": True}},
        "limit": PAGE,
    })
    for run in runs:
        _api(api_url, f"flow_runs/{run['id']}/set_state", {"state": {
            "type": "CRASHED", "name": "Crashed",
            "message": "its process ended without reporting a final state (flows.server)",
        }, "force": True})
    return [run["name"] for run in runs]


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
    with (
        prefect_server() as (api_url, prefect_ready, owned),
        stage_server(api_url, enabled=not args.no_stage_server) as stages,
    ):
        prefect_ready()
        if owned:  # in parallel with the stage server's imports and DVC's start, not before them
            threading.Thread(target=warm_up, args=(api_url,), daemon=True).start()
        env = {**os.environ, "PREFECT_API_URL": api_url}
        env.pop(forkserver.ENV, None)
        if owned:  # nothing outlives this server to act on heartbeats (flows.stages.cli)
            env.setdefault(forkserver.HEARTBEATS_ENV, "off")
        if stages is not None and wait_ready(stages):
            env[forkserver.ENV] = stages
        elif stages is not None:
            print("stage server did not start: every stage imports the stack itself",
                  file=sys.stderr)
        start = time.time()
        print(f"servers ready in {start - begin:.0f} s; running {' '.join(command)}",
              file=sys.stderr)
        proc = subprocess.Popen(command, env=env)
        # Ctrl-C is the command's to handle (DVC stops its stage, the stage says how to resume):
        # the servers stay up until it has exited, so its last reports still reach them
        previous = signal.signal(signal.SIGINT, signal.SIG_IGN)
        try:
            code = proc.wait()
        finally:
            signal.signal(signal.SIGINT, previous)
        wall = time.time() - start
        try:
            runs, in_flows, in_tasks = run_seconds(api_url, start)
        except (OSError, ValueError, KeyError) as exc:
            print(f"Prefect: could not read the run times ({exc})", file=sys.stderr)
            runs = 0
        if owned:
            try:
                crashed = crash_unfinished(api_url, start)
            except (OSError, ValueError, KeyError) as exc:
                print(f"Prefect: could not check for unfinished runs ({exc})", file=sys.stderr)
                crashed = []
            if crashed:
                print(f"Prefect: marked {len(crashed)} flow runs Crashed that the command left "
                      f"unfinished: {', '.join(crashed)}", file=sys.stderr)
    if runs:
        print(f"Prefect: {runs} flow runs; flows ran {in_flows:.1f} s, tasks {in_tasks:.1f} s "
              f"of {wall:.1f} s wall (overhead outside the flows {100 * (1 - in_flows / wall):.0f}%:"
              f" DVC, process starts, imports; outside the tasks "
              f"{100 * (1 - in_tasks / wall):.0f}%); with starting and stopping the servers "
              f"{time.time() - begin:.1f} s", file=sys.stderr)
    return code


if __name__ == "__main__":
    sys.exit(main())
