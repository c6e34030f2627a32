"""Shared helpers of the pipeline tests: tiny params, a temporary project copy, subprocess env."""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import yaml
from torch import nn
from torch.utils.data import Dataset
from tqdm.auto import tqdm

from flows.methods import make_attributor, parse_method
from flows.runtime import resolve_device, use_channels_last
from flows.shards import ShardIndex, ShardInfo, prepare_out_dir, write_index
from flows.stages.explain import explain_shard, plan_explanation

REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
PROJECT_FILES = ("lrp", "flows", "params.yaml", "dvc.yaml", ".dvcignore", "pyproject.toml")


def tiny_params(root: Path, **sections: dict[str, Any]) -> dict[str, Any]:
    """The repository's params.yaml shrunk to seconds of work (absolute MLflow store in root)."""
    params = yaml.safe_load((REPO / "params.yaml").read_text())
    params["data"].update(classes=["circle", "square", "triangle"], per_class=12, image_size=32)
    params["train"].update(epochs=1, batch_size=16, patience=1, per_model={})
    params["explain"].update(split="test", shard_size=4, compare=[])
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


GIT = {"GIT_AUTHOR_NAME": "t", "GIT_AUTHOR_EMAIL": "t@t", "GIT_COMMITTER_NAME": "t",
       "GIT_COMMITTER_EMAIL": "t@t"}


def init_project(root: Path, environ: dict[str, str]) -> None:
    """What a user does once on a fresh clone: git and DVC, the synthetic data, ``dvc add data``."""
    for cmd in (["git", "init", "-q"], ["dvc", "init", "-q"],
                ["python", "-m", "flows.stages", "data"], ["dvc", "add", "-q", "data"]):
        run(cmd, root, environ)


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


def explain_dataset(
    model: nn.Module,
    dataset: Dataset,
    *,
    out_dir: Path,
    method: str = "epsilon-plus-flat",
    options: dict[str, Any],
    batch_size: int | str,
    device: str | torch.device,
    shard_size: int = 256,
    progress: bool = True,
    num_workers: int = 0,
    on_shard: Callable[[ShardInfo], None] | None = None,
    channels_last: bool | str = "auto",
    tf32: bool = True,
) -> ShardIndex:
    """The explain stage's pieces in one process: plan, every shard in order, the index.

    What a worker does shard by shard, composed here so the tests can exercise resume, checks and
    storage options without Prefect.
    ``method`` is an engine composite name (``lrp.composites.names()``) or a non-LRP baseline
    (``lrp.baselines``). ``options``: ``target`` ("label": ground truth, default; or "predicted"),
    ``relevance_dtype`` ("float32" default, or "float16" to halve disk use; computed in float32
    either way), ``channel_sum`` (store (N,H,W)); the rest goes to ``lrp.Explainer`` (output,
    residual, lrn, epsilon, ...). For LRP the dataset's ``input_bounds()`` is passed as
    ``input_bounds`` unless given. ``batch_size`` may be ``"auto"`` (searched on CUDA);
    ``channels_last`` and ``tf32`` as in ``params.runtime`` (:mod:`flows.runtime`).
    ``on_shard`` is called after each shard is written (progress reporting; tests use it to
    simulate an interruption). The model is put in eval mode and moved to ``device`` (its
    training flag and memory format are restored).
    """
    if batch_size != "auto" and (
        isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1
    ):
        raise ValueError(f"shard_size and batch_size must be >= 1, got {shard_size}, {batch_size}")
    if shard_size < 1:
        raise ValueError(f"shard_size and batch_size must be >= 1, got {shard_size}, {batch_size}")
    plan = plan_explanation(
        model, dataset, out_dir=out_dir, method=parse_method(method), options=options, shard_size=shard_size
    )
    device = resolve_device(device)
    was_training = model.training
    model.eval()
    nhwc = False
    bar = None
    try:
        model.to(device)
        nhwc = use_channels_last(channels_last, model, device)
        if nhwc:
            model.to(memory_format=torch.channels_last)
        # built before any file is touched, so bad options fail without side effects
        attribute = make_attributor(model, plan.method, plan.engine_options, validate=False)
        prepare_out_dir(plan)
        bar = tqdm(total=plan.num_items, desc=f"explain {method}", unit="img",
                   disable=not progress)
        outcomes = []
        for spec in plan.shards:
            outcome = explain_shard(
                plan, spec, model, dataset, batch_size=batch_size, device=device,
                num_workers=num_workers, channels_last=nhwc, tf32=tf32, attribute=attribute,
                progress=bar.update,
            )
            outcomes.append(outcome)
            if not outcome.written:
                bar.update(spec.count)
            elif on_shard is not None:
                on_shard(outcome.info)
    finally:
        if bar is not None:
            bar.close()
        if nhwc:
            model.to(memory_format=torch.contiguous_format)
        model.train(was_training)
    return write_index(plan, outcomes)
