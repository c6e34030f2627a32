"""Prefect flows and tasks of the pipeline: data -> train -> explain -> evaluate -> report.

The DVC stages (``python -m flows.stages <stage>``) call the per-stage flows, a Prefect deployment
runs :func:`lrp_pipeline` end to end. Tasks call the plain stage functions in ``flows.data``,
``flows.training``, ``flows.explaining`` and ``flows.evaluation``; this module only decides paths,
passes parameters and reports progress (a tqdm bar in the terminal, logs and a progress artifact in
Prefect). Tasks exchange paths and small dicts, never tensors: nothing large goes through Prefect.
Explain and evaluate run one task per shard (``flows.shards``), in this process or on a Dask
cluster (``runtime.task_runner``, ``flows.scaleout``).
"""

from __future__ import annotations

import contextlib
import copy
import hashlib
import json
import shutil
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml
from prefect import flow, get_run_logger, task
from prefect.artifacts import create_progress_artifact, update_progress_artifact
from prefect.cache_policies import NO_CACHE

from flows.config import Params, ParamsError
from flows.layout import Layout, resolve, write_json


@dataclass(frozen=True)
class Context:
    """Validated params plus the folder relative paths are resolved against."""

    params: Params
    base: Path
    layout: Layout
    params_path: Path


# --------------------------------------------------------------------------- configuration


def apply_overrides(raw: dict[str, Any], overrides: Mapping[str, Any] | None) -> dict[str, Any]:
    """Merge ``{"train.epochs": 1}`` or ``{"train": {"epochs": 1}}`` into the raw params dict.

    Unknown keys are left for :meth:`Params.from_dict`, which names them in its error.
    """
    merged = copy.deepcopy(raw) if raw else {}
    for key, value in (overrides or {}).items():
        if isinstance(value, Mapping) and "." not in key:
            section = merged.setdefault(key, {})
            if not isinstance(section, dict):
                raise ParamsError(f"overrides: {key}: section is not a mapping")
            section.update(value)
            continue
        parts = key.split(".")
        if len(parts) != 2:
            raise ParamsError(f"overrides: {key!r}: use 'section.key' (e.g. 'train.epochs')")
        section = merged.setdefault(parts[0], {})
        if not isinstance(section, dict):
            raise ParamsError(f"overrides: {parts[0]}: section is not a mapping")
        section[parts[1]] = value
    return merged


def load_context(
    params_path: str | Path = "params.yaml",
    overrides: Mapping[str, Any] | None = None,
    output_dir: str | Path | None = None,
) -> Context:
    """Read params (plus overrides) and fix the output root (``outputs/`` next to the params)."""
    path = Path(params_path).resolve()
    if not path.is_file():
        raise ParamsError(f"{path}: params file not found")
    try:
        raw = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    except yaml.YAMLError as exc:
        raise ParamsError(f"{path}: invalid YAML: {exc}") from exc
    if not isinstance(raw, dict):
        raise ParamsError(f"{path}: top level must be a mapping")
    params = Params.from_dict(apply_overrides(raw, overrides), source=str(path))
    base = path.parent
    root = resolve(output_dir, base) if output_dir is not None else base / "outputs"
    return Context(params=params, base=base, layout=Layout(root.resolve()), params_path=path)


