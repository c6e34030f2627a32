"""Checks shared by the model-zoo tests (issue 11's coverage lists): every composite runs and gives
finite relevance, LRP-0 without biases conserves in float64, the otsuki2024 preset conserves in
float32. Each check returns every failure it finds (not only the first), so one run lists them.

Models get random weights (nothing is downloaded) and non-trivial normalisation statistics:
affine parameters of BatchNorm/LayerNorm/GroupNorm and ConvNeXt layer scales are drawn at random,
so that BN folding, bias handling and the layer-scale product all change the result (a
default-initialised BN is the identity and its shift is 0, which would let a missing fold or a
biased denominator pass unnoticed). BatchNorm running statistics are drawn at random too
(activations then grow or shrink by orders of magnitude from block to block, as in no trained
network: the otsuki2024 check conserves all the same, since the preset spreads its stabiliser's
share instead of absorbing it; benchmarks/zoo_otsuki_conservation.py compares both, also with
trained-like scales). The LRP-0 conservation check uses scales without shifts (see
``check_lrp0_conserves``).
"""

from __future__ import annotations

import functools
from collections.abc import Callable

import torch
from torch import Tensor, nn

import lrp

INPUT_BOUNDS = (-3.0, 3.0)
LRP0_TOLERANCE = 1e-8  # float64, LRP-0, zero_bias=True, stabilizer=0 (issue 11)
OTSUKI_TOLERANCE = 1e-4  # float32 (issue 11: < 1e-3 for the zoo, < 1e-4 for ResNeXt; met by all)
_NORMS = (nn.modules.batchnorm._NormBase, nn.LayerNorm, nn.GroupNorm)


def randomize_statistics(model: nn.Module, seed: int = 0, shift: bool = True) -> nn.Module:
    """Random BN statistics, norm affine parameters and layer scales (see module docstring).
    ``shift=False`` keeps running means and norm biases at 0 (scales only)."""
    g = torch.Generator().manual_seed(seed)

    def uniform(t: Tensor, low: float, high: float) -> None:
        t.copy_(torch.rand(t.shape, generator=g, dtype=torch.float64) * (high - low) + low)

    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, _NORMS):
                if getattr(module, "running_mean", None) is not None:
                    uniform(module.running_var, 0.5, 2.0)
                    if shift:
                        uniform(module.running_mean, -0.2, 0.2)
                if getattr(module, "weight", None) is not None:
                    uniform(module.weight, 0.5, 1.5)
                if shift and getattr(module, "bias", None) is not None:
                    uniform(module.bias, -0.1, 0.1)
                continue
            for name, p in module.named_parameters(recurse=False):
                if name in ("layer_scale", "gamma"):  # torchvision / timm ConvNeXt, init 1e-6
                    uniform(p, 0.5, 1.5)
    return model


def composite_options(composite: str) -> dict[str, object]:
    return {"input_bounds": INPUT_BOUNDS} if composite == "epsilon-gamma-box" else {}


def make_input(n: int, size: int, dtype: torch.dtype, seed: int = 1) -> Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 3, size, size, generator=g, dtype=dtype).clamp(*INPUT_BOUNDS)


def cached_builder(
    build: Callable[[str], nn.Module],
) -> Callable[..., nn.Module]:
    """One model in memory at a time (the full zoo would not fit): tests of one model run in a
    row, so consecutive checks reuse it."""

    @functools.lru_cache(maxsize=1)
    def get(name: str, dtype: torch.dtype, shift: bool = True) -> nn.Module:
        torch.manual_seed(0)
        model = randomize_statistics(build(name), shift=shift).eval()
        return model.to(dtype).requires_grad_(False)

    return get


def _describe(err: BaseException) -> str:
    return f"{type(err).__name__}: {str(err).strip().splitlines()[0][:300] if str(err) else ''}"


def _logit_gap(e: lrp.Explanation, reference: Tensor) -> float:
    return ((e.logits - reference).abs().max() / reference.abs().max()).item()


def check_every_composite(model: nn.Module, x: Tensor) -> list[str]:
    """Every composite explains the model: the prepared copy computes the model's logits, the
    relevance has the input's shape, is finite and not all zero."""
    with torch.no_grad():
        reference = model(x)
    failures = []
    for composite in lrp.composites.names():
        try:
            e = lrp.Explainer(model, composite, **composite_options(composite))(x)
        except Exception as err:  # collect every composite's failure, not just the first
            failures.append(f"{composite}: raises {_describe(err)}")
            continue
        gap = _logit_gap(e, reference)
        if not gap < 1e-4:  # float32: folded BatchNorm rounds differently
            failures.append(f"{composite}: prepared copy's logits differ by {gap:.2g} (relative)")
        if e.relevance.shape != x.shape:
            failures.append(f"{composite}: relevance shape {tuple(e.relevance.shape)}")
        elif not torch.isfinite(e.relevance).all():
            failures.append(f"{composite}: relevance not finite")
        elif not (e.relevance.flatten(1).abs().sum(1) > 0).all():
            failures.append(f"{composite}: relevance all zero for a sample")
    failures += check_record_layers(model, x)
    return failures


