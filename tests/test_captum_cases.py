"""Captum's published LRP test cases, re-created for this engine.

Source: pytorch/captum, ``tests/attr/test_lrp.py`` (read at commit 09aa048) and the models it
imports from ``captum/testing/helpers/basic_models.py`` (``SimpleLRPModel``,
``BasicModel_ConvNet_One_Conv``; captum 0.9.0). The models are rebuilt here with the same fixed
weights and the expected relevances are Captum's, not produced by this engine.

Rule mapping: Captum's EpsilonRule (default, epsilon 1e-9) -> ``Epsilon(1e-9)``; GammaRule ->
``Gamma(gamma, stabilizer=1e-9)``; Alpha1_Beta0_Rule -> ``ZPlus(1e-9)``; IdentityRule -> ``Pass``.
Captum keeps the bias in every denominator (its rules divide by the layer's output), so
zero_bias=False throughout; its Gamma and Alpha1_Beta0 modify only the weights, which equals
ours on these cases (non-negative inputs, no biases). Captum's EpsilonRule on an addition module
is the proportional split of ``residual="proportional"``. Captum explains the target's output
value (our ``output="logit"``).

Captum's LayerLRP cases (relevance at an inner layer) are checked on ``layer_maps``.

Four cases need the traced engine: models without Linear/Conv layers, an addition module inside
a model, outputs of shape (N, K, *) explained for the target channel.
"""

from __future__ import annotations

import pytest
import torch
from torch import Tensor, nn

import lrp

EPS = lrp.rules.Epsilon(1e-9)
ATOL = 1e-4  # Captum's assertTensorAlmostEqual default delta


def check(relevance: Tensor, expected: list) -> None:
    torch.testing.assert_close(
        relevance, torch.tensor(expected, dtype=relevance.dtype), atol=ATOL, rtol=0
    )


class SimpleLRP(nn.Module):
    """Captum's SimpleLRPModel: Linear(3, 3) of 2s, ReLU, Linear(3, 1) of 3s, Dropout."""

    def __init__(self) -> None:
        super().__init__()
        self.linear = nn.Linear(3, 3, bias=False)
        self.relu = nn.ReLU()
        self.linear2 = nn.Linear(3, 1, bias=False)
        self.dropout = nn.Dropout(p=0.01)
        with torch.no_grad():
            self.linear.weight.fill_(2.0)
            self.linear2.weight.fill_(3.0)

    def forward(self, x: Tensor) -> Tensor:
        return self.dropout(self.linear2(self.relu(self.linear(x))))


def _simple(negative_corner: bool = False) -> nn.Module:
    model = SimpleLRP().eval()
    if negative_corner:  # Captum: model.linear.weight.data[0][0] = -2
        with torch.no_grad():
            model.linear.weight[0, 0] = -2.0
    return model


X3 = [[1.0, 2.0, 3.0]]


