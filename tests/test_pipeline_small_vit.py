"""small_vit (a torchvision VisionTransformer) as a pipeline architecture.

The fast tests check what the stages rely on (params validation, the image side, the trained
file's round trip, the train stage's explainability check with transformer methods); the slow one
runs ``dvc repro`` on the tiny config like tests/test_pipeline_mobilenet.py (458 s on the
shared 2-core development machine, hence slow).
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from pipeline_helpers import copy_project, env, init_project, run, tiny_params, write_params

from flows.config import Params
from flows.context import engine_options, methods
from flows.methods import make_attributor
from flows.models import ModelError, build_model, load_trained, save_trained

VIT_EXPLAIN = {
    "composite": "epsilon-transformer",
    "compare": ["epsilon-transformer:attention=cp", "attention-rollout", "input-x-gradient"],
}


def test_params_accept_small_vit_and_transformer_methods(tmp_path: Path) -> None:
    p = Params.from_dict(
        tiny_params(tmp_path, model={"architectures": ["small_vit"]}, explain=VIT_EXPLAIN)
    )
    assert p.model.architectures == ["small_vit"]
    assert [m.label for m in methods(p)] == [
        "epsilon-transformer",
        "epsilon-transformer_attention-cp",
        "attention-rollout",
        "input-x-gradient",
    ]


def test_small_vit_side_and_trained_file_round_trip(tmp_path: Path) -> None:
    torch.manual_seed(0)
    model = build_model("small_vit", 3, image_size=32).eval()
    x = torch.randn(2, 3, 32, 32)
    assert model(x).shape == (2, 3)
    assert build_model("small_vit", 3).image_size == 64  # the default side
    save_trained(model, "small_vit", tmp_path / "vit.pt")
    loaded = load_trained(tmp_path / "vit.pt")  # side read from the position embedding
    assert loaded.image_size == 32
    assert torch.equal(loaded.eval()(x), model(x))
    with pytest.raises(ModelError, match="multiple of its patch size 8"):
        build_model("small_vit", 3, image_size=36)
    with pytest.raises(ModelError, match="no pretrained weights"):
        build_model("small_vit", 3, weights="DEFAULT")


def test_train_stage_check_explains_small_vit(tmp_path: Path) -> None:
    """What flows.stages.train.check_explainable runs on a dummy batch, per compared method."""
    p = Params.from_dict(
        tiny_params(tmp_path, model={"architectures": ["small_vit"]}, explain=VIT_EXPLAIN)
    )
    torch.manual_seed(0)
    model = build_model("small_vit", 3, image_size=p.data.image_size).eval()
    with torch.no_grad():  # torchvision zero-initialises the head: give it weights
        model.heads.head.weight.normal_()
    x = torch.randn(2, 3, p.data.image_size, p.data.image_size)
    target = torch.tensor([0, 2])
    for method in methods(p):
        out = make_attributor(model, method, engine_options(p, method))(x, target)
        assert out["relevance"].shape == x.shape, method.label
        assert torch.isfinite(out["relevance"]).all(), method.label
        assert out["relevance"].abs().sum() > 0, method.label


@pytest.mark.slow
def test_small_vit_through_dvc_repro(tmp_path: Path) -> None:
    root = copy_project(tmp_path / "project")
    write_params(
        root / "params.yaml",
        tiny_params(root, model={"architectures": ["small_vit"]}, explain=VIT_EXPLAIN),
    )
    e = env(root)
    init_project(root, e)
    run(["python", "-m", "flows.server", "--", "dvc", "repro"], root, e, timeout=900)
    summary = json.loads((root / "metrics" / "small_vit" / "explain.json").read_text())
    assert 0.0 <= summary["composite"]["insertion"] <= 1.0
    assert 0.0 <= summary["compare"]["attention-rollout"]["relevance_mass"] <= 1.0
    status = run(["dvc", "status", "--json"], root, e)
    assert json.loads(status.strip().splitlines()[-1]) == {}
