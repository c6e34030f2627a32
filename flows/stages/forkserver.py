"""Stages without the import tax: one process imports torch, Prefect, MLflow and the flows once,
then forks a fresh child for every ``python -m flows.stages ...`` that DVC runs.

Each DVC stage is a new process, and importing the stack costs 10-16 s, more than the tiny
pipeline's work. ``python -m flows.server -- dvc repro`` starts this server next to the Prefect
server and sets ``LRP_STAGE_SERVER`` to its socket. The stage command (:func:`delegate`, stdlib
only) hands its argv, working directory, environment and stdin/stdout/stderr to the server; a
forked child runs the stage exactly as :mod:`flows.stages.cli` would, writing to the caller's
terminal, and the caller exits with the child's status. Ctrl-C and SIGTERM reach the child.

CPU threads: torch's OpenMP (libgomp) cannot be forked once it has started its worker threads (a
child that enters a parallel region then waits forever for workers that were never copied), so the
server runs torch single-threaded and each child sets the stage's thread count (``OMP_NUM_THREADS``
of the caller, else torch's default, one per core). :func:`cpu_defaults` makes idle OpenMP workers
sleep instead of spin (``OMP_WAIT_POLICY=PASSIVE``, unless set): spinning workers keep a core busy
between parallel regions, which on a 2-core machine with another job on the other core made training
and the metric forwards 2-3x slower than one thread (BENCHMARKS.md, the default pipeline).

Never stale: the server records the modification times of every ``lrp``/``flows`` source file it
imported; a request from another checkout, or after a file changed, is refused and the caller
runs the stage itself (a fresh import), while the server restarts to pick up the new code.
"""

from __future__ import annotations

import atexit
import contextlib
import gc
import importlib
import json
import os
import signal
import socket
import sys
import threading
import traceback
import weakref
from collections.abc import Sequence
from pathlib import Path
from typing import NoReturn

ENV = "LRP_STAGE_SERVER"
# "off": the Prefect server lives only as long as the command (flows.server started it), so the
# stages' flow runs send no heartbeats (see flows.stages.cli.flow_settings)
HEARTBEATS_ENV = "LRP_FLOW_HEARTBEATS"
PACKAGES = ("flows", "lrp")
# what the stages import lazily (each child would repeat it): Prefect on a process's first flow
# run; the figures' Agg backend (evaluate, report); MLflow's SQL store, its migrations, model
# logging and the git lookup in report (1 s); tabulate, which torch._dynamo's exit handler
# (registered when torchvision imports it) imports to format its table (40 ms per stage)
WARM = ("prefect.engine", "prefect.flow_engine", "prefect.utilities.visualization",
        "anyio._backends._asyncio", "matplotlib.backends.backend_agg",
        "mlflow.store.tracking.sqlalchemy_store", "sqlalchemy.dialects.sqlite", "alembic.command",
        "mlflow.pytorch", "mlflow.pyfunc", "git", "tabulate")
MODULE = "flows.stages.forkserver"  # what `python -m` runs (here __name__ is "__main__")
CPU_ENV = {"OMP_WAIT_POLICY": "PASSIVE"}  # idle OpenMP threads sleep (libgomp's default: spin)


def cpu_defaults() -> None:
    """Set :data:`CPU_ENV` where the environment does not: call before torch is imported (libgomp
    reads it once, when torch loads it)."""
    for key, value in CPU_ENV.items():
        os.environ.setdefault(key, value)


def _send(sock: socket.socket, message: dict, fds: Sequence[int] = ()) -> None:
    """One JSON line; ``fds`` travel with its first byte (SCM_RIGHTS)."""
    data = json.dumps(message).encode() + b"\n"
    if fds:
        socket.send_fds(sock, [data[:1]], list(fds))
        data = data[1:]
    sock.sendall(data)


def _recv_request(sock: socket.socket) -> tuple[dict | None, list[int]]:
    """The caller's one message and its three stream fds (None when it hung up first)."""
    chunk, fds, _, _ = socket.recv_fds(sock, 65536, 3)
    buf = chunk
    while chunk and not buf.endswith(b"\n"):
        chunk = sock.recv(65536)
        buf += chunk
    return (json.loads(buf) if buf.endswith(b"\n") else None), list(fds)


# -- the caller's side (stdlib only: it runs before any heavy import) ------------------------------


