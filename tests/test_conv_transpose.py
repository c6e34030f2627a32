"""Transposed convolutions (nn.ConvTranspose1d/2d/3d) under the linear rules.

Checked against Zennit 0.5.1 (whose rules and composites cover transposed convolutions, on the
single-layer models of its own test suite: layer, ReLU, flatten, dense), against gradient x input
(LRP-0 on a ReLU network, an identity independent of the rule code) and for conservation where a
rule keeps it exactly.
"""

from __future__ import annotations

from collections import OrderedDict

import pytest
import torch
from torch import nn
from zennit.canonizers import SequentialMergeBatchNorm
from zennit.composites import EpsilonAlpha2Beta1, EpsilonGammaBox, EpsilonPlus, EpsilonPlusFlat
from zennit_reference import assert_matches, zennit_relevance

import lrp
from lrp.rules import Epsilon, ZPlus

F64 = torch.float64
TYPES = {1: nn.ConvTranspose1d, 2: nn.ConvTranspose2d, 3: nn.ConvTranspose3d}
# (in, out, kernel, stride, padding, output_padding, groups)
GEOMETRIES = {
    "k3": (3, 3, 3, 1, 0, 0, 1),
    "k2-s2-op1": (1, 3, 2, 2, 0, 1, 1),
    "k2-s2": (1, 3, 2, 2, 0, 0, 1),
    "k3-s2-p1-g3": (3, 6, 3, 2, 1, 1, 3),
}
ZENNIT = {
    "epsilon-plus-flat": (EpsilonPlusFlat, {}),
    "epsilon-plus": (EpsilonPlus, {}),
    "epsilon-alpha2-beta1": (EpsilonAlpha2Beta1, {}),
    "epsilon-gamma-box": (EpsilonGammaBox, {"low": -3.0, "high": 3.0}),
}


def _model(dims: int, geometry: str, batchnorm: bool = False, seed: int = 0):
    """The layer, [BatchNorm,] ReLU, flatten, dense; and an input batch."""
    c_in, c_out, k, s, p, op, groups = GEOMETRIES[geometry]
    torch.manual_seed(seed)  # the layers' initialisation
    g = torch.Generator().manual_seed(seed)
    layer = TYPES[dims](c_in, c_out, k, stride=s, padding=p, output_padding=op, groups=groups)
    x = torch.randn(3, c_in, *([4] * dims), dtype=F64, generator=g)
    parts: list[tuple[str, nn.Module]] = [("linr0", layer.to(F64))]
    if batchnorm:
        bn = getattr(nn, f"BatchNorm{dims}d")(c_out).to(F64)
        bn.running_mean.normal_(0, 0.3, generator=g)
        bn.running_var.uniform_(0.5, 1.5, generator=g)
        bn.weight.data.uniform_(0.5, 1.5, generator=g)
        bn.bias.data.normal_(0, 0.2, generator=g)
        parts.append(("bn0", bn))
    with torch.no_grad():
        features = nn.Sequential(OrderedDict(parts))(x).shape[1:].numel()
    parts += [("actv0", nn.ReLU()), ("flat0", nn.Flatten()), ("linr1", nn.Linear(features, 4))]
    return nn.Sequential(OrderedDict(parts)).to(F64).eval(), x


@pytest.mark.parametrize("dims", [1, 2, 3])
@pytest.mark.parametrize("geometry", ["k3", "k2-s2-op1"])
@pytest.mark.parametrize("composite", list(ZENNIT))
def test_matches_zennit(dims: int, geometry: str, composite: str) -> None:
    model, x = _model(dims, geometry)
    one_hot = torch.eye(4, dtype=F64)[model(x).argmax(1)]
    cls, kwargs = ZENNIT[composite]
    expected = zennit_relevance(model, x, one_hot, cls(**kwargs))
    options = {"input_bounds": (-3.0, 3.0)} if composite == "epsilon-gamma-box" else {}
    # empty="drop": Zennit's z+ drops an output with no positive contribution
    explainer = lrp.Explainer(model, composite, empty="drop", **options)
    assert_matches(explainer(x, output_relevance=one_hot).relevance, expected)


@pytest.mark.parametrize("dims", [1, 2, 3])
@pytest.mark.parametrize("geometry", ["k3", "k2-s2-op1", "k3-s2-p1-g3"])
@pytest.mark.parametrize("batchnorm", [False, True], ids=["plain", "batchnorm"])
def test_lrp0_is_gradient_times_input(dims: int, geometry: str, batchnorm: bool) -> None:
    """LRP-0 on a ReLU network is gradient x input, biases included; with a BatchNorm after the
    layer this also checks its fold (per output channel, within each group)."""
    model, x = _model(dims, geometry, batchnorm)
    xx = x.clone().requires_grad_(True)
    out = model(xx)
    target = out.argmax(1)
    (grad,) = torch.autograd.grad(out.gather(1, target[:, None]).sum(), xx)
    result = lrp.Explainer(model, "lrp-0", stabilizer=0.0)(x, target=target)
    torch.testing.assert_close(result.logits, out.detach(), rtol=0, atol=1e-12)
    torch.testing.assert_close(result.relevance, grad * x, rtol=0, atol=1e-12)


def test_batchnorm_fold_matches_zennit() -> None:
    model, x = _model(2, "k3", batchnorm=True)
    model.bn0.eps = 0.0  # Zennit's merge leaves eps in the identity BatchNorm it leaves behind
    one_hot = torch.eye(4, dtype=F64)[model(x).argmax(1)]
    composite = EpsilonPlus(canonizers=[SequentialMergeBatchNorm()])
    expected = zennit_relevance(model, x, one_hot, composite)
    ours = lrp.Explainer(model, "epsilon-plus", empty="drop")(x, output_relevance=one_hot).relevance
    assert_matches(ours, expected)


@pytest.mark.parametrize("dims", [1, 2, 3])
def test_zplus_empty_outputs_spread_flat(dims: int) -> None:
    """One input channel, kernel 2, stride 2: each output has one contribution, so every output
    whose x w is negative has no positive one. Those outputs' relevance is spread flat over
    their receptive field (conservative); the plain rule drops it. (No output padding: an
    output there has no input at all, only the bias.) Relevance reaches such an output where
    its bias keeps it above the ReLU's threshold, as with seed 1."""
    model, x = _model(dims, "k2-s2", seed=1)
    errors = {}
    for empty in ("drop", "flat"):
        rules = {nn.Linear: Epsilon(0.0, zero_bias=True),
                 TYPES[dims]: ZPlus(stabilizer=0.0, zero_bias=True, empty=empty)}
        result = lrp.Explainer(model, lrp.Composite(f"zplus-{empty}", rules))(x)
        total = result.relevance.flatten(1).sum(1)
        errors[empty] = float(((total - result.initial) / result.initial).abs().max())
    assert errors["flat"] < 1e-12
    assert errors["drop"] > 1e-3  # the case is exercised: relevance is lost without the fallback


def test_output_size_argument_is_a_clear_error() -> None:
    class Up(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.up = nn.ConvTranspose2d(3, 4, 3, stride=2)
            self.fc = nn.Linear(4, 2)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.fc(self.up(x, output_size=[2, 4, 18, 18]).mean((2, 3)))

    with pytest.raises(lrp.UnsupportedOperationError, match=r"'up' \(ConvTranspose2d\).*output_size"):
        lrp.Explainer(Up().eval())(torch.randn(2, 3, 8, 8))
