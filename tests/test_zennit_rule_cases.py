"""Zennit's published single-layer rule cases (its ``tests/test_rules.py::test_linear_rule``),
run through this engine with Zennit 0.5.1's own rules as the oracle.

Zennit's cases: each linear module type (Linear, Conv1d/2d/3d, ConvTranspose1d/2d/3d; 1 or 3
input and output channels, kernel 2 or 3, with and without bias), float64, random normal input,
the output itself as the relevance to explain; each rule with the parameters Zennit tests it
with, with and without the bias (``zero_params="bias"`` there, ``zero_bias=True`` here). The
mapping of names: Zennit's z+ and alpha-beta drop an output with no positive contribution, which
this engine does with ``empty="drop"``; Zennit's ``WSquare()`` squares the bias into the
denominator, which this engine's ``WSquare`` does with ``zero_bias=False`` (its default leaves the
bias out, as the rule is defined).
"""

from __future__ import annotations

import itertools

import pytest
import torch
import zennit.rules as zr
from torch import nn

import lrp
from lrp import rules as lr

F64 = torch.float64
TYPES = [nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d,
         nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d]

# (id, this engine's rule, Zennit's rule)
RULES = [
    ("epsilon", lambda: lr.Epsilon(1e-6), lambda: zr.Epsilon(1e-6)),
    ("epsilon-nobias", lambda: lr.Epsilon(1e-6, zero_bias=True),
     lambda: zr.Epsilon(1e-6, zero_params="bias")),
    ("epsilon-1", lambda: lr.Epsilon(1.0), lambda: zr.Epsilon(1.0)),
    ("epsilon-1-nobias", lambda: lr.Epsilon(1.0, zero_bias=True),
     lambda: zr.Epsilon(1.0, zero_params="bias")),
    ("zplus", lambda: lr.ZPlus(empty="drop"), lambda: zr.ZPlus()),
    ("zplus-nobias", lambda: lr.ZPlus(zero_bias=True, empty="drop"),
     lambda: zr.ZPlus(zero_params="bias")),
    ("gamma-0.25", lambda: lr.Gamma(0.25), lambda: zr.Gamma(0.25)),
    ("gamma-0.25-nobias", lambda: lr.Gamma(0.25, zero_bias=True),
     lambda: zr.Gamma(0.25, zero_params="bias")),
    ("gamma-0.5", lambda: lr.Gamma(0.5), lambda: zr.Gamma(0.5)),
    ("gamma-0.5-nobias", lambda: lr.Gamma(0.5, zero_bias=True),
     lambda: zr.Gamma(0.5, zero_params="bias")),
    ("alpha2-beta1", lambda: lr.AlphaBeta(2.0, 1.0, empty="drop"),
     lambda: zr.AlphaBeta(2.0, 1.0)),
    ("alpha1-beta0-nobias", lambda: lr.AlphaBeta(1.0, 0.0, empty="drop", zero_bias=True),
     lambda: zr.AlphaBeta(1.0, 0.0, zero_params="bias")),
    ("zbox", lambda: lr.ZBox(-3.0, 3.0), lambda: zr.ZBox(-3.0, 3.0)),
    ("wsquare", lambda: lr.WSquare(zero_bias=False), lambda: zr.WSquare()),
    ("wsquare-nobias", lambda: lr.WSquare(), lambda: zr.WSquare(zero_params="bias")),
    ("flat", lambda: lr.Flat(), lambda: zr.Flat()),
]


#: Zennit's grid: (in channels, out channels, kernel, bias)
GRID = list(itertools.product((1, 3), (1, 3), (2, 3), (True, False)))


def _layers(module_type: type[nn.Module]):
    """Zennit's module fixtures for one type, each with its input batch of 4."""
    if module_type is nn.Linear:
        for bias in (True, False):
            yield nn.Linear(16, 15, bias=bias), (16,)
        return
    dims = int(module_type.__name__[-2])
    for c_in, c_out, k, bias in GRID:
        yield module_type(c_in, c_out, k, bias=bias), (c_in, *([4] * dims))


@pytest.mark.parametrize("rule_id,ours,theirs", RULES, ids=[r[0] for r in RULES])
@pytest.mark.parametrize("module_type", TYPES, ids=lambda t: t.__name__)
def test_single_layer_rule_matches_zennit(module_type, rule_id, ours, theirs) -> None:
    torch.manual_seed(0xDEADBEEF)
    for layer, shape in _layers(module_type):
        layer = layer.to(F64).eval()
        x = torch.randn(4, *shape, dtype=F64)
        output = layer(x).detach()

        hook = theirs().register(layer)
        try:
            xx = x.clone().requires_grad_(True)
            (expected,) = torch.autograd.grad(layer(xx), xx, grad_outputs=output)
        finally:
            hook.remove()

        explainer = lrp.Explainer(nn.Sequential(layer).eval(), {module_type: ours()})
        got = explainer(x, output_relevance=output).relevance
        scale = expected.abs().max().clamp(min=1e-30)
        torch.testing.assert_close(got / scale, expected / scale, rtol=0, atol=1e-10,
                                   msg=lambda m, layer=layer: f"{layer}: {m}")
