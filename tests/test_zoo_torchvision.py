"""Every CNN classification builder in torchvision.models can be explained (issue 11).

Default suite: the cheapest member of each family, one sample at the smallest input that family
allows. The rest of the list is marked ``slow_zoo`` and runs only with ``LRP_SLOW_ZOO=1`` (``.ci/run``
sets it when CI's time budget allows): ``LRP_SLOW_ZOO=1 ./scripts/test.sh -m slow_zoo``.
Transformers (ViT, Swin, MaxViT) raise a clear ``lrp.LRPError`` until they have rules, then run.
"""

from __future__ import annotations

import os
import re

import pytest
import torch
import torchvision
from torch import nn
from torchvision.models.maxvit import MaxVit
from torchvision.models.swin_transformer import SwinTransformer
from torchvision.models.vision_transformer import VisionTransformer
from zoo_checks import (
    CHECKS,
    cached_builder,
    check_lrp0_conserves,
    check_otsuki_conserves,
    make_input,
    randomize_statistics,
    run_check,
)

import lrp

TRANSFORMER_PREFIXES = ("vit_", "swin_", "maxvit")
CNN_BUILDERS = [
    n
    for n in torchvision.models.list_models(module=torchvision.models)
    if not n.startswith(TRANSFORMER_PREFIXES)
]
# family -> its cheapest member (parameters, then compute), run in the default suite
REPRESENTATIVES = {
    "alexnet": "alexnet",
    "convnext": "convnext_tiny",
    "densenet": "densenet121",
    "efficientnet_b": "efficientnet_b0",
    "efficientnet_v2": "efficientnet_v2_s",
    "googlenet": "googlenet",
    "inception": "inception_v3",
    "mnasnet": "mnasnet0_5",
    "mobilenet_v2": "mobilenet_v2",
    "mobilenet_v3": "mobilenet_v3_small",
    "regnet_x": "regnet_x_400mf",
    "regnet_y": "regnet_y_400mf",
    "resnet": "resnet18",
    "resnext": "resnext50_32x4d",
    "shufflenet_v2": "shufflenet_v2_x0_5",
    "squeezenet": "squeezenet1_1",
    "vgg": "vgg11_bn",
    "wide_resnet": "wide_resnet50_2",
}
SLOW_ZOO = pytest.mark.skipif(
    os.environ.get("LRP_SLOW_ZOO") != "1", reason="full zoo: set LRP_SLOW_ZOO=1 (see .ci/run)"
)


def family(name: str) -> str:
    """The REPRESENTATIVES key a builder belongs to (longest matching prefix)."""
    keys = [k for k in REPRESENTATIVES if name.startswith(k)]
    if not keys:
        raise KeyError(f"{name}: new torchvision family, add it to REPRESENTATIVES")
    return max(keys, key=len)


def input_size(name: str) -> int:
    """Smallest input each architecture allows, with every stage's map at least 1 px."""
    if name == "inception_v3":
        return 75
    if name == "alexnet":
        return 64
    return 32


def build(name: str) -> nn.Module:
    kwargs: dict[str, object] = {"weights": None, "num_classes": 10}
    if name in ("googlenet", "inception_v3"):
        kwargs |= {"aux_logits": False, "init_weights": False}
    return torchvision.models.get_model(name, **kwargs)


get_model = cached_builder(build)


def test_every_builder_is_listed_in_a_family() -> None:
    """The family table covers every CNN builder torchvision has (a new one is not forgotten)."""
    assert len(CNN_BUILDERS) >= 67
    assert {family(n) for n in CNN_BUILDERS} == set(REPRESENTATIVES)
    assert all(family(r) == f for f, r in REPRESENTATIVES.items())


def _params(names: list[str], marks: tuple[pytest.MarkDecorator, ...]) -> list[object]:
    return [
        pytest.param(name, check, marks=marks, id=f"{name}-{check}")
        for name in names
        for check in CHECKS  # a model's checks in a row: it is built once
    ]


DEFAULT = list(REPRESENTATIVES.values())
SLOW = [n for n in CNN_BUILDERS if n not in DEFAULT]


@pytest.mark.parametrize(
    ("name", "check"),
    [*_params(DEFAULT, ()), *_params(SLOW, (pytest.mark.slow_zoo, SLOW_ZOO))],
)
def test_torchvision_cnn(name: str, check: str) -> None:
    n = 2 if name in SLOW else 1
    failures = run_check(get_model, name, check, input_size(name), n)
    assert not failures, f"{name} ({input_size(name)} px):\n" + "\n".join(failures)


def _small_transformers() -> dict[str, nn.Module]:
    return {
        "vit": VisionTransformer(
            image_size=32, patch_size=16, num_layers=1, num_heads=2, hidden_dim=8, mlp_dim=16,
            num_classes=10,
        ),
        "swin": SwinTransformer(
            patch_size=[4, 4], embed_dim=8, depths=[1, 1], num_heads=[1, 1], window_size=[2, 2],
            num_classes=10,
        ),
        "maxvit": MaxVit(
            input_size=(32, 32), stem_channels=8, partition_size=2, block_channels=[8],
            block_layers=[1], head_dim=4, stochastic_depth_prob=0.0, num_classes=10,
        ),
    }  # fmt: skip


@pytest.mark.parametrize("kind", ["vit", "swin", "maxvit"])
def test_transformers_raise_a_clear_error_or_run(kind: str) -> None:
    """Attention without a rule raises an explicit error, never a silent gradient; once it has
    rules (the transformer issue: ViT's nn.MultiheadAttention first) the explainer computes the
    model's logits and finite relevance. Their conservation belongs to that issue's tests."""
    torch.manual_seed(0)
    model = _small_transformers()[kind].eval()
    with torch.no_grad():
        for m in model.modules():  # ViT's head starts at zero: logits and relevance would be 0
            if isinstance(m, nn.Linear) and not m.weight.any():
                nn.init.normal_(m.weight, std=0.5)
        x = make_input(2, 32, torch.float32)
        logits = model(x)
    assert logits.shape == (2, 10) and logits.abs().min() > 0
    try:
        e = lrp.Explainer(model)(x)
    except lrp.LRPError as err:  # names where it stopped: a module path or an op, quoted
        assert re.search(r"'[\w.<>]+'", str(err)), str(err)
        return
    torch.testing.assert_close(e.logits, logits, rtol=1e-4, atol=1e-5)
    assert e.relevance.shape == x.shape and torch.isfinite(e.relevance).all()
    assert (e.relevance.flatten(1).abs().sum(1) > 0).all()


@pytest.mark.parametrize("name", ["r3d_18", "mc3_18", "r2plus1d_18"])
def test_video_cnns_conserve(name: str) -> None:
    """torchvision's video ResNets (Conv3d, BatchNorm3d, (2+1)D factorised convolutions,
    residual merges) under the same conservation checks, on 4 frames of 32 px. (S3D needs 16
    frames of 224 px for its final pool; it was checked once by hand: LRP-0 float32 1.7e-7.)"""
    builder = getattr(torchvision.models.video, name)
    g = torch.Generator().manual_seed(1)
    x = torch.randn(2, 3, 4, 32, 32, generator=g, dtype=torch.float64).clamp(-3.0, 3.0)
    torch.manual_seed(0)
    model = randomize_statistics(builder(num_classes=5).double().eval(), shift=False)
    assert not check_lrp0_conserves(model, x)
    torch.manual_seed(0)
    model = randomize_statistics(builder(num_classes=5).eval())
    assert not check_otsuki_conserves(model, x.float())
