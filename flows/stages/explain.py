"""The explain stage: every compared method over the dataset, one Prefect task per shard.

The flow plans in its own process (hashes and file checks, no engine work), runs one idempotent
``explain-shard`` task per shard (here or on Dask workers; retried on failure, skipped when its
shard is already complete), then writes each method's ``index.json`` (:mod:`flows.shards`).
"""

from __future__ import annotations

import json
import shutil
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
from prefect import flow
from torch import nn
from torch.utils.data import DataLoader, Dataset, Subset
from tqdm.auto import tqdm

from flows import workers
from flows.context import (
    Context,
    engine_options,
    load_context,
    log,
    methods,
    require_arch,
    require_data,
)
from flows.data import NonFiniteInputError, collate
from flows.io import jsonable
from flows.methods import Attributor, Method, make_attributor
from flows.runtime import (
    auto_batch_size,
    loader_workers,
    resolve_batch_size,
    resolve_device,
    torch_backends,
    use_channels_last,
    worker_device,
)
from flows.scaleout import Dispatch, dispatcher, run_shard_tasks
from flows.shards import (
    ARRAYS,
    FORMAT_VERSION,
    ExplainPlan,
    ShardError,
    ShardInfo,
    ShardOutcome,
    ShardSpec,
    complete_shard_meta,
    dataset_id,
    engine_version,
    file_sha256,
    model_hash,
    prepare_out_dir,
    save_shard,
    sha256_text,
    write_index,
)

# Options consumed here (storage and target); every other option goes to the engine.
LOCAL_OPTIONS = {"target": "label", "relevance_dtype": "float32", "channel_sum": False}


def plan_explanation(
    model: nn.Module,
    dataset: Dataset,
    *,
    out_dir: Path,
    method: Method,
    options: dict[str, Any],
    shard_size: int,
) -> ExplainPlan:
    """Check the options and fix the shards and the parameter hash; touches no file.

    ``options``: ``target`` ("label" or "predicted"), ``relevance_dtype`` ("float32", or
    "float16" to halve disk use; computed in float32 either way), ``channel_sum`` (store (N,H,W));
    the rest goes to the engine or the baseline. For LRP the dataset's ``input_bounds()`` is
    passed as ``input_bounds`` unless given. The hash covers the model's weights (so a worker
    that loads another model file is caught) and the dataset fingerprint.
    """
    if shard_size < 1:
        raise ValueError(f"shard_size must be >= 1, got {shard_size}")
    local = {k: options.get(k, v) for k, v in LOCAL_OPTIONS.items()}
    if local["target"] not in ("label", "predicted"):
        raise ValueError(
            f"options['target'] must be 'label' or 'predicted', got {local['target']!r}"
        )
    if local["relevance_dtype"] not in ("float16", "float32"):
        raise ValueError(
            "options['relevance_dtype'] must be 'float16' or 'float32', "
            f"got {local['relevance_dtype']!r}"
        )
    engine_options = {k: v for k, v in options.items() if k not in LOCAL_OPTIONS}
    if method.composite and "input_bounds" not in engine_options and hasattr(dataset, "input_bounds"):
        engine_options["input_bounds"] = dataset.input_bounds()
    n = len(dataset)
    params = {
        "format": FORMAT_VERSION,
        "method": method.spec,
        "options": jsonable({**local, **engine_options}),
        "model_sha256": model_hash(model),
        "dataset": dataset_id(dataset),
        "num_items": n,
        "shard_size": shard_size,
        "engine_version": engine_version(),
    }
    params_hash = sha256_text(json.dumps(params, sort_keys=True))
    shards = tuple(
        ShardSpec(k, start, min(shard_size, n - start))
        for k, start in enumerate(range(0, n, shard_size))
    )
    return ExplainPlan(
        Path(out_dir), method, params, params_hash, local, engine_options, shards
    )


