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


# otsuki2024 at the published eps 1e-5 on calibrated activations (float32, < 1e-3): measured miss,
# a depthwise-conv family like the torchvision ones (see KNOWN_MISSES in test_zoo_torchvision.py)
KNOWN_MISSES = {
    ("mobilenetv3_small_100", "otsuki2024"): "float32 otsuki2024 conservation 1.8e-3 (issue 11)",
}


def _marks(name: str, check: str) -> tuple[pytest.MarkDecorator, ...]:
    miss = KNOWN_MISSES.get((name, check))
    return () if miss is None else (pytest.mark.xfail(reason=miss, strict=True),)


@pytest.mark.parametrize(
    ("name", "check"),
    [pytest.param(n, c, marks=_marks(n, c), id=f"{n}-{c}") for n in MODELS for c in CHECKS],
)
def test_timm_cnn(name: str, check: str) -> None:
    failures = run_check(get_model, name, check, SIZE, 1)
    assert not failures, f"timm {name} ({SIZE} px):\n" + "\n".join(failures)
