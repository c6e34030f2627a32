"""timm CNNs can be explained (issue 11): the same checks as the torchvision zoo, random weights
(``pretrained=False``: nothing is downloaded), one sample at 32 px."""

from __future__ import annotations

import pytest
import timm  # a dev dependency (pyproject.toml)
from torch import nn
from zoo_checks import CHECKS, cached_builder, run_check

MODELS = [
    "resnet18",
    "resnet50d",
    "seresnet50",
    "efficientnet_b0",
    "mobilenetv3_small_100",
    "regnety_002",
    "convnext_atto",
    "resnetv2_50",
]
SIZE = 32


def build(name: str) -> nn.Module:
    return timm.create_model(name, pretrained=False, num_classes=10)


get_model = cached_builder(build)


@pytest.mark.parametrize(
    ("name", "check"),
    [pytest.param(n, c, id=f"{n}-{c}") for n in MODELS for c in CHECKS],
)
def test_timm_cnn(name: str, check: str) -> None:
    failures = run_check(get_model, name, check, SIZE, 1)
    assert not failures, f"timm {name} ({SIZE} px):\n" + "\n".join(failures)
