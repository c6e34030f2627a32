"""The stage server: stages run in forks of one process that imported the stack once, with the
caller's argv, directory, environment, streams and exit status, and never with stale code."""

from __future__ import annotations

import re
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
from pipeline_helpers import copy_project, env, stop

from flows.server import wait_ready
from flows.stages import forkserver

pytestmark = pytest.mark.slow
FORKED = "in a fork of the stage server"


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory):
    """A project copy, a stage server started in it, and the environment that reaches it
    (shared by the tests below, in order: the last one edits the copy's code)."""
    tmp_path = tmp_path_factory.mktemp("served")
    root = copy_project(tmp_path / "project")
    sock = str(tmp_path / "stages.sock")
    e = env(tmp_path)
    server = subprocess.Popen(
        [sys.executable, "-m", forkserver.MODULE, sock],
        cwd=root,
        env=e,
        stdin=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )
    try:
        assert wait_ready(sock, timeout=180), "stage server did not start"
        yield root, {**e, forkserver.ENV: sock}, sock
    finally:
        stop(server)


def _stage(root: Path, e: dict[str, str], *args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "flows.stages", *args],
        cwd=root,
        env=e,
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )


def _python(script: str, timeout: float = 60) -> subprocess.CompletedProcess:
    """``python -c script`` in the repository root, output captured."""
    return subprocess.run([sys.executable, "-c", script], cwd=Path(__file__).resolve().parents[1],
                          capture_output=True, text=True, timeout=timeout, check=False)


def test_stage_runs_in_a_fork_with_the_callers_streams_and_status(served) -> None:
    root, e, _ = served
    out = _stage(root, e, "train")  # no --model: the stage's own error, exit 2
    assert out.returncode == 2
    assert FORKED in out.stderr and "needs --model" in out.stderr
    assert re.search(r"imports done once, [1-9]\d* torch threads", out.stderr)
    one = _stage(root, {**e, "OMP_NUM_THREADS": "1"}, "train")  # the caller's thread count
    assert "imports done once, 1 torch threads" in one.stderr
    missing = _stage(root, e, "train", "--model", "small_resnet", "--params", "nope.yaml")
    assert missing.returncode == 2 and FORKED in missing.stderr
    assert "nope.yaml" in missing.stderr  # the params file named, on the caller's stderr
    (root / "sub").mkdir()
    elsewhere = _stage(root / "sub", e, "train")  # another directory: not this server's code
    assert "running the stage in this process" in elsewhere.stderr
    assert FORKED not in elsewhere.stderr and elsewhere.returncode == 2


def test_edited_code_is_never_served_stale(served) -> None:
    root, e, sock = served
    helper = root / "flows" / "io.py"
    helper.write_text(helper.read_text() + "\n# edited\n")
    first = _stage(root, e, "train")
    assert "flows/io.py changed since the server started" in first.stderr
    assert "running the stage in this process" in first.stderr and first.returncode == 2
    time.sleep(0.5)  # the server re-executes itself with the new code
    assert wait_ready(sock, timeout=180)
    again = _stage(root, e, "train")
    assert FORKED in again.stderr and again.returncode == 2


def test_without_a_server_the_stage_runs_here(tmp_path: Path) -> None:
    root = copy_project(tmp_path / "project")
    e = {**env(tmp_path), forkserver.ENV: str(tmp_path / "absent.sock")}
    out = _stage(root, e, "train")
    assert "not reachable: running the stage in this process" in out.stderr
    assert out.returncode == 2 and "needs --model" in out.stderr


FORK_AFTER_WORK = textwrap.dedent("""
    import os, signal, sys, torch
    from flows.stages.forkserver import cpu_defaults
    cpu_defaults()
    assert os.environ["OMP_WAIT_POLICY"] == sys.argv[1]
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # what the stage server does before it imports and forks
    a = torch.randn(600, 600)
    (a @ a).sum().item()  # work in the server: large enough for a parallel region
    pid = os.fork()
    if pid == 0:
        signal.alarm(60)  # a hung child ends (and fails the test) instead of spinning on
        torch.set_num_threads(2)  # a child's stage count (2 even on one core: a team is made)
        for _ in range(3):
            (a @ a).sum().item()
            torch.nn.functional.conv2d(torch.randn(8, 3, 64, 64), torch.randn(16, 3, 3, 3))
        os._exit(0 if torch.get_num_threads() == 2 else 3)
    _, status = os.waitpid(pid, 0)
    sys.exit(os.waitstatus_to_exitcode(status))
""")


@pytest.mark.parametrize("policy", [None, "ACTIVE"])
def test_forked_child_uses_threads_after_the_server_worked(tmp_path: Path, policy) -> None:
    """libgomp cannot be forked once its workers run (a child's parallel region hangs): the
    server keeps torch at one thread, so a child can start its own team. OMP_WAIT_POLICY
    defaults to PASSIVE and a value already set is kept."""
    e = env(tmp_path)
    e.pop("OMP_WAIT_POLICY", None)
    if policy is not None:
        e["OMP_WAIT_POLICY"] = policy
    out = subprocess.run(
        [sys.executable, "-c", FORK_AFTER_WORK, policy or "PASSIVE"], env=e, cwd=tmp_path,
        capture_output=True, text=True, timeout=120, check=False,
    )
    assert out.returncode == 0, out.stderr


