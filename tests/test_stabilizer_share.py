"""``stabilizer_share="flat"``: the stabiliser's share of each output's relevance is spread flat
over the output's inputs instead of being absorbed (issue 11: otsuki2024's published eps 1e-5
absorbed up to 2 % at depthwise convolutions).

References are dense and independent of lrp.rules (tests/test_rules_dense.py's matrices): for a
rule with contributions c_jk >= 0 and denominator den_k = sum_j c_jk (+ b+), the plain rule gives
R_j = sum_k c_jk / (den_k + eps) R_k; "flat" adds sum_k eps / (den_k + eps) R_k / |F(k)| for every
input j in the receptive field F(k) of output k (zero padding excluded), pools: in proportion to
the pool's own weights. A large eps makes the share large, so every test here can fail.
"""

from __future__ import annotations

import zlib

import pytest
import torch
from test_rules_dense import F64, assert_close, dense_layer, dense_map, pos, propagate
from test_zplus_empty import _layer, _positive_part, _receptive_field, _reference
from torch import nn

import lrp

EPS = 0.3  # large on purpose: the stabiliser's share is O(1) of the relevance


def _flat(conn: torch.Tensor, share: torch.Tensor) -> torch.Tensor:
    """sum_k share[n, k] spread uniformly over the inputs connected to output k."""
    return torch.einsum("kj,nk->nj", conn / conn.sum(1, keepdim=True), share)


@pytest.mark.parametrize("bias", [True, False], ids=["bias", "zero-bias"])
@pytest.mark.parametrize("nonnegative", [True, False], ids=["after-relu", "signed-input"])
@pytest.mark.parametrize("rule", ["zplus", "ab21"])
@pytest.mark.parametrize(
    "kind", ["linear", "conv1d-s2", "conv2d-g2", "conv2d-depthwise-s2", "conv2d-all"]
)
def test_alpha_beta_share_flat_dense(kind: str, rule: str, nonnegative: bool, bias: bool) -> None:
    torch.manual_seed(zlib.crc32(repr((kind, rule, nonnegative, bias)).encode()))
    layer, shape = _layer(kind, bias=True)  # channel 0 has only negative weights: empty outputs
    n = 3
    x = torch.randn(n, *shape, dtype=F64) * (torch.rand(n, *shape, dtype=F64) < 0.4)
    x[0].abs_()
    if nonnegative:
        model, x_layer = nn.Sequential(nn.ReLU(), layer, nn.Flatten()).eval(), x.clamp(min=0)
    else:
        model, x_layer = nn.Sequential(layer, nn.Flatten()).eval(), x
    alpha, beta = (1.0, 0.0) if rule == "zplus" else (2.0, 1.0)

    def make(share: str) -> lrp.rules.AlphaBeta:
        if rule == "zplus":
            return lrp.rules.ZPlus(EPS, zero_bias=not bias, stabilizer_share=share)
        return lrp.rules.AlphaBeta(alpha, beta, EPS, stabilizer_share=share)

    use_bias = bias or rule != "zplus"
    with torch.no_grad():
        K = model(x).shape[1]
    R = torch.randn(n, K, dtype=F64)

    W, b = dense_layer(layer, shape)
    conn = _receptive_field(layer, shape)
    x_flat = x_layer.reshape(n, -1)
    plain, _ = _reference(W, b, conn, x_flat, R, alpha, beta, EPS, use_bias, flat=False)
    _, den_pos = _positive_part(W, b if use_bias else torch.zeros_like(b), x_flat)
    share = alpha * R * EPS / (den_pos + EPS)
    assert (den_pos == 0).any() and (den_pos > 0).any()  # empty and non-empty outputs

    absorb = lrp.Explainer(model, composite={type(layer): make("absorb")})
    flat = lrp.Explainer(model, composite={type(layer): make("flat")})
    r_absorb = absorb(x, output_relevance=R).relevance.reshape(n, -1)
    r_flat = flat(x, output_relevance=R).relevance.reshape(n, -1)
    # absorb is the plain rule, plus (its default empty="flat") empty outputs spread whole
    assert_close(r_absorb, plain + _flat(conn, alpha * R * (den_pos == 0)))
    assert_close(r_flat, plain + _flat(conn, share))
    if rule == "zplus" and not bias:  # no bias, nothing absorbed: exactly conservative
        torch.testing.assert_close(r_flat.sum(1), R.sum(1), rtol=1e-12, atol=1e-12)
        assert ((r_absorb.sum(1) - R.sum(1)).abs() > 1e-3).any()


@pytest.mark.parametrize(
    "rule",
    [
        lambda s: lrp.rules.Flat(EPS, stabilizer_share=s),
        lambda s: lrp.rules.WSquare(EPS, stabilizer_share=s),
        lambda s: lrp.rules.ZPlusOnes(EPS, stabilizer_share=s),
    ],
    ids=["flat", "wsquare", "zplus-ones"],
)
@pytest.mark.parametrize("kind", ["linear", "conv2d-g2", "conv2d-all"])
def test_input_free_rules_share_flat_dense(kind: str, rule) -> None:
    torch.manual_seed(zlib.crc32(kind.encode()))
    layer, shape = _layer(kind, bias=False)  # z+ with ones: channel 0 has no positive weight
    model = nn.Sequential(layer, nn.Flatten()).eval()
    x = torch.randn(2, *shape, dtype=F64)
    with torch.no_grad():
        K = model(x).shape[1]
    R = torch.randn(2, K, dtype=F64)
    W, _ = dense_layer(layer, shape)
    conn = _receptive_field(layer, shape)
    transformed = {"Flat": conn, "WSquare": W * W, "ZPlusOnes": pos(W)}
    r_flat = rule("flat")
    c = transformed[type(r_flat).__name__].unsqueeze(0).expand(2, -1, -1)
    den = c.sum(2)
    ref = propagate(c, den, R, EPS) + _flat(conn, R * EPS / (den + EPS))
    out = lrp.Explainer(model, composite={type(layer): r_flat})(x, output_relevance=R)
    assert_close(out.relevance.reshape(2, -1), ref)
    torch.testing.assert_close(out.relevance.flatten(1).sum(1), R.sum(1), rtol=1e-12, atol=1e-12)
    absorbed = lrp.Explainer(model, composite={type(layer): rule("absorb")})
    r_absorbed = absorbed(x, output_relevance=R).relevance.reshape(2, -1)
    assert_close(r_absorbed, propagate(c, den, R, EPS))


