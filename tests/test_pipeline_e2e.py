"""The default pipeline end to end through ``dvc repro`` in a fresh copy of the project.

Real DVC (git repo, data.dvc, dvc.yaml), real Prefect flows (one local server for the whole
``dvc repro``, started by ``python -m flows.server``, as the main command does) and a real MLflow
SQLite store, on a tiny configuration comparing the default methods.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import pytest
import yaml
from pipeline_helpers import GIT, copy_project, env, init_project, run, tiny_params, write_params

from flows.config import DEFAULT_COMPARE

pytestmark = pytest.mark.slow
LABELS = ("otsuki2024", "otsuki2024_residual-gradient", "grad-cam")


@pytest.fixture(scope="module")
def repro(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A project copy after data generation, ``dvc add data`` and ``dvc repro``."""
    root = copy_project(tmp_path_factory.mktemp("project"))
    write_params(root / "params.yaml",
                 tiny_params(root, explain={"compare": list(DEFAULT_COMPARE)}))
    e = env(root, PREFECT_LOGGING_LEVEL="INFO", **GIT)
    init_project(root, e)
    out = run(["python", "-m", "flows.server", "--", "dvc", "repro"], root, e, timeout=900)
    (root / "repro.log").write_text(out)
    run(["git", "add", "-A"], root, e)
    run(["git", "commit", "-qm", "repro"], root, e)
    return root


def test_one_prefect_server_serves_the_whole_repro(repro: Path) -> None:
    out = (repro / "repro.log").read_text()
    assert out.count("Prefect: starting one local server") == 1
    assert "Starting temporary server" not in out  # no stage started a server of its own
    assert "Prefect: 7 flow runs" in out  # train, explain, evaluate x 2 models, report
    assert out.count("in a fork of the stage server") == 7  # the stack imported once, not 7 times
    assert "running the stage in this process" not in out
    assert "MLflow run " in out and "/#/experiments/" in out  # the report stage's last line


def test_dvc_status_clean_and_outputs(repro: Path) -> None:
    e = env(repro)
    status = run(["dvc", "status", "--json"], repro, e)
    assert json.loads(status.strip().splitlines()[-1]) == {}
    for arch in ("small_resnet", "lrn_cnn"):
        assert (repro / "outputs" / "models" / f"{arch}.pt").is_file()
        summary = json.loads((repro / "metrics" / arch / "explain.json").read_text())
        s = summary["composite"]
        assert 0.0 <= s["insertion"] <= 1.0 and 0.0 <= s["deletion"] <= 1.0
        assert "aopc_morf" in s and "relevance_mass" in s
        assert "q4" in s
        assert sorted(summary["compare"]) == sorted(LABELS)
        assert (repro / "outputs" / "plots" / arch / "curves.png").is_file()
    shown = run(["dvc", "metrics", "show", "--json"], repro, e)
    assert "small_resnet" in shown
    html = repro / "plots.html"
    run(["dvc", "plots", "show", "-o", str(html.with_suffix(""))], repro, e)
    page = (html.with_suffix("") / "index.html").read_text()
    assert "<img" in page and "cdn" not in page.lower()  # viewable offline


def _stale_after(repro: Path, edit: Callable[[dict], None]) -> set[str]:
    """The stages `dvc status` lists after ``edit`` changes params.yaml (restored after)."""
    params_file = repro / "params.yaml"
    original = params_file.read_text()
    try:
        params = yaml.safe_load(original)
        edit(params)
        write_params(params_file, params)
        out = run(["dvc", "status", "--json"], repro, env(repro))
    finally:
        params_file.write_text(original)
    return set(json.loads(out.strip().splitlines()[-1]))


def test_only_changed_stages_rerun(repro: Path) -> None:
    """Changing a metric setting invalidates evaluate (and report), not train or explain."""
    status = _stale_after(repro, lambda p: p["evaluate"].update(steps=6))
    assert {"evaluate@small_resnet", "evaluate@lrn_cnn"} <= status
    assert not any(k.startswith(("train@", "explain@")) for k in status)


def test_adding_a_model_keeps_the_others_trained(repro: Path) -> None:
    """A new entry in model.architectures adds its stages; the models already trained stay."""
    status = _stale_after(repro, lambda p: p["model"]["architectures"].append("caffenet"))
    assert {"train@caffenet", "explain@caffenet", "evaluate@caffenet"} <= status
    assert not any(k.endswith(("@small_resnet", "@lrn_cnn")) for k in status), status


