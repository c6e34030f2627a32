"""The whole pipeline as one Prefect flow (what the ``lrp-pipeline/default`` deployment runs)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from prefect import flow, get_run_logger
from prefect.artifacts import create_progress_artifact, update_progress_artifact

from flows.context import fingerprint, load_context
from flows.scaleout import dispatcher
from flows.stages.data import data_task
from flows.stages.evaluate import run_evaluate
from flows.stages.explain import run_explain
from flows.stages.report import report_task
from flows.stages.train import train_task
from flows.tracking import check_reachable, target_for


@flow(name="lrp-pipeline", log_prints=True)
def lrp_pipeline(
    params_path: str = "params.yaml",
    overrides: dict[str, Any] | None = None,
    output_dir: str | None = None,
) -> dict[str, Any]:
    """Data, then train, explain and evaluate per model, then the report, in one Prefect run.

    Without ``overrides`` it writes to ``outputs/`` and ``metrics/`` like ``dvc repro``; with
    overrides everything goes to ``outputs/runs/<hash of the settings>`` (unless ``output_dir``
    is given), so DVC-tracked files stay consistent and a rerun with the same settings resumes.
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
    check_reachable(target_for(ctx.params.mlflow, ctx.base))
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
            composite = ev["summary"][ctx.params.explain.composite]
            results[arch] = {"val_accuracy": train["val_accuracy"], **composite}
    report = report_task(ctx, overrides)
    step("report")
    logger.info("MLflow run %s: %s", report["parent_run_id"], report["parent_run_url"])
    return {"outputs": str(ctx.layout.root), "metrics": results, "mlflow": report}