def reachable(path: str) -> bool:
    """Whether a stage server listens at ``path``."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        try:
            sock.connect(path)
        except OSError:
            return False
    return True


def delegate(argv: Sequence[str]) -> int | None:
    """Run the stage in the server's forked child; its exit status, or None to run it here."""
    path = os.environ.get(ENV)
    if not path:
        return None
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        sock.connect(path)
    except OSError:
        sock.close()
        print(
            f"stage server {path} not reachable: running the stage in this process", file=sys.stderr
        )
        return None
    with sock, sock.makefile("rb") as replies:
        request = {
            "argv": list(argv),
            "cwd": os.getcwd(),
            "env": dict(os.environ),
            "code": str(_code_root()),
        }
        _send(sock, request, [0, 1, 2])
        reply = json.loads(replies.readline() or "null")
        if reply is None or "pid" not in reply:
            why = (reply or {}).get("refused", "the server closed the connection")
            print(f"stage server: {why}; running the stage in this process", file=sys.stderr)
            return None
        child = reply["pid"]

        def forward(signum: int, _frame: object) -> None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(child, signum)

        for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
            signal.signal(sig, forward)
        done = json.loads(replies.readline() or "null")
    if done is None:  # the child died without reporting (killed by a signal)
        print(f"stage process {child} ended without a status", file=sys.stderr)
        return 1
    return int(done["exit"])


# -- the server's side ----------------------------------------------------------------------------


def _code_root() -> Path:
    """The folder holding the ``flows`` package this process imports."""
    return Path(__file__).resolve().parents[2]


def _sources(root: Path) -> dict[str, int]:
    """Modification times (ns) of every source file of the packages under ``root``."""
    return {
        str(p): p.stat().st_mtime_ns for pkg in PACKAGES for p in sorted((root / pkg).rglob("*.py"))
    }


def _stale(root: Path, snapshot: dict[str, int], code: str) -> str | None:
    """Why the imported code cannot serve a caller running the code in ``code`` (None if it can)."""
    if Path(code) != root:
        return f"it serves the code in {root}, this stage's code is in {code}"
    now = _sources(root)
    if now != snapshot:
        changed = sorted(set(now.items()) ^ set(snapshot.items()))
        return f"{Path(changed[0][0]).relative_to(root)} changed since the server started"
    return None


def _prefect_env(env: dict[str, str]) -> dict[str, str]:
    return {k: v for k, v in env.items() if k.startswith("PREFECT_")}


def _reload_settings() -> None:
    """Prefect read its settings and logging config from the server's environment at import
    (0.4 s: done only when the caller's ``PREFECT_*`` variables differ)."""
    import prefect.context
    from prefect.logging.configuration import setup_logging

    prefect.context.refresh_global_settings_context()
    setup_logging(incremental=False)


def _exit(status: int) -> NoReturn:
    """End the child as the interpreter would, minus tearing the server's modules down.

    What a normal exit does first is kept, in its order: wait for the non-daemon threads, run
    the atexit handlers (Prefect drains its log and event queues there; the status reaches the
    caller from one of them) and flush every stream. The rest of a normal exit only frees
    objects: in a fork it writes to every page of the imported stack that the child shares with
    the server (0.4-0.9 s of CPU per stage, beside DVC and the next stage). ``os._exit`` skips
    it, as :mod:`multiprocessing` does for its forked children.
    """
    try:
        threading._shutdown()  # type: ignore[attr-defined]  # joins non-daemon threads, as at exit
    finally:
        atexit._run_exitfuncs()
        for stream in (sys.stdout, sys.stderr):
            with contextlib.suppress(Exception):
                stream.flush()
        with contextlib.suppress(Exception):  # C stdio buffers (native code's printf)
            import ctypes

            ctypes.CDLL(None).fflush(None)
        os._exit(status)