class OneConv(nn.Module):
    """Captum's BasicModel_ConvNet_One_Conv with its fixed weights."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(1, 2, 3, 1)
        self.relu1 = nn.ReLU()
        self.fc1 = nn.Linear(8, 4)
        self.relu2 = nn.ReLU()
        with torch.no_grad():
            self.conv1.weight.fill_(1.0)
            self.conv1.bias.copy_(torch.tensor([-50.0, -75.0]))
            self.fc1.weight.copy_(torch.cat([torch.ones(4, 5), -torch.ones(4, 3)], dim=1))
            self.fc1.bias.zero_()

    def forward(self, x: Tensor) -> Tensor:
        x = self.relu1(self.conv1(x))
        return self.relu2(self.fc1(x.view(-1, 8)))


def test_basic_one_conv() -> None:
    """test_lrp_basic_attributions: BasicModel_ConvNet_One_Conv, default (epsilon) rules."""
    model = OneConv().eval()
    x = torch.arange(16).view(1, 1, 4, 4).float()
    e = lrp.Explainer(model, composite={(nn.Conv2d, nn.Linear): EPS})(x)
    assert e.target.tolist() == [0]
    check(e.relevance, [[[[0, 1, 2, 3], [0, 5, 6, 7], [0, 9, 10, 11], [0, 0, 0, 0]]]])
    assert lrp.conservation(e).item() < 1e-6  # Captum asserts delta == 0


def test_simple_epsilon() -> None:
    """test_lrp_simple_attributions."""
    e = lrp.Explainer(_simple(), composite={nn.Linear: EPS})(torch.tensor(X3))
    check(e.relevance, [[18.0, 36.0, 54.0]])


def test_simple_epsilon_batch() -> None:
    """test_lrp_simple_attributions_batch: target 0, a batch of x and 3x."""
    x = torch.tensor(X3)
    e = lrp.Explainer(_simple(), composite={nn.Linear: EPS})(torch.cat((x, 3 * x)), target=0)
    check(e.relevance, [[18.0, 36.0, 54.0], [54.0, 108.0, 162.0]])


def test_simple_tanh() -> None:
    """test_lrp_simple_tanh: Tanh passes relevance ('result if tanh is skipped')."""

    class TanhModel(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.linear = nn.Linear(3, 3, bias=False)
            self.tanh = nn.Tanh()
            self.linear2 = nn.Linear(3, 1, bias=False)
            with torch.no_grad():
                self.linear.weight.fill_(0.1)
                self.linear2.weight.fill_(0.1)

        def forward(self, x: Tensor) -> Tensor:
            return self.linear2(self.tanh(self.linear(x)))

    e = lrp.Explainer(TanhModel().eval(), composite={nn.Linear: EPS})(torch.tensor(X3))
    check(e.relevance, [[0.0269, 0.0537, 0.0806]])


def test_simple_gamma() -> None:
    """test_lrp_simple_attributions_GammaRule: gamma 1 on linear, 0.25 on linear2."""
    comp = {
        "linear": lrp.rules.Gamma(1.0, stabilizer=1e-9),
        "linear2": lrp.rules.Gamma(0.25, stabilizer=1e-9),
    }
    e = lrp.Explainer(_simple(negative_corner=True), composite=comp)(torch.tensor(X3))
    check(e.relevance, [[28 / 3, 104 / 3, 52.0]])


def test_simple_alpha1_beta0() -> None:
    """test_lrp_simple_attributions_AlphaBeta: Alpha1_Beta0 on both layers."""
    comp = {nn.Linear: lrp.rules.ZPlus(1e-9)}
    e = lrp.Explainer(_simple(negative_corner=True), composite=comp)(torch.tensor(X3))
    check(e.relevance, [[12.0, 33.6, 50.4]])
    comp_ab = {nn.Linear: lrp.rules.AlphaBeta(1.0, 0.0, 1e-9)}
    e_ab = lrp.Explainer(_simple(negative_corner=True), composite=comp_ab)(torch.tensor(X3))
    check(e_ab.relevance, [[12.0, 33.6, 50.4]])


def test_identity_rule() -> None:
    """test_lrp_Identity: IdentityRule on linear (3 -> 3), epsilon on linear2."""
    comp = {"linear": lrp.rules.Pass(), "linear2": EPS}
    e = lrp.Explainer(_simple(negative_corner=True), composite=comp)(torch.tensor(X3))
    check(e.relevance, [[24.0, 36.0, 36.0]])


class AdditionModule(nn.Module):
    """Captum's Addition_Module: a module whose forward returns x1 + x2."""

    def forward(self, x1: Tensor, x2: Tensor) -> Tensor:
        return x1 + x2


