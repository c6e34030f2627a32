"""Scale-out of explain/evaluate: per-shard tasks on a Dask cluster equal the single-process run.

The sharded flows run on a ``distributed.LocalCluster`` of 2 single-threaded CPU worker processes
(the flows reach it through ``runtime.dask_address``), against a Prefect test server. Also:
reruns skip finished shards, a failed shard is retried, NaN images are named, the batch-size
search and the runtime params.
"""

from __future__ import annotations

import csv
import json
import os
import shutil
import sys
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from pipeline_helpers import REPO, env, explain_dataset, run, tiny_params, write_params

from flows.config import ParamsError, load_params
from flows.data import ImageDataset, NonFiniteInputError, make_synthetic_dataset
from flows.models import build_model
from flows.runtime import auto_batch_size, find_batch_size
from flows.shards import load_shards

ARCH = "lrn_cnn"
METHOD = "epsilon-plus-flat"


# --------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def prefect_server():
    """One Prefect test server for the module (PREFECT_API_URL set while it runs)."""
    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
    from prefect.testing.utilities import prefect_test_harness

    with prefect_test_harness(server_startup_timeout=120):
        yield


@pytest.fixture(scope="module")
def cluster():
    """The issue's test cluster: 2 CPU worker processes, one thread each."""
    import distributed

    with distributed.LocalCluster(
        n_workers=2, threads_per_worker=1, processes=True, dashboard_address=":0"
    ) as c:
        yield c


def _project(root: Path, data_root: Path, model_file: Path, **runtime) -> Path:
    """A params file (tiny, one model, 36 images in 9 shards, 10 scored) and its model."""
    params = tiny_params(root, model={"architectures": [ARCH]})
    params["data"]["root"] = str(data_root)
    params["explain"].update(split="all", shard_size=4)
    params["evaluate"].update(max_images=10, steps=6)
    params["runtime"].update(runtime)
    root.mkdir(parents=True, exist_ok=True)
    write_params(root / "params.yaml", params)
    models = root / "outputs" / "models"
    models.mkdir(parents=True, exist_ok=True)
    shutil.copy2(model_file, models / f"{ARCH}.pt")
    return root / "params.yaml"


