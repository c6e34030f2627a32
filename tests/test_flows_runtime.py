"""flows.runtime.inference_model: the optimized copy the metric forwards use on CPU."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import Tensor, nn

from flows.runtime import inference_model
from flows.stages.evaluate import EvalSettings, evaluate_piece

CPU = torch.device("cpu")


def convnet() -> nn.Module:
    torch.manual_seed(0)
    m = nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
        nn.Conv2d(8, 8, 3, padding=1, stride=2), nn.BatchNorm2d(8), nn.ReLU(),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Dropout(0.5), nn.Linear(8, 4),
    )
    for bn in (m[1], m[4]):  # non-trivial statistics, so folding them is visible
        bn.running_mean.uniform_(-0.5, 0.5)
        bn.running_var.uniform_(0.5, 2.0)
    return m.eval()


class Branchy(nn.Module):
    """Data-dependent control flow: torch.fx cannot trace it."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3)

    def forward(self, x: Tensor) -> Tensor:
        y = self.conv(x).mean((2, 3))
        return y if y.sum() > 0 else -y


def test_cpu_auto_gives_an_equivalent_optimized_copy() -> None:
    model = convnet()
    before = copy.deepcopy(model.state_dict())
    x = torch.randn(16, 3, 16, 16)
    fast, how = inference_model("auto", model, CPU, x[:8])
    assert fast is not model and "optimized copy" in how
    assert not any(isinstance(m, nn.BatchNorm2d) for m in fast.modules())  # folded
    with torch.inference_mode():
        for batch in (x, x[:3], x[:1]):  # other batch sizes than the check's
            torch.testing.assert_close(fast(batch), model(batch), rtol=1e-5, atol=1e-5)
    assert any(isinstance(m, nn.BatchNorm2d) for m in model.modules())  # the model is untouched
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k]), k
    assert inference_model(True, model, CPU, x)[0] is not model


def test_off_elsewhere_or_when_asked() -> None:
    model, x = convnet(), torch.randn(2, 3, 16, 16)
    assert inference_model(False, model, CPU, x) == (model, "off")
    assert inference_model("auto", model, torch.device("cuda"), x) == (model, "off (cuda)")
    with pytest.raises(ValueError, match="optimize_inference"):
        inference_model("yes", model, CPU, x)


def test_untraceable_or_different_copies_are_not_used(monkeypatch) -> None:
    x = torch.randn(2, 3, 8, 8)
    model = Branchy().eval()
    got, how = inference_model("auto", model, CPU, x)
    assert got is model and how.startswith("off (") and "Error" in how

    import torch.fx.experimental.optimization as fxo

    def wrong(m: nn.Module) -> nn.Module:
        bad = copy.deepcopy(m)
        bad[-1].bias.data += 1.0
        return bad

    monkeypatch.setattr(fxo, "optimize_for_inference", wrong)
    model = convnet()
    got, how = inference_model("auto", model, CPU, torch.randn(4, 3, 16, 16))
    assert got is model and "differs" in how


class ImageSet:
    def __init__(self, images: Tensor) -> None:
        self.images = images

    def __getitem__(self, i: int) -> dict:
        return {"image": self.images[i], "mask": torch.empty(0)}


def test_evaluate_piece_with_the_optimized_copy_matches_the_model() -> None:
    """The stage's scores agree with the plain model's to float32 roundoff."""
    model = convnet()
    g = torch.Generator().manual_seed(2)
    images = torch.rand(6, 3, 16, 16, generator=g)
    arrays = {
        "index": list(range(6)),
        "target": [0, 1, 2, 3, 0, 1],
        "relevance": torch.randn(6, 3, 16, 16, generator=g).numpy(),
    }
    settings = EvalSettings(steps=8, quantize_levels=[0, 8], batch_size=7, chunk=4, aopc_region=4,
                            aopc_steps=10)
    pieces = {
        opt: evaluate_piece(model, ImageSet(images), arrays, "m", settings, device=CPU, bar=False,
                            optimize=opt)
        for opt in (False, "auto")
    }
    for level in ("0", "8"):
        plain, fast = pieces[False]["levels"][level], pieces["auto"]["levels"][level]
        assert plain["cols"].keys() == fast["cols"].keys()
        for col, values in plain["cols"].items():
            assert fast["cols"][col] == pytest.approx(values, abs=1e-5), (level, col)
    assert pieces[False]["metric_params"] == pieces["auto"]["metric_params"]
