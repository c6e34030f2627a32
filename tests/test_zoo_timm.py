"""timm models can be explained (issue 11): the same checks as the torchvision zoo, random weights
(``pretrained=False``: nothing is downloaded), one sample at 32 px (or the smallest input the
architecture allows).

Default suite: ``MODELS`` and, for what the timm sweep (benchmarks/zoo_sweep.py, BENCHMARKS.md
"timm sweep") found and fixed, one model per fix (``SWEEP``). The rest of the sweep's passing
models are marked ``slow_zoo`` and run only with ``LRP_SLOW_ZOO=1`` (as the torchvision zoo's).
Models with attention get the composites and CP-LRP's LRP-0 conservation (``ATTENTION``).
"""

from __future__ import annotations

import os

import pytest
import timm  # a dev dependency (pyproject.toml)
import torch
from torch import nn
from zoo_checks import (
    CHECKS,
    LRP0_TOLERANCE,
    cached_builder,
    check_every_composite,
    make_input,
    run_check,
)

import lrp

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
# one model per fix of the sweep (the op it needed)
SWEEP = {
    "skresnet18": 32,  # softmax over paths as a gate
    "resnest14d": 32,  # split attention: softmax over the radix dim
    "tf_efficientnet_b0": 32,  # TF 'SAME' padding (pad_same) fused into the convolutions
    "nf_regnet_b0": 32,  # weights standardised in the forward (ScaledStdConv2d)
    "convnextv2_atto": 32,  # GRN: the norm held constant, addcmul
    "ghostnetv2_100": 64,  # nearest interpolation of a gate
    "mambaout_femto": 32,  # a product of two signals (the gated conv): the uniform rule
    "poolformerv2_s12": 32,  # StarReLU's constant power
}
# the sweep's other passing CNNs (input px), slow_zoo
SLOW = {
    "resnet10t": 32, "resnet26d": 32, "resnetrs50": 32, "resnext26ts": 32,
    "seresnext26d_32x4d": 32, "res2net50_14w_8s": 32, "res2next50": 32, "ecaresnet26t": 32,
    "resnetaa50": 32, "resnetblur50": 32, "wide_resnet50_2": 32, "tresnet_m": 32,
    "resnetv2_50x1_bit": 32, "regnetx_002": 32, "regnetz_b16": 32, "regnetv_040": 32,
    "efficientnetv2_rw_t": 32, "tf_efficientnetv2_b0": 32, "mobilenetv2_050": 32,
    "mobilenetv3_small_050": 32, "tf_mobilenetv3_small_100": 32, "mobilenetv4_conv_small": 32,
    "mobilenetv1_100": 32, "mnasnet_050": 32, "ghostnet_050": 32, "rexnet_100": 32,
    "mixnet_s": 32, "tf_mixnet_s": 32, "hardcorenas_a": 32, "fbnetc_100": 32, "fbnetv3_b": 32,
    "lcnet_050": 32, "tinynet_e": 32, "repghostnet_050": 32, "densenet121": 32,
    "densenetblur121d": 32, "dla34": 64, "dla46_c": 32, "dpn48b": 32, "hrnet_w18_small": 64,
    "inception_v3": 75, "xception41": 32, "legacy_xception": 71, "cspresnet50": 32,
    "cspdarknet53": 32, "cs3darknet_s": 32, "darknet17": 32, "vgg11_bn": 32, "repvgg_a0": 32,
    "mobileone_s0": 32, "repvit_m0_9": 32, "selecsls42b": 32, "vovnet39a": 32,
    "ese_vovnet19b_dw": 32, "gernet_s": 32, "hgnet_tiny": 32, "hgnetv2_b0": 32,
    "nf_resnet26": 32, "nfnet_l0": 32, "dm_nfnet_f0": 32, "eca_nfnet_l0": 32,
    "inception_next_tiny": 32, "poolformer_s12": 32, "mixer_s16_224": 32, "resmlp_12_224": 32,
    "convformer_s18": 32,
}  # fmt: skip
# starnet_s1 (the star, act(x1) * x2) passes the sweep, whose LRP-0 check also zeroes the conv
# biases; with them, its bias-free denominators cancel to ~0 (sum |R| 1e63 x the logit)
# models with attention (input px, create_model kwargs)
ATTENTION = {
    "mobilevit_xxs": (64, {}),  # control flow on sizes: traced with the input's shapes known
    "swin_tiny_patch4_window7_224": (64, {"img_size": 64, "window_size": 2}),  # nn.Softmax
}
ATTENTION_SLOW = {
    "vit_tiny_patch16_224": (32, {"img_size": 32}),
    "deit_tiny_distilled_patch16_224": (32, {"img_size": 32}),
    "swinv2_tiny_window8_256": (64, {"img_size": 64, "window_size": 2}),
    "levit_128s": (64, {"img_size": 64}),
    "coatnet_nano_rw_224": (64, {"img_size": 64}),
    "maxvit_nano_rw_256": (64, {"img_size": 64}),
    "efficientformerv2_s0": (64, {"img_size": 64}),
    "edgenext_xx_small": (64, {}),
    "tiny_vit_5m_224": (64, {}),
    "pvt_v2_b0": (64, {}),
    "gcresnet33ts": (32, {}),
    "botnet26t_256": (64, {"img_size": 64}),
    "eva02_tiny_patch14_224": (28, {"img_size": 28}),  # SwiGLU: the uniform rule
    "caformer_s18": (32, {}),
    "mobilevitv2_050": (64, {}),  # a softmax gate behind an eval-mode dropout
}
SIZE = 32
SLOW_ZOO = pytest.mark.skipif(
    os.environ.get("LRP_SLOW_ZOO") != "1", reason="full zoo: set LRP_SLOW_ZOO=1 (see .ci/run)"
)
KWARGS = {
    "mixer_s16_224": {"img_size": 32},
    "resmlp_12_224": {"img_size": 32},
    **{name: kwargs for name, (_, kwargs) in {**ATTENTION, **ATTENTION_SLOW}.items()},
}


