"""The explain and evaluate stages as one Prefect task per shard, here or on Dask workers.

Each stage plans in the flow process (hashes and file checks, no engine work), runs one
idempotent task per shard (``explain-shard``, ``evaluate-shard``: retried on failure, skipped
when their output is already complete), then finishes in the flow process (``index.json``; the
merged metrics). Tasks receive paths and small dataclasses; each process loads the model and the
dataset once (:func:`stage_inputs`) and checks them against the plan's hashes.
"""

from __future__ import annotations

import shutil
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from prefect import task
from prefect.cache_policies import NO_CACHE

from flows import evaluation as ev
from flows import explaining as ex
from flows.config import ParamsError
from flows.data import DatasetError
from flows.pipeline import (
    Context,
    _progress,
    dataset,
    device,
    explain_options,
    load_trained,
    methods,
)
from flows.runtime import metric_batch_size, torch_backends, use_channels_last, worker_device
from flows.scaleout import Dispatch, register_shard_task, run_shard_tasks

SHARD_RETRIES = 2
RETRY_DELAY_S = 2
# Deterministic failures: retrying cannot help (bad data, corrupt files, wrong params).
PERMANENT_ERRORS: tuple[type[BaseException], ...] = (
    ex.NonFiniteInputError, ex.ShardError, DatasetError, ParamsError,
)

# Per process (flow process or Dask worker): loaded models, datasets and attributors.
_INPUTS: dict[tuple[Any, ...], Any] = {}
_CACHE_LOCK = threading.Lock()
# One shard at a time per process: tasks of one worker share the cached model.
_RUN_LOCK = threading.Lock()


@dataclass(frozen=True)
class EvalJob:
    """Score the first ``count`` of the ``rows`` images of one explanation shard."""

    method: str
    explained: Path
    sha256: str
    start: int
    rows: int
    count: int
    out: Path
    key: str


# --------------------------------------------------------------------------- inputs


def stage_inputs(
    ctx: Context, arch: str, *, model_sha256: str | None = None, dataset_id: str | None = None
) -> tuple[torch.nn.Module, Any, str, str]:
    """The trained model, the stage's dataset and their hashes, loaded once per process.

    Cached by paths and file stamps; when the plan's ``model_sha256`` or ``dataset_id`` differ
    from the cached ones (files changed since), they are reloaded once, then a ShardError says
    that the files changed during the run.
    """
    for attempt in range(2):
        ds, ds_id = _cached(
            ("dataset", *_dataset_key(ctx)), lambda: _load_dataset(ctx), fresh=attempt > 0
        )
        path = ctx.layout.model(arch)
        stamp = _stamp(path)
        model, sha = _cached(
            ("model", str(path), stamp, arch, len(ds.classes)),
            lambda ds=ds: _load_model(ctx, arch, len(ds.classes)),
            fresh=attempt > 0,
        )
        ok_model = model_sha256 is None or sha == model_sha256
        ok_data = dataset_id is None or ds_id == dataset_id
        if ok_model and ok_data:
            return model, ds, sha, ds_id
    what = "model file" if not ok_model else f"dataset {ds.root}"
    raise ex.ShardError(
        f"{arch}: the {what} changed while the stage ran (hash differs from the plan); rerun"
    )


def _load_dataset(ctx: Context) -> tuple[Any, str]:
    ds = dataset(ctx, ctx.params.explain.split, ctx.params.runtime.subset)
    return ds, ex.dataset_id(ds)  # the fingerprint stats every file: once per load


def _load_model(ctx: Context, arch: str, num_classes: int) -> tuple[torch.nn.Module, str]:
    model = load_trained(ctx, arch, num_classes).eval()
    return model, ex.model_hash(model)


def _dataset_key(ctx: Context) -> tuple[Any, ...]:
    from flows.pipeline import data_root

    d, p = ctx.params.data, ctx.params
    root = data_root(ctx)
    return (str(root), d.image_size, p.explain.split, p.runtime.subset, d.val_fraction,
            d.test_fraction)


def _cached(key: tuple[Any, ...], load: Any, *, fresh: bool = False, keep: int = 1) -> Any:
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


def _stamp(path: Path) -> tuple[int, int]:
    st = path.stat() if path.exists() else None
    return (st.st_mtime_ns, st.st_size) if st else (0, 0)


def _attributor(
    model: torch.nn.Module, plan: ex.ExplainPlan, dev: torch.device, nhwc: bool
) -> ex.Attributor:
    key = ("attributor", id(model), plan.params_hash, str(dev), nhwc)
    with _CACHE_LOCK:  # attributors of a model no longer cached would keep it alive (on the GPU)
        for old in [k for k in _INPUTS if k[0] == "attributor" and k[1] != id(model)]:
            del _INPUTS[old]
    return _cached(
        key, lambda: ex.make_attributor(model, plan.method, plan.engine_options, validate=False),
        keep=4,  # a few methods
    )


