"""The report stage: everything the evaluate stage wrote, plus figures and models, into MLflow.

One parent run per report (params, per-model summary metrics, links to DVC and Prefect) and one
child run per model with the per-image table, heatmap grids, curves, the conservation histogram and
the model itself. A run is only marked FINISHED after all of its parts are logged; a failure marks
it FAILED, so a partial report never looks complete in the MLflow UI.
"""

from __future__ import annotations

import json
import subprocess
from pathlib import Path
from typing import Any

import numpy as np
import yaml

from flows import plots
from flows.layout import write_json

SAMPLES_PER_CLASS = 3


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


def report_to_mlflow(ctx: Any, *, flow_run: dict[str, str]) -> dict[str, Any]:
    """Log the results; return run ids and model URIs (also written to outputs/report)."""
    from mlflow.tracking import MlflowClient

    from flows.pipeline import data_root, dataset, load_trained
    from flows.tracking import (
        get_experiment_id,
        log_metrics,
        log_model,
        log_params,
        log_series,
        resolve_target,
        tracked_run,
    )

    p = ctx.params
    m = p.mlflow
    target = resolve_target(m.tracking_uri, m.experiment, m.artifact_location, ctx.base)
    client = MlflowClient(tracking_uri=target.tracking_uri)
    import mlflow

    mlflow.set_tracking_uri(target.tracking_uri)  # log_model goes through the fluent API
    experiment_id = get_experiment_id(client, target)
    tags = {
        "params_file": str(ctx.params_path),
        "outputs": str(ctx.layout.root),
        "prefect.flow_run_id": flow_run.get("id", ""),
        "prefect.flow_run_name": flow_run.get("name", ""),
        "git.commit": git_commit(ctx.base),
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
    ds = dataset(ctx, p.explain.split, p.runtime.subset)
    with tracked_run(client, experiment_id, "lrp-pipeline", tags) as parent_id:
        result["parent_run_id"] = parent_id
        log_params(client, parent_id, p.to_flat_dict())
        for arch in p.model.architectures:
            with tracked_run(
                client, experiment_id, arch, {**tags, "lrp.model": arch}, parent=parent_id
            ) as run_id:
                summary = _log_model_run(
                    client, run_id, ctx, arch, ds, figures / arch,
                    log_params=log_params, log_metrics=log_metrics, log_series=log_series,
                )
                model_uri = None
                if m.log_models:
                    model = load_trained(ctx, arch, len(ds.classes))
                    model_uri = log_model(run_id, model, name="model")
                result["models"][arch] = {"run_id": run_id, "model_uri": model_uri}
            flat: dict[str, Any] = {}
            _flatten(arch, summary, flat)
            log_metrics(client, parent_id, _numeric(flat))
        client.log_dict(parent_id, result, "runs.json")
    write_json(figures / "runs.json", result)
    return result


def _require_inputs(ctx: Any) -> None:
    """Refuse to start a report on missing stage outputs (names the first missing file)."""
    from flows.pipeline import methods

    layout = ctx.layout
    for arch in ctx.params.model.architectures:
        ev = layout.evaluation(arch)
        needed = [
            layout.model(arch), layout.train_metrics(arch), layout.metrics(arch),
            ev / "scores.csv", ev / "curves.json", ev / "metric_params.json",
            *[layout.relevance(arch, m) for m in methods(ctx.params)],
        ]
        for path in needed:
            if not path.exists():
                raise FileNotFoundError(
                    f"{path}: missing; run the earlier stages first (dvc repro) for {arch!r}"
                )


def _log_model_run(
    client: Any, run_id: str, ctx: Any, arch: str, ds: Any, fig_dir: Path, **log: Any
) -> dict[str, Any]:
    """Params, metrics, tables and figures of one model (the model itself is logged after)."""
    from flows.explaining import load_shards
    from flows.pipeline import methods

    p = ctx.params
    layout = ctx.layout
    train = json.loads(layout.train_metrics(arch).read_text())
    summary = json.loads(layout.metrics(arch).read_text())
    metric_params = json.loads((layout.evaluation(arch) / "metric_params.json").read_text())
    curves = json.loads((layout.evaluation(arch) / "curves.json").read_text())

    params: dict[str, Any] = {**p.to_flat_dict(), "model.name": arch}
    _flatten("metric", metric_params, params)
    log["log_params"](client, run_id, params)
    log["log_metrics"](client, run_id, {
        "val_accuracy": train["val_accuracy"], "best_epoch": train["best_epoch"],
        "train_images": train["train_images"], "val_images": train["val_images"],
    })
    for key in ("train_loss", "train_accuracy", "val_loss", "val_accuracy"):
        series = [h.get(key) for h in train.get("history", [])]
        if series:
            log["log_series"](client, run_id, f"epoch.{key}", series)
    flat: dict[str, Any] = {}
    _flatten("", summary, flat)
    log["log_metrics"](client, run_id, _numeric(flat))

    client.log_artifact(run_id, str(layout.evaluation(arch) / "scores.csv"), "tables")
    client.log_artifact(run_id, str(layout.evaluation(arch) / "curves.json"), "tables")
    client.log_artifact(run_id, str(layout.evaluation(arch) / "metric_params.json"), "tables")
    client.log_artifact(run_id, str(layout.metrics(arch)), "tables")
    client.log_artifact(run_id, str(layout.train_metrics(arch)), "tables")

    for variant, c in curves.items():
        safe = variant.replace("/", "_")
        plots.curve_plot(
            np.asarray(c["fraction"]),
            {"insertion": np.asarray(c["insertion"]), "deletion": np.asarray(c["deletion"])},
            fig_dir / f"curves_{safe}.png", title=f"{arch} {variant}: mean insertion / deletion",
        )
        if "aopc_morf_curve" in c:
            steps = np.arange(len(c["aopc_morf_curve"]))
            plots.curve_plot(
                steps, {"MoRF": np.asarray(c["aopc_morf_curve"])},
                fig_dir / f"morf_{safe}.png", title=f"{arch} {variant}: region perturbation",
                xlabel="regions perturbed", ylabel="target logit",
            )
    for method in methods(p):
        shards = load_shards(layout.relevance(arch, method))
        plots.conservation_histogram(
            np.asarray(shards["conservation"]), fig_dir / f"conservation_{method}.png",
            title=f"{arch} {method}: conservation error",
        )
        _heatmap_grids(ds, shards, fig_dir / "heatmaps" / method, f"{arch} {method}")
    client.log_artifacts(run_id, str(fig_dir), "figures")
    return summary


def _heatmap_grids(ds: Any, shards: dict[str, Any], out_dir: Path, title: str) -> None:
    """One grid per class: the first explained images of that class."""
    labels = np.asarray(shards["label"])
    for label, name in enumerate(ds.classes):
        rows = np.flatnonzero(labels == label)[:SAMPLES_PER_CLASS]
        if rows.size == 0:
            continue
        images, rels, titles = [], [], []
        for r in rows:
            item = ds[int(shards["index"][r])]
            images.append(item["image"].numpy())
            rels.append(np.asarray(shards["relevance"][r], dtype=np.float32))
            pred = int(np.argmax(shards["logits"][r]))
            titles.append(
                f"{name} (pred {ds.classes[pred]}, target {ds.classes[int(shards['target'][r])]})"
            )
        plots.heatmap_grid(images, rels, titles, out_dir / f"{name}.png",
                           suptitle=f"{title}: {name}")
