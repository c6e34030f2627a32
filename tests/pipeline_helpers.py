"""Shared helpers of the pipeline tests: tiny params, a temporary project copy, subprocess env."""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import sys
from pathlib import Path
from typing import Any

import yaml

REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
PROJECT_FILES = ("lrp", "flows", "params.yaml", "dvc.yaml", ".dvcignore", "pyproject.toml")


def tiny_params(root: Path, **sections: dict[str, Any]) -> dict[str, Any]:
    """The repository's params.yaml shrunk to seconds of work (absolute MLflow store in root)."""
    params = yaml.safe_load((REPO / "params.yaml").read_text())
    params["data"].update(classes=["circle", "square", "triangle"], per_class=12, image_size=32)
    params["train"].update(epochs=1, batch_size=16, patience=1, per_model={})
    params["explain"].update(split="test", shard_size=4)
    params["evaluate"].update(steps=8, quantize_levels=[0, 4])
    params["runtime"].update(device="cpu", batch_size=16)
    params["mlflow"].update(tracking_uri="sqlite:///mlflow.db", artifact_location="mlartifacts")
    for name, values in sections.items():
        params.setdefault(name, {}).update(values)
    return params


def write_params(path: Path, params: dict[str, Any]) -> Path:
    path.write_text(yaml.safe_dump(params, sort_keys=False))
    return path


def copy_project(dest: Path) -> Path:
    """The files a fresh clone has (no data, outputs, stores or caches)."""
    dest.mkdir(parents=True, exist_ok=True)
    ignore = shutil.ignore_patterns("__pycache__", "*.pyc")
    for name in PROJECT_FILES:
        src = REPO / name
        if src.is_dir():
            shutil.copytree(src, dest / name, ignore=ignore)
        else:
            shutil.copy2(src, dest / name)
    return dest


def env(tmp: Path, **extra: str) -> dict[str, str]:
    """Subprocess environment: the venv first on PATH, Prefect state inside tmp, no analytics."""
    e = dict(os.environ)
    e.pop("PREFECT_API_URL", None)
    e.update(
        PATH=f"{BIN}{os.pathsep}{e.get('PATH', '')}",
        PREFECT_HOME=str(tmp / "prefect-home"),
        PREFECT_SERVER_ANALYTICS_ENABLED="false",
        PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS="120",
        PREFECT_LOGGING_LEVEL="WARNING",
        DVC_NO_ANALYTICS="1",
        MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR="false",
        TQDM_DISABLE="1",
        PYTHONUNBUFFERED="1",
    )
    e.update(extra)
    return e


def run(cmd: list[str], cwd: Path, environ: dict[str, str], timeout: float = 600) -> str:
    """Run a command; on failure raise with its output (the test log shows why)."""
    proc = subprocess.run(
        cmd, cwd=cwd, env=environ, capture_output=True, text=True, timeout=timeout, check=False
    )
    if proc.returncode != 0:
        raise AssertionError(
            f"{' '.join(cmd)} exited {proc.returncode}\nstdout:\n{proc.stdout[-4000:]}\n"
            f"stderr:\n{proc.stderr[-6000:]}"
        )
    return proc.stdout + proc.stderr


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def stop(proc: subprocess.Popen) -> None:
    """Stop a subprocess started with start_new_session=True and all of its children."""
    if proc.poll() is not None:
        return
    try:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(timeout=20)
    except (ProcessLookupError, subprocess.TimeoutExpired):
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=10)
