"""What a shard task finds in its process: the model and dataset loaded once, one shard at a time.

Shard tasks run in the flow process or on Dask workers; each process loads the trained model and
the stage's dataset once (:func:`stage_inputs`) and checks them against the plan's hashes, so a
worker that sees other files fails instead of mixing results. :func:`shard_task` makes the
retried, registered Prefect task both shard stages use.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

import distributed
import torch
from prefect import task
from prefect.cache_policies import NO_CACHE

from flows import shards
from flows.config import ParamsError
from flows.context import Context, data_root, dataset, load_trained, log
from flows.data import DatasetError, ImageDataset
from flows.methods import MethodError
from flows.models import ModelError
from flows.scaleout import register_shard_task

SHARD_RETRIES = 2
RETRY_DELAY_S = 2
# Deterministic failures: retrying cannot help (bad data, corrupt files, wrong params).
PERMANENT_ERRORS: tuple[type[BaseException], ...] = (
    shards.ShardError, DatasetError, ParamsError, MethodError, ModelError,
)

# Per process (flow process or Dask worker): loaded models, datasets and attributors.
_INPUTS: dict[tuple[Any, ...], Any] = {}
_CACHE_LOCK = threading.Lock()
# One shard at a time per process: tasks of one worker share the cached model.
RUN_LOCK = threading.Lock()


def stage_inputs(
    ctx: Context, arch: str, *, model_sha256: str | None = None, dataset_id: str | None = None
) -> tuple[torch.nn.Module, ImageDataset, str, str]:
    """The trained model, the stage's dataset and their hashes, loaded once per process.

    Cached by paths and file stamps; when the plan's ``model_sha256`` or ``dataset_id`` differ
    from the cached ones (files changed since), they are reloaded once, then a ShardError says
    that the files changed during the run.
    """
    for attempt in range(2):
        ds, ds_id = cached(
            ("dataset", *_dataset_key(ctx)), lambda: _load_dataset(ctx), fresh=attempt > 0
        )
        path = ctx.layout.model(arch)
        model, sha = cached(
            ("model", str(path), _stamp(path), arch, len(ds.classes)),
            lambda ds=ds: _load_model(ctx, arch, len(ds.classes)),
            fresh=attempt > 0,
        )
        ok_model = model_sha256 is None or sha == model_sha256
        ok_data = dataset_id is None or ds_id == dataset_id
        if ok_model and ok_data:
            return model, ds, sha, ds_id
    what = "model file" if not ok_model else f"dataset {ds.root}"
    raise shards.ShardError(
        f"{arch}: the {what} changed while the stage ran (hash differs from the plan); rerun"
    )


def cached(key: tuple[Any, ...], load: Callable[[], Any], *, fresh: bool = False,
           keep: int = 1) -> Any:
    """``load()`` once per key; at most ``keep`` entries of a kind (``key[0]``) stay cached."""
    with _CACHE_LOCK:
        if not fresh and key in _INPUTS:
            return _INPUTS[key]
    value = load()
    with _CACHE_LOCK:
        same_kind = [k for k in _INPUTS if k[0] == key[0] and k != key]
        for old in same_kind[: max(0, len(same_kind) - keep + 1)]:
            del _INPUTS[old]  # oldest first: workers keep one model and one dataset
        _INPUTS[key] = value
    return value


def forget(kind: str, keep: Callable[[tuple[Any, ...]], bool]) -> None:
    """Drop cached entries of ``kind`` for which ``keep(key)`` is false."""
    with _CACHE_LOCK:
        for old in [k for k in _INPUTS if k[0] == kind and not keep(k)]:
            del _INPUTS[old]


def in_dask_worker() -> bool:
    try:
        distributed.get_worker()
    except ValueError:
        return False
    return True


def shard_task(name: str, run_name: str, fn: Callable[..., Any]) -> Any:
    """A retried, registered shard task around ``fn``.

    The task wraps a module-level function of another name: cloudpickle then ships the function
    by reference, so a Dask worker runs it with its module's real globals (caches, locks).
    """
    return register_shard_task(
        task(
            name=name,
            task_run_name=run_name,
            retries=SHARD_RETRIES,
            retry_delay_seconds=RETRY_DELAY_S,
            retry_condition_fn=_retry_condition,
            cache_policy=NO_CACHE,
        )(fn)
    )


def warn(message: str) -> None:
    log(message, level=logging.WARNING)


def _retry_condition(task: Any, task_run: Any, state: Any) -> bool:
    """Retry transient failures (a lost GPU, a flaky file system), not bad data or params."""
    return not isinstance(getattr(state, "data", None), PERMANENT_ERRORS)


def _load_dataset(ctx: Context) -> tuple[ImageDataset, str]:
    ds = dataset(ctx, ctx.params.explain.split, ctx.params.runtime.subset)
    return ds, shards.dataset_id(ds)  # the fingerprint stats every file: once per load


def _load_model(ctx: Context, arch: str, num_classes: int) -> tuple[torch.nn.Module, str]:
    model = load_trained(ctx, arch, num_classes).eval()
    return model, shards.model_hash(model)


def _dataset_key(ctx: Context) -> tuple[Any, ...]:
    d, p = ctx.params.data, ctx.params
    return (str(data_root(ctx)), d.image_size, p.explain.split, p.runtime.subset,
            d.val_fraction, d.test_fraction)


def _stamp(path: Path) -> tuple[int, int]:
    st = path.stat() if path.exists() else None
    return (st.st_mtime_ns, st.st_size) if st else (0, 0)
