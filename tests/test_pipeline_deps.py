"""dvc.yaml's deps are honest: each stage depends on every flows module its command imports."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from pipeline_helpers import REPO

STAGES = yaml.safe_load((REPO / "dvc.yaml").read_text())["stages"]


def _imported(module: str) -> set[str]:
    """The flows files (but empty package markers) that importing ``module`` loads."""
    code = (
        "import importlib, json, sys; importlib.import_module(sys.argv[1]); "
        "print(json.dumps([m.__file__ for n, m in list(sys.modules.items()) "
        "if n.split('.')[0] == 'flows' and getattr(m, '__file__', None)]))"
    )
    out = subprocess.run(
        [sys.executable, "-c", code, module],
        cwd=REPO,
        capture_output=True,
        text=True,
        check=True,
        timeout=120,
    ).stdout
    files = {str(Path(f).relative_to(REPO)) for f in json.loads(out)}
    return {f for f in files if not f.endswith("__init__.py")}


@pytest.mark.parametrize("stage", list(STAGES))
def test_stage_deps_cover_the_code_it_runs(stage: str) -> None:
    spec = STAGES[stage].get("do", STAGES[stage])
    deps = set(spec["deps"])
    launcher = {f"flows/stages/{m}.py" for m in ("__main__", "cli", "forkserver", "registry")}
    needed = _imported(f"flows.stages.{stage}") | launcher
    assert needed <= deps, f"{stage}: add to dvc.yaml deps: {sorted(needed - deps)}"