@pytest.fixture(scope="module")
def inputs(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """A generated dataset and an (untrained, seeded) model state_dict, shared by the projects."""
    tmp = tmp_path_factory.mktemp("inputs")
    data = make_synthetic_dataset(
        tmp / "data", classes=["circle", "square", "triangle"], per_class=12, size=32
    )
    torch.manual_seed(0)
    model_file = tmp / f"{ARCH}.pt"
    torch.save(build_model(ARCH, 3).state_dict(), model_file)
    return data, model_file


@pytest.fixture(scope="module")
def local_run(inputs, prefect_server, tmp_path_factory) -> Path:
    """The single-process reference: explain and evaluate with ``task_runner: local``."""
    from flows.stages.evaluate import evaluate_flow
    from flows.stages.explain import explain_flow

    params = _project(tmp_path_factory.mktemp("local"), *inputs, task_runner="local")
    explain_flow(str(params), ARCH)
    evaluate_flow(str(params), ARCH)
    return params.parent / "outputs"


def _outputs(root: Path) -> dict:
    rows = list(csv.DictReader((root / "eval" / ARCH / "scores.csv").open()))
    return {
        "shards": load_shards(root / "relevance" / ARCH / METHOD),
        "rows": rows,
        "metrics": _by_variant(
            json.loads((root.parent / "metrics" / ARCH / "explain.json").read_text())),
        "curves": json.loads((root / "eval" / ARCH / "curves.json").read_text()),
        "metric_params": json.loads((root / "eval" / ARCH / "metric_params.json").read_text()),
        "plots": (root / "plots" / ARCH / "curves.png").is_file(),
    }


def _loaded_inputs() -> list[str]:
    """(Run on a Dask worker) what the shard tasks of this process have loaded."""
    from flows import workers

    return sorted({key[0] for key in workers._INPUTS})


def _by_variant(summary: dict) -> dict:
    """``{variant: {metric: value}}`` from the nested metrics file (composite, q<n>, compare)."""
    out: dict = {}
    for label, values in {"composite": summary["composite"], **summary["compare"]}.items():
        out[label] = {k: v for k, v in values.items() if not isinstance(v, dict)}
        out.update({f"{label}/{k}": v for k, v in values.items() if isinstance(v, dict)})
    return out


def _assert_same_results(got: dict, want: dict) -> None:
    for name in ("label", "target", "index"):
        np.testing.assert_array_equal(got["shards"][name], want["shards"][name])
    for name in ("relevance", "logits", "initial", "conservation"):
        np.testing.assert_allclose(got["shards"][name], want["shards"][name], rtol=1e-4,
                                   atol=1e-9)
    assert len(got["rows"]) == len(want["rows"]) == 2 * 10  # two quantization levels
    for g, w in zip(got["rows"], want["rows"], strict=True):
        assert g.keys() == w.keys()
        for key in ("method", "quantize_levels", "index", "path", "label", "target",
                    "predicted"):
            assert g[key] == w[key], key
        for key in ("conservation", "insertion", "deletion", "id", "aopc_morf",
                    "relevance_mass", "pointing_game"):
            np.testing.assert_allclose(float(g[key] or "nan"), float(w[key] or "nan"),
                                       rtol=1e-4, atol=1e-7, err_msg=key)
    assert got["metrics"].keys() == want["metrics"].keys()
    for variant, values in want["metrics"].items():
        assert got["metrics"][variant].keys() == values.keys()
        for key, value in values.items():
            np.testing.assert_allclose(got["metrics"][variant][key], value, rtol=1e-4,
                                       atol=1e-7, err_msg=f"{variant}.{key}")
    assert got["curves"].keys() == want["curves"].keys()
    for variant, curves in want["curves"].items():
        for key, values in curves.items():
            np.testing.assert_allclose(got["curves"][variant][key], values, rtol=1e-4,
                                       atol=1e-7)
    assert got["metric_params"] == want["metric_params"]
    assert got["plots"] == want["plots"]


# --------------------------------------------------------------------------- sharded flows


def test_dask_flows_equal_single_process_and_rerun_skips(
    inputs, local_run, cluster, tmp_path: Path
) -> None:
    import distributed
    from prefect.client.orchestration import get_client

    from flows.stages.evaluate import evaluate_flow
    from flows.stages.explain import explain_flow

    params = _project(tmp_path, *inputs, task_runner="dask",
                      dask_address=cluster.scheduler_address)
    explained = explain_flow(str(params), ARCH)[METHOD]
    assert len(explained["written"]) == 9 and explained["skipped"] == []
    scored = evaluate_flow(str(params), ARCH)
    assert (scored["scored"], scored["reused"]) == (3, 0)  # 10 images scored: shards 0..2
    out = tmp_path / "outputs"
    _assert_same_results(_outputs(out), _outputs(local_run))
    assert len(list((out / "eval-shards" / ARCH / METHOD).glob("shard-*.json"))) == 3
    # the shards ran in the worker processes (each loaded model and data itself) ...
    with distributed.Client(cluster, set_as_default=False) as client:
        loaded = client.run(_loaded_inputs)
    assert len(loaded) == 2 and all({"model", "dataset"} <= set(v) for v in loaded.values())
    # ... and reported their task runs to the flow's Prefect server
    with get_client(sync_client=True) as prefect:
        runs = prefect.read_task_runs(limit=200)
    done = {r.name for r in runs if r.state and r.state.is_completed()}
    assert {f"explain-{ARCH}-{METHOD}-{k}" for k in range(9)} <= done
    assert {f"evaluate-{ARCH}-{METHOD}-{s}" for s in (0, 4, 8)} <= done

    # A rerun after a lost explanation shard and a lost partial score redoes just those.
    (out / "relevance" / ARCH / METHOD / "shard-00005.npz").unlink()
    (out / "eval-shards" / ARCH / METHOD / "shard-00001.json").unlink()
    explained = explain_flow(str(params), ARCH)[METHOD]
    assert explained["written"] == ["shard-00005.npz"] and len(explained["skipped"]) == 8
    scored = evaluate_flow(str(params), ARCH)
    assert (scored["scored"], scored["reused"]) == (1, 2)
    _assert_same_results(_outputs(out), _outputs(local_run))


@pytest.mark.slow
def test_stage_cli_on_a_local_dask_cluster_with_temporary_server(
    inputs, local_run, tmp_path: Path
) -> None:
    """The DVC stage commands with ``task_runner: dask`` and no Prefect server: the workers
    report to the stage's temporary server instead of each starting one of their own."""
    params = _project(tmp_path, *inputs, task_runner="dask", dask_workers=2)
    environ = env(tmp_path, PREFECT_LOGGING_LEVEL="INFO")
    for stage in ("explain", "evaluate"):
        out = run([sys.executable, "-m", "flows.stages", stage, "--model", ARCH, "--params",
                   str(params)], REPO, environ, timeout=300)
        assert out.count("Starting temporary server") == 1, out[-3000:]
        assert f"{stage}-shards-{ARCH}" in out  # the sharded subflow ran
    _assert_same_results(_outputs(tmp_path / "outputs"), _outputs(local_run))


def test_failed_shard_is_retried(inputs, local_run, monkeypatch, tmp_path: Path) -> None:
    """The first attempt of shard 1 dies (as a lost worker would); the retry gives right results."""
    import flows.stages.explain
    from flows.stages.explain import explain_flow

    real = flows.stages.explain._explain_range
    attempts: list[int] = []

    def flaky(attribute, dataset, spec, *args, **kwargs):
        if spec.k == 1:
            attempts.append(spec.k)
            if len(attempts) == 1:
                raise RuntimeError("simulated failure of the worker running shard 1")
        return real(attribute, dataset, spec, *args, **kwargs)

    monkeypatch.setattr(flows.stages.explain, "_explain_range", flaky)
    params = _project(tmp_path, *inputs, task_runner="local")
    explained = explain_flow(str(params), ARCH)[METHOD]
    assert attempts == [1, 1] and len(explained["written"]) == 9
    got = load_shards(tmp_path / "outputs" / "relevance" / ARCH / METHOD)
    want = load_shards(local_run / "relevance" / ARCH / METHOD)
    for name in want:
        np.testing.assert_array_equal(got[name], want[name])


def test_bad_data_is_not_retried(inputs, prefect_server, monkeypatch, tmp_path: Path) -> None:
    """A NaN image is a data error: the shard fails once, naming the file, without retries."""
    import flows.stages.explain
    from flows.stages.explain import explain_flow

    calls: list[int] = []
    real = flows.stages.explain._explain_range

    def poisoned(attribute, dataset, spec, *args, **kwargs):
        calls.append(spec.k)
        arrays, bad_input, bad_output, paths = real(attribute, dataset, spec, *args, **kwargs)
        bad_input[0] = spec.k == 2
        return arrays, bad_input, bad_output, paths

    monkeypatch.setattr(flows.stages.explain, "_explain_range", poisoned)
    params = _project(tmp_path, *inputs, task_runner="local")
    with pytest.raises(NonFiniteInputError, match=r"item 8 \(.+\.png\)"):
        explain_flow(str(params), ARCH)
    assert calls.count(2) == 1


# --------------------------------------------------------------------------- bulk checks


class _Poisoned(ImageDataset):
    """Item ``bad`` gets NaN pixels (``value=nan``) or huge ones that overflow the model."""

    def __init__(self, *args, bad: int = 5, value: float = float("nan"), **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.bad, self.value = bad, value

    def __getitem__(self, index: int) -> dict:
        item = super().__getitem__(index)
        if index == self.bad:
            item["image"] = torch.full_like(item["image"], self.value)
        return item


@pytest.fixture(scope="module")
def small(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, torch.nn.Module]:
    root = make_synthetic_dataset(
        tmp_path_factory.mktemp("syn"), classes=["star", "square", "ring"], per_class=4, size=32
    )
    torch.manual_seed(0)
    return root, build_model(ARCH, 3).eval()


def _explain(model, ds, out: Path, **kw):
    args = dict(method=METHOD, options={}, batch_size=5, device="cpu", shard_size=4,
                progress=False)
    return explain_dataset(model, ds, out_dir=out, **{**args, **kw})


def test_nan_image_names_item_and_file(small, tmp_path: Path) -> None:
    root, model = small
    ds = _Poisoned(root, size=32, bad=5)
    with pytest.raises(NonFiniteInputError) as err:
        _explain(model, ds, tmp_path)
    path = ds.samples[5][0]
    assert "item 5" in str(err.value) and str(path) in str(err.value)
    assert not (tmp_path / "shard-00001.npz").exists()  # the bad shard was not written
    assert not (tmp_path / "index.json").exists()


def test_nonfinite_relevance_is_stored_and_reported(small, tmp_path: Path) -> None:
    root, model = small
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        _explain(model, _Poisoned(root, size=32, bad=6, value=1e38), tmp_path)
    messages = [str(w.message) for w in caught if issubclass(w.category, RuntimeWarning)]
    assert any("dataset items [6]" in m and "shard-00001.npz" in m for m in messages), messages
    assert json.loads((tmp_path / "index.json").read_text())["nonfinite"] == [6]
    again = _explain(model, _Poisoned(root, size=32, bad=6, value=1e38), tmp_path)
    assert again.written == []  # the reused shard keeps its record
    assert json.loads((tmp_path / "index.json").read_text())["nonfinite"] == [6]


def test_channels_last_equals_default_layout(small, tmp_path: Path) -> None:
    root, model = small
    ds = ImageDataset(root, size=32)
    _explain(model, ds, tmp_path / "nchw", channels_last=False)
    _explain(model, ds, tmp_path / "nhwc", channels_last=True)
    a, b = load_shards(tmp_path / "nchw"), load_shards(tmp_path / "nhwc")
    np.testing.assert_allclose(b["relevance"], a["relevance"], rtol=1e-4, atol=1e-10)
    assert next(model.parameters()).is_contiguous()  # the caller's model is given back as it was


# --------------------------------------------------------------------------- batch size


def _fake_attribution(threshold: int, calls: list[int]):
    def run(size: int) -> None:
        calls.append(size)
        if size > threshold:
            raise torch.OutOfMemoryError(f"CUDA out of memory (fake, batch {size})")

    return run


@pytest.mark.parametrize("threshold", [1, 3, 37, 100, 5000])
def test_batch_size_search_stays_below_the_limit(threshold: int) -> None:
    calls: list[int] = []
    size = find_batch_size(_fake_attribution(threshold, calls), start=8, limit=1024, margin=0.9)
    fits = min(threshold, 1024)
    assert 1 <= size <= fits
    assert size >= int(0.9 * fits * 0.75)  # within the bisection's resolution, minus the margin
    assert max(calls) <= 1024


def test_batch_size_search_errors() -> None:
    with pytest.raises(torch.OutOfMemoryError, match="batch of 1"):
        find_batch_size(_fake_attribution(0, []))

    def broken(size: int) -> None:
        raise ValueError("not an OOM")

    with pytest.raises(ValueError, match="not an OOM"):
        find_batch_size(broken)


def test_auto_batch_size_cpu_fallback_and_cuda_cache(monkeypatch) -> None:
    calls: list[int] = []
    run = _fake_attribution(50, calls)
    assert auto_batch_size(("m", 1), torch.device("cpu"), run, limit=256) == 64
    assert auto_batch_size(("m", 1), torch.device("cpu"), run, limit=16) == 16
    assert calls == []  # no search off CUDA
    monkeypatch.setattr(torch.cuda, "synchronize", lambda device=None: None)
    cuda = torch.device("cuda")
    first = auto_batch_size(("test-model", 2), cuda, run, limit=256)
    n = len(calls)
    assert 0 < first <= 50 and n > 0
    assert auto_batch_size(("test-model", 2), cuda, run, limit=256) == first
    assert len(calls) == n  # cached per model/shape


def test_worker_device_and_loader_workers(monkeypatch) -> None:
    import distributed

    from flows import runtime

    assert runtime.worker_device("cpu") == torch.device("cpu")
    monkeypatch.setattr(runtime, "resolve_device", lambda requested: torch.device("cuda"))
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    monkeypatch.setattr(distributed, "get_worker", lambda: type("W", (), {"name": 3})())
    assert runtime.worker_device("auto") == torch.device("cuda", 1)  # worker 3 of a 2-GPU box
    assert runtime.loader_workers(2) == 2
    monkeypatch.setattr(runtime.multiprocessing, "current_process",
                        lambda: type("P", (), {"daemon": True})())
    assert runtime.loader_workers(2) == 0  # daemonic Dask workers cannot start loader processes


# --------------------------------------------------------------------------- params


def test_runtime_params(tmp_path: Path) -> None:
    def load(runtime: dict):
        path = tmp_path / "params.yaml"
        path.write_text(yaml.safe_dump({"runtime": runtime}))
        return load_params(path).runtime

    r = load({"batch_size": "auto", "channels_last": True, "task_runner": "dask",
              "dask_address": "tcp://scheduler:8786", "dask_gpu_per_task": False})
    assert r.batch_size == "auto" and r.channels_last is True and r.dask_workers == 2
    assert load({}).task_runner == "local" and load({}).channels_last == "auto"
    for bad, named in [
        ({"batch_size": "big"}, r"runtime.batch_size: must be an integer.*'auto'"),
        ({"batch_size": 0}, r"runtime.batch_size: 0 is below the minimum 1"),
        ({"channels_last": "yes"}, r"runtime.channels_last: must be true or false"),
        ({"task_runner": "ray"}, r"runtime.task_runner: 'ray' is not one of"),
        ({"dask_workers": 0}, r"runtime.dask_workers"),
    ]:
        with pytest.raises(ParamsError, match=named):
            load(bad)


def test_runtime_knobs_are_not_stage_params() -> None:
    """Changing where or how fast shards run must not invalidate explain/evaluate results."""
    stages = yaml.safe_load((REPO / "dvc.yaml").read_text())["stages"]
    knobs = {"device", "num_workers", "channels_last", "tf32", "task_runner", "dask_address",
             "dask_workers", "dask_gpu_per_task"}
    for name in ("explain", "evaluate"):
        listed = set(stages[name]["do"]["params"])
        assert "runtime" not in listed
        assert not {f"runtime.{k}" for k in knobs} & listed
    defaults = load_params(REPO / "params.yaml").runtime
    assert defaults.task_runner == "local"


def test_gpu_annotation_checks_the_cluster(cluster, monkeypatch) -> None:
    from flows import scaleout
    from flows.config import RuntimeParams

    address = cluster.scheduler_address
    assert not scaleout._remote_gpu_per_task(RuntimeParams(dask_address=address))
    with pytest.raises(scaleout.ClusterError, match=r"dask_gpu_per_task: true.*GPU=1"):
        scaleout._remote_gpu_per_task(
            RuntimeParams(dask_address=address, dask_gpu_per_task=True)
        )
    monkeypatch.setattr(scaleout, "CONNECT_TIMEOUT_S", 2)
    with pytest.raises(scaleout.ClusterError, match=r"runtime\.dask_address"):
        scaleout._remote_gpu_per_task(RuntimeParams(dask_address="tcp://127.0.0.1:9"))


def _resource_restrictions(x: int) -> dict:
    """(Run as a shard task on a Dask worker) the resources the scheduler reserved for it."""
    from distributed import get_worker

    worker = get_worker()
    return dict(worker.state.tasks[worker.get_current_task()].resource_restrictions or {})


def test_gpu_per_task_reserves_one_gpu_per_shard(prefect_server) -> None:
    import distributed
    from prefect import flow, task

    from flows import scaleout
    from flows.config import RuntimeParams

    probe = scaleout.register_shard_task(task(name="resource-probe")(_resource_restrictions))
    with distributed.LocalCluster(
        n_workers=1, threads_per_worker=1, processes=True, dashboard_address=":0",
        resources={"GPU": 1},
    ) as gpu_cluster:
        address = gpu_cluster.scheduler_address
        runtime = RuntimeParams(device="cuda", task_runner="dask", dask_address=address)
        assert scaleout._remote_gpu_per_task(runtime)  # auto: the workers offer a GPU

        @flow
        def outer() -> list:
            dispatch = scaleout.Dispatch(address, gpu_per_task=True)
            return scaleout.run_shard_tasks(dispatch, probe, {}, [{"x": 1}, {"x": 2}], name="p")

        assert outer() == [{"GPU": 1}, {"GPU": 1}]

