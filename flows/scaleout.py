"""Where shard tasks run: one after another in the flow process, or on a Dask cluster.

``runtime.task_runner: local`` (default) calls each shard task in the flow process, in order.
``runtime.task_runner: dask`` submits them to a Prefect ``DaskTaskRunner`` (prefect-dask): on the
scheduler at ``runtime.dask_address``, or on a ``distributed.LocalCluster`` of
``runtime.dask_workers`` processes started for the run. Shard tasks exchange paths and small
dataclasses only; every worker loads the model and the dataset itself (cached per process).
"""

from __future__ import annotations

import contextlib
import inspect
import logging
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlparse

import dask
import distributed
import torch
from prefect import Task, flow, get_run_logger
from prefect._internal.concurrency.services import QueueService
from prefect.context import FlowRunContext
from prefect.futures import wait
from prefect.settings import PREFECT_API_URL, temporary_settings
from prefect_dask import DaskTaskRunner

from flows.config import RuntimeParams
from flows.runtime import resolve_device

log = logging.getLogger(__name__)

# Shard tasks by name: the inner flow looks them up (flow parameters stay small and JSON-able).
_TASKS: dict[str, Task] = {}
GPU_RESOURCE = "GPU"
CONNECT_TIMEOUT_S = 20


class ClusterError(RuntimeError):
    """The Dask cluster is unreachable or cannot run the shard tasks (the params key is named)."""


@dataclass(frozen=True)
class Dispatch:
    """How shard tasks run: ``address`` None = here, in order; else on that Dask scheduler.

    ``gpu_per_task`` annotates each task with the Dask resource ``GPU: 1`` (one task per GPU).
    """

    address: str | None = None
    gpu_per_task: bool = False

    @property
    def local(self) -> bool:
        return self.address is None


def register_shard_task(task: Task) -> Task:
    """Make ``task`` runnable by :func:`run_shard_tasks` (decorator; keyed by the task name)."""
    _TASKS[task.name] = task
    return task


@contextlib.contextmanager
def dispatcher(runtime: RuntimeParams) -> Iterator[Dispatch]:
    """The :class:`Dispatch` of ``runtime``; starts (and stops) a local Dask cluster if asked.

    With ``task_runner: dask`` and no ``dask_address``, a ``LocalCluster`` of ``dask_workers``
    single-threaded processes lives as long as this block, so a whole pipeline run shares one.
    """
    if runtime.task_runner == "local":
        yield Dispatch()
        return
    with _quiet_dask_logs():
        if runtime.dask_address:
            yield Dispatch(runtime.dask_address, _remote_gpu_per_task(runtime))
            return
        gpu = _local_gpu_per_task(runtime)
        # DataLoader workers are child processes: Dask's default daemonic workers cannot fork.
        with dask.config.set({"distributed.worker.daemon": runtime.num_workers == 0}):
            cluster = distributed.LocalCluster(
                n_workers=runtime.dask_workers,
                threads_per_worker=1,
                processes=True,
                dashboard_address=":0",  # a free port: 8787 may be taken
                resources={GPU_RESOURCE: 1} if gpu else None,
                silence_logs=logging.WARNING,
            )
        try:
            yield Dispatch(cluster.scheduler_address, gpu)
        finally:
            _drain_workers(cluster)
            cluster.close()


def run_shard_tasks(
    dispatch: Dispatch,
    task: Task,
    shared: dict[str, Any],
    items: list[dict[str, Any]],
    *,
    name: str,
) -> list[Any]:
    """Run ``task(**shared, **item)`` for every item; results in item order.

    Local: called one after another in this process (retries apply). Dask: an inner flow
    ``name`` with a ``DaskTaskRunner`` submits them all, waits for all, then raises the first
    failure (after the task's retries), so finished shards are kept for the next run.
    """
    if task.name not in _TASKS:
        raise ValueError(f"task {task.name!r} is not registered with register_shard_task")
    if dispatch.local:
        return [task(**shared, **item) for item in items]
    inner = _shards_flow.with_options(
        name=name, task_runner=DaskTaskRunner(address=dispatch.address)
    )
    with _api_for_workers(dispatch.address):
        return inner(task.name, shared, items, dispatch.gpu_per_task)


