"""Operations people write by hand instead of using a layer, each against the rule computed
independently (dense LRP-0 through the weights, the layer the code stands for, or autograd where
the rule is the gradient): products with a parameter, norms written out (RMSNorm, LayerNorm,
division by a sum), InstanceNorm, max/min over dims, flips (docs/ENGINE_API.md "Which operation
gets which rule")."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from test_graph_ops_zoo import F64, explain, lrp0
from torch import nn

import lrp


# ------------------------------------------------------------------ products with a parameter
class ParameterProduct(nn.Module):
    """``relu(l1(x))`` times a parameter matrix, written as ``form``."""

    def __init__(self, form: str) -> None:
        super().__init__()
        self.form = form
        self.l1 = nn.Linear(4, 5, bias=False)
        self.w = nn.Parameter(torch.randn(5, 3))
        self.b = nn.Parameter(torch.randn(3))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = F.relu(self.l1(x))
        if self.form == "matmul":
            return h @ self.w
        if self.form == "mm":
            return torch.mm(h, self.w)
        if self.form == "method":
            return h.matmul(self.w)
        if self.form == "addmm":
            return torch.addmm(self.b, h, self.w)
        return torch.einsum("nj,jk->nk", h, self.w)


@pytest.mark.parametrize("form", ["matmul", "mm", "method", "addmm", "einsum"])
def test_product_with_a_parameter_is_linear_in_the_signal(form: str) -> None:
    """The parameter gets no relevance (it used to get half, silently, as a second factor)."""
    torch.manual_seed(0)
    model = ParameterProduct(form).double().eval()
    x = torch.randn(6, 4, dtype=F64)
    r = torch.randn(6, 3, dtype=F64)
    got = explain(model, x, r, zero_bias=True, epsilon=0.0)
    with torch.no_grad():
        h = F.relu(model.l1(x))
    expected = lrp0(model.l1.weight, x, lrp0(model.w.T, h, r))
    torch.testing.assert_close(got, expected)
    torch.testing.assert_close(got.sum(1), r.sum(1))


@pytest.mark.parametrize("composite", ["epsilon-plus-flat", "epsilon", "otsuki2024"])
@pytest.mark.parametrize("form", ["matmul", "addmm"])
def test_matmul_with_a_parameter_gets_the_composites_linear_rule(composite: str, form: str) -> None:
    """``x @ W (+ b)`` explains as the nn.Linear holding W^T and b, whatever the composite."""
    torch.manual_seed(1)
    model = ParameterProduct(form).double().eval()
    linear = nn.Linear(5, 3, bias=form == "addmm").double()
    with torch.no_grad():
        linear.weight.copy_(model.w.T)
        if form == "addmm":
            linear.bias.copy_(model.b)
    reference = nn.Sequential(model.l1, nn.ReLU(), linear).eval()
    x = torch.randn(6, 4, dtype=F64)
    got = lrp.Explainer(model, composite)(x).relevance
    torch.testing.assert_close(got, lrp.Explainer(reference, composite)(x).relevance)


# ------------------------------------------------------------------ norms written out
class Normalised(nn.Module):
    """``l2(norm(l1(x)))`` with the normalisation written as ``form``."""

    def __init__(self, form: str) -> None:
        super().__init__()
        self.form = form
        self.l1 = nn.Linear(4, 6, bias=False)
        self.l2 = nn.Linear(6, 3, bias=False)
        self.rms = nn.RMSNorm(6, eps=1e-6)
        with torch.no_grad():
            self.rms.weight.copy_(torch.linspace(-1.5, 2.0, 6))

    def norm(self, h: torch.Tensor) -> torch.Tensor:
        w = self.rms.weight
        if self.form == "rsqrt":  # LLaMA's RMSNorm
            return h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + 1e-6) * w
        if self.form == "pow":
            return h / (h.square().mean(-1, keepdim=True) + 1e-6) ** 0.5 * w
        if self.form == "functional":
            return F.rms_norm(h, (6,), w, 1e-6)
        if self.form == "module":
            return self.rms(h)
        p = F.relu(h)
        if self.form == "sum":  # BAT's p / p.sum()
            return p / p.sum(-1, keepdim=True)
        return p / (p.abs().sum(-1, keepdim=True) + 1e-6)  # abs has no rule: it only feeds a sum

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.l2(self.norm(self.l1(x)))


@pytest.mark.parametrize("form", ["rsqrt", "pow", "functional", "module", "sum", "l1"])
def test_a_normalising_statistic_is_held_constant(form: str) -> None:
    """The statistic (a mean of squares, a sum) scales the signal: relevance passes through the
    normalisation unchanged, as through LayerNorm's sigma, and none enters the statistic (a
    LayerNorm from mean and variance: tests/test_graph_ops_zoo.py)."""
    torch.manual_seed(2)
    model = Normalised(form).double().eval()
    x = torch.randn(5, 4, dtype=F64)
    r = torch.randn(5, 3, dtype=F64)
    got = explain(model, x, r)
    with torch.no_grad():
        y = model.norm(model.l1(x))
    expected = lrp0(model.l1.weight, x, lrp0(model.l2.weight, y, r))
    torch.testing.assert_close(got, expected)


def test_sqrt_of_a_signal_that_is_no_statistic_is_refused() -> None:
    """Only a reduction carried by element-wise arithmetic is a statistic; the square root of
    a signal is not one, and has no rule."""

    class Product(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.a = nn.Linear(4, 3, bias=False)
            self.b = nn.Linear(4, 3, bias=False)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.a(x) * torch.sqrt(F.relu(self.b(x)) + 1.0)

    model = Product().double().eval()
    x = torch.randn(2, 4, dtype=F64)
    with pytest.raises(lrp.UnsupportedOperationError, match="'sqrt'"):
        explain(model, x, torch.randn(2, 3, dtype=F64))


# ------------------------------------------------------------------ InstanceNorm
@pytest.mark.parametrize("affine", [True, False])
def test_instance_norm_is_group_norm_with_a_group_per_channel(affine: bool) -> None:
    torch.manual_seed(4)
    inorm = nn.InstanceNorm2d(3, affine=affine)
    gnorm = nn.GroupNorm(3, 3, affine=affine)
    if affine:
        with torch.no_grad():
            for p in (inorm.weight, inorm.bias):
                p.normal_()
        gnorm.load_state_dict(inorm.state_dict())
    conv = nn.Conv2d(2, 3, 3, padding=1)
    head = nn.Linear(3 * 16, 2)

    def model(norm: nn.Module) -> nn.Module:
        return nn.Sequential(conv, norm, nn.ReLU(), nn.Flatten(), head).double().eval()

    x = torch.randn(2, 2, 4, 4, dtype=F64)
    got = lrp.Explainer(model(inorm), "epsilon")(x).relevance
    torch.testing.assert_close(got, lrp.Explainer(model(gnorm), "epsilon")(x).relevance)


def test_instance_norm_with_running_statistics_is_a_channel_affine_map() -> None:
    """In eval mode with ``track_running_stats`` it is the stand-alone BatchNorm's map."""
    torch.manual_seed(5)
    inorm = nn.InstanceNorm2d(3, affine=True, track_running_stats=True)
    bnorm = nn.BatchNorm2d(3)
    with torch.no_grad():
        for t in (inorm.weight, inorm.bias, inorm.running_mean):
            t.normal_()
        inorm.running_var.uniform_(0.5, 2.0)
    bnorm.load_state_dict(inorm.state_dict())
    conv, head = nn.Conv2d(2, 3, 3, padding=1), nn.Linear(3 * 16, 2)

    def model(norm: nn.Module) -> nn.Module:  # the ReLU keeps the norm from being folded
        return nn.Sequential(conv, nn.ReLU(), norm, nn.Flatten(), head).double().eval()

    x = torch.randn(2, 2, 4, 4, dtype=F64)
    got = lrp.Explainer(model(inorm), "epsilon")(x).relevance
    torch.testing.assert_close(got, lrp.Explainer(model(bnorm), "epsilon")(x).relevance)


