"""The report stage: everything the earlier stages wrote, plus figures and models, into MLflow.

One parent run per report (params, a method x metric summary table and figure of every model,
links to DVC and Prefect) and one child run per model with the per-image table, heatmap grids,
curves, the conservation histograms and the model itself. A run is only marked FINISHED after all
of its parts are logged; a failure marks it FAILED, so a partial report never looks complete. The
Prefect run gets a markdown artifact with the same table and the MLflow link, and the stage ends
by printing the MLflow run id and URL.
"""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path
from typing import Any

import mlflow
import numpy as np
import yaml
from mlflow.data.meta_dataset import MetaDataset
from mlflow.data.sources import LocalArtifactDatasetSource
from mlflow.entities import DatasetInput, InputTag
from mlflow.tracking import MlflowClient
from mlflow.utils.mlflow_tags import MLFLOW_DATASET_CONTEXT
from prefect import flow, task
from prefect.artifacts import create_markdown_artifact
from prefect.cache_policies import NO_CACHE
from prefect.runtime import flow_run

from flows import plots
from flows.context import Context, data_root, load_context, load_trained, log, methods
from flows.context import dataset as load_dataset
from flows.io import write_json, write_text
from flows.methods import Method
from flows.shards import load_shards
from flows.tracking import (
    check_reachable,
    get_experiment_id,
    log_metrics,
    log_model,
    log_params,
    log_series,
    target_for,
    tracked_run,
)

SAMPLES_PER_CLASS = 3
TABLE_METRICS = ("insertion", "deletion", "id", "aopc_morf", "relevance_mass", "pointing_game",
                 "conservation_median")
MLFLOW_UI = "http://127.0.0.1:5000"  # where `mlflow ui` serves a local store by default


def dvc_data_hash(base: Path, data_root: Path) -> dict[str, str]:
    """The md5 recorded in the ``.dvc`` file that tracks the dataset (``data.dvc``), if any."""
    for dvc_file in sorted(base.glob("*.dvc")):
        try:
            spec = yaml.safe_load(dvc_file.read_text()) or {}
        except (OSError, yaml.YAMLError):
            continue
        for out in spec.get("outs", []) or []:
            tracked = (base / str(out.get("path", ""))).resolve()
            if data_root.resolve() == tracked or tracked in data_root.resolve().parents:
                return {
                    "dvc.data_hash": str(out.get("md5", "")),
                    "dvc.data_file": dvc_file.name,
                    "dvc.data_path": str(out.get("path", "")),
                }
    return {}


def git_commit(base: Path) -> str | None:
    """HEAD of the repository holding the params file, or None (no git / no commit yet)."""
    try:
        out = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=base, capture_output=True, text=True, timeout=10,
            check=False,
        )
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() if out.returncode == 0 else None


def _flatten(prefix: str, value: Any, out: dict[str, Any]) -> None:
    if isinstance(value, dict):
        for k, v in value.items():
            _flatten(f"{prefix}.{k}" if prefix else str(k), v, out)
    else:
        out[prefix] = value


def _numeric(flat: dict[str, Any]) -> dict[str, float]:
    return {
        k: float(v) for k, v in flat.items()
        if isinstance(v, int | float) and not isinstance(v, bool)
    }


def overrides_vs_head(ctx: Context, given: dict[str, Any] | None) -> dict[str, Any]:
    """The settings that make this run a variant: ``given`` (deployment overrides), else the
    params that differ from the committed params file (what ``dvc exp run -S`` changed)."""
    if given:
        return dict(given)
    try:
        out = subprocess.run(
            ["git", "show", f"HEAD:./{ctx.params_path.name}"], cwd=ctx.base, capture_output=True,
            text=True, timeout=10, check=False,
        )
        committed = yaml.safe_load(out.stdout) if out.returncode == 0 else None
    except (OSError, subprocess.SubprocessError, yaml.YAMLError):
        committed = None
    if not isinstance(committed, dict):
        return {}
    now: dict[str, Any] = {}
    before: dict[str, Any] = {}
    _flatten("", yaml.safe_load(ctx.params_path.read_text()) or {}, now)
    _flatten("", committed, before)
    return {k: v for k, v in now.items() if before.get(k) != v}


def run_name(ctx: Context, arch: str | None, overrides: dict[str, Any]) -> str:
    """``small_resnet+lrn_cnn epsilon-plus-flat explain.composite=epsilon``: readable in the UI."""
    models = arch or "+".join(ctx.params.model.architectures)
    extra = " ".join(f"{k}={v}" for k, v in sorted(overrides.items()))
    return " ".join(filter(None, (models, ctx.params.explain.composite, extra)))[:250]