def submit_all(
    task_name: str, shared: dict[str, Any], items: list[dict[str, Any]], gpu: bool
) -> list[Any]:
    """Submit one task per item to this flow's (Dask) task runner and wait for all of them."""
    task = _TASKS[task_name]
    resources = dask.annotate(resources={GPU_RESOURCE: 1}) if gpu else contextlib.nullcontext()
    with resources:
        futures = [task.submit(**shared, **item) for item in items]
    wait(futures)
    failed = [f for f in futures if not f.state.is_completed()]
    if failed:
        get_run_logger().error("%d of %d %s tasks failed", len(failed), len(futures), task_name)
    return [f.result() for f in futures]  # raises the first failure


# A flow around a module-level function of another name: shipped to workers by reference.
_shards_flow = flow(name="shards", validate_parameters=False, log_prints=True)(submit_all)


@contextlib.contextmanager
def _api_for_workers(address: str | None) -> Iterator[None]:
    """Point Dask workers at this run's Prefect API, also when it is the temporary server.

    Without ``PREFECT_API_URL`` the flow runs against a temporary server, and the settings that
    prefect-dask ships to the workers carry no URL: every worker process would then start its
    own temporary server (seconds each, and the task runs land in separate processes' servers).
    Handing the workers the temporary server's URL makes them report to the flow's server.
    """
    if PREFECT_API_URL.value():
        yield
        return
    ctx = FlowRunContext.get()
    url = str(ctx.client.api_url).rstrip("/") if ctx is not None and ctx.client else ""
    host = urlparse(url).hostname or ""
    if not url.startswith("http") or host not in ("127.0.0.1", "localhost"):
        yield
        return
    scheduler_host = urlparse(address or "").hostname or ""
    if scheduler_host not in ("127.0.0.1", "localhost", ""):
        log.warning(
            "runtime.dask_address %s: workers on other machines cannot reach the temporary "
            "Prefect server at %s; start `prefect server start --host 0.0.0.0` and export "
            "PREFECT_API_URL for a remote cluster", address, url,
        )
    with temporary_settings({PREFECT_API_URL: url}):
        yield


def _drain_workers(cluster: Any) -> None:
    """Flush the Prefect log/event services of every worker before the cluster stops.

    Otherwise each worker drains them while exiting and the nanny, tired of waiting, kills it.
    """
    with contextlib.suppress(Exception), distributed.Client(
        cluster, set_as_default=False
    ) as client:
        client.run(_drain_prefect_services)


async def _drain_prefect_services() -> None:
    pending = QueueService.drain_all(timeout=10, at_exit=False)  # awaitable inside a loop
    if inspect.isawaitable(pending):
        await pending


def _local_gpu_per_task(runtime: RuntimeParams) -> bool:
    if isinstance(runtime.dask_gpu_per_task, bool):
        return runtime.dask_gpu_per_task
    return torch.cuda.is_available() and resolve_device(runtime.device).type == "cuda"


def _remote_gpu_per_task(runtime: RuntimeParams) -> bool:
    """Ask the scheduler which workers offer a GPU resource (and fail early if it is down)."""
    address = runtime.dask_address
    try:
        with distributed.Client(
            address, timeout=CONNECT_TIMEOUT_S, set_as_default=False
        ) as client:
            workers = client.scheduler_info(n_workers=-1).get("workers", {})
    except (OSError, TimeoutError) as exc:
        raise ClusterError(
            f"runtime.dask_address: cannot reach the Dask scheduler at {address!r} "
            f"({type(exc).__name__}: {exc})"
        ) from exc
    with_gpu = [
        w for w in workers.values() if (w.get("resources") or {}).get(GPU_RESOURCE, 0) >= 1
    ]
    wanted = runtime.dask_gpu_per_task
    if wanted is True and workers and not with_gpu:
        raise ClusterError(
            f"runtime.dask_gpu_per_task: true, but no worker of {address} offers a "
            f"{GPU_RESOURCE} resource (start workers with `dask worker {address} --resources "
            f"{GPU_RESOURCE}=1`), so the tasks would wait forever"
        )
    if not workers:
        log.warning("Dask scheduler %s has no workers yet: shard tasks wait for one", address)
    if wanted == "auto":
        return bool(with_gpu) and runtime.device != "cpu"
    return bool(wanted)


@contextlib.contextmanager
def _quiet_dask_logs() -> Iterator[None]:
    """Dask logs every worker start and stop at INFO: keep the stage output readable."""
    names = ["distributed", *(n for n in logging.root.manager.loggerDict if n.startswith("distributed."))]
    loggers = [logging.getLogger(n) for n in names]
    levels = [lg.level for lg in loggers]
    for lg in loggers:
        lg.setLevel(max(lg.level, logging.WARNING))
    try:
        yield
    finally:
        for lg, level in zip(loggers, levels, strict=True):
            lg.setLevel(level)