def test_skip_connection() -> None:
    """test_lrp_skip_connection: epsilon on the addition = proportional split; target 1."""

    class SkipConnection(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.linear = nn.Linear(2, 2, bias=False)
            self.add = AdditionModule()
            with torch.no_grad():
                self.linear.weight.fill_(5.0)

        def forward(self, x: Tensor) -> Tensor:
            return self.add(self.linear(x), x)

    explainer = lrp.Explainer(
        SkipConnection().eval(), composite={nn.Linear: EPS}, residual="proportional"
    )
    e = explainer(torch.tensor([[2.0, 3.0]]), target=1)
    check(e.relevance, [[10.0, 18.0]])


def test_maxpool1d_after_linear() -> None:
    """test_lrp_maxpool1D: output (N, K, 1); the tie goes to the first maximum (the gradient)."""

    class MaxPoolModel(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.linear = nn.Linear(2, 2, bias=False)
            self.maxpool = nn.MaxPool1d(2)
            with torch.no_grad():
                self.linear.weight.fill_(2.0)

        def forward(self, x: Tensor) -> Tensor:
            return self.maxpool(self.linear(x))

    e = lrp.Explainer(MaxPoolModel().eval(), composite={nn.Linear: EPS})(
        torch.tensor([[[1.0, 2.0], [5.0, 6.0]]]), target=1
    )
    check(e.relevance, [[[0.0, 0.0], [10.0, 12.0]]])


def test_maxpool2d_only() -> None:
    """test_lrp_maxpool2D: a model with no Linear/Conv layer, output (N, C, H, W)."""
    model = nn.Sequential(nn.MaxPool2d(2)).eval()
    e = lrp.Explainer(model, composite={})(torch.tensor([[[[1.0, 2.0], [5.0, 6.0]]]]), target=0)
    check(e.relevance, [[[[0.0, 0.0], [0.0, 6.0]]]])


def test_maxpool3d_only() -> None:
    """test_lrp_maxpool3D."""
    model = nn.Sequential(nn.MaxPool3d(2)).eval()
    x = torch.tensor([[[[[1.0, 2.0], [5.0, 6.0]], [[3.0, 4.0], [7.0, 8.0]]]]])
    e = lrp.Explainer(model, composite={})(x, target=0)
    check(e.relevance, [[[[[0.0, 0.0], [0.0, 0.0]], [[0.0, 0.0], [0.0, 8.0]]]]])


# Captum's LayerLRP cases (tests/attr/layer/test_layer_lrp.py, same models and rules): the
# relevance at a layer's output is ``layer_maps``; at its input, the map of the module before it


def test_layer_basic_one_conv() -> None:
    """test_lrp_basic_attributions (LayerLRP on conv1): the map at conv1's output."""
    x = torch.arange(16).view(1, 1, 4, 4).float()
    e = lrp.Explainer(OneConv().eval(), composite={(nn.Conv2d, nn.Linear): EPS})(
        x, layer_maps=["conv1"])
    check(e.layer_maps["conv1"], [[[[0, 4], [31, 40]], [[0, 0], [-6, -15]]]])


def test_layer_simple_epsilon() -> None:
    """test_lrp_simple_attributions and _all_layers: linear2's input (the ReLU's output) and
    linear's output hold the same relevance; linear's input is the input relevance."""
    e = lrp.Explainer(_simple(), composite={nn.Linear: EPS})(
        torch.tensor(X3), layer_maps=["linear", "relu"])
    torch.testing.assert_close(e.layer_maps["relu"], e.layer_maps["linear"])
    check(e.layer_maps["linear"], [[36.0, 36.0, 36.0]])
    check(e.relevance, [[18.0, 36.0, 54.0]])
    assert lrp.conservation(e).item() < 1e-6  # Captum: delta == 0


@pytest.mark.parametrize("rule", ["gamma", "zplus"])
def test_layer_simple_gamma_and_zplus(rule: str) -> None:
    """test_lrp_simple_attributions_GammaRule / _AlphaBeta (LayerLRP on linear)."""
    comp = (
        {"linear": lrp.rules.Gamma(1.0, stabilizer=1e-9),
         "linear2": lrp.rules.Gamma(0.25, stabilizer=1e-9)}
        if rule == "gamma" else {nn.Linear: lrp.rules.ZPlus(1e-9)}
    )  # fmt: skip
    model = _simple(negative_corner=True)
    before = model(torch.tensor(X3))
    e = lrp.Explainer(model, composite=comp)(torch.tensor(X3), layer_maps=["linear"])
    check(e.layer_maps["linear"], [[24.0, 36.0, 36.0]])
    torch.testing.assert_close(model(torch.tensor(X3)), before)  # _repeat_attributions