def explain_shard(
    plan: ExplainPlan,
    spec: ShardSpec,
    model: nn.Module,
    dataset: Dataset,
    *,
    batch_size: int | str,
    device: str | torch.device,
    num_workers: int = 0,
    channels_last: bool | str = "auto",
    tf32: bool = True,
    attribute: Attributor | None = None,
    progress: Callable[[int], None] | None = None,
) -> ShardOutcome:
    """Explain one shard and write it atomically; skip it when it is already complete and valid.

    Idempotent, so a retried or repeated task costs one file check. The model is moved to
    ``device`` (and to NHWC when ``channels_last`` applies) and must be in eval mode; pass
    ``attribute`` (from :func:`flows.methods.make_attributor` with ``validate=False``) to reuse one across
    shards. ``batch_size="auto"`` searches the largest batch that fits on CUDA (cached per
    process). Raises :class:`NonFiniteInputError` naming the items whose image is NaN/Inf;
    NaN/Inf relevance of a finite image is stored, recorded in the shard and warned about.
    """
    path = plan.out_dir / spec.file
    done = complete_shard_meta(path, plan.params_hash, spec.start, spec.count)
    if done is not None:
        info = ShardInfo(spec.file, spec.start, spec.count, file_sha256(path))
        return ShardOutcome(info, False, tuple(done.get("nonfinite", ())))
    device = resolve_device(device)
    fixed = resolve_batch_size(batch_size)
    with torch_backends(device, tf32=tf32):
        model.to(device)
        nhwc = use_channels_last(channels_last, model, device)
        if nhwc:
            model.to(memory_format=torch.channels_last)
        if attribute is None:
            attribute = make_attributor(model, plan.method, plan.engine_options, validate=False)
        size = fixed or _auto_batch_size(plan, spec, attribute, dataset, device, nhwc)
        arrays, bad_input, bad_output, paths = _explain_range(
            attribute, dataset, spec, size, device, num_workers, plan.local, nhwc, progress
        )
    if bad_input.any():
        raise NonFiniteInputError(_describe_bad_inputs(arrays["index"], bad_input, paths))
    nonfinite = tuple(int(i) for i in arrays["index"][bad_output])
    meta: dict[str, Any] = {
        "params_hash": plan.params_hash, "start": spec.start, "count": spec.count, "shard": spec.k
    }
    if nonfinite:  # only then: clean shards stay byte-identical to earlier versions
        meta["nonfinite"] = list(nonfinite)
    save_shard(path, arrays, meta)
    if nonfinite:
        warnings.warn(
            f"{plan.method.label}: relevance or logits are NaN/Inf for dataset items "
            f"{list(nonfinite)} ({path.name}; stored as computed)",
            RuntimeWarning,
            stacklevel=2,
        )
    info = ShardInfo(spec.file, spec.start, spec.count, file_sha256(path))
    return ShardOutcome(info, True, nonfinite)


