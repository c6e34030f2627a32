"""LayerNorm / GroupNorm (sigma held constant, then epsilon) and the BatchNorm affine rule.

References are float64 and dense: the contribution matrix c[j, i] = x_j * d y_i / d x_j with sigma
fixed is built by index loops (LayerNorm) or from an explicit autograd Jacobian of the map with a
constant sigma (GroupNorm); denominators are the module's own output (bias included unless
zero_bias). Then R_j = sum_i c[j, i] / stab(den_i) R_i, stab(d) = d + eps sign(d), sign(0) = +1
(METHOD.md section 5, Ali et al. 2022, AttnLRP). The rules run as the engine runs them: wrapped in
``lrp.layers.ModuleRuleLayer`` and driven by ``torch.autograd.grad``.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

import lrp
from lrp.layers import ModuleRuleLayer
from lrp.rules import AffineEpsilon, GroupNormRule, LayerNormRule

F64 = torch.float64


def stab(d: torch.Tensor, eps: float) -> torch.Tensor:
    return d + eps * torch.where(d >= 0, 1.0, -1.0).to(d)


def run_rule(module: nn.Module, rule: lrp.rules.ModuleRule, x: torch.Tensor, R: torch.Tensor):
    layer = ModuleRuleLayer(module, rule, "norm")
    xx = x.clone().requires_grad_(True)
    out = layer(xx)
    with torch.no_grad():
        torch.testing.assert_close(out, module(x), rtol=0, atol=0)  # forward is the module's
    (r_in,) = torch.autograd.grad(out, xx, R)
    return r_in


def assert_close(actual: torch.Tensor, expected: torch.Tensor, rtol: float = 1e-10) -> None:
    assert actual.shape == expected.shape and actual.dtype == expected.dtype
    err = (actual - expected).abs().max()
    assert err <= rtol * expected.abs().max(), f"max abs error {err:.3e}"


def _randomise(module: nn.Module) -> nn.Module:
    with torch.no_grad():
        for name, p in module.named_parameters():
            p.copy_(torch.randn_like(p) * 0.8 + (1.0 if name == "weight" else 0.0))
    return module


# ----------------------------------------------------------------------------------------------
# LayerNorm and GroupNorm
# ----------------------------------------------------------------------------------------------


def layernorm_reference(ln: nn.LayerNorm, x, R, eps: float, zero_bias: bool) -> torch.Tensor:
    """Index loops over each normalised slice of m elements."""
    k = len(ln.normalized_shape)
    lead = x.shape[: x.ndim - k]
    m = int(torch.tensor(ln.normalized_shape).prod())
    xs, Rs = x.reshape(-1, m), R.reshape(-1, m)
    w = torch.ones(m, dtype=F64) if ln.weight is None else ln.weight.detach().reshape(m)
    b = torch.zeros(m, dtype=F64) if ln.bias is None else ln.bias.detach().reshape(m)
    with torch.no_grad():
        y = ln(x).reshape(-1, m)
    out = torch.zeros_like(xs)
    for s in range(xs.shape[0]):
        row = xs[s].tolist()
        mu = sum(row) / m
        sigma = (sum((v - mu) ** 2 for v in row) / m + ln.eps) ** 0.5
        c = torch.zeros(m, m, dtype=F64)  # c[j, i]
        for i in range(m):
            for j in range(m):
                c[j, i] = row[j] * ((1.0 if i == j else 0.0) - 1.0 / m) * w[i] / sigma
        # the contributions add up to the output without its bias (the references are valid)
        torch.testing.assert_close(c.sum(0) + b, y[s], rtol=1e-12, atol=1e-12)
        den = c.sum(0) if zero_bias else y[s]
        out[s] = c @ (Rs[s] / stab(den, eps))
    return out.reshape(*lead, *ln.normalized_shape)


def groupnorm_reference(gn: nn.GroupNorm, x, R, eps: float, zero_bias: bool) -> torch.Tensor:
    """Explicit Jacobian of the map with sigma fixed at its value for this sample."""
    n = x.shape[0]
    out = torch.zeros_like(x)
    G = gn.num_groups
    for s in range(n):
        xs = x[s]
        groups = xs.reshape(G, -1)
        sigma = (groups.var(1, unbiased=False) + gn.eps).sqrt().detach()

        def f(v, sigma=sigma):
            g = v.reshape(G, -1)
            yv = ((g - g.mean(1, keepdim=True)) / sigma[:, None]).reshape(v.shape)
            if gn.weight is not None:
                yv = yv * gn.weight.detach().view(-1, *([1] * (v.ndim - 1)))
            return yv

        J = torch.autograd.functional.jacobian(f, xs).reshape(xs.numel(), xs.numel())  # [i, j]
        c = xs.reshape(1, -1) * J  # c[i, j] = x_j dy_i/dx_j
        b = (
            torch.zeros_like(xs)
            if gn.bias is None
            else gn.bias.detach().view(-1, *([1] * (xs.ndim - 1)))
        )
        b = b.expand_as(xs).reshape(-1)
        with torch.no_grad():
            y = gn(xs[None])[0].reshape(-1)
        torch.testing.assert_close(c.sum(1) + b, y, rtol=1e-12, atol=1e-12)
        den = c.sum(1) if zero_bias else y
        out[s] = (c.T @ (R[s].reshape(-1) / stab(den, eps))).reshape(xs.shape)
    return out


def _ln_case(name: str) -> tuple[nn.Module, tuple[int, ...]]:
    if name == "ln-last":
        return _randomise(nn.LayerNorm(5)), (2, 3, 5)
    if name == "ln-last2":
        return _randomise(nn.LayerNorm((3, 4))), (2, 3, 4)
    if name == "ln-noaffine":
        return nn.LayerNorm(6, elementwise_affine=False), (3, 6)
    if name == "ln-nobias":
        return _randomise(nn.LayerNorm((2, 3), bias=False)), (2, 2, 2, 3)
    raise AssertionError(name)


def _gn_case(name: str) -> tuple[nn.Module, tuple[int, ...]]:
    if name == "gn-3groups":
        return _randomise(nn.GroupNorm(3, 6)), (2, 6, 2, 3)
    if name == "gn-1group":
        return _randomise(nn.GroupNorm(1, 4)), (2, 4, 3)
    if name == "gn-per-channel":
        return _randomise(nn.GroupNorm(4, 4)), (2, 4, 2, 2)
    if name == "gn-noaffine":
        return nn.GroupNorm(2, 4, affine=False), (2, 4, 3, 2)
    raise AssertionError(name)


CASES = [
    *("ln-last", "ln-last2", "ln-noaffine", "ln-nobias"),
    *("gn-3groups", "gn-1group", "gn-per-channel", "gn-noaffine"),
]


def _case(name: str):
    torch.manual_seed(sum(map(ord, name)))
    module, shape = (_ln_case if name.startswith("ln") else _gn_case)(name)
    module = module.to(F64).eval()
    x = torch.randn(*shape, dtype=F64) * 2 + 0.3
    R = torch.randn(*shape, dtype=F64)
    ref_fn = layernorm_reference if name.startswith("ln") else groupnorm_reference
    rule_cls = LayerNormRule if name.startswith("ln") else GroupNormRule
    return module, x, R, ref_fn, rule_cls


@pytest.mark.parametrize("eps", [1e-6, 0.1])
@pytest.mark.parametrize("zero_bias", [False, True])
@pytest.mark.parametrize("name", CASES)
def test_norm_matches_dense_reference(name: str, zero_bias: bool, eps: float) -> None:
    module, x, R, ref_fn, rule_cls = _case(name)
    got = run_rule(module, rule_cls(eps, zero_bias=zero_bias), x, R)
    assert_close(got, ref_fn(module, x, R, eps, zero_bias))


def test_layernorm_and_groupnorm_rule_are_one_rule() -> None:
    """GroupNorm(1, C) normalises like LayerNorm over (C, *) with per-channel affine."""
    torch.manual_seed(0)
    x = torch.randn(2, 3, 4, dtype=F64)
    R = torch.randn(2, 3, 4, dtype=F64)
    gn = _randomise(nn.GroupNorm(1, 3)).to(F64)
    ln = nn.LayerNorm((3, 4)).to(F64)
    with torch.no_grad():
        ln.weight.copy_(gn.weight[:, None].expand(3, 4))
        ln.bias.copy_(gn.bias[:, None].expand(3, 4))
    assert_close(run_rule(gn, GroupNormRule(), x, R), run_rule(ln, LayerNormRule(), x, R))


@pytest.mark.parametrize("name", CASES)
def test_norm_zero_bias_conserves(name: str) -> None:
    module, x, R, _, rule_cls = _case(name)
    got = run_rule(module, rule_cls(0.0, zero_bias=True), x, R)
    torch.testing.assert_close(got.flatten(1).sum(1), R.flatten(1).sum(1), rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("name", ["ln-last", "ln-last2", "gn-3groups", "gn-1group"])
def test_norm_bias_absorbs_its_share(name: str) -> None:
    """sum R_in = sum_i R_i (y_i - b_i) / stab(y_i): the bias keeps b_i / stab(y_i) of R_i."""
    module, x, R, _, rule_cls = _case(name)
    eps = 1e-6
    got = run_rule(module, rule_cls(eps), x, R)
    with torch.no_grad():
        y = module(x)
    b = module.bias.detach()
    b = b if isinstance(module, nn.LayerNorm) else b.view(-1, *([1] * (x.ndim - 2)))
    expected = (R * (y - b) / stab(y, eps)).flatten(1).sum(1)
    torch.testing.assert_close(got.flatten(1).sum(1), expected, rtol=1e-10, atol=1e-12)
    gap = (got.flatten(1).sum(1) - R.flatten(1).sum(1)).abs()
    assert (gap > 1e-3).all()  # not conservative with the bias in the denominators


def test_norm_rejects_other_modules() -> None:
    with pytest.raises(lrp.UnsupportedLayerError, match="LayerNorm"):
        run_rule(nn.BatchNorm1d(3).eval(), LayerNormRule(), torch.randn(2, 3), torch.randn(2, 3))


def test_layernorm_in_a_network_conserves() -> None:
    """Linear -> LayerNorm -> ReLU -> Linear explained end to end, biases out of all denominators."""
    torch.manual_seed(3)
    model = nn.Sequential(
        nn.Linear(6, 8), _randomise(nn.LayerNorm(8)), nn.ReLU(), nn.Linear(8, 3)
    ).to(F64)
    x = torch.randn(4, 6, dtype=F64)
    comp = {nn.Linear: lrp.rules.LRP0(zero_bias=True), nn.LayerNorm: LayerNormRule(0.0, True)}
    e = lrp.Explainer(model.eval(), composite=comp)(x)
    tl = e.logits.gather(1, e.target[:, None])[:, 0]
    torch.testing.assert_close(e.relevance.sum(1), tl, rtol=1e-9, atol=1e-12)


# ----------------------------------------------------------------------------------------------
# BatchNorm that follows no Linear/Conv: per-channel affine map under the epsilon rule
# ----------------------------------------------------------------------------------------------


def _bn(kind: str) -> tuple[nn.Module, tuple[int, ...]]:
    bn, shape = {
        "bn1d": (nn.BatchNorm1d(4), (3, 4)),
        "bn1d-seq": (nn.BatchNorm1d(3), (2, 3, 5)),
        "bn2d": (nn.BatchNorm2d(3), (2, 3, 4, 2)),
        "bn2d-noaffine": (nn.BatchNorm2d(3, affine=False), (2, 3, 2, 2)),
    }[kind]
    bn = bn.to(F64)
    with torch.no_grad():
        bn.running_mean.normal_()
        bn.running_var.uniform_(0.3, 2.0)
        bn.eps = 1e-3
        if bn.affine:
            bn.weight.normal_()
            bn.bias.normal_()
    return bn.eval(), shape


def bn_reference(bn: nn.Module, x: torch.Tensor, R: torch.Tensor, eps: float) -> torch.Tensor:
    """Element by element: R_in = a_c x / stab(y) R with y the module's own output."""
    with torch.no_grad():
        y = bn(x)
    out = torch.zeros_like(x)
    for idx in torch.cartesian_prod(*[torch.arange(s) for s in x.shape]).tolist():
        idx = tuple(idx)
        c = idx[1]
        w = 1.0 if bn.weight is None else bn.weight[c].item()
        a = w / (bn.running_var[c].item() + bn.eps) ** 0.5
        out[idx] = a * x[idx] / stab(y[idx], eps) * R[idx]
    return out


