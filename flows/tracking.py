"""MLflow logging for the report stage.

Everything goes through :class:`MlflowClient` with explicit run ids (the fluent API is not
thread-safe), URIs are made absolute so that a DVC stage, a Prefect worker and ``mlflow ui`` started
from another directory all see the same store, and the store is checked before any work starts so
that an unreachable server fails in a second with the params key named, not after training.
MLflow itself is imported where it is used: the train stage only checks the store and should not
pay the import.
"""

from __future__ import annotations

import json
import math
import sqlite3
import time
import urllib.error
import urllib.request
from collections.abc import Iterable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import torch
import torchvision

from flows.config import MlflowParams

PARAM_KEY = "mlflow.tracking_uri"
MAX_PARAM_LEN = 6000  # MLflow 3 limit on a param value


class TrackingError(RuntimeError):
    """The MLflow store is unreachable or refused a write (names the URI and the params key)."""


@dataclass(frozen=True)
class TrackingTarget:
    """Resolved, absolute tracking URI and artifact location."""

    tracking_uri: str
    artifact_location: str
    experiment: str


def resolve_target(
    tracking_uri: str, experiment: str, artifact_location: str | None, base_dir: str | Path
) -> TrackingTarget:
    """Make relative sqlite/file URIs absolute against ``base_dir`` (the params file's folder)."""
    base = Path(base_dir).resolve()
    uri = tracking_uri.strip()
    if uri.startswith("sqlite:///"):
        db = uri[len("sqlite:///") :]
        db_path = Path(db) if db.startswith("/") else base / db
        uri = f"sqlite:///{db_path}"
        default_artifacts = db_path.parent / "mlartifacts"
    elif "://" not in uri:  # a plain folder: the (deprecated) file store
        folder = Path(uri) if Path(uri).is_absolute() else base / uri
        uri = folder.as_uri()
        default_artifacts = folder
    elif uri.startswith("file:"):
        default_artifacts = Path(urlparse(uri).path)
    else:
        default_artifacts = base / "mlartifacts"
    if artifact_location:
        if "://" in artifact_location:
            artifacts = artifact_location
        else:
            loc = Path(artifact_location)
            artifacts = (loc if loc.is_absolute() else base / loc).as_uri()
    else:
        artifacts = default_artifacts.as_uri()
    return TrackingTarget(uri, artifacts, experiment)


def target_for(m: MlflowParams, base_dir: str | Path) -> TrackingTarget:
    """The resolved target of the ``mlflow`` params section."""
    return resolve_target(m.tracking_uri, m.experiment, m.artifact_location, base_dir)


def check_reachable(target: TrackingTarget, timeout: float = 5.0) -> None:
    """Fail fast with a clear message when the tracking store cannot be used."""
    uri = target.tracking_uri
    where = f"MLflow tracking URI {uri!r} (params key {PARAM_KEY!r})"
    scheme = urlparse(uri).scheme
    try:
        if scheme == "sqlite":
            db = Path(uri[len("sqlite:///") :])
            if not db.parent.is_dir():
                raise TrackingError(f"{where}: folder {db.parent} does not exist")
            with sqlite3.connect(db, timeout=timeout) as conn:
                conn.execute("SELECT 1")
        elif scheme in ("http", "https"):
            url = uri.rstrip("/") + "/health"
            with urllib.request.urlopen(url, timeout=timeout) as resp:
                if resp.status != 200:
                    raise TrackingError(f"{where}: {url} answered HTTP {resp.status}")
        elif scheme == "file":
            Path(urlparse(uri).path).mkdir(parents=True, exist_ok=True)
        else:
            from mlflow.tracking import MlflowClient

            MlflowClient(uri).search_experiments(max_results=1)
    except TrackingError:
        raise
    except (TimeoutError, OSError, urllib.error.URLError, sqlite3.Error) as exc:
        raise TrackingError(f"{where} is unreachable: {exc}") from exc
    except Exception as exc:
        raise TrackingError(f"{where} is unusable: {type(exc).__name__}: {exc}") from exc
    art = target.artifact_location
    if art.startswith("file:"):
        try:
            Path(urlparse(art).path).mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise TrackingError(
                f"MLflow artifact location {art!r} (params key 'mlflow.artifact_location') "
                f"cannot be created: {exc}"
            ) from exc


EXPERIMENT_KIND = ("mlflow.experimentKind", "custom_model_development")  # UI opens on runs