def _child(
    conn: socket.socket, request: dict, fds: list[int], added: dict[str, str], threads: int
) -> NoReturn:
    """In the forked child: become the stage process the caller would have been, run, and exit
    like it (:func:`_exit`: Prefect drains its log and event queues in the atexit handlers); the
    status reaches the caller last, once that is done."""
    from flows.stages.cli import main

    for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP, signal.SIGCHLD):
        signal.signal(sig, signal.default_int_handler if sig == signal.SIGINT else signal.SIG_DFL)
    os.setpgrp()
    _disown_finalizers()
    for target, fd in enumerate(fds):
        os.dup2(fd, target)
        os.close(fd)
    # the caller's terminal or pipe, line-buffered (the server's own stdout was decided at start)
    sys.stdout = os.fdopen(1, "w", buffering=1, closefd=False)
    os.chdir(request["cwd"])
    prefect_env = _prefect_env(os.environ)
    os.environ.clear()
    os.environ.update(request["env"])
    for key, value in added.items():  # what importing the stack sets (defaults, session ids)
        os.environ.setdefault(key, value)
    if _prefect_env(os.environ) != prefect_env:
        _reload_settings()
    import torch

    wanted = os.environ.get("OMP_NUM_THREADS", "")
    torch.set_num_threads(int(wanted) if wanted.isdigit() and int(wanted) > 0 else threads)
    sys.argv = ["python -m flows.stages", *request["argv"]]
    reply = conn.dup()  # its own descriptor: nothing the stage closes can take it away
    status = [1]

    def report() -> None:  # registered first, so it runs after the handlers the stage adds
        sys.stdout.flush()
        sys.stderr.flush()
        with contextlib.suppress(OSError):
            _send(reply, {"exit": status[0]})

    atexit.register(report)
    _send(reply, {"pid": os.getpid()})
    print(f"stage {' '.join(request['argv'])}: in a fork of the stage server (pid {os.getpid()}, "
          f"imports done once, {torch.get_num_threads()} torch threads)", file=sys.stderr, flush=True)
    try:
        status[0] = main(request["argv"])
    except SystemExit as exc:  # argparse
        status[0] = exc.code if isinstance(exc.code, int) else 1
    except BaseException:  # what the interpreter would print before exiting with 1
        traceback.print_exc()
        status[0] = 1
    _exit(status[0])


def _reap(_signum: int, _frame: object) -> None:
    while True:
        try:
            pid, _ = os.waitpid(-1, os.WNOHANG)
        except ChildProcessError:
            return
        if pid == 0:
            return


def _warm() -> None:
    """Import :data:`WARM` (what is missing is the stage's to report, not the server's) and
    complete the pydantic models that were left to build on first use (Prefect defers 260 of
    them: 25 ms in every stage's first flow run, 0.1 s once here). Nothing runs a kernel (a fork
    must not inherit a started OpenMP pool) or starts a thread."""
    for name in WARM:
        with contextlib.suppress(ImportError):
            importlib.import_module(name)
    from pydantic import BaseModel

    todo = [BaseModel]
    while todo:
        for model in todo.pop().__subclasses__():
            todo.append(model)
            if not model.__dict__.get("__pydantic_complete__", True):
                with contextlib.suppress(Exception):  # what cannot resolve stays deferred
                    model.model_rebuild(raise_errors=False)


def _disown_finalizers() -> None:
    """Leave the server's ``weakref.finalize`` callbacks to the server: a child's exit runs only
    the ones it created.

    At exit every live finalizer runs. The inherited ones would act on the server's objects: undo
    torch's operator registrations one by one (200 calls, 30 ms per stage) or delete a temporary
    directory the server made. The stdlib keeps the live finalizers in ``finalize._registry``
    (its only enumeration); ``atexit`` is their public switch."""
    for finalizer in list(weakref.finalize._registry):  # type: ignore[attr-defined]
        finalizer.atexit = False


def serve(path: str) -> None:
    """Import the stack, then fork a child per request until stopped (or stale: restart)."""
    root = _code_root()
    snapshot = _sources(root)  # before importing: a file edited meanwhile reads as changed
    before = dict(os.environ)
    cpu_defaults()
    import torch

    threads = torch.get_num_threads()  # the children's default
    torch.set_num_threads(1)  # nothing here may start OpenMP's workers (see the module doc)
    import flows.stages.cli  # noqa: F401  (the point: everything a stage imports, once)

    _warm()
    added = {k: v for k, v in os.environ.items() if before.get(k) != v}
    gc.freeze()  # children's collections then leave the server's objects (and pages) alone

    signal.signal(signal.SIGCHLD, _reap)
    if os.path.exists(path):
        os.unlink(path)
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(path)
    listener.listen(16)
    print(f"stage server: ready at {path} (code in {root})", file=sys.stderr, flush=True)
    while True:
        conn, _ = listener.accept()
        with conn:
            request, fds = _recv_request(conn)
            if request is None or len(fds) != 3:
                for fd in fds:
                    os.close(fd)
                continue
            why = _stale(root, snapshot, request["code"])
            if why is not None:
                _send(conn, {"refused": why})
                for fd in fds:
                    os.close(fd)
                if Path(request["code"]) != root:
                    continue  # another checkout: this one's code is still current
                listener.close()
                os.unlink(path)
                print(f"stage server: {why}; restarting", file=sys.stderr, flush=True)
                os.execv(sys.executable, [sys.executable, "-m", MODULE, path])
            if os.fork() == 0:
                listener.close()
                _child(conn, request, fds, added, threads)
            for fd in fds:
                os.close(fd)


if __name__ == "__main__":
    serve(sys.argv[1])