def _retry_condition(task: Any, task_run: Any, state: Any) -> bool:
    """Retry transient failures (a lost GPU, a flaky file system), not bad data or params."""
    return not isinstance(getattr(state, "data", None), PERMANENT_ERRORS)


def _in_dask_worker() -> bool:
    try:
        from distributed import get_worker

        get_worker()
    except (ImportError, ValueError):
        return False
    return True


# --------------------------------------------------------------------------- explain


def explain_one_shard(
    ctx: Context, arch: str, plan: ex.ExplainPlan, spec: ex.ShardSpec
) -> ex.ShardOutcome:
    """Explain one shard (skipped when complete): the unit of work of the explain stage."""
    from tqdm.auto import tqdm

    r = ctx.params.runtime
    with _RUN_LOCK:
        model, ds, _, _ = stage_inputs(
            ctx, arch, model_sha256=plan.params["model_sha256"],
            dataset_id=plan.params["dataset"],
        )
        dev = worker_device(r.device)
        model.to(dev)
        nhwc = use_channels_last(r.channels_last, model, dev)
        if nhwc:
            model.to(memory_format=torch.channels_last)
        with tqdm(total=spec.count, desc=f"explain {arch}/{plan.method} #{spec.k}", unit="img",
                  disable=_in_dask_worker(), leave=False) as bar:
            outcome = ex.explain_shard(
                plan, spec, model, ds, batch_size=r.batch_size, device=dev,
                num_workers=r.num_workers, channels_last=nhwc, tf32=r.tf32,
                attribute=_attributor(model, plan, dev, nhwc), progress=bar.update,
            )
    if outcome.nonfinite:
        _warn(f"{arch}/{plan.method} {spec.file}: NaN/Inf relevance or logits for dataset "
              f"items {list(outcome.nonfinite)}")
    return outcome