def expected_conservation(method: Method, residual: str) -> str:
    """What the conservation histogram of ``method`` should show, and why (METHOD.md 1 and 3)."""
    if not method.composite:
        return f"{method.label}: not an LRP method, no conservation"
    mode = method.options.get("residual", residual)
    if mode == "gradient":
        return (f"{method.label}: expected > 0 on ResNets: the gradient residual rule copies "
                "relevance into both branches of each skip (METHOD.md 3)")
    if method.name == "otsuki2024":
        return (f"{method.label}: expected near 0 (bias-free z+, conservative residual "
                "splitting); the small rest is the stabiliser")
    return (f"{method.label}: expected > 0: biases absorb relevance under {method.name} "
            "(only bias-free rules conserve: otsuki2024 or zero_bias=True)")


def mlflow_url(tracking_uri: str, experiment_id: str, run_id: str) -> str:
    """The run's page in the MLflow UI (for a local store: as served by `mlflow ui`)."""
    base = tracking_uri.rstrip("/") if tracking_uri.startswith("http") else MLFLOW_UI
    return f"{base}/#/experiments/{experiment_id}/runs/{run_id}"


def summary_table(ctx: Context) -> list[dict[str, Any]]:
    """One row per (model, method): the raw-heatmap metrics of the evaluate stage."""
    rows = []
    for arch in ctx.params.model.architectures:
        metrics = json.loads(ctx.layout.metrics(arch).read_text())
        per_method = {ctx.params.explain.composite: metrics["composite"], **metrics["compare"]}
        for label, values in per_method.items():
            rows.append({"model": arch, "method": label,
                         **{k: values.get(k) for k in TABLE_METRICS}})
    return rows


def markdown_table(rows: list[dict[str, Any]]) -> str:
    head = ["model", "method", *TABLE_METRICS]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        cells = [r["model"], r["method"]] + [_fmt(r.get(k)) for k in TABLE_METRICS]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def report_to_mlflow(
    ctx: Context, *, flow_run_info: dict[str, str], overrides: dict[str, Any] | None = None
) -> dict[str, Any]:
    """Log the results; return run ids, URLs and model URIs (also written to outputs/report)."""
    p = ctx.params
    target = target_for(p.mlflow, ctx.base)
    client = MlflowClient(tracking_uri=target.tracking_uri)
    mlflow.set_tracking_uri(target.tracking_uri)  # log_model goes through the fluent API
    experiment_id = get_experiment_id(client, target)
    variant = overrides_vs_head(ctx, overrides)
    tags = {
        "params_file": str(ctx.params_path),
        "outputs": str(ctx.layout.root),
        "prefect.flow_run_id": flow_run_info.get("id", ""),
        "prefect.flow_run_name": flow_run_info.get("name", ""),
        "git.commit": git_commit(ctx.base),
        "dvc.exp_name": os.environ.get("DVC_EXP_NAME"),
        "lrp.composite": p.explain.composite,
        "lrp.overrides": json.dumps(variant, sort_keys=True, default=str),
        **dvc_data_hash(ctx.base, data_root(ctx)),
    }
    figures = ctx.layout.report()
    result: dict[str, Any] = {
        "tracking_uri": target.tracking_uri,
        "experiment_id": experiment_id,
        "experiment": target.experiment,
        "models": {},
    }
    _require_inputs(ctx)
    ds = load_dataset(ctx, p.explain.split, p.runtime.subset)
    rows = summary_table(ctx)
    table = markdown_table(rows)
    with tracked_run(client, experiment_id, run_name(ctx, None, variant), tags) as parent_id:
        result["parent_run_id"] = parent_id
        result["parent_run_url"] = mlflow_url(target.tracking_uri, experiment_id, parent_id)
        log_params(client, parent_id, p.to_flat_dict())
        _log_dataset(client, parent_id, ctx, tags.get("dvc.data_hash") or ds.fingerprint())
        for arch in p.model.architectures:
            with tracked_run(
                client, experiment_id, run_name(ctx, arch, variant),
                {**tags, "lrp.model": arch}, parent=parent_id,
            ) as run_id:
                summary = _log_model_run(client, run_id, ctx, arch, ds, figures / arch)
                model_uri = None
                if p.mlflow.log_models:
                    model = load_trained(ctx, arch, len(ds.classes))
                    model_uri = log_model(run_id, model, name="model")
                result["models"][arch] = {"run_id": run_id, "model_uri": model_uri}
            flat: dict[str, Any] = {}
            _flatten(arch, summary, flat)
            log_metrics(client, parent_id, _numeric(flat))
        write_text(figures / "summary.md", table + "\n")
        plots.summary_bars(rows, figures / "summary.png", metrics=("insertion", "deletion",
                                                                    "aopc_morf"))
        client.log_artifact(parent_id, str(figures / "summary.md"), "summary")
        client.log_artifact(parent_id, str(figures / "summary.png"), "summary")
        client.log_table(parent_id, {k: [r[k] for r in rows] for k in rows[0]},
                         "summary/summary_table.json")
        client.log_dict(parent_id, result, "runs.json")
    write_json(figures / "runs.json", result)
    result["table"] = table
    return result


