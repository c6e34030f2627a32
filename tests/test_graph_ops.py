"""The graph pass's rules for operations that are not layers (docs/ENGINE_API.md, "Which
operation gets which rule"), each against the formula computed independently on a tiny model."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import lrp
from lrp.rules.residual import ResidualMerge

F64 = torch.float64


def explain(model: nn.Module, x: torch.Tensor, r_out: torch.Tensor, **options) -> torch.Tensor:
    composite = options.pop("composite", {nn.Linear: lrp.rules.Epsilon(0.0, zero_bias=True)})
    e = lrp.Explainer(model.double().eval(), composite, **options)(x, output_relevance=r_out)
    return e.relevance


class AddConstant(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.shift = nn.Parameter(torch.tensor([0.5, -1.0, 2.0], dtype=F64))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.shift


@pytest.mark.parametrize("zero_bias", [False, True])
def test_adding_a_parameter_is_a_bias(zero_bias: bool) -> None:
    x = torch.tensor([[1.0, 2.0, -3.0]], dtype=F64)
    r = torch.tensor([[1.0, 1.0, 1.0]], dtype=F64)
    got = explain(AddConstant(), x, r, composite="epsilon", epsilon=0.1, zero_bias=zero_bias)
    y = x + torch.tensor([0.5, -1.0, 2.0], dtype=F64)
    expected = r if zero_bias else r * x / (y + 0.1 * torch.where(y >= 0, 1.0, -1.0))
    torch.testing.assert_close(got, expected)


class LayerScale(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.gamma = nn.Parameter(torch.tensor([2.0, -0.5, 3.0], dtype=F64))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (x * self.gamma) / 4.0 - x.neg()


def test_scaling_by_constants_passes_relevance() -> None:
    """x * c, x / c and -x are diagonal linear maps; ``x*g/4 - (-x)`` is a two-term merge."""
    x = torch.tensor([[1.0, 2.0, -3.0]], dtype=F64)
    r = torch.tensor([[1.0, -2.0, 0.5]], dtype=F64)
    got = explain(LayerScale(), x, r)
    h1 = x * torch.tensor([2.0, -0.5, 3.0], dtype=F64) / 4.0
    h2 = x  # -(-x)
    share = h1.abs() / (h1.abs() + h2.abs())
    torch.testing.assert_close(got, r * share + r * (1 - share))  # both terms pass back to x
    assert got.sum() == pytest.approx(r.sum().item())


class Gated(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.signal = nn.Linear(4, 3)
        self.gate_fc = nn.Linear(4, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.signal(x) * torch.sigmoid(self.gate_fc(x))


def test_gate_gives_all_relevance_to_the_signal() -> None:
    torch.manual_seed(0)
    model = Gated().double().eval()
    x = torch.randn(2, 4, dtype=F64)
    r = torch.randn(2, 3, dtype=F64)
    got = explain(model, x, r)
    # the signal's linear layer under LRP-0 without bias, with the gated output's relevance
    w = model.signal.weight
    z = x @ w.T
    expected = x * ((r / z) @ w)
    torch.testing.assert_close(got, expected)


def test_gate_branch_is_not_run_backward() -> None:
    """The gate's branch gets no relevance, so autograd must not run its rules at all (a zero
    relevance materialised for it would cost the gate's pool over the whole signal, its
    convolutions and activations): recorded relevance reaches the signal's layer only."""
    torch.manual_seed(0)
    model = Gated().double().eval()
    e = lrp.Explainer(model, composite="lrp-0")(torch.randn(2, 4, dtype=F64), record_layers=True)
    assert "signal" in e.layer_relevance
    assert "gate_fc" not in e.layer_relevance
    # asked for its map, the gate's layer is left out, with a warning naming it
    with pytest.warns(UserWarning, match=r"no relevance reached the output of \['gate_fc'\]"):
        maps = lrp.Explainer(model, composite="lrp-0")(
            torch.randn(2, 4, dtype=F64), layer_maps=["signal", "gate_fc"]).layer_maps
    assert list(maps) == ["signal"]