def build(name: str) -> nn.Module:
    model = timm.create_model(name, pretrained=False, num_classes=10, **KWARGS.get(name, {}))
    with torch.no_grad():  # zero-initialised heads (timm ViTs): logits and relevance would be 0
        for m in model.modules():
            if isinstance(m, nn.Linear | nn.Conv2d) and not m.weight.any():
                nn.init.normal_(m.weight, std=m.weight[0].numel() ** -0.5)
    return model


get_model = cached_builder(build)


def _params(models: dict[str, int], marks: tuple = ()) -> list[object]:
    return [pytest.param(n, c, s, marks=marks, id=f"{n}-{c}") for n, s in models.items()
            for c in CHECKS]


@pytest.mark.parametrize(
    ("name", "check", "size"),
    [*_params(dict.fromkeys(MODELS, SIZE)), *_params(SWEEP),
     *_params(SLOW, (pytest.mark.slow_zoo, SLOW_ZOO))],
)
def test_timm_cnn(name: str, check: str, size: int) -> None:
    failures = run_check(get_model, name, check, size, 1)
    assert not failures, f"timm {name} ({size} px):\n" + "\n".join(failures)


def _attention(models: dict[str, tuple[int, dict]], marks: tuple = ()) -> list[object]:
    return [pytest.param(n, s, marks=marks, id=n) for n, (s, _) in models.items()]


@pytest.mark.parametrize(
    ("name", "size"),
    [*_attention(ATTENTION), *_attention(ATTENTION_SLOW, (pytest.mark.slow_zoo, SLOW_ZOO))],
)
def test_timm_attention_model(name: str, size: int) -> None:
    """Every composite explains it; LRP-0 without biases conserves under CP-LRP (float64), the
    relevance a class token absorbs counted (docs/TRANSFORMERS.md)."""
    x = make_input(1, size, torch.float32)
    failures = check_every_composite(get_model(name, torch.float32), x)
    model = get_model(name, torch.float64, shift=False)
    with torch.no_grad():  # layer biases are shifts too: without them no denominator cancels
        for m in model.modules():
            if isinstance(m, nn.Linear | nn.Conv2d) and m.bias is not None:
                m.bias.zero_()
    x = make_input(1, size, torch.float64)
    e = lrp.Explainer(model, "lrp-0", zero_bias=True, stabilizer=0.0, attention="cp")(x)
    total = e.relevance.flatten(1).sum(1) + e.absorbed
    error = ((total - e.initial).abs() / e.initial.abs()).max().item()
    if not error < LRP0_TOLERANCE:
        failures.append(f"lrp-0 cp float64: conservation error {error:.2g}")
    assert not failures, f"timm {name} ({size} px):\n" + "\n".join(failures)
