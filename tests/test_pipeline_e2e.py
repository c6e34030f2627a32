"""The default pipeline end to end through ``dvc repro`` in a fresh copy of the project.

Real DVC (git repo, data.dvc, dvc.yaml), real Prefect flows (temporary local server per stage, as
users get by default) and a real MLflow SQLite store, on a tiny configuration.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml
from pipeline_helpers import copy_project, env, run, tiny_params, write_params

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def repro(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A project copy after data generation, ``dvc add data`` and ``dvc repro``."""
    root = copy_project(tmp_path_factory.mktemp("project"))
    write_params(root / "params.yaml", tiny_params(root))
    e = env(root)
    run(["git", "init", "-q"], root, e)
    run(["dvc", "init", "-q"], root, e)
    run(["python", "-m", "flows.stages", "data"], root, e)
    run(["dvc", "add", "-q", "data"], root, e)
    run(["dvc", "repro"], root, e, timeout=900)
    return root


def test_dvc_status_clean_and_outputs(repro: Path) -> None:
    e = env(repro)
    status = run(["dvc", "status", "--json"], repro, e)
    assert json.loads(status.strip().splitlines()[-1]) == {}
    for arch in ("small_resnet", "lrn_cnn"):
        assert (repro / "outputs" / "models" / f"{arch}.pt").is_file()
        summary = json.loads((repro / "outputs" / "metrics" / f"{arch}.json").read_text())
        s = summary["epsilon-plus-flat"]
        assert 0.0 <= s["insertion"] <= 1.0 and 0.0 <= s["deletion"] <= 1.0
        assert "aopc_morf" in s and "relevance_mass" in s
        assert "epsilon-plus-flat/q4" in summary
        assert (repro / "outputs" / "plots" / arch / "insertion.csv").is_file()
    shown = run(["dvc", "metrics", "show", "--json"], repro, e)
    assert "small_resnet" in shown


def test_only_changed_stages_rerun(repro: Path) -> None:
    """Changing a metric setting invalidates evaluate (and report), not train or explain."""
    params_file = repro / "params.yaml"
    original = params_file.read_text()
    try:
        params = yaml.safe_load(original)
        params["evaluate"]["steps"] = 6
        write_params(params_file, params)
        status = json.loads(
            run(["dvc", "status", "--json"], repro, env(repro)).strip().splitlines()[-1]
        )
    finally:
        params_file.write_text(original)
    assert {"evaluate@small_resnet", "evaluate@lrn_cnn"} <= set(status)
    assert not any(k.startswith(("train@", "explain@")) for k in status)


def test_mlflow_store(repro: Path) -> None:
    import mlflow.pytorch
    from mlflow.tracking import MlflowClient
    from torch import nn

    uri = f"sqlite:///{repro / 'mlflow.db'}"
    client = MlflowClient(tracking_uri=uri)
    exp = client.get_experiment_by_name("lrp-at-scale")
    assert exp is not None
    assert exp.artifact_location == (repro / "mlartifacts").as_uri()
    runs = client.search_runs([exp.experiment_id])
    assert len(runs) == 3 and all(r.info.status == "FINISHED" for r in runs)
    parent = next(r for r in runs if r.info.run_name == "lrp-pipeline")
    data_md5 = yaml.safe_load((repro / "data.dvc").read_text())["outs"][0]["md5"]
    assert parent.data.tags["dvc.data_hash"] == data_md5
    assert parent.data.tags["prefect.flow_run_id"]
    assert parent.data.params["train.epochs"] == "1"
    children = [r for r in runs if r.data.tags.get("mlflow.parentRunId") == parent.info.run_id]
    assert sorted(r.info.run_name for r in children) == ["lrn_cnn", "small_resnet"]
    mlflow.set_tracking_uri(uri)
    for child in children:
        metrics = child.data.metrics
        for key in ("epsilon-plus-flat.insertion", "epsilon-plus-flat.deletion",
                    "epsilon-plus-flat.id", "epsilon-plus-flat.aopc_morf", "val_accuracy"):
            assert key in metrics, key
        assert child.data.params["metric.epsilon-plus-flat/insertion_deletion.steps"] == "8"
        paths = _artifact_paths(client, child.info.run_id)
        assert "tables/scores.csv" in paths
        assert any(p.startswith("figures/heatmaps/epsilon-plus-flat/") for p in paths)
        assert "figures/curves_epsilon-plus-flat.png" in paths
        assert "figures/conservation_epsilon-plus-flat.png" in paths
        local = client.download_artifacts(child.info.run_id, "tables/scores.csv")
        assert Path(local).read_text().startswith("method,")
        model = mlflow.pytorch.load_model(f"runs:/{child.info.run_id}/model")
        assert any(isinstance(m, nn.Conv2d) for m in model.modules())


def _artifact_paths(client, run_id: str, path: str | None = None) -> list[str]:
    out = []
    for info in client.list_artifacts(run_id, path):
        if info.is_dir:
            out += _artifact_paths(client, run_id, info.path)
        else:
            out.append(info.path)
    return out
