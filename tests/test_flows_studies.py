"""The study commands (flows.studies): the Otsuki et al. table on any model, and on the pipeline's."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from pipeline_helpers import tiny_params, write_params
from torch import nn

from flows.context import load_context
from flows.methods import parse_method
from flows.models import build_model, save_trained
from flows.stages.data import data_task
from flows.studies.otsuki_table import evaluate, format_table, main
from lrp.baselines import attribute
from lrp.metrics import insertion_deletion
from lrp.postprocess import heat_quantization

H = W = 8


def tiny_model() -> nn.Module:
    torch.manual_seed(0)
    m = nn.Sequential(
        nn.Conv2d(3, 4, 3, padding=1),
        nn.ReLU(),
        nn.Conv2d(4, 4, 3, padding=1, stride=2),
        nn.ReLU(),
        nn.Flatten(),
        nn.Linear(4 * (H // 2) * (W // 2), 5),
    )
    return m.double().eval()



def test_table_rows_match_direct_metric() -> None:
    m = parse_method("grad-cam:target_layer=features.5,batch_size=4")
    assert (m.name, m.options) == ("grad-cam", {"target_layer": "features.5", "batch_size": 4})
    model = tiny_model().float()
    x = torch.rand(4, 3, H, W)
    batches = [(x[:3], None), (x[3:], None)]
    rows = evaluate(model, batches, ["gradient", "random:seed=3"], steps=8, batch_size=16)
    assert len(rows) == 4 and {r["n"] for r in rows} == {4}
    grad = attribute(model, x, method="gradient").sum(1)
    for q in (False, True):
        heat = heat_quantization(grad, 8) if q else grad
        direct = insertion_deletion(model, x, heat, steps=8)
        row = next(r for r in rows if r["method"] == "gradient" and r["quantized"] is q)
        assert row["insertion"] == pytest.approx(direct.insertion.mean().item(), abs=1e-6)
        assert row["deletion"] == pytest.approx(direct.deletion.mean().item(), abs=1e-6)
        assert row["params"]["heat_quantization"] == (8 if q else None)
    text = format_table(rows)
    assert "gradient" in text and "random:seed=3" in text and "heat quantization" in text


def test_table_cli_offline(capsys: pytest.CaptureFixture[str], tmp_path) -> None:
    path = tmp_path / "tiny.pt"
    torch.save(tiny_model().float(), path)
    assert (
        main(
            [
                "--checkpoint",
                str(path),
                "--n",
                "2",
                "--size",
                str(H),
                "--device",
                "cpu",
                "--methods",
                "gradient",
                "grad-cam",
                "--pixels-per-step",
                "16",
            ]
        )
        == 0
    )
    out = capsys.readouterr()
    assert "random images" in out.err
    assert "grad-cam" in out.out and "Ins" in out.out


def test_table_on_the_pipelines_model(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """``--model <architecture>`` loads the train stage's file (recorded architecture) and the
    pipeline's data, and writes under outputs/studies (no DVC output is touched)."""
    params = write_params(tmp_path / "params.yaml", tiny_params(tmp_path))
    ctx = load_context(params)
    data_task.fn(ctx)
    save_trained(build_model("small_resnet", 3), "small_resnet", ctx.layout.model("small_resnet"))
    args = ["--params", str(params), "--model", "small_resnet", "--n", "3", "--device", "cpu",
            "--methods", "gradient", "--pixels-per-step", "256", "--target", "label"]
    assert main(args) == 0
    rows = json.loads((ctx.layout.studies() / "otsuki_table_small_resnet.json").read_text())
    assert {r["n"] for r in rows} == {3}
    assert sorted(p.name for p in (tmp_path / "outputs").iterdir()) == ["models", "studies"]


def test_table_fails_in_one_line_on_a_file_without_architecture(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = tmp_path / "small_resnet.pt"
    torch.save(build_model("small_resnet", 3).state_dict(), path)
    assert main(["--checkpoint", str(path), "--n", "1", "--device", "cpu"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "--architecture" in err and str(path) in err