# ------------------------------------------------------------------ ops whose gradient is the rule
MOVES = {
    "amax": lambda x: x.amax((2, 3)),
    "torch.amin": lambda x: torch.amin(x, dim=-1),
    "max.values": lambda x: x.flatten(2).max(-1).values,
    "torch.max[0]": lambda x: torch.max(x, dim=1)[0],
    "min over all": lambda x: x.min().expand(x.shape[0]),
    "flip": lambda x: torch.flip(x, [2]),
    "Tensor.flip": lambda x: x.flip(-1),
    "rot90": lambda x: torch.rot90(x, 1, (2, 3)),
    "roll": lambda x: x.roll(1, 3),
    "repeat_interleave": lambda x: x.repeat_interleave(2, dim=1),
    "index_select": lambda x: x.index_select(1, torch.tensor([2, 0])),
}


class Move(nn.Module):
    def __init__(self, name: str) -> None:
        super().__init__()
        self.name = name

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return MOVES[self.name](x).reshape(x.shape[0], -1)


@pytest.mark.parametrize("name", list(MOVES))
def test_selections_and_rearrangements_move_relevance_by_their_gradient(name: str) -> None:
    """Max/min pick one input (winner takes all, as max-pools); flips and rolls permute; repeats
    copy (the gradient sums the copies)."""
    torch.manual_seed(6)
    x = torch.randn(2, 3, 4, 5, dtype=F64)
    out = Move(name)(x)
    r = torch.randn_like(out)
    got = explain(Move(name), x, r)
    xg = x.clone().requires_grad_(True)
    (expected,) = torch.autograd.grad(Move(name)(xg), xg, r)
    torch.testing.assert_close(got, expected)


def test_elementwise_max_of_two_signals_is_refused() -> None:
    class Max(nn.Module):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return torch.max(x, x.flip(-1)).flatten(1)

    x = torch.randn(2, 3, dtype=F64)
    with pytest.raises(lrp.UnsupportedOperationError, match="'max'"):
        explain(Max(), x, torch.randn(2, 3, dtype=F64))