def _shard_task(name: str, run_name: str, fn: Any) -> Any:
    """A retried, registered shard task around ``fn``.

    The task wraps a module-level function of another name: cloudpickle then ships the function
    by reference, so a Dask worker runs it with this module's real globals (caches, locks).
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


explain_shard_task = _shard_task(
    "explain-shard", "explain-{arch}-{plan.method}-{spec.k}", explain_one_shard
)


def run_explain(ctx: Context, arch: str, dispatch: Dispatch) -> dict[str, dict[str, Any]]:
    """The explain stage: plan every method, run the shards, write each ``index.json``.

    Returns per method the output folder and the shard files written and reused.
    """
    p = ctx.params
    model, ds, _, _ = stage_inputs(ctx, arch)
    root = ctx.layout.relevance(arch)
    wanted = set(methods(p))
    plans = []
    for method in methods(p):
        plan = ex.plan_explanation(
            model, ds, out_dir=ctx.layout.relevance(arch, method), method=method,
            options=explain_options(ctx, method), shard_size=p.explain.shard_size,
        )
        ex.make_attributor(model, method, plan.engine_options)  # bad options fail here
        plans.append(plan)
    if root.is_dir():  # methods no longer asked for would be stale outputs
        for old in root.iterdir():
            if old.is_dir() and old.name not in wanted:
                shutil.rmtree(old)
    for plan in plans:
        ex.prepare_out_dir(plan)
    items = [{"plan": plan, "spec": spec} for plan in plans for spec in plan.shards]
    outcomes = run_shard_tasks(
        dispatch, explain_shard_task, {"ctx": ctx, "arch": arch}, items,
        name=f"explain-shards-{arch}",
    )
    written = {}
    for plan in plans:
        mine = [o for it, o in zip(items, outcomes, strict=True) if it["plan"] is plan]
        index = ex.write_index(plan, mine)
        written[plan.method] = {
            "out_dir": str(plan.out_dir), "written": index.written, "skipped": index.skipped
        }
        _progress(
            None, 1.0, f"{arch}/{plan.method}: {index.num_items} images in {len(index.shards)} "
            f"shards ({len(index.skipped)} reused) -> {plan.out_dir}",
        )
    return written


# --------------------------------------------------------------------------- evaluate


def eval_settings(ctx: Context, dev: torch.device) -> ev.EvalSettings:
    """Metric settings of ``params.evaluate`` (batch size from ``runtime.batch_size``)."""
    e = ctx.params.evaluate
    return ev.EvalSettings(
        steps=e.steps, baseline=e.baseline, score=e.score,
        quantize_levels=list(e.quantize_levels), max_images=e.max_images,
        batch_size=metric_batch_size(ctx.params.runtime.batch_size, dev),
    )


def evaluate_one_shard(
    ctx: Context, arch: str, settings: ev.EvalSettings, model_sha256: str, dataset_id: str,
    job: EvalJob,
) -> bool:
    """Score one explanation shard into a partial result; False when it was already there."""
    if ev.read_piece(job.out, job.key) is not None:
        return False
    r = ctx.params.runtime
    with _RUN_LOCK:
        model, ds, _, _ = stage_inputs(
            ctx, arch, model_sha256=model_sha256, dataset_id=dataset_id
        )
        dev = worker_device(r.device)
        arrays = ex.read_shard(
            job.explained, sha256=job.sha256, names=("index", "target", "relevance"),
            count=job.rows,
        )
        arrays = {k: v[: job.count] for k, v in arrays.items()}
        with torch_backends(dev, tf32=r.tf32):
            piece = ev.evaluate_piece(
                model, ds, arrays, job.method, settings, device=dev, start=job.start,
                bar=not _in_dask_worker(),
            )
    ev.write_piece(job.out, job.key, piece)
    return True


evaluate_shard_task = _shard_task(
    "evaluate-shard", "evaluate-{arch}-{job.method}-{job.start}", evaluate_one_shard
)


def run_evaluate(ctx: Context, arch: str, dispatch: Dispatch) -> dict[str, Any]:
    """The evaluate stage: one partial result per explanation shard, merged into the outputs.

    Partial results live in ``outputs/eval-shards/<arch>/`` keyed by the metric settings, the
    shard's SHA-256 and the model, so a rerun skips the shards already scored.
    """
    p = ctx.params
    _, ds, model_sha, ds_id = stage_inputs(ctx, arch)
    settings = eval_settings(ctx, device(ctx))
    jobs: list[EvalJob] = []
    limits: dict[str, int] = {}
    part_root = ctx.layout.eval_shards(arch)
    for method in methods(p):
        out = ctx.layout.relevance(arch, method)
        index = ex.read_index(out)
        n = index["num_items"]
        n = n if settings.max_images is None else min(n, settings.max_images)
        if n == 0:
            raise ValueError(f"no explained images for method {method!r}")
        limits[method] = n
        for s in index["shards"]:
            if s.start >= n:
                break
            count = min(s.count, n - s.start)
            key = ev.piece_key(
                settings, method=method, shard_sha256=s.sha256, start=s.start, count=count,
                model_sha256=model_sha,
            )
            jobs.append(EvalJob(
                method, out / s.file, s.sha256, s.start, s.count, count,
                part_root / method / f"{Path(s.file).stem}.json", key,
            ))
    _remove_stale_pieces(part_root, {j.out for j in jobs})
    done = run_shard_tasks(
        dispatch, evaluate_shard_task,
        {"ctx": ctx, "arch": arch, "settings": settings, "model_sha256": model_sha,
         "dataset_id": ds_id},
        [{"job": j} for j in jobs], name=f"evaluate-shards-{arch}",
    )
    pieces: dict[str, list[dict[str, Any]]] = {m: [] for m in methods(p)}
    for job in jobs:
        piece = ev.read_piece(job.out, job.key)
        if piece is None:
            raise ex.ShardError(f"{job.out}: partial result missing or stale after its task ran")
        pieces[job.method].append(piece)
    infos = {
        m: {k: v[: limits[m]] for k, v in ex.load_shards(
            ctx.layout.relevance(arch, m), names=ev.MERGE_ARRAYS).items()}
        for m in methods(p)
    }
    result = ev.merge_pieces(pieces, infos, ds, settings)
    ev.write_outputs(
        result, eval_dir=ctx.layout.evaluation(arch), metrics_file=ctx.layout.metrics(arch),
        plots_dir=ctx.layout.plots(arch), primary=p.explain.composite,
    )
    scored = sum(1 for d in done if d)
    _progress(None, 1.0, f"{arch} evaluate: {len(jobs)} shards ({len(jobs) - scored} reused)")
    return {"summary": result.summary[p.explain.composite], "scored": scored,
            "reused": len(jobs) - scored}


def _remove_stale_pieces(root: Path, keep: set[Path]) -> None:
    """Partial results of shards or methods that are no longer part of the stage."""
    if not root.is_dir():
        return
    for path in root.rglob("*.json"):
        if path not in keep:
            path.unlink(missing_ok=True)
    for tmp in root.rglob(".*.tmp-*"):
        tmp.unlink(missing_ok=True)


def _warn(message: str) -> None:
    import logging

    try:
        from prefect import get_run_logger

        get_run_logger().warning(message)
    except Exception:
        logging.getLogger(__name__).warning(message)