def check_record_layers(
    model: nn.Module, x: Tensor, composite: str = "epsilon-plus-flat"
) -> list[str]:
    """``record_layers=True`` (the diagnostic users reach for when relevance goes missing) works
    and does not change the relevance; it reports the module that produces the logits."""
    plain = lrp.Explainer(model, composite, **composite_options(composite))
    try:
        e = plain(x, record_layers=True)
    except Exception as err:
        return [f"{composite} record_layers=True: raises {_describe(err)}"]
    failures = []
    if not e.layer_relevance:
        failures.append(f"{composite} record_layers=True: no layer relevance")
    again = plain(x).relevance  # bitwise equality is too strict: oneDNN's CPU kernels are not
    # deterministic to the last bit from call to call (1e-14 on 4e-7 measured on googlenet)
    gap = ((e.relevance - again).abs().max() / again.abs().max().clamp(min=1e-30)).item()
    if not gap <= 1e-5:
        failures.append(f"{composite} record_layers=True: relevance changed by {gap:.2g} (relative)")
    return failures


def check_lrp0_conserves(model: nn.Module, x: Tensor) -> list[str]:
    """LRP-0 with biases left out of every denominator and no stabiliser is exactly conservative
    (each layer's contributions sum to its denominator); in float64 only rounding remains. A
    gradient fallback anywhere (a residual copy, a gate differentiated, a bias) breaks it.

    The model's BatchNorms must have random scales but no shifts (``shift=False``), as in
    tests/test_resnet.py: with shifts the bias-free denominators can be ~0 where the real
    pre-activation is not, the relevance then cancels at up to 1e11 (timm resnet18) to 1e51
    (timm efficientnet_b0) x the logit, and float64 rounding alone exceeds any tolerance."""
    assert x.dtype == torch.float64
    try:
        e = lrp.Explainer(model, "lrp-0", zero_bias=True, stabilizer=0.0)(x)
    except Exception as err:
        return [f"lrp-0 float64: raises {_describe(err)}"]
    with torch.no_grad():
        reference = model(x)
    failures = []
    if not _logit_gap(e, reference) < 1e-9:
        failures.append(f"lrp-0 float64: logits differ by {_logit_gap(e, reference):.2g}")
    error = lrp.conservation(e)
    if not (error < LRP0_TOLERANCE).all():
        # sum|R| / |initial|: how much the relevance cancels, i.e. how far rounding can reach
        spread = (e.relevance.abs().flatten(1).sum(1) / e.initial.abs()).tolist()
        failures.append(
            f"lrp-0 float64: conservation error {error.tolist()} >= {LRP0_TOLERANCE} "
            f"(sum|R| / |initial| = {[f'{v:.2g}' for v in spread]})"
        )
    return failures


def check_otsuki_conserves(model: nn.Module, x: Tensor) -> list[str]:
    """The otsuki2024 preset (z+ everywhere, splitting at every merge, bias-free) explains the
    softmax probability and conserves it in float32, at the published stabiliser 1e-5.

    The stabiliser is absolute; absorbing its share (the published code, ``stabilizer_share=
    "absorb"``) loses 1-50 % on depthwise/grouped-conv families with these random statistics.
    """
    try:
        e = lrp.Explainer(model, "otsuki2024")(x)
    except Exception as err:
        return [f"otsuki2024 float32: raises {_describe(err)}"]
    with torch.no_grad():
        probability = torch.softmax(model(x).double(), 1).max(1).values
    failures = []
    if not torch.allclose(e.initial.double(), probability, rtol=1e-4, atol=0):
        failures.append(f"otsuki2024: initial {e.initial.tolist()} != p {probability.tolist()}")
    error = lrp.conservation(e)
    if not (error < OTSUKI_TOLERANCE).all():
        failures.append(
            f"otsuki2024 float32: conservation error {error.tolist()} >= {OTSUKI_TOLERANCE}"
        )
    return failures


CHECKS = ("composites", "otsuki2024", "lrp-0-float64")


def run_check(
    get_model: Callable[..., nn.Module], name: str, check: str, size: int, n: int
) -> list[str]:
    """One of ``CHECKS`` on model ``name`` with ``n`` samples of ``size`` px."""
    if check == "lrp-0-float64":
        model = get_model(name, torch.float64, shift=False)
        return check_lrp0_conserves(model, make_input(n, size, torch.float64))
    x = make_input(n, size, torch.float32)
    if check == "composites":
        return check_every_composite(get_model(name, torch.float32), x)
    if check == "otsuki2024":
        return check_otsuki_conserves(get_model(name, torch.float32), x)
    raise ValueError(check)