def get_experiment_id(client: Any, target: TrackingTarget) -> str:
    """Id of the experiment (created with the explicit artifact location when missing), tagged
    as model development so the MLflow UI opens on its runs, not on the GenAI traces page."""
    exp = client.get_experiment_by_name(target.experiment)
    if exp is None:
        try:
            experiment_id = client.create_experiment(
                target.experiment, artifact_location=target.artifact_location
            )
        except Exception:  # created concurrently by another process
            exp = client.get_experiment_by_name(target.experiment)
            if exp is None:
                raise
            experiment_id = exp.experiment_id
    else:
        experiment_id = exp.experiment_id
        if exp.lifecycle_stage == "deleted":
            client.restore_experiment(experiment_id)
    client.set_experiment_tag(experiment_id, *EXPERIMENT_KIND)
    return experiment_id


def _clean_params(params: Mapping[str, Any]) -> dict[str, str]:
    out = {}
    for key, value in params.items():
        text = json.dumps(value) if isinstance(value, dict | list) else str(value)
        out[key] = text[:MAX_PARAM_LEN]
    return out


def log_params(client: Any, run_id: str, params: Mapping[str, Any]) -> None:
    """Log params in batches of 100 (the MLflow batch limit)."""
    from mlflow.entities import Param

    items = [Param(k, v) for k, v in _clean_params(params).items()]
    for i in range(0, len(items), 100):
        client.log_batch(run_id, params=items[i : i + 100])


def log_metrics(
    client: Any, run_id: str, metrics: Mapping[str, float], step: int = 0
) -> None:
    """Log finite scalar metrics in batches; NaN/inf are skipped (MLflow stores them badly)."""
    from mlflow.entities import Metric

    now = int(time.time() * 1000)
    items = [
        Metric(k, float(v), now, step)
        for k, v in metrics.items()
        if v is not None and math.isfinite(float(v))
    ]
    for i in range(0, len(items), 1000):
        client.log_batch(run_id, metrics=items[i : i + 1000])


def log_series(client: Any, run_id: str, key: str, values: Iterable[float]) -> None:
    """A per-epoch (or per-step) series as one metric with steps."""
    from mlflow.entities import Metric

    now = int(time.time() * 1000)
    items = [
        Metric(key, float(v), now, step)
        for step, v in enumerate(values)
        if v is not None and math.isfinite(float(v))
    ]
    for i in range(0, len(items), 1000):
        client.log_batch(run_id, metrics=items[i : i + 1000])


def log_model(run_id: str, model: Any, *, name: str = "model") -> str:
    """Log a torch model with the pickle format (keeps Conv2d/ReLU modules for LRP); return URI.

    ``mlflow.pytorch.log_model`` only works through the fluent API, so the run is resumed here
    without ending it (the caller finishes it once every artifact is in).
    """
    import mlflow
    import mlflow.pytorch

    requirements = [f"torch=={torch.__version__.split('+')[0]}",
                    f"torchvision=={torchvision.__version__.split('+')[0]}"]
    active = mlflow.active_run()
    if active is not None and active.info.run_id != run_id:
        raise TrackingError(f"another MLflow run ({active.info.run_id}) is active in this process")
    started = active is None
    if started:
        mlflow.start_run(run_id=run_id)
    try:
        info = mlflow.pytorch.log_model(
            model.cpu().eval(),
            name=name,
            serialization_format="pickle",
            pip_requirements=requirements,
        )
    finally:
        if started:
            # Detach but keep the run open: the caller marks it FINISHED once all is logged.
            mlflow.end_run(status="RUNNING")
    return info.model_uri


@contextmanager
def tracked_run(
    client: Any,
    experiment_id: str,
    run_name: str,
    tags: Mapping[str, Any],
    parent: str | None = None,
) -> Iterator[str]:
    """Create a run that is only marked FINISHED when the block succeeds (FAILED otherwise)."""
    all_tags = {k: str(v) for k, v in tags.items() if v is not None}
    if parent is not None:
        all_tags["mlflow.parentRunId"] = parent
    run = client.create_run(experiment_id, tags=all_tags, run_name=run_name)
    run_id = run.info.run_id
    try:
        yield run_id
    except BaseException:
        client.set_terminated(run_id, status="FAILED")
        raise
    client.set_terminated(run_id, status="FINISHED")
