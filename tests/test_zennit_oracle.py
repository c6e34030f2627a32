"""Agreement with Zennit 0.5.1 (an established implementation of the same composites).

Zennit's ResNet canonizer splits relevance at a residual sum in proportion to the signed
contributions (its Norm rule on the summation), which is this engine's ``residual="proportional"``.
Zennit merges BatchNorm but leaves ``bn.eps`` in the identity it leaves behind, so BN layers get
``eps = 0`` here to compare exactly.
"""

from __future__ import annotations

import pytest
import torch
import torchvision
from zennit.composites import EpsilonAlpha2Beta1, EpsilonGammaBox, EpsilonPlus, EpsilonPlusFlat
from zennit.torchvision import ResNetCanonizer, VGGCanonizer
from zennit_reference import assert_matches, zennit_relevance

import lrp

COMPOSITES = {
    "epsilon-plus-flat": (EpsilonPlusFlat, {}),
    "epsilon-plus": (EpsilonPlus, {}),
    "epsilon-alpha2-beta1": (EpsilonAlpha2Beta1, {}),
    "epsilon-gamma-box": (EpsilonGammaBox, {"low": -3.0, "high": 3.0}),
}
MODELS = {
    "vgg11": (torchvision.models.vgg11, VGGCanonizer),
    "vgg11_bn": (torchvision.models.vgg11_bn, VGGCanonizer),
    "resnet18": (torchvision.models.resnet18, ResNetCanonizer),
}


def _random_model(name: str) -> torch.nn.Module:
    torch.manual_seed(0)
    model = MODELS[name][0](num_classes=10).double().eval()
    for m in model.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            m.running_mean.uniform_(-0.5, 0.5)
            m.running_var.uniform_(0.5, 2.0)
            m.weight.data.uniform_(0.5, 1.5)
            m.bias.data.uniform_(-0.2, 0.2)
            m.eps = 0.0
    return model


@pytest.mark.parametrize("model_name", list(MODELS))
@pytest.mark.parametrize("composite", list(COMPOSITES))
def test_matches_zennit(model_name: str, composite: str) -> None:
    model = _random_model(model_name)
    x = torch.randn(2, 3, 32, 32, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    target = model(x).argmax(1)
    one_hot = torch.eye(10, dtype=torch.float64)[target]

    zennit_cls, kwargs = COMPOSITES[composite]
    zennit_composite = zennit_cls(canonizers=[MODELS[model_name][1]()], **kwargs)
    expected = zennit_relevance(model, x, one_hot, zennit_composite)

    options = {"input_bounds": (-3.0, 3.0)} if composite == "epsilon-gamma-box" else {}
    explainer = lrp.Explainer(model, composite, residual="proportional", **options)
    assert_matches(explainer(x, output_relevance=one_hot).relevance, expected)