def test_division_by_a_signal_that_is_no_statistic_is_an_error() -> None:
    """``x / x.sum()`` holds the sum (tests/test_graph_handwritten.py); ``x / (x * x + 1)`` has
    no rule."""

    class Normalised(nn.Module):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return x / (x * x + 1.0)

    with pytest.raises(lrp.UnsupportedOperationError, match="'truediv' of two input-dependent"):
        lrp.Explainer(Normalised().double())(torch.randn(2, 3, dtype=F64))


class ThreeWay(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Linear(3, 3, bias=False)
        self.b = nn.Linear(3, 3, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.a(x) + self.b(x) - x


def test_chained_merge_is_one_n_term_split() -> None:
    """``a(x) + b(x) - x``: one three-term merge, shares |h_i| / sum |h_j|, x the identity skip."""
    torch.manual_seed(1)
    model = ThreeWay().double().eval()
    x = torch.randn(2, 3, dtype=F64)
    r = torch.randn(2, 3, dtype=F64)
    explainer = lrp.Explainer(model, {nn.Linear: lrp.rules.Epsilon(0.0)})
    got = explainer(x, output_relevance=r).relevance
    merges = [m for m in explainer.prepared_model().modules() if isinstance(m, ResidualMerge)]
    assert len(merges) == 1 and merges[0].identity == (False, False, True)
    assert merges[0].coefficients == (1.0, 1.0, -1.0)
    ha, hb = model.a(x).detach(), model.b(x).detach()
    total = ha.abs() + hb.abs() + x.abs()
    ra, rb = r * ha.abs() / total, r * hb.abs() / total
    wa, wb = model.a.weight, model.b.weight
    expected = x * ((ra / ha) @ wa) + x * ((rb / hb) @ wb) + (r - ra - rb)
    torch.testing.assert_close(got, expected)


class FunctionalPools(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.avg_pool2d(F.relu(x), 2).mean((2, 3))


def test_functional_pools_get_the_proportional_rule_with_the_stabilizer() -> None:
    """``F.avg_pool2d`` and ``x.mean`` share relevance in proportion to their inputs; the
    ``stabilizer=`` option reaches them (issue 11)."""
    x = torch.rand(1, 2, 4, 4, dtype=F64) + 0.1
    r = torch.tensor([[1.0, 2.0]], dtype=F64)
    exact = explain(FunctionalPools(), x, r, stabilizer=0.0)
    expected = r.view(1, 2, 1, 1) * x / x.sum((2, 3), keepdim=True)
    torch.testing.assert_close(exact, expected)
    loose = explain(FunctionalPools(), x, r, stabilizer=1.0)
    assert (loose.sum() - r.sum()).abs() > 1e-2  # a large stabiliser absorbs relevance


class FoldPatches(nn.Module):
    """Overlapping 2x2 patches of the input, scaled per patch position, folded back (summed)."""

    def __init__(self, functional: bool) -> None:
        super().__init__()
        self.functional = functional
        self.unfold, self.fold = nn.Unfold(2), nn.Fold((4, 4), 2)
        self.scale = nn.Parameter(torch.linspace(0.5, 2.0, 8, dtype=F64).view(1, 8, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.functional:
            return F.fold(F.unfold(x, 2) * self.scale, (4, 4), 2)
        return self.fold(self.unfold(x) * self.scale)


@pytest.mark.parametrize("functional", [False, True], ids=["modules", "functional"])
def test_unfold_moves_and_fold_sums_relevance(functional: bool) -> None:
    """Unfold copies (its gradient sums the copies' relevance); Fold sums overlapping patches
    (the sum rule: each patch value's share of its output, LRP-0 with stabilizer 0). Checked
    against LRP-0 on the dense matrices of the two maps."""
    model = FoldPatches(functional).double().eval()
    g = torch.Generator().manual_seed(0)
    x = torch.rand(1, 2, 4, 4, dtype=F64, generator=g) + 0.1
    r = torch.rand(1, 2, 4, 4, dtype=F64, generator=g)
    got = explain(model, x, r, stabilizer=0.0)
    with torch.no_grad():
        patches = (F.unfold(x, 2) * model.scale).flatten()  # the fold's inputs, (P,)
        fold = torch.autograd.functional.jacobian(
            lambda p: F.fold(p.view(1, 8, -1), (4, 4), 2).flatten(), patches)  # (out, P)
        unfold = torch.autograd.functional.jacobian(
            lambda v: (F.unfold(v.view(1, 2, 4, 4), 2) * model.scale).flatten(), x.flatten())
    contributions = fold * patches  # LRP-0 through the fold: c_kp / sum_p c_kp
    r_patches = (contributions / contributions.sum(1, keepdim=True) * r.flatten()[:, None]).sum(0)
    c = unfold * x.flatten()  # each patch value is one input copy, scaled
    expected = (c / c.sum(1, keepdim=True) * r_patches[:, None]).sum(0)
    torch.testing.assert_close(got.flatten(), expected)
    torch.testing.assert_close(got.sum(), r.sum())


def test_functional_max_pool_is_winner_takes_all() -> None:
    class Pool(nn.Module):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return F.max_pool2d(x, 2).flatten(1)

    x = torch.tensor([[[[1.0, 5.0], [2.0, 3.0]]]], dtype=F64)
    got = explain(Pool(), x, torch.tensor([[4.0]], dtype=F64))
    torch.testing.assert_close(got, torch.tensor([[[[0.0, 4.0], [0.0, 0.0]]]], dtype=F64))


def test_otsuki_stem_pool_is_only_the_resnet_stem_shape() -> None:
    """The 2x2-average backward goes to a first 3x3/2/pad-1 max-pool only."""
    def net(pool: nn.Module) -> nn.Sequential:
        return nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.ReLU(), pool, nn.Flatten(),
                             nn.LazyLinear(2))

    stem = net(nn.MaxPool2d(3, 2, 1))
    other = net(nn.MaxPool2d(2, 2))
    x = torch.rand(1, 3, 8, 8)
    for model in (stem, other):
        model(x)  # materialise the lazy layer
    rules = lrp.Explainer(stem.eval(), "otsuki2024")
    rules(x)
    assert isinstance(rules.rules["2"], lrp.rules.Proportional) and rules.rules["2"].through
    plain = lrp.Explainer(other.eval(), "otsuki2024")
    plain(x)
    assert "2" not in plain.rules  # winner takes all: the ordinary gradient


def test_shape_queries_and_constants_carry_no_relevance() -> None:
    class Reshaping(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.fc = nn.Linear(8, 2, bias=False)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            n = x.shape[0]
            torch._assert(x.dim() == 4, "4-D input")
            h = torch.cat([x[:, :1], x[:, 1:]], dim=1).permute(0, 2, 3, 1).reshape(n, -1)
            return self.fc(h)

    torch.manual_seed(2)
    model = Reshaping().double().eval()
    x = torch.randn(3, 2, 2, 2, dtype=F64)
    e = lrp.Explainer(model, "lrp-0")(x)
    xg = x.clone().requires_grad_(True)
    (g,) = torch.autograd.grad(model(xg).gather(1, e.target[:, None]).sum(), xg)
    torch.testing.assert_close(e.relevance, g * x)  # LRP-0 on a linear model = gradient x input


class Mlp(nn.Module):
    """A transformer's MLP on tokens: an expanding Linear, an activation, an eval-mode dropout,
    the projection back. ``functional``: the activation as ``F.gelu``; ``leak``: its output is
    also read by the head (then nothing may be fused)."""

    def __init__(self, functional: bool = False, leak: bool = False) -> None:
        super().__init__()
        self.fc1 = nn.Linear(6, 24)
        self.act = nn.GELU()
        self.drop = nn.Dropout(0.1)
        self.fc2 = nn.Linear(24, 6)
        self.head = nn.Linear(6 + (24 if leak else 0), 4)
        self.functional, self.leak = functional, leak

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        a = F.gelu(self.fc1(x)) if self.functional else self.act(self.fc1(x))
        h = self.fc2(self.drop(a))
        return self.head(torch.cat([h, a], -1) if self.leak else h)


def _epsilon_mlp_reference(model: Mlp, x: torch.Tensor, target: torch.Tensor, eps: float):
    """The epsilon rule written out on the three weight matrices, the activation passing
    relevance unchanged: (relevance at x, relevance at the activation's output)."""

    def back(layer: nn.Linear, inp: torch.Tensor, r: torch.Tensor) -> torch.Tensor:
        z = F.linear(inp, layer.weight, layer.bias)
        den = z + eps * torch.where(z >= 0, 1.0, -1.0).to(z.dtype)  # sign(0) = +1
        return inp * ((r / den) @ layer.weight)

    with torch.no_grad():
        z1 = F.linear(x, model.fc1.weight, model.fc1.bias)
        a = F.gelu(z1)
        h = F.linear(a, model.fc2.weight, model.fc2.bias)
        out = F.linear(h, model.head.weight, model.head.bias)
        r_out = torch.zeros_like(out).scatter_(1, target[:, None], out.gather(1, target[:, None]))
        r_a = back(model.fc2, a, back(model.head, h, r_out))
        return back(model.fc1, x, r_a), r_a


@pytest.mark.parametrize("functional", [False, True], ids=["module", "functional"])
def test_mlp_activation_is_recomputed_inside_the_projection(functional: bool) -> None:
    """Linear -> GELU -> dropout -> Linear: the projection runs the activation on its input and
    keeps that input, so the expansion keeps its output instead of recomputing it; relevance
    (and the activation's recorded relevance) equals the epsilon rule on the matrices."""
    torch.manual_seed(0)
    model = Mlp(functional).double().eval()
    x = torch.randn(3, 6, dtype=F64)
    explainer = lrp.Explainer(model, composite={nn.Linear: lrp.rules.Epsilon(1e-3)})
    e = explainer(x, record_layers=True, layer_maps=["fc1", "fc2"])
    expected, r_act = _epsilon_mlp_reference(model, x, e.target, 1e-3)
    torch.testing.assert_close(e.relevance, expected, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(e.layer_maps["fc1"], r_act, rtol=1e-10, atol=1e-12)
    if not functional:  # the activation's and the dropout's paths are still reported
        for path in ("act", "drop"):
            torch.testing.assert_close(e.layer_relevance[path], r_act.sum(1))
        # and the activation module stays at its path in the copy (not registered under fc2)
        names = dict(explainer.prepared_model().named_modules())
        assert isinstance(names["act.module"], nn.GELU) and "fc2.input_fn" not in names
        calls = []  # a user's hook on it fires once per explanation, not again in the backward
        hook = names["act.module"].register_forward_hook(lambda m, i, o: calls.append(1))
        explainer(x)
        hook.remove()
        assert len(calls) == 1
    layers = {m.path: m for m in explainer.prepared_model().modules() if hasattr(m, "input_fn")}
    assert layers["fc2"].input_fn is not None and layers["fc1"].output_kept
    assert layers["fc1"].rule.kept_source(layers["fc1"]) == "output"


def test_mlp_activation_read_elsewhere_is_not_fused() -> None:
    torch.manual_seed(0)
    model = Mlp(leak=True).double().eval()
    explainer = lrp.Explainer(model, composite={nn.Linear: lrp.rules.Epsilon(1e-3)})
    e = explainer(torch.randn(3, 6, dtype=F64))
    layers = {m.path: m for m in explainer.prepared_model().modules() if hasattr(m, "input_fn")}
    assert layers["fc2"].input_fn is None and not layers["fc1"].output_kept
    assert torch.isfinite(e.relevance).all()