def _explain_range(
    attribute: Attributor,
    dataset: Dataset,
    spec: ShardSpec,
    batch_size: int,
    device: torch.device,
    num_workers: int,
    local: dict[str, Any],
    channels_last: bool,
    progress: Callable[[int], None] | None,
) -> tuple[dict[str, np.ndarray], np.ndarray, np.ndarray, list[str]]:
    """The hot loop: no per-sample Python work and no host-device sync per batch.

    On CUDA, batches come from pinned memory and are copied with ``non_blocking``; results go
    into preallocated pinned host buffers with ``non_blocking`` copies, and NaN/Inf flags are kept
    on the device; one synchronisation at the end of the shard makes all of it visible (other
    devices copy synchronously). Returns the arrays, the per-item flags (non-finite input,
    non-finite output) and the items' file paths.
    """
    cuda = device.type == "cuda"
    loader = DataLoader(
        Subset(dataset, range(spec.start, spec.start + spec.count)),
        batch_size=batch_size,
        shuffle=False,
        num_workers=loader_workers(num_workers),
        collate_fn=collate,
        pin_memory=cuda,
    )
    store = torch.float16 if local["relevance_dtype"] == "float16" else torch.float32
    n = spec.count
    host: dict[str, torch.Tensor] = {}
    bad_input = torch.zeros(n, dtype=torch.bool, device=device)
    bad_output = torch.zeros(n, dtype=torch.bool, device=device)
    label = np.empty(n, dtype=np.int64)
    index = np.empty(n, dtype=np.int64)
    paths: list[str] = []
    pos = 0
    for batch in loader:
        b = len(batch["label"])
        x = batch["image"].to(device, non_blocking=cuda)
        if channels_last and x.dim() == 4:
            x = x.contiguous(memory_format=torch.channels_last)
        target = batch["label"].to(device, non_blocking=cuda) if local["target"] == "label" else None
        result = attribute(x, target)
        relevance = result["relevance"].detach().float()  # computed in float32 (docs/PIPELINE.md)
        logits = result["logits"].detach().float()
        bad_input[pos : pos + b] = ~torch.isfinite(x).flatten(1).all(1)
        bad_output[pos : pos + b] = ~(
            torch.isfinite(relevance).flatten(1).all(1) & torch.isfinite(logits).all(1)
        )
        if local["channel_sum"]:
            relevance = relevance.sum(1)
        values = {
            "relevance": relevance.to(store).contiguous(),  # float16: a storage format only
            "logits": logits,
            "target": result["target"].detach().long(),
            "initial": result["initial"].detach().float(),
            "conservation": result["conservation"].detach().float(),
        }
        if not host:
            host = {
                name: torch.empty((n, *v.shape[1:]), dtype=v.dtype, pin_memory=cuda)
                for name, v in values.items()
            }
        for name, v in values.items():
            host[name][pos : pos + b].copy_(v, non_blocking=cuda)  # into pinned memory: async
        label[pos : pos + b] = batch["label"].numpy()
        index[pos : pos + b] = batch["index"].numpy()
        paths.extend(batch.get("path") or [""] * b)
        pos += b
        if progress is not None:
            progress(b)
    if pos != n:
        raise ShardError(f"dataset yielded {pos} items for {spec.file}, expected {n}")
    flags = torch.empty((2, n), dtype=torch.bool, pin_memory=cuda)
    flags[0].copy_(bad_input, non_blocking=cuda)
    flags[1].copy_(bad_output, non_blocking=cuda)
    if cuda:
        torch.cuda.synchronize(device)  # the one wait per shard: results are now on the host
    arrays = {name: t.numpy() for name, t in host.items()}
    arrays["label"] = label
    arrays["index"] = index
    flags_np = flags.numpy()
    return {name: arrays[name] for name in ARRAYS}, flags_np[0], flags_np[1], paths


def _auto_batch_size(
    plan: ExplainPlan,
    spec: ShardSpec,
    attribute: Attributor,
    dataset: Dataset,
    device: torch.device,
    channels_last: bool,
) -> int:
    """``batch_size: auto``: the largest batch of this model and image shape that fits (CUDA)."""
    sample = dataset[spec.start]["image"]
    key = (plan.params["model_sha256"], plan.method.spec, json.dumps(plan.params["options"]),
           tuple(sample.shape), channels_last)
    limit = int(plan.params["shard_size"])  # a shard is one DataLoader pass: no bigger batches

    def run(size: int) -> None:
        x = sample.unsqueeze(0).expand(size, *sample.shape).to(device).contiguous()
        if channels_last and x.dim() == 4:
            x = x.contiguous(memory_format=torch.channels_last)
        target = torch.zeros(size, dtype=torch.long, device=device)
        attribute(x, target if plan.local["target"] == "label" else None)

    return auto_batch_size(key, device, run, limit=limit)


def _describe_bad_inputs(index: np.ndarray, bad: np.ndarray, paths: list[str]) -> str:
    items = [
        f"item {int(index[i])}" + (f" ({paths[i]})" if i < len(paths) and paths[i] else "")
        for i in np.flatnonzero(bad)
    ]
    shown = ", ".join(items[:10]) + (f" and {len(items) - 10} more" if len(items) > 10 else "")
    return f"image contains NaN or Inf values: {shown}; fix or remove these files"