def _log_dataset(client: MlflowClient, run_id: str, ctx: Context, digest: str) -> None:
    """The dataset as an MLflow input (what ``mlflow.log_input`` does, with an explicit run)."""
    root = data_root(ctx)
    ds = MetaDataset(LocalArtifactDatasetSource(str(root)), name=root.name, digest=digest[:36])
    context = InputTag(MLFLOW_DATASET_CONTEXT, ctx.params.explain.split)
    client.log_inputs(run_id, datasets=[DatasetInput(ds._to_mlflow_entity(), tags=[context])])


def _require_inputs(ctx: Context) -> None:
    """Refuse to start a report on missing stage outputs (names the first missing file)."""
    layout = ctx.layout
    for arch in ctx.params.model.architectures:
        ev = layout.evaluation(arch)
        needed = [
            layout.model(arch), layout.train_metrics(arch), layout.train_history(arch),
            layout.metrics(arch), ev / "scores.csv", ev / "curves.json",
            ev / "metric_params.json",
            *[layout.relevance(arch, m.label) for m in methods(ctx.params)],
        ]
        for path in needed:
            if not path.exists():
                raise FileNotFoundError(
                    f"{path}: missing; run the earlier stages first (dvc repro) for {arch!r}"
                )


def _log_model_run(
    client: MlflowClient, run_id: str, ctx: Context, arch: str, ds: Any, fig_dir: Path
) -> dict[str, Any]:
    """Params, metrics, tables and figures of one model (the model itself is logged after)."""
    p = ctx.params
    layout = ctx.layout
    train = json.loads(layout.train_metrics(arch).read_text())
    history = json.loads(layout.train_history(arch).read_text())["history"]
    summary = json.loads(layout.metrics(arch).read_text())
    metric_params = json.loads((layout.evaluation(arch) / "metric_params.json").read_text())
    curves = json.loads((layout.evaluation(arch) / "curves.json").read_text())

    params: dict[str, Any] = {**p.to_flat_dict(), "model.name": arch}
    _flatten("metric", metric_params, params)
    log_params(client, run_id, params)
    log_metrics(client, run_id, {
        "val_accuracy": train["val_accuracy"], "best_epoch": train["best_epoch"],
        "train_images": train["train_images"], "val_images": train["val_images"],
    })
    for key in ("train_loss", "train_accuracy", "val_loss", "val_accuracy"):
        series = [h.get(key) for h in history]
        if series:
            log_series(client, run_id, f"epoch.{key}", series)
    flat: dict[str, Any] = {}
    _flatten("", summary, flat)
    log_metrics(client, run_id, _numeric(flat))

    client.log_artifact(run_id, str(layout.evaluation(arch) / "scores.csv"), "tables")
    client.log_artifact(run_id, str(layout.evaluation(arch) / "curves.json"), "tables")
    client.log_artifact(run_id, str(layout.evaluation(arch) / "metric_params.json"), "tables")
    client.log_artifact(run_id, str(layout.metrics(arch)), "tables")
    client.log_artifact(run_id, str(layout.train_metrics(arch)), "tables")
    client.log_artifact(run_id, str(layout.plots(arch) / "curves.png"), "figures")

    for variant, c in curves.items():
        safe = variant.replace("/", "_")
        plots.curve_plot(
            np.asarray(c["fraction"]),
            {"insertion": np.asarray(c["insertion"]), "deletion": np.asarray(c["deletion"])},
            fig_dir / f"curves_{safe}.png", title=f"{arch} {variant}: mean insertion / deletion",
            metric="AUC",
        )
        if "aopc_morf_curve" in c:
            steps = np.arange(len(c["aopc_morf_curve"]))
            plots.curve_plot(
                steps, {"MoRF": np.asarray(c["aopc_morf_curve"])},
                fig_dir / f"morf_{safe}.png", title=f"{arch} {variant}: region perturbation",
                metric="aopc_morf", xlabel="regions perturbed", ylabel="target logit",
            )
    for method in methods(p):
        shards = load_shards(layout.relevance(arch, method.label))
        if method.composite:
            plots.conservation_histogram(
                np.asarray(shards["conservation"]), fig_dir / f"conservation_{method.label}.png",
                title=f"{arch} {method.label}: conservation error",
                expected=expected_conservation(method, p.explain.residual),
            )
        _heatmap_grids(ds, shards, fig_dir / "heatmaps" / method.label, f"{arch} {method.label}",
                       score=p.evaluate.score)
    client.log_artifacts(run_id, str(fig_dir), "figures")
    return summary