def fingerprint(*parts: Any) -> str:
    """Stable short hash of JSON-able settings: guards resumable state against changed params."""
    text = json.dumps(parts, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def methods(params: Params) -> list[str]:
    """The LRP composite first, then any baselines."""
    return [params.explain.composite, *[m for m in params.explain.baselines]]


def data_root(ctx: Context) -> Path:
    return resolve(ctx.params.data.root, ctx.base)


def dataset(ctx: Context, split: str | None, subset: int | None = None) -> Any:
    """The project's ImageDataset for one split (validates every file on construction)."""
    from flows.data import ImageDataset

    d = ctx.params.data
    return ImageDataset(
        data_root(ctx), size=d.image_size, split=None if split == "all" else split, subset=subset,
        val_fraction=d.val_fraction, test_fraction=d.test_fraction,
    )


def load_trained(ctx: Context, arch: str, num_classes: int) -> Any:
    """The model the train stage wrote (a state_dict), rebuilt with real modules."""
    from flows.models import build_model

    path = ctx.layout.model(arch)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: trained model missing; run the train stage for {arch!r}")
    return build_model(arch, num_classes, checkpoint=path)


def device(ctx: Context) -> Any:
    from flows.training import resolve_device

    return resolve_device(ctx.params.runtime.device)


def _progress(key: str | None, value: float, description: str) -> None:
    """Log progress to Prefect (a no-op outside a run)."""
    with contextlib.suppress(Exception):  # not inside a Prefect run
        get_run_logger().info("%s (%.0f%%)", description, 100 * value)


# --------------------------------------------------------------------------- tasks


@task(name="check-tracking", cache_policy=NO_CACHE)
def check_tracking_task(ctx: Context) -> str:
    """Fail in a second when the MLflow store is unreachable, before any training."""
    from flows.tracking import check_reachable, resolve_target

    m = ctx.params.mlflow
    target = resolve_target(m.tracking_uri, m.experiment, m.artifact_location, ctx.base)
    check_reachable(target)
    return target.tracking_uri


@task(name="make-data", cache_policy=NO_CACHE)
def data_task(ctx: Context, force: bool = False) -> str:
    """Generate the synthetic dataset (deterministic, skipped when complete) or check user data."""
    from flows.data import make_synthetic_dataset

    d = ctx.params.data
    root = data_root(ctx)
    if d.synthetic and (force or not root.exists() or (root / "manifest.json").is_file()):
        make_synthetic_dataset(
            root, classes=d.classes, per_class=d.per_class, size=d.image_size, seed=d.seed
        )
    ds = dataset(ctx, "all")
    _progress(None, 1.0, f"dataset {root}: {len(ds)} images, classes {ds.classes}")
    return str(root)


def require_data(ctx: Context) -> None:
    """DVC stages never create data behind data.dvc's back: they ask for the data stage."""
    root = data_root(ctx)
    if not root.exists():
        raise FileNotFoundError(
            f"{root}: dataset missing (params key 'data.root'); run "
            "`python -m flows.stages data && dvc add data` or `dvc pull`"
        )


@task(name="train", cache_policy=NO_CACHE)
def train_task(ctx: Context, arch: str) -> dict[str, Any]:
    """Fine-tune or train ``arch``; resumable from the last epoch checkpoint."""
    import torch

    from flows.models import build_model
    from flows.training import train_model

    p = ctx.params
    train_ds = dataset(ctx, "train", p.runtime.subset)
    val_ds = dataset(ctx, "val", p.runtime.subset)
    ckpt = resolve(p.model.checkpoint, ctx.base) if p.model.checkpoint else None
    model = build_model(arch, len(train_ds.classes), weights=p.model.weights, checkpoint=ckpt)
    shapes = [(k, tuple(v.shape)) for k, v in model.state_dict().items()]  # architecture edits
    fp = fingerprint(
        arch, shapes, p.model, p.train, p.data, p.runtime.subset, train_ds.fingerprint()
    )
    ckpt_root = ctx.layout.checkpoints(arch)
    if ckpt_root.is_dir():  # checkpoints from other settings would refuse to resume
        for old in ckpt_root.iterdir():
            if old.name != fp:
                shutil.rmtree(old, ignore_errors=True)
    t = p.train_for(arch)
    result = train_model(
        model, train_ds, val_ds, epochs=t.epochs, lr=t.lr, weight_decay=t.weight_decay,
        momentum=t.momentum, batch_size=t.batch_size, patience=t.patience, device=device(ctx),
        seed=t.seed, num_workers=p.runtime.num_workers, progress=True,
        checkpoint_dir=ckpt_root / fp, augment=t.augment, schedule=t.schedule,
    )
    out = ctx.layout.model(arch)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.tmp")
    torch.save({k: v.detach().cpu() for k, v in result.model.state_dict().items()}, tmp)
    tmp.replace(out)
    summary = {
        "val_accuracy": result.val_accuracy,
        "best_epoch": result.best_epoch,
        "epochs_run": len(result.history),
        "train_images": len(train_ds),
        "val_images": len(val_ds),
        "history": result.history,
    }
    write_json(ctx.layout.train_metrics(arch), summary)
    _progress(None, 1.0, f"{arch}: val accuracy {result.val_accuracy:.3f}")
    return {"model": str(out), "val_accuracy": result.val_accuracy}


def explain_options(ctx: Context, method: str) -> dict[str, Any]:
    """Options for ``explain_dataset``: storage/target always, engine options for LRP composites.

    Input bounds for z^B come from the dataset inside ``explain_dataset``; baselines take no
    LRP options.
    """
    import lrp

    e = ctx.params.explain
    options: dict[str, Any] = {
        "target": e.target, "relevance_dtype": e.relevance_dtype, "channel_sum": e.channel_sum,
    }
    if method in lrp.composites.names():
        options.update(
            output=e.output, residual=e.residual, lrn=e.lrn, epsilon=e.epsilon, gamma=e.gamma
        )
    return options


@task(name="report", cache_policy=NO_CACHE)
def report_task(ctx: Context, flow_run: dict[str, str]) -> dict[str, Any]:
    """Log params, metrics, tables, figures and models to MLflow (runs FINISHED only when whole)."""
    from flows.report import report_to_mlflow

    return report_to_mlflow(ctx, flow_run=flow_run)


def _flow_run_info() -> dict[str, str]:
    from prefect.runtime import flow_run

    return {"id": str(flow_run.id or ""), "name": str(flow_run.name or "")}


# --------------------------------------------------------------------------- flows


@flow(name="data", log_prints=True)
def data_flow(params_path: str = "params.yaml", force: bool = False) -> str:
    """Create the synthetic dataset (then ``dvc add data``)."""
    return data_task(load_context(params_path), force=force)


@flow(name="train", log_prints=True)
def train_flow(params_path: str = "params.yaml", model: str = "small_resnet") -> dict[str, Any]:
    """DVC stage ``train@<model>``."""
    ctx = load_context(params_path)
    _require_arch(ctx, model)
    check_tracking_task(ctx)
    require_data(ctx)
    return train_task(ctx, model)


@flow(name="explain", log_prints=True)
def explain_flow(params_path: str = "params.yaml", model: str = "small_resnet") -> dict[str, Any]:
    """DVC stage ``explain@<model>``: one ``explain-shard`` task per shard (runtime.task_runner)."""
    from flows.scaleout import dispatcher
    from flows.shards import run_explain

    ctx = load_context(params_path)
    _require_arch(ctx, model)
    require_data(ctx)
    with dispatcher(ctx.params.runtime) as dispatch:
        return run_explain(ctx, model, dispatch)


@flow(name="evaluate", log_prints=True)
def evaluate_flow(params_path: str = "params.yaml", model: str = "small_resnet") -> dict[str, Any]:
    """DVC stage ``evaluate@<model>``: one ``evaluate-shard`` task per explanation shard."""
    from flows.scaleout import dispatcher
    from flows.shards import run_evaluate

    ctx = load_context(params_path)
    _require_arch(ctx, model)
    require_data(ctx)
    with dispatcher(ctx.params.runtime) as dispatch:
        return run_evaluate(ctx, model, dispatch)


@flow(name="report", log_prints=True)
def report_flow(params_path: str = "params.yaml") -> dict[str, Any]:
    """DVC stage ``report``: one MLflow parent run, one child run per model."""
    ctx = load_context(params_path)
    check_tracking_task(ctx)
    return report_task(ctx, _flow_run_info())


@flow(name="lrp-pipeline", log_prints=True)
def lrp_pipeline(
    params_path: str = "params.yaml",
    overrides: dict[str, Any] | None = None,
    output_dir: str | None = None,
) -> dict[str, Any]:
    """The whole pipeline in one Prefect run (what the ``lrp-pipeline/default`` deployment runs).

    Without ``overrides`` it writes to ``outputs/`` like ``dvc repro``; with overrides the outputs
    go to ``outputs/runs/<hash of the settings>`` (unless ``output_dir`` is given), so DVC-tracked
    outputs stay consistent and a rerun with the same settings resumes where it stopped.
    """
    if output_dir is None and overrides:
        output_dir = str(Path("outputs") / "runs" / fingerprint(overrides))
    touches_data = any(k == "data" or k.startswith("data.") for k in overrides or {})
    if touches_data and output_dir is not None and "data.root" not in (overrides or {}):
        # Never regenerate the DVC-tracked dataset in place: a data variant gets its own copy.
        overrides = {**(overrides or {}), "data.root": str(Path(output_dir) / "data")}
    ctx = load_context(params_path, overrides, output_dir)
    logger = get_run_logger()
    logger.info("params %s, outputs %s", ctx.params_path, ctx.layout.root)
    check_tracking_task(ctx)
    archs = list(ctx.params.model.architectures)
    total = 1 + 3 * len(archs) + 1
    done = 0
    artifact = create_progress_artifact(0.0, key="lrp-pipeline-progress",
                                        description="stages done / stages")

    def step(what: str) -> None:
        nonlocal done
        done += 1
        update_progress_artifact(artifact, 100.0 * done / total)
        logger.info("stage %d/%d done: %s", done, total, what)

    from flows.scaleout import dispatcher
    from flows.shards import run_evaluate, run_explain

    data_task(ctx)
    step("data")
    results: dict[str, Any] = {}
    with dispatcher(ctx.params.runtime) as dispatch:  # one Dask cluster for the whole run
        for arch in archs:
            train = train_task(ctx, arch)
            step(f"train {arch}")
            run_explain(ctx, arch, dispatch)
            step(f"explain {arch}")
            ev = run_evaluate(ctx, arch, dispatch)
            step(f"evaluate {arch}")
            results[arch] = {"val_accuracy": train["val_accuracy"], **ev["summary"]}
    report = report_task(ctx, _flow_run_info())
    step("report")
    return {"outputs": str(ctx.layout.root), "metrics": results, "mlflow": report}


def _require_arch(ctx: Context, arch: str) -> None:
    if arch not in ctx.params.model.architectures:
        raise ParamsError(
            f"{ctx.params_path}: model.architectures: {arch!r} is not listed "
            f"({ctx.params.model.architectures})"
        )