def explain_one_shard(ctx: Context, arch: str, plan: ExplainPlan, spec: ShardSpec) -> ShardOutcome:
    """Explain one shard (skipped when complete): the unit of work of the explain stage."""
    r = ctx.params.runtime
    with workers.RUN_LOCK:
        model, ds, _, _ = workers.stage_inputs(
            ctx, arch, model_sha256=plan.params["model_sha256"],
            dataset_id=plan.params["dataset"],
        )
        dev = worker_device(r.device)
        model.to(dev)
        nhwc = use_channels_last(r.channels_last, model, dev)
        if nhwc:
            model.to(memory_format=torch.channels_last)
        with tqdm(total=spec.count, desc=f"explain {arch}/{plan.method.label} #{spec.k}",
                  unit="img", disable=workers.in_dask_worker(), leave=False) as bar:
            outcome = explain_shard(
                plan, spec, model, ds, batch_size=r.batch_size, device=dev,
                num_workers=r.num_workers, channels_last=nhwc, tf32=r.tf32,
                attribute=_attributor(model, plan, dev, nhwc), progress=bar.update,
            )
    if outcome.nonfinite:
        workers.warn(f"{arch}/{plan.method.label} {spec.file}: NaN/Inf relevance or logits for "
                     f"dataset items {list(outcome.nonfinite)}")
    return outcome


explain_shard_task = workers.shard_task(
    "explain-shard", "explain-{arch}-{plan.method.label}-{spec.k}", explain_one_shard
)


def run_explain(ctx: Context, arch: str, dispatch: Dispatch) -> dict[str, dict[str, Any]]:
    """Plan every method, run the shards, write each ``index.json``.

    Returns per method label the output folder and the shard files written and reused.
    """
    p = ctx.params
    model, ds, _, _ = workers.stage_inputs(ctx, arch)
    root = ctx.layout.relevance(arch)
    compared = methods(p)
    plans = []
    for method in compared:
        plan = plan_explanation(
            model, ds, out_dir=ctx.layout.relevance(arch, method.label), method=method,
            options=explain_options(ctx, method), shard_size=p.explain.shard_size,
        )
        make_attributor(model, method, plan.engine_options)  # bad options fail here
        plans.append(plan)
    wanted = {m.label for m in compared}
    if root.is_dir():  # methods no longer asked for would be stale outputs
        for old in root.iterdir():
            if old.is_dir() and old.name not in wanted:
                shutil.rmtree(old)
    for plan in plans:
        prepare_out_dir(plan)
    items = [{"plan": plan, "spec": spec} for plan in plans for spec in plan.shards]
    outcomes = run_shard_tasks(
        dispatch, explain_shard_task, {"ctx": ctx, "arch": arch}, items,
        name=f"explain-shards-{arch}",
    )
    written = {}
    for plan in plans:
        mine = [o for it, o in zip(items, outcomes, strict=True) if it["plan"] is plan]
        index = write_index(plan, mine)
        written[plan.method.label] = {
            "out_dir": str(plan.out_dir), "written": index.written, "skipped": index.skipped
        }
        log("%s/%s: %d images in %d shards (%d reused) -> %s", arch, plan.method.label,
            index.num_items, len(index.shards), len(index.skipped), plan.out_dir)
    return written


def explain_options(ctx: Context, method: Method) -> dict[str, Any]:
    """Storage and target options of ``params.explain`` plus the method's engine options."""
    e = ctx.params.explain
    local = {"target": e.target, "relevance_dtype": e.relevance_dtype,
             "channel_sum": e.channel_sum}
    return {**local, **engine_options(ctx.params, method)}


def _attributor(model: nn.Module, plan: ExplainPlan, dev: torch.device, nhwc: bool) -> Attributor:
    # attributors of a model no longer cached would keep it alive (on the GPU)
    workers.forget("attributor", lambda k: k[1] == id(model))
    key = ("attributor", id(model), plan.params_hash, str(dev), nhwc)
    return workers.cached(
        key, lambda: make_attributor(model, plan.method, plan.engine_options, validate=False),
        keep=8,  # a few methods
    )


@flow(name="explain", log_prints=True)
def explain_flow(params_path: str = "params.yaml", model: str = "small_resnet") -> dict[str, Any]:
    """DVC stage ``explain@<model>``: one ``explain-shard`` task per shard (runtime.task_runner)."""
    ctx = load_context(params_path)
    require_arch(ctx, model)
    require_data(ctx)
    with dispatcher(ctx.params.runtime) as dispatch:
        return run_explain(ctx, model, dispatch)