@pytest.mark.parametrize("eps", [1e-6, 0.5])
@pytest.mark.parametrize("kind", ["bn1d", "bn1d-seq", "bn2d", "bn2d-noaffine"])
def test_batchnorm_affine_matches_reference(kind: str, eps: float) -> None:
    torch.manual_seed(len(kind))
    bn, shape = _bn(kind)
    x, R = torch.randn(*shape, dtype=F64), torch.randn(*shape, dtype=F64)
    got = run_rule(bn, AffineEpsilon(eps), x, R)
    assert_close(got, bn_reference(bn, x, R, eps))
    # the shift (bias - mean * a) absorbs relevance: not conservative
    assert (got.flatten(1).sum(1) - R.flatten(1).sum(1)).abs().min() > 1e-3


@pytest.mark.parametrize("kind", ["bn1d", "bn2d"])
def test_batchnorm_affine_zero_bias_is_identity(kind: str) -> None:
    torch.manual_seed(5)
    bn, shape = _bn(kind)
    x, R = torch.randn(*shape, dtype=F64), torch.randn(*shape, dtype=F64)
    x[0, 0] = 0.0  # a x = 0: the single contribution still takes all of R
    got = run_rule(bn, AffineEpsilon(1e-6, zero_bias=True), x, R)
    assert torch.equal(got, R)
    # the limit of the formula with c out of the denominator (eps -> 0, a x != 0)
    with torch.no_grad():
        ax = bn(x) - (
            bn.bias - bn.running_mean * bn.weight / (bn.running_var + bn.eps).sqrt()
        ).view(-1, *([1] * (x.ndim - 2)))
    nz = ax != 0
    torch.testing.assert_close(got[nz], (ax / ax * R)[nz], rtol=1e-12, atol=1e-12)


def test_batchnorm_affine_needs_running_statistics() -> None:
    bn, shape = _bn("bn2d")
    x, R = torch.randn(*shape, dtype=F64), torch.randn(*shape, dtype=F64)
    with pytest.raises(lrp.UnsupportedLayerError, match="batch statistics"):
        run_rule(bn.train(), AffineEpsilon(), x, R)
    with pytest.raises(lrp.UnsupportedLayerError, match="BatchNorm"):
        run_rule(nn.LayerNorm(shape[1:]).to(F64), AffineEpsilon(), x, R)