def test_a_stage_process_ends_like_a_normal_exit_minus_the_teardown() -> None:
    """``_exit`` (how a forked stage ends): non-daemon threads finish, then the atexit handlers
    run (Prefect drains its queues there), every buffered stream reaches the caller (C stdio
    too) and the status is the stage's."""
    script = (
        "import atexit, ctypes, sys, threading, time\n"
        "from flows.stages.forkserver import _exit\n"
        "def late():\n"
        "    time.sleep(0.3)\n"
        "    print('thread done', flush=True)\n"
        "threading.Thread(target=late).start()\n"
        "atexit.register(lambda: print('atexit ran'))\n"
        "ctypes.CDLL(None).printf(b'from C, unflushed\\n')\n"
        "sys.stdout.write('python, unflushed\\n')\n"
        "_exit(3)\n"
    )
    out = _python(script)
    assert out.returncode == 3, out.stderr
    lines = out.stdout.splitlines()
    assert lines.index("thread done") < lines.index("atexit ran")
    assert "python, unflushed" in lines and "from C, unflushed" in lines


FINALIZERS = textwrap.dedent("""
    import os, sys, tempfile, weakref
    from flows.stages.forkserver import _disown_finalizers

    class Owner:
        pass

    server_dir = tempfile.TemporaryDirectory()  # the server's: removed by a finalizer at exit
    owner = Owner()
    weakref.finalize(owner, print, "server finalizer ran", flush=True)
    pid = os.fork()
    if pid == 0:
        _disown_finalizers()
        child = Owner()
        weakref.finalize(child, print, "child finalizer ran", flush=True)
        sys.exit(0)  # a normal exit runs the live finalizers
    os.waitpid(pid, 0)
    print("server dir after the child exited:", os.path.isdir(server_dir.name), flush=True)
""")


def test_a_stage_runs_only_its_own_finalizers_at_exit() -> None:
    """A forked stage leaves the server's ``weakref.finalize`` callbacks alone (a temporary
    directory the server made survives the child's exit; torch's operator registrations are not
    undone once per stage) and still runs the ones it created."""
    out = _python(FINALIZERS)
    assert out.returncode == 0, out.stderr
    lines = out.stdout.splitlines()
    assert "child finalizer ran" in lines
    assert "server dir after the child exited: True" in lines
    assert lines.count("server finalizer ran") == 1, lines  # in the server, not in the child


def test_the_server_builds_deferred_models_before_forking() -> None:
    """Prefect leaves its API models to build on first use, which every stage would repeat;
    the server completes them once (``_warm``)."""
    script = (
        "from prefect.client.schemas.objects import FlowRun, State\n"
        "from prefect.client.schemas.actions import FlowRunCreate\n"
        "import flows.stages.cli\n"
        "from flows.stages.forkserver import _warm\n"
        "models = (FlowRun, State, FlowRunCreate)\n"
        "print('before', [m.__pydantic_complete__ for m in models])\n"
        "_warm()\n"
        "print('after', [m.__pydantic_complete__ for m in models])\n"
    )
    out = _python(script, timeout=300)
    assert out.returncode == 0, out.stderr
    assert "after [True, True, True]" in out.stdout, out.stdout


HEARTBEAT = "Started flow run heartbeat context"  # the flow engine's debug line
SCRIPT = """
import os, signal, sys
from prefect import flow
from prefect.settings import PREFECT_FLOWS_HEARTBEAT_FREQUENCY, temporary_settings
from flows.stages.cli import flow_settings

@flow
def fine():
    return 1

@flow
def killed():
    os.kill(os.getpid(), signal.SIGKILL)  # no chance to report a final state

print("==", "default", file=sys.stderr, flush=True)  # split apart: the command line is echoed
with flow_settings():
    fine()
print("==", "configured", file=sys.stderr, flush=True)
with temporary_settings(updates={PREFECT_FLOWS_HEARTBEAT_FREQUENCY: 60}), flow_settings():
    fine()
print("==", "killed", file=sys.stderr, flush=True)
with flow_settings():
    killed()
"""


def test_own_server_runs_without_heartbeats_and_crashes_what_dies(tmp_path: Path) -> None:
    """Under a Prefect server that flows.server started (it stops with the command) flow runs
    send no heartbeats unless a frequency is configured, and a run whose process was killed is
    marked Crashed once the command has exited."""
    e = {**env(tmp_path), "PREFECT_LOGGING_LEVEL": "DEBUG"}
    out = subprocess.run(
        [sys.executable, "-m", "flows.server", "--no-stage-server", "--", sys.executable, "-c",
         SCRIPT],
        cwd=Path(__file__).resolve().parents[1], env=e, capture_output=True, text=True,
        timeout=600, check=False,
    )
    assert out.returncode != 0  # the command was killed
    log = out.stderr
    default, configured = log.split("== default")[1].split("== configured")
    configured, killed = configured.split("== killed")
    assert "Beginning flow run" in default and HEARTBEAT not in default
    assert HEARTBEAT in configured
    name = killed.split("Beginning flow run '")[1].split("'")[0]
    assert f"Prefect: marked 1 flow runs Crashed that the command left unfinished: {name}" in log
