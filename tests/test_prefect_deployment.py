"""A real Prefect server on loopback, the pipeline served as a deployment, a parameterised run.

Exactly the README's commands: ``prefect server start``, ``python -m flows.serve``,
``prefect deployment run 'lrp-pipeline/default' -p overrides=...``.
"""

from __future__ import annotations

import json
import subprocess
import time
from pathlib import Path

import httpx
import pytest
from pipeline_helpers import env, free_port, run, stop, tiny_params, write_params

pytestmark = pytest.mark.slow


def _wait(what: str, check, timeout: float, procs: list[subprocess.Popen]) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for p in procs:
            if p.poll() is not None:
                raise AssertionError(f"{p.args} exited {p.returncode} while waiting for {what}")
        try:
            if check():
                return
        except httpx.HTTPError:
            pass
        time.sleep(1.0)
    raise AssertionError(f"timed out after {timeout}s waiting for {what}")


def test_deployment_run_completes(tmp_path: Path) -> None:
    work = tmp_path / "work"
    work.mkdir()
    params = tiny_params(work, model={"architectures": ["lrn_cnn"]})
    params["data"]["root"] = str(work / "data" / "synthetic")
    params_file = write_params(work / "params.yaml", params)
    port = free_port()
    api = f"http://127.0.0.1:{port}/api"
    e = env(tmp_path, PREFECT_API_URL=api)
    logs = tmp_path / "logs"
    logs.mkdir()
    server_env = {k: v for k, v in e.items() if k != "PREFECT_API_URL"}
    with open(logs / "server.log", "w") as slog, open(logs / "serve.log", "w") as wlog:
        server = subprocess.Popen(
            ["prefect", "server", "start", "--host", "127.0.0.1", "--port", str(port)],
            cwd=tmp_path, env=server_env, stdout=slog, stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        procs = [server]
        try:
            _wait("server health", lambda: httpx.get(f"{api}/health", timeout=2).status_code == 200,
                  180, procs)
            serve = subprocess.Popen(
                ["python", "-m", "flows.serve", "--params", str(params_file), "--pipeline-only"],
                cwd=work, env=e, stdout=wlog, stderr=subprocess.STDOUT, start_new_session=True,
            )
            procs.append(serve)
            _wait(
                "deployment registration",
                lambda: httpx.get(f"{api}/deployments/name/lrp-pipeline/default", timeout=2)
                .status_code == 200,
                120, procs,
            )
            out = run(
                ["prefect", "deployment", "run", "lrp-pipeline/default",
                 "-p", 'overrides={"train.epochs": 1, "evaluate.steps": 5}',
                 "--watch", "--watch-timeout", "500"],
                work, e, timeout=560,
            )
            runs = httpx.post(f"{api}/flow_runs/filter", json={"limit": 10}, timeout=10).json()
            pipeline_runs = [r for r in runs if r["parameters"].get("overrides")]
            assert len(pipeline_runs) == 1, out
            flow_run = pipeline_runs[0]
            assert flow_run["state_type"] == "COMPLETED", (out, (logs / "serve.log").read_text())
            assert flow_run["parameters"]["overrides"] == {"train.epochs": 1, "evaluate.steps": 5}
            # the run's markdown artifact carries the method x metric table and the MLflow link
            artifacts = httpx.post(
                f"{api}/artifacts/filter",
                json={"artifacts": {"key": {"any_": ["lrp-report"]}}, "limit": 10},
                timeout=10,
            ).json()
            assert len(artifacts) == 1, artifacts
            report = artifacts[0]["data"]
        finally:
            for p in reversed(procs):
                stop(p)

    # The run wrote its own output folder (DVC outputs untouched) and an MLflow run linked to it.
    run_dirs = list((work / "outputs" / "runs").iterdir())
    assert len(run_dirs) == 1
    metrics = json.loads((run_dirs[0] / "metrics" / "lrn_cnn" / "explain.json").read_text())
    assert metrics["composite"]["n_images"] > 0
    assert not (work / "outputs" / "models").exists()
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=f"sqlite:///{work / 'mlflow.db'}")
    exp = client.get_experiment_by_name("lrp-at-scale")
    parents = client.search_runs(
        [exp.experiment_id], filter_string=f"tags.`prefect.flow_run_id` = '{flow_run['id']}'"
    )
    assert parents and all(r.info.status == "FINISHED" for r in parents)
    assert any(r.info.run_id in report for r in parents), report  # the artifact links the run
    assert "insertion" in report.lower()