def _heatmap_grids(ds: Any, shards: dict[str, Any], out_dir: Path, title: str, *,
                   score: str) -> None:
    """One grid per class: the first explained images of that class, each row titled with the
    image's dataset index and file, its classes and the model's score of the explained class."""
    labels = np.asarray(shards["label"])
    for label, name in enumerate(ds.classes):
        rows = np.flatnonzero(labels == label)[:SAMPLES_PER_CLASS]
        if rows.size == 0:
            continue
        images, rels, titles = [], [], []
        for r in rows:
            index = int(shards["index"][r])
            item = ds[index]
            images.append(item["image"].numpy())
            rels.append(np.asarray(shards["relevance"][r], dtype=np.float32))
            logits = np.asarray(shards["logits"][r], dtype=np.float64)
            target = int(shards["target"][r])
            value = _softmax(logits)[target] if score == "softmax" else logits[target]
            titles.append(
                f"#{index} {Path(str(item.get('path', ''))).name}\n{name}: pred "
                f"{ds.classes[int(np.argmax(logits))]}, {score}({ds.classes[target]}) {value:.2f}"
            )
        plots.heatmap_grid(images, rels, titles, out_dir / f"{name}.png",
                           suptitle=f"{title}: {name}")


def _softmax(logits: np.ndarray) -> np.ndarray:
    e = np.exp(logits - logits.max())
    return e / e.sum()


def _flatten(prefix: str, value: Any, out: dict[str, Any]) -> None:
    if isinstance(value, dict):
        for k, v in value.items():
            _flatten(f"{prefix}.{k}" if prefix else str(k), v, out)
    else:
        out[prefix] = value


def _numeric(flat: dict[str, Any]) -> dict[str, float]:
    return {
        k: float(v) for k, v in flat.items()
        if isinstance(v, int | float) and not isinstance(v, bool)
    }


def _fmt(value: Any) -> str:
    return f"{value:.3f}" if isinstance(value, int | float) else "-"


@task(name="report", cache_policy=NO_CACHE)
def report_task(ctx: Context, overrides: dict[str, Any] | None = None) -> dict[str, Any]:
    """Log everything to MLflow, then link it from Prefect (markdown artifact) and the terminal."""
    info = {"id": str(flow_run.id or ""), "name": str(flow_run.name or "")}
    result = report_to_mlflow(ctx, flow_run_info=info, overrides=overrides)
    expected = "\n".join(
        f"- {expected_conservation(m, ctx.params.explain.residual)}" for m in methods(ctx.params)
    )
    create_markdown_artifact(
        f"# LRP report\n\nMLflow run: [{result['parent_run_id']}]({result['parent_run_url']}) "
        f"(store `{result['tracking_uri']}`)\n\n{result['table']}\n\n"
        f"Conservation error:\n{expected}\n",
        key="lrp-report", description="method x metric table and the MLflow run",
    )
    log("MLflow run %s: %s (store %s)", result["parent_run_id"], result["parent_run_url"],
        result["tracking_uri"])
    return result


@flow(name="report", log_prints=True)
def report_flow(params_path: str = "params.yaml") -> dict[str, Any]:
    """DVC stage ``report``: one MLflow parent run, one child run per model."""
    ctx = load_context(params_path)
    check_reachable(target_for(ctx.params.mlflow, ctx.base))
    result = report_task(ctx)
    print(f"MLflow run {result['parent_run_id']}: {result['parent_run_url']}")
    return result
