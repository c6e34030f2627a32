"""A non-ResNet torchvision family (MobileNetV3) through ``dvc repro`` on the tiny config.

The train stage first explains a dummy batch with the untrained model, so an architecture the
engine cannot explain fails in seconds; this checks that MobileNetV3 gets all the way through.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from pipeline_helpers import copy_project, env, init_project, run, tiny_params, write_params

pytestmark = pytest.mark.slow


def test_mobilenet_v3_small_through_dvc_repro(tmp_path: Path) -> None:
    root = copy_project(tmp_path / "project")
    write_params(root / "params.yaml", tiny_params(root, model={"architectures":
                                                                ["mobilenet_v3_small"]}))
    e = env(root)
    init_project(root, e)
    run(["python", "-m", "flows.server", "--", "dvc", "repro"], root, e, timeout=900)
    summary = json.loads((root / "metrics" / "mobilenet_v3_small" / "explain.json").read_text())
    assert 0.0 <= summary["composite"]["insertion"] <= 1.0
    status = run(["dvc", "status", "--json"], root, e)
    assert json.loads(status.strip().splitlines()[-1]) == {}