def test_mlflow_store(repro: Path) -> None:
    import mlflow.pytorch
    from mlflow.tracking import MlflowClient
    from torch import nn

    uri = f"sqlite:///{repro / 'mlflow.db'}"
    client = MlflowClient(tracking_uri=uri)
    exp = client.get_experiment_by_name("lrp-at-scale")
    assert exp is not None
    assert exp.artifact_location == (repro / "mlartifacts").as_uri()
    assert exp.tags.get("mlflow.experimentKind") == "custom_model_development"
    runs = client.search_runs([exp.experiment_id])
    assert len(runs) == 3 and all(r.info.status == "FINISHED" for r in runs)
    parent = next(r for r in runs if "mlflow.parentRunId" not in r.data.tags)
    assert parent.info.run_name == "small_resnet+lrn_cnn epsilon-plus-flat"
    assert [d.dataset.name for d in parent.inputs.dataset_inputs] == ["synthetic"]
    assert {"summary/summary.md", "summary/summary.png"} <= set(
        _artifact_paths(client, parent.info.run_id))
    data_md5 = yaml.safe_load((repro / "data.dvc").read_text())["outs"][0]["md5"]
    assert parent.data.tags["dvc.data_hash"] == data_md5
    assert parent.data.tags["prefect.flow_run_id"]
    assert parent.data.params["train.epochs"] == "1"
    children = [r for r in runs if r.data.tags.get("mlflow.parentRunId") == parent.info.run_id]
    assert sorted(r.info.run_name for r in children) == [
        "lrn_cnn epsilon-plus-flat", "small_resnet epsilon-plus-flat"]
    mlflow.set_tracking_uri(uri)
    for child in children:
        metrics = child.data.metrics
        for key in ("composite.insertion", "composite.deletion", "composite.id",
                    "composite.aopc_morf", "compare.grad-cam.insertion", "val_accuracy"):
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


def test_edited_helper_makes_its_stages_stale(repro: Path) -> None:
    """DVC deps cover shared helpers: context.py (every stage) and shards.py (not train)."""
    stale = {}
    for helper in ("flows/context.py", "flows/shards.py"):
        path = repro / helper
        original = path.read_text()
        try:
            path.write_text(original + "\n# edited\n")
            out = run(["dvc", "status", "--json"], repro, env(repro))
            stale[helper] = set(json.loads(out.strip().splitlines()[-1]))
        finally:
            path.write_text(original)
    every = {f"{s}@{m}" for s in ("train", "explain", "evaluate")
             for m in ("small_resnet", "lrn_cnn")} | {"report"}
    assert stale["flows/context.py"] == every
    assert stale["flows/shards.py"] == every - {"train@small_resnet", "train@lrn_cnn"}


def test_dvc_exp_compares_two_composites(repro: Path) -> None:
    """Two composites in two experiments share the `composite.*` columns of `dvc exp show`."""
    e = env(repro, **GIT)
    run(["python", "-m", "flows.server", "--", "dvc", "exp", "run", "-n", "eps",
         "-S", "explain.composite=epsilon"], repro, e, timeout=900)
    rows = json.loads(run(["dvc", "exp", "show", "--json"], repro, e).strip().splitlines()[-1])
    found = {}
    for row in rows:
        for rev in [row, *[e for exp in row.get("experiments") or [] for e in exp["revs"]]]:
            data = (rev.get("data") or {})
            composite = data.get("params", {}).get("params.yaml", {}).get("data", {})
            metrics = data.get("metrics", {}).get("metrics/small_resnet/explain.json", {})
            value = metrics.get("data", {}).get("composite", {}).get("insertion")
            name = composite.get("explain", {}).get("composite")
            if value is not None and name:
                found[name] = value
    assert {"epsilon-plus-flat", "epsilon"} <= set(found), rows
    diff = run(["dvc", "metrics", "diff", "HEAD", "eps", "--json"], repro, e)
    assert "composite.insertion" in diff


def _artifact_paths(client, run_id: str, path: str | None = None) -> list[str]:
    out = []
    for info in client.list_artifacts(run_id, path):
        if info.is_dir:
            out += _artifact_paths(client, run_id, info.path)
        else:
            out.append(info.path)
    return out
