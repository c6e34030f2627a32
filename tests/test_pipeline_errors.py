"""Bad input fails early with the file or params key named, and nothing partial looks complete."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
from pipeline_helpers import REPO, env, free_port, tiny_params, write_params

from flows.config import ParamsError
from flows.context import dataset, load_context
from flows.stages.data import data_task
from flows.stages.report import report_to_mlflow
from flows.tracking import TrackingError, check_reachable, resolve_target, tracked_run


def _stage(tmp: Path, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "flows.stages", *args], cwd=REPO, env=env(tmp),
        capture_output=True, text=True, timeout=300, check=False,
    )


@pytest.fixture()
def project(tmp_path: Path) -> Path:
    """A params file and a generated tiny dataset in tmp."""
    write_params(tmp_path / "params.yaml", tiny_params(tmp_path))
    data_task.fn(load_context(tmp_path / "params.yaml"))
    return tmp_path


@pytest.mark.parametrize(
    ("section", "values", "named"),
    [
        ("train", {"epoch": 3}, "train.epoch"),
        ("train", {"lr": "fast"}, "train.lr"),
        ("explain", {"composite": "no-such-composite"}, "explain.composite"),
        ("evaluate", {"baseline": "purple"}, "evaluate.baseline"),
    ],
)
def test_bad_params_named_by_stage_cli(
    tmp_path: Path, section: str, values: dict, named: str
) -> None:
    params = write_params(tmp_path / "params.yaml", tiny_params(tmp_path, **{section: values}))
    proc = _stage(tmp_path, "train", "--model", "small_resnet", "--params", str(params))
    assert proc.returncode == 2
    assert named in proc.stderr and str(params) in proc.stderr
    assert not (tmp_path / "outputs").exists()


def test_bad_override_named(tmp_path: Path) -> None:
    params = write_params(tmp_path / "params.yaml", tiny_params(tmp_path))
    with pytest.raises(ParamsError, match=r"train\.epochz"):
        load_context(params, {"train.epochz": 1})
    with pytest.raises(ParamsError, match=r"runtime\.batch_size"):
        load_context(params, {"runtime": {"batch_size": 0}})


def test_unreachable_mlflow_uri(tmp_path: Path) -> None:
    uri = f"http://127.0.0.1:{free_port()}"
    with pytest.raises(TrackingError, match=r"mlflow\.tracking_uri") as err:
        check_reachable(resolve_target(uri, "x", None, tmp_path), timeout=2)
    assert uri in str(err.value)
    missing = resolve_target("sqlite:///no/such/folder/m.db", "x", None, tmp_path)
    with pytest.raises(TrackingError, match="does not exist"):
        check_reachable(missing)


@pytest.mark.slow
def test_unreachable_mlflow_fails_before_training(project: Path) -> None:
    params = tiny_params(project, mlflow={"tracking_uri": f"http://127.0.0.1:{free_port()}"})
    path = write_params(project / "params.yaml", params)
    proc = _stage(project, "train", "--model", "lrn_cnn", "--params", str(path))
    assert proc.returncode == 1, proc.stderr
    assert "mlflow.tracking_uri" in proc.stderr and "unreachable" in proc.stderr
    assert not (project / "outputs" / "models").exists()


def test_corrupt_and_non_image_files_named(project: Path) -> None:
    ctx = load_context(project / "params.yaml")
    images = project / "data" / "synthetic" / "images"
    victim = sorted((images / "square").glob("*.png"))[0]
    victim.write_bytes(b"\x89PNG\r\n\x1a\n this is not a png")
    with pytest.raises(ValueError, match=str(victim)):
        dataset(ctx, "all")
    victim.unlink()
    stray = images / "circle" / "notes.txt"
    stray.write_text("hello")
    with pytest.raises(ValueError, match=str(stray)):
        dataset(ctx, "all")
    stray.unlink()
    for f in (images / "triangle").iterdir():
        f.unlink()
    (images / "triangle").rmdir()
    with pytest.raises(ValueError, match="triangle"):
        dataset(ctx, "all")


@pytest.mark.slow
def test_corrupt_image_fails_train_stage(project: Path) -> None:
    victim = sorted((project / "data" / "synthetic" / "images" / "circle").glob("*.png"))[-1]
    victim.write_bytes(b"garbage")
    proc = _stage(project, "train", "--model", "lrn_cnn", "--params",
                  str(project / "params.yaml"))
    assert proc.returncode == 1
    assert str(victim) in proc.stderr
    assert not (project / "outputs" / "models").exists()


def test_report_on_missing_outputs_logs_nothing_finished(project: Path) -> None:
    """The report stage on missing stage outputs fails, naming the file; no FINISHED run."""
    from mlflow.tracking import MlflowClient

    ctx = load_context(project / "params.yaml")
    with pytest.raises(FileNotFoundError, match=r"small_resnet\.pt"):
        report_to_mlflow(ctx, flow_run_info={"id": "", "name": ""})
    client = MlflowClient(tracking_uri=f"sqlite:///{project / 'mlflow.db'}")
    exp = client.get_experiment_by_name("lrp-at-scale")
    runs = client.search_runs([exp.experiment_id]) if exp is not None else []
    assert all(r.info.status != "FINISHED" for r in runs)
    assert not (project / "outputs" / "report" / "runs.json").exists()


def test_tracked_run_status(tmp_path: Path) -> None:
    from mlflow.tracking import MlflowClient

    from flows.tracking import get_experiment_id

    target = resolve_target("sqlite:///m.db", "e", None, tmp_path)
    check_reachable(target)
    client = MlflowClient(tracking_uri=target.tracking_uri)
    exp = get_experiment_id(client, target)
    with tracked_run(client, exp, "ok", {}) as ok:
        pass
    with pytest.raises(RuntimeError), tracked_run(client, exp, "bad", {}) as bad:
        raise RuntimeError("boom")
    assert client.get_run(ok).info.status == "FINISHED"
    assert client.get_run(bad).info.status == "FAILED"
    assert client.get_experiment(exp).artifact_location == (tmp_path / "mlartifacts").as_uri()
