"""flows.studies.lrn_study: the Taylor-vs-identity AOPC table of Binder et al. 2016 on a tiny LRN model."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from torch import nn

from flows.studies.lrn_study import format_table, lrn_aopc_table, lrn_heatmaps, main
from lrp.models import lrn_cnn
from lrp.rules.lrn import LRNIdentity, LRNTaylor

EPS = (1e-2, 1.0)


def _tiny(lrn_alpha: float = 2.0, seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return lrn_cnn(num_classes=3, width=8, lrn_alpha=lrn_alpha).eval()


def _images(n: int = 6, px: int = 32, seed: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 3, px, px, generator=g), torch.arange(n) % 3


def test_table_rows_and_params() -> None:
    images, labels = _images(n=4)
    rows = lrn_aopc_table(
        _tiny(),
        images,
        labels,
        epsilons=EPS,
        alpha_beta=((1.0, 0.0),),
        orders=("morf", "lerf"),
        region=8,
        steps=4,
        batch_size=64,
    )
    methods = [
        "lrn=identity",
        "lrn=taylor",
        "lrn=taylor",
        "lrn=taylor alpha1-beta0",
        "random heatmap",
    ]
    assert [r["method"] for r in rows] == methods * 2
    assert [r["order"] for r in rows] == ["morf"] * 5 + ["lerf"] * 5
    assert [r["lrn_epsilon"] for r in rows[1:3]] == list(EPS)
    for r in rows:
        assert r["n"] == len(images)
        assert math.isfinite(r["aopc"]) and math.isfinite(r["sem"])
        assert math.isfinite(r["diff_vs_identity"])
        p = r["params"]
        assert p["region"] == 8 and p["steps"] == 4 and p["perturbation"] == "uniform"
        assert p["order"] == r["order"] and p["composite"] == "epsilon-plus-flat"
        assert p["tiles"] == 16 and p["seed"] == 0
    for r in (rows[0], rows[5]):  # identity against itself
        assert r["diff_vs_identity"] == 0.0
    assert "LRNTaylor(epsilon=0.01" in rows[1]["params"]["lrn_rule"]
    json.dumps(rows)  # loggable as is
    table = format_table(rows)
    assert table.count("\n") == 2 + len(rows) - 1 and "lrn=taylor" in table


def test_taylor_heatmaps_differ_from_identity() -> None:
    model = _tiny()
    images, labels = _images(n=4)
    ident = lrn_heatmaps(model, images, labels, LRNIdentity())
    assert torch.isfinite(ident).all() and ident.abs().sum() > 0
    for eps in EPS:
        taylor = lrn_heatmaps(model, images, labels, LRNTaylor(epsilon=eps))
        assert torch.isfinite(taylor).all()
        assert not torch.allclose(taylor, ident, rtol=1e-3, atol=1e-6)


def test_requires_lrn_layer() -> None:
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU(), nn.Flatten(), nn.LazyLinear(2))
    images, labels = _images(n=2, px=8)
    model(images)
    with pytest.raises(ValueError, match="LocalResponseNorm"):
        lrn_aopc_table(model.eval(), images, labels, steps=2)


def test_cli_writes_json(tmp_path: Path) -> None:
    from PIL import Image

    for c, name in enumerate(["a", "b"]):
        folder = tmp_path / "data" / name
        folder.mkdir(parents=True)
        for i in range(3):
            pixels = torch.rand(32, 32, 3, generator=torch.Generator().manual_seed(10 * c + i))
            Image.fromarray((pixels * 255).byte().numpy()).save(folder / f"{i}.png")
    torch.manual_seed(0)
    ckpt = tmp_path / "m.pt"
    torch.save({"model": lrn_cnn(num_classes=2).state_dict()}, ckpt)
    out = tmp_path / "rows.json"
    main(
        [
            "--checkpoint",
            str(ckpt),
            "--architecture",
            "lrn_cnn",
            "--data",
            str(tmp_path / "data"),
            "--split",
            "all",
            "--image-size",
            "32",
            "--n",
            "4",
            "--epsilons",
            "0.1",
            "--alpha-beta",
            "2,1",
            "--steps",
            "3",
            "--region",
            "16",
            "--out",
            str(out),
        ]
    )
    saved = json.loads(out.read_text())
    assert [r["method"] for r in saved["rows"]] == [
        "lrn=identity",
        "lrn=taylor",
        "lrn=taylor alpha2-beta1",
        "random heatmap",
    ]
    assert saved["meta"]["argv"]["steps"] == 3