@pytest.mark.parametrize(
    "pool",
    [nn.AvgPool2d(3, stride=2, padding=1), nn.AvgPool2d(3, 2, 1, count_include_pad=False),
     nn.AdaptiveAvgPool2d((2, 3))],
    ids=["avg3s2p1", "avg-exclude-pad", "adaptive2x3"],
)
def test_pool_share_flat_dense(pool: nn.Module) -> None:
    torch.manual_seed(5)
    x = torch.randn(2, 3, 5, 6, dtype=F64).clamp(min=0)  # after a ReLU: all-zero windows occur
    x[:, :, :3, :3] = 0
    model = nn.Sequential(pool, nn.Flatten()).eval()
    with torch.no_grad():
        K = model(x).shape[1]
    R = torch.randn(2, K, dtype=F64)
    A = dense_map(pool, (3, 5, 6))
    c = x.reshape(2, 1, -1) * A.unsqueeze(0)
    z = c.sum(2)
    assert (z == 0).any()
    spread = torch.einsum("kj,nk->nj", A / A.sum(1, keepdim=True), R * EPS / (z + EPS))
    ref = propagate(c, z, R, EPS) + spread
    rule = lrp.rules.Proportional(EPS, stabilizer_share="flat")
    out = lrp.Explainer(model, composite={type(pool): rule})(x, output_relevance=R)
    assert_close(out.relevance.reshape(2, -1), ref)
    torch.testing.assert_close(out.relevance.flatten(1).sum(1), R.sum(1), rtol=1e-12, atol=1e-12)


def _depthwise_net() -> nn.Module:
    """A small inverted-residual net whose depthwise z+ outputs are weak against eps 1e-5."""
    torch.manual_seed(0)
    net = nn.Sequential(
        nn.Conv2d(3, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU(),
        nn.Conv2d(16, 16, 3, padding=1, groups=16), nn.BatchNorm2d(16), nn.SiLU(),
        nn.Conv2d(16, 16, 2, stride=2, groups=16), nn.BatchNorm2d(16), nn.SiLU(),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(16, 5),
    )  # fmt: skip
    with torch.no_grad():
        for m in net.modules():
            if isinstance(m, nn.Conv2d) and m.groups > 1:
                m.weight.mul_(1e-3)  # weak depthwise outputs, normalised again by the BN
            if isinstance(m, nn.BatchNorm2d):
                m.running_var.fill_(1e-6)
                m.bias.normal_()
    return net.eval()


def test_otsuki2024_spreads_the_share_by_default() -> None:
    """The preset's default is "flat" (exactly conservative); "absorb" is the published code's
    plain z+; the two differ by at most the absorbed share."""
    net = _depthwise_net()
    x = torch.randn(4, 3, 8, 8)
    flat = lrp.Explainer(net, "otsuki2024")
    absorb = lrp.Explainer(net, "otsuki2024", stabilizer_share="absorb")
    assert flat.composite.options["stabilizer_share"] == "flat"
    assert absorb.composite.options["stabilizer_share"] == "absorb"
    e_flat, e_absorb = flat(x), absorb(x)
    err_flat, err_absorb = lrp.conservation(e_flat), lrp.conservation(e_absorb)
    assert (err_flat < 1e-5).all(), err_flat
    assert (err_absorb > 1e-2).all(), err_absorb  # the published rule loses a visible part
    lost = (e_absorb.initial - e_absorb.relevance.flatten(1).sum(1)).abs()
    moved = (e_flat.relevance - e_absorb.relevance).flatten(1).abs().sum(1)
    assert (moved > 0).all()
    assert (lost <= moved * (1 + 1e-4)).all()
    rules = {type(r).__name__: r.stabilizer_share for r in flat.rules.values()
             if hasattr(r, "stabilizer_share")}
    assert rules == {"ZPlusOnes": "flat", "ZPlus": "flat", "Proportional": "flat"}


def test_other_composites_keep_the_plain_rule() -> None:
    """Zennit's composites keep the absorbing stabiliser (the oracle tests compare to 1e-10);
    the option reaches their z+, flat and pool rules when given."""
    net = _depthwise_net()
    plain = lrp.Explainer(net, "epsilon-plus-flat")
    spread = lrp.Explainer(net, "epsilon-plus-flat", stabilizer_share="flat")
    assert plain.composite.options["stabilizer_share"] == "absorb"
    spread(torch.randn(1, 3, 8, 8))
    shares = {type(r).__name__: r.stabilizer_share for r in spread.rules.values()
              if hasattr(r, "stabilizer_share")}
    assert shares == {"Flat": "flat", "ZPlus": "flat", "Proportional": "flat"}


def test_bad_share_is_named() -> None:
    with pytest.raises(ValueError, match="stabilizer_share='spread'"):
        lrp.rules.ZPlus(stabilizer_share="spread")
    with pytest.raises(ValueError, match="stabilizer_share"):
        lrp.Explainer(nn.Linear(2, 2), "otsuki2024", stabilizer_share="none")
