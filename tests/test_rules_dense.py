"""Linear/conv rules, pools and conservation against independent dense computations.

Every reference here is written from docs/ENGINE_API.md and METHOD.md section 1 with explicit
matrices: a layer is unfolded into its dense input-output matrix W_dense (K, J) by pushing unit
basis vectors through it in float64 (plus the bias vector b_dense of length K), the contributions
c[n, k, j] of each rule are built element-wise from W_dense and x, and

    R_in[n, j] = sum_k c[n, k, j] / stab(den[n, k]) * R_out[n, k],
    stab(d) = d + eps * sign(d), sign(0) = +1  (eps = 0: zero denominators drop their relevance).

No code is shared with lrp.rules / lrp.ops (no transposed convolutions, no modified-gradient trick).
"""

from __future__ import annotations

import copy
import itertools
import math
import zlib

import pytest
import torch
import torch.nn.functional as F
import torchvision
from torch import nn

import lrp

F64 = torch.float64
RTOL = 1e-10


# ----------------------------------------------------------------------------------------------
# dense references
# ----------------------------------------------------------------------------------------------


def dense_layer(layer: nn.Module, in_shape: tuple[int, ...]) -> tuple[torch.Tensor, torch.Tensor]:
    """(W_dense (K, J), b_dense (K,)) of a Linear/ConvNd layer for one sample of ``in_shape``.

    Built by explicit index arithmetic from the weight tensor (zero padding = missing entries):
    out[co, o] = sum_{ci in group(co), t} w[co, ci_local, t] * x[ci, o * stride - pad + t * dil].
    """
    w = layer.weight.detach().to(F64)
    bias = None if layer.bias is None else layer.bias.detach().to(F64)
    if isinstance(layer, nn.Linear):
        b = bias if bias is not None else torch.zeros(w.shape[0], dtype=F64)
        return w.clone(), b.clone()
    C_in, spatial = in_shape[0], in_shape[1:]
    d = len(spatial)
    C_out, cin_g = w.shape[0], w.shape[1]
    cout_g = C_out // layer.groups
    ks, st, pd, dl = w.shape[2:], layer.stride, layer.padding, layer.dilation
    out_sp = [(spatial[i] + 2 * pd[i] - dl[i] * (ks[i] - 1) - 1) // st[i] + 1 for i in range(d)]
    K = C_out * math.prod(out_sp)
    W = torch.zeros(K, C_in * math.prod(spatial), dtype=F64)
    wl = w.tolist()
    for co in range(C_out):
        g = co // cout_g
        for o in itertools.product(*[range(n) for n in out_sp]):
            k_idx = co
            for i in range(d):
                k_idx = k_idx * out_sp[i] + o[i]
            for cl in range(cin_g):
                ci = g * cin_g + cl
                for t in itertools.product(*[range(n) for n in ks]):
                    p = [o[i] * st[i] - pd[i] + t[i] * dl[i] for i in range(d)]
                    if any(p[i] < 0 or p[i] >= spatial[i] for i in range(d)):
                        continue
                    j_idx = ci
                    for i in range(d):
                        j_idx = j_idx * spatial[i] + p[i]
                    wv = wl[co][cl]
                    for ti in t:
                        wv = wv[ti]
                    W[k_idx, j_idx] += wv
    b = torch.zeros(K, dtype=F64) if bias is None else bias.repeat_interleave(math.prod(out_sp))
    return W, b


def dense_map(fn, in_shape: tuple[int, ...]) -> torch.Tensor:
    """Dense matrix (K, J) of a linear parameter-free map (pools)."""
    J = 1
    for s in in_shape:
        J *= s
    basis = torch.eye(J, dtype=F64).reshape(J, *in_shape)
    with torch.no_grad():
        return fn(basis).reshape(J, -1).T.contiguous()


def stab(d: torch.Tensor, eps: float) -> torch.Tensor:
    sign = torch.where(d >= 0, torch.ones_like(d), -torch.ones_like(d))
    return d + eps * sign


def propagate(c: torch.Tensor, den: torch.Tensor, R: torch.Tensor, eps: float) -> torch.Tensor:
    """R_in[n, j] = sum_k c[n,k,j] / stab(den[n,k]) * R[n,k]; eps = 0 drops den == 0."""
    if eps == 0:
        s = torch.where(den == 0, torch.zeros_like(den), R / torch.where(den == 0, 1.0, den))
    else:
        s = R / stab(den, eps)
    return torch.einsum("nkj,nk->nj", c, s)


def pos(t: torch.Tensor) -> torch.Tensor:
    return t.clamp(min=0)


def neg(t: torch.Tensor) -> torch.Tensor:
    return t.clamp(max=0)


def reference(
    rule_spec: tuple,
    W: torch.Tensor,
    b: torch.Tensor,
    x: torch.Tensor,
    R: torch.Tensor,
    low: torch.Tensor | None = None,
    high: torch.Tensor | None = None,
) -> torch.Tensor:
    """Relevance at the input for rule_spec = (name, params...), x: (N, J), R: (N, K)."""
    name = rule_spec[0]
    Wb = W.unsqueeze(0)  # (1, K, J)
    xb = x.unsqueeze(1)  # (N, 1, J)
    xp, xn = pos(xb), neg(xb)
    N = x.shape[0]
    if name in ("lrp0", "epsilon"):
        eps = 0.0 if name == "lrp0" else rule_spec[1]
        zero_bias = name == "epsilon" and rule_spec[2]
        c = xb * Wb
        den = c.sum(2) + (0.0 if zero_bias else b)
        # a denominator of exactly 0: R_k spreads uniformly over the receptive field (empty="flat")
        conn = (W != 0).to(F64)  # random weights: exact zeros only outside the receptive field
        flat = torch.einsum("kj,nk->nj", conn / conn.sum(1, keepdim=True), R * (den == 0))
        return propagate(c, den, R, eps) + flat
    if name == "gamma":
        g, eps = rule_spec[1], 1e-6
        z = (xb * Wb).sum(2) + b
        w_up = Wb + g * pos(Wb)
        w_dn = Wb + g * neg(Wb)
        c_pos = xp * w_up + xn * w_dn
        c_neg = xp * w_dn + xn * w_up
        den_pos = c_pos.sum(2) + (b + g * pos(b))
        den_neg = c_neg.sum(2) + (b + g * neg(b))
        r_pos = propagate(c_pos, den_pos, R * (z > 0), eps)
        r_neg = propagate(c_neg, den_neg, R * (z < 0), eps)
        return r_pos + r_neg
    if name in ("alphabeta", "zplus"):
        if name == "alphabeta":
            alpha, beta, use_bias = rule_spec[1], rule_spec[2], True
        else:
            alpha, beta, use_bias = 1.0, 0.0, not rule_spec[1]
        eps = 1e-6
        bb = b if use_bias else torch.zeros_like(b)
        c_pos = xp * pos(Wb) + xn * neg(Wb)
        c_neg = xp * neg(Wb) + xn * pos(Wb)
        den_pos = c_pos.sum(2) + pos(bb)
        r = alpha * propagate(c_pos, den_pos, R, eps)
        # no positive contribution at all: alpha * R_k spreads uniformly over the receptive field
        conn = (W != 0).to(F64)  # random weights: exact zeros only outside the receptive field
        r = r + alpha * torch.einsum(
            "kj,nk->nj", conn / conn.sum(1, keepdim=True), R * (den_pos == 0)
        )
        if beta:
            r = r - beta * propagate(c_neg, c_neg.sum(2) + neg(bb), R, eps)
        return r
    if name == "zbox":
        lo, hi = low.unsqueeze(0).unsqueeze(0), high.unsqueeze(0).unsqueeze(0)
        c = xb * Wb - lo * pos(Wb) - hi * neg(Wb)
        return propagate(c, c.sum(2), R, 1e-6)
    # input-free rules: contributions do not depend on x
    if name == "flat":
        c1, eps = (W != 0).to(F64), 1e-6
    elif name == "wsquare":
        c1, eps = W * W, 1e-6
    elif name == "zplusones":
        c1, eps = pos(W), 1e-5
    else:
        raise AssertionError(name)
    c = c1.unsqueeze(0).expand(N, -1, -1)
    return propagate(c, c.sum(2), R, eps)


def make_rule(rule_spec: tuple, low=None, high=None) -> lrp.rules.Rule:
    name = rule_spec[0]
    if name == "lrp0":
        return lrp.rules.LRP0()
    if name == "epsilon":
        return lrp.rules.Epsilon(rule_spec[1], zero_bias=rule_spec[2])
    if name == "gamma":
        return lrp.rules.Gamma(rule_spec[1])
    if name == "alphabeta":
        return lrp.rules.AlphaBeta(rule_spec[1], rule_spec[2])
    if name == "zplus":
        return lrp.rules.ZPlus(zero_bias=rule_spec[1])
    if name == "zbox":
        return lrp.rules.ZBox(low, high)
    return {"flat": lrp.rules.Flat, "wsquare": lrp.rules.WSquare, "zplusones": lrp.rules.ZPlusOnes}[
        name
    ]()


RULES = [
    ("lrp0",),
    ("epsilon", 0.1, False),
    ("epsilon", 0.1, True),
    ("epsilon", 1e-6, False),
    ("gamma", 0.25),
    ("gamma", 1.0),
    ("alphabeta", 2.0, 1.0),
    ("alphabeta", 1.0, 0.0),
    ("zplus", False),
    ("zplus", True),
    ("zbox-scalar",),
    ("zbox-channel",),
    ("flat",),
    ("wsquare",),
    ("zplusones",),
]


def _seed(*parts) -> int:
    return zlib.crc32(repr(parts).encode()) % 10_000


def _rule_id(spec: tuple) -> str:
    return "-".join(str(s) for s in spec)


def layer_factory(kind: str) -> tuple[nn.Module, tuple[int, ...]]:
    """(layer, one sample's input shape); float64, random weights and biases."""
    if kind == "linear":
        layer, shape = nn.Linear(7, 5), (7,)
    elif kind == "linear-nobias":
        layer, shape = nn.Linear(7, 5, bias=False), (7,)
    elif kind == "conv1d":
        layer, shape = nn.Conv1d(3, 4, 3, stride=2, padding=1), (3, 9)
    elif kind == "conv2d":
        layer, shape = nn.Conv2d(3, 4, 3), (3, 5, 6)
    elif kind == "conv2d-s2-p1":
        layer, shape = nn.Conv2d(3, 4, 3, stride=2, padding=1), (3, 5, 6)
    elif kind == "conv2d-d2-nobias":
        layer, shape = nn.Conv2d(3, 4, 2, dilation=2, bias=False), (3, 5, 6)
    elif kind == "conv2d-g2-p1":
        layer, shape = nn.Conv2d(4, 4, 3, padding=1, groups=2), (4, 5, 6)
    elif kind == "conv2d-all":
        layer, shape = nn.Conv2d(4, 6, 3, stride=2, padding=1, dilation=2, groups=2), (4, 5, 6)
    elif kind == "conv2d-all-nobias":
        layer, shape = (
            nn.Conv2d(
                4, 2, (2, 3), stride=(2, 1), padding=(1, 0), dilation=(1, 2), groups=2, bias=False
            ),
            (4, 5, 6),
        )
    elif kind == "conv3d":
        layer, shape = nn.Conv3d(2, 3, 2, stride=(1, 2, 1), padding=1), (2, 3, 4, 3)
    elif kind == "conv2d-1x1":  # pointwise: the transpose is a 1x1 convolution (lrp/ops.py)
        layer, shape = nn.Conv2d(3, 5, 1), (3, 4, 5)
    elif kind == "conv2d-1x1-g3-nobias":
        layer, shape = nn.Conv2d(6, 9, 1, groups=3, bias=False), (6, 4, 3)
    elif kind == "conv1d-1x1-d2":  # dilation does not matter for a 1-tap kernel
        layer, shape = nn.Conv1d(4, 2, 1, dilation=2), (4, 7)
    else:
        raise AssertionError(kind)
    layer = layer.to(F64)
    with torch.no_grad():
        layer.weight.normal_()
        if layer.bias is not None:
            layer.bias.normal_()
    return layer, shape


LAYERS = [
    "linear",
    "linear-nobias",
    "conv1d",
    "conv2d",
    "conv2d-s2-p1",
    "conv2d-d2-nobias",
    "conv2d-g2-p1",
    "conv2d-all",
    "conv2d-all-nobias",
    "conv3d",
    "conv2d-1x1",
    "conv2d-1x1-g3-nobias",
    "conv1d-1x1-d2",
]


def bounds_for(spec_name: str, shape: tuple[int, ...]):
    """(engine low/high, dense low/high over J) for the ZBox variants."""
    if spec_name == "zbox-scalar":
        lo, hi = -1.5, 2.0
        J = int(torch.tensor(shape).prod())
        return lo, hi, torch.full((J,), lo, dtype=F64), torch.full((J,), hi, dtype=F64)
    C = shape[0]
    lo = -1.0 - torch.rand(C, dtype=F64)
    hi = 1.0 + torch.rand(C, dtype=F64)
    lo_d = lo.view(C, *([1] * (len(shape) - 1))).expand(shape).reshape(-1)
    hi_d = hi.view(C, *([1] * (len(shape) - 1))).expand(shape).reshape(-1)
    return lo, hi, lo_d, hi_d


def run_rule(layer_kind: str, spec: tuple, nonneg: bool, seed: int):
    torch.manual_seed(seed)
    layer, shape = layer_factory(layer_kind)
    N = 2
    x = torch.randn(N, *shape, dtype=F64)
    low = high = low_d = high_d = None
    rule_spec = spec
    if spec[0].startswith("zbox"):
        low, high, low_d, high_d = bounds_for(spec[0], shape)
        rule_spec = ("zbox",)
    rule = make_rule(rule_spec, low, high)
    mods = [nn.ReLU()] if nonneg else []
    model = nn.Sequential(*mods, layer, nn.Flatten()).eval()
    e = lrp.Explainer(model, composite={type(layer): rule})
    with torch.no_grad():
        K = model(x).shape[1]
    R = torch.randn(N, K, dtype=F64)
    out = e(x, output_relevance=R)
    prepared = e.prepared_model()
    assert prepared.get_submodule(str(len(mods))).input_nonnegative is nonneg
    W, b = dense_layer(layer, shape)
    xin = x.clamp(min=0) if nonneg else x
    ref = reference(rule_spec, W, b, xin.reshape(N, -1), R, low_d, high_d).reshape(x.shape)
    return out, ref  # the ReLU before the layer passes relevance unchanged (METHOD.md section 1)


def assert_close(actual: torch.Tensor, expected: torch.Tensor, rtol: float = RTOL) -> None:
    assert actual.dtype == expected.dtype
    assert actual.shape == expected.shape
    scale = expected.abs().max().clamp(min=1e-300)
    err = (actual - expected).abs().max()
    assert err <= rtol * scale, f"max abs error {err:.3e} vs scale {scale:.3e}"


@pytest.mark.parametrize("layer_kind", LAYERS)
@pytest.mark.parametrize("spec", RULES, ids=_rule_id)
def test_rule_matches_dense_reference(layer_kind: str, spec: tuple) -> None:
    out, ref = run_rule(layer_kind, spec, nonneg=False, seed=_seed(layer_kind, spec))
    assert_close(out.relevance, ref)


@pytest.mark.parametrize("layer_kind", ["linear", "conv2d-s2-p1", "conv2d-all", "conv3d"])
@pytest.mark.parametrize("spec", RULES, ids=_rule_id)
def test_rule_nonnegative_fast_path(layer_kind: str, spec: tuple) -> None:
    """A ReLU before the layer: the engine skips negative-input terms; result must not change."""
    out, ref = run_rule(layer_kind, spec, nonneg=True, seed=_seed(layer_kind, spec, 1))
    assert_close(out.relevance, ref)


def test_reference_is_sensitive() -> None:
    """Sanity of the harness: rules that differ by spec give different dense references."""
    torch.manual_seed(0)
    layer, shape = layer_factory("conv2d-all")
    W, b = dense_layer(layer, shape)
    x = torch.randn(2, W.shape[1], dtype=F64)
    R = torch.randn(2, W.shape[0], dtype=F64)
    refs = [
        reference(s, W, b, x, R)
        for s in [
            ("lrp0",),
            ("epsilon", 0.1, True),
            ("gamma", 0.25),
            ("alphabeta", 2.0, 1.0),
            ("zplus", False),
            ("flat",),
            ("wsquare",),
            ("zplusones",),
        ]
    ]
    for i in range(len(refs)):
        for j in range(i):
            assert (refs[i] - refs[j]).abs().max() > 1e-6


@pytest.mark.parametrize("layer_kind", LAYERS)
def test_dense_matrix_is_the_layer(layer_kind: str) -> None:
    """The hand-built W_dense, b_dense reproduce the layer's forward (the references are valid)."""
    torch.manual_seed(1)
    layer, shape = layer_factory(layer_kind)
    W, b = dense_layer(layer, shape)
    x = torch.randn(3, *shape, dtype=F64)
    with torch.no_grad():
        expected = layer(x).reshape(3, -1)
    assert torch.allclose(x.reshape(3, -1) @ W.T + b, expected, rtol=1e-12, atol=1e-12)


def test_zero_denominator_lrp0_drops_or_spreads_relevance() -> None:
    """eps = 0: an output whose contributions sum to exactly 0 gets no relevance under the plain
    rule (no NaN/inf); with empty="flat" (the default) its relevance spreads over its inputs."""
    layer = nn.Linear(3, 2, bias=False).to(F64)
    with torch.no_grad():
        layer.weight.copy_(torch.tensor([[1.0, -1.0, 0.0], [0.5, 2.0, 1.0]], dtype=F64))
    model = nn.Sequential(layer).eval()
    x = torch.tensor([[2.0, 2.0, 1.0]], dtype=F64)  # z_0 = 0 exactly
    R = torch.tensor([[3.0, 1.0]], dtype=F64)
    plain = lrp.Explainer(model, composite={nn.Linear: lrp.rules.LRP0(empty="drop")})
    out = plain(x, output_relevance=R)
    z1 = 0.5 * 2 + 2.0 * 2 + 1.0
    expected = torch.tensor([[0.5 * 2 / z1, 2.0 * 2 / z1, 1.0 / z1]], dtype=F64)
    assert torch.isfinite(out.relevance).all()
    assert_close(out.relevance, expected)
    spread = lrp.Explainer(model, composite={nn.Linear: lrp.rules.LRP0()})(x, output_relevance=R)
    assert_close(spread.relevance, expected + 3.0 / 3)  # a dense layer's field: every input
    assert spread.relevance.sum() == pytest.approx(4.0, rel=1e-12)


def test_epsilon_sign_of_zero_is_positive() -> None:
    """stab(0) = 0 + eps * sign(0) = +eps: an exactly cancelling output divides by +eps."""
    layer = nn.Linear(2, 1, bias=False).to(F64)
    with torch.no_grad():
        layer.weight.copy_(torch.tensor([[1.0, -1.0]], dtype=F64))
    x = torch.tensor([[3.0, 3.0]], dtype=F64)  # z = 0 exactly
    R = torch.tensor([[2.0]], dtype=F64)
    rule = lrp.rules.Epsilon(0.5, empty="drop")  # the plain rule ("flat" spreads a 0 denominator)
    out = lrp.Explainer(nn.Sequential(layer).eval(), composite={nn.Linear: rule})(
        x, output_relevance=R
    )
    assert_close(out.relevance, torch.tensor([[3.0 / 0.5 * 2.0, -3.0 / 0.5 * 2.0]], dtype=F64))


@pytest.mark.parametrize("dtype", [torch.float32, F64])
def test_stabilize_without_zeros_is_the_same(dtype: torch.dtype) -> None:
    """The copysign form ``stabilize`` takes where no zero was counted equals the general one
    (magnitudes from 1e-30 to 1e3, both signs), and the general one keeps sign(-0.0) = +1."""
    from lrp.rules.base import stabilize

    g = torch.Generator().manual_seed(0)
    z = torch.randn(4000, dtype=dtype, generator=g) * torch.logspace(-30, 3, 4000, dtype=dtype)
    for eps in (1e-6, 0.25, 1e-9):
        assert torch.equal(stabilize(z, eps, nonzero=True), stabilize(z, eps))
    zeros = torch.tensor([0.0, -0.0], dtype=dtype)
    assert torch.equal(stabilize(zeros, 0.5), torch.tensor([0.5, 0.5], dtype=dtype))


def test_gamma_zero_output_gets_no_relevance() -> None:
    layer = nn.Linear(2, 2, bias=True).to(F64)
    with torch.no_grad():
        layer.weight.copy_(torch.tensor([[1.0, -1.0], [1.0, 1.0]], dtype=F64))
        layer.bias.zero_()
    x = torch.tensor([[1.0, 1.0]], dtype=F64)  # z = (0, 2)
    R = torch.tensor([[5.0, 1.0]], dtype=F64)
    out = lrp.Explainer(nn.Sequential(layer).eval(), composite={nn.Linear: lrp.rules.Gamma(0.5)})(
        x, output_relevance=R
    )
    # only output 1 (z > 0): c = x (w + 0.5 w+) = (1.5, 1.5), den = 3 (+1e-6)
    expected = torch.tensor([[1.5 / (3 + 1e-6), 1.5 / (3 + 1e-6)]], dtype=F64)
    assert_close(out.relevance, expected)


# ----------------------------------------------------------------------------------------------
# pools and activations
# ----------------------------------------------------------------------------------------------


def _identity_conv(C: int) -> nn.Conv2d:
    conv = nn.Conv2d(C, C, 1, bias=False).to(F64)
    with torch.no_grad():
        conv.weight.copy_(torch.eye(C, dtype=F64).view(C, C, 1, 1))
    return conv


def _through(module: nn.Module, x: torch.Tensor, R_fn, composite=None):
    """Explain Sequential(identity 1x1 conv [Pass], module, Flatten) with output relevance."""
    C = x.shape[1]
    model = nn.Sequential(_identity_conv(C), module, nn.Flatten()).eval()
    comp = {"0": lrp.rules.Pass()}
    if composite:
        comp.update(composite)
    e = lrp.Explainer(model, composite=comp)
    with torch.no_grad():
        K = model(x).shape[1]
    R = R_fn(x.shape[0], K)
    return e(x, output_relevance=R), R


@pytest.mark.parametrize("positive", [True, False])
@pytest.mark.parametrize(
    "pool",
    [
        nn.AvgPool2d(2),
        nn.AvgPool2d(3, stride=2, padding=1),
        nn.AdaptiveAvgPool2d((3, 4)),
        nn.AdaptiveAvgPool2d(1),
        nn.AdaptiveAvgPool2d((7, 7)),
    ],
    ids=["avg2", "avg3s2p1", "adaptive3x4", "adaptive1", "adaptive7x7-upsample"],
)
def test_average_pools_proportional(pool: nn.Module, positive: bool) -> None:
    torch.manual_seed(3)
    x = torch.randn(2, 3, 5, 6, dtype=F64)
    if positive:
        x = x.abs() + 0.1
    out, R = _through(pool, x, lambda n, k: torch.randn(n, k, dtype=F64))
    A = dense_map(pool, (3, 5, 6))  # (K, J) averaging matrix
    xf = x.reshape(2, -1)
    c = xf.unsqueeze(1) * A.unsqueeze(0)
    ref = propagate(c, c.sum(2), R, 1e-6).reshape(x.shape)
    assert_close(out.relevance, ref)


@pytest.mark.parametrize("kernel,stride,padding", [(2, 2, 0), (3, 2, 1), (3, 1, 0)])
def test_maxpool_winner_takes_all(kernel: int, stride: int, padding: int) -> None:
    torch.manual_seed(4)
    x = torch.randn(2, 3, 5, 6, dtype=F64)
    pool = nn.MaxPool2d(kernel, stride, padding)
    out, R = _through(pool, x, lambda n, k: torch.randn(n, k, dtype=F64))
    # explicit windows: pad with -inf, unfold values and flat input indices, argmax per window
    idx = torch.arange(5 * 6, dtype=F64).view(1, 1, 5, 6).expand(1, 1, 5, 6)
    xp = F.pad(x, (padding,) * 4, value=float("-inf"))
    ip = F.pad(idx, (padding,) * 4, value=-1.0)
    ref = torch.zeros(2, 3, 30, dtype=F64)
    Rv = R.view(2, 3, -1)
    for c in range(3):
        vals = F.unfold(xp[:, c : c + 1], kernel, stride=stride)  # (N, k*k, L)
        inds = F.unfold(ip, kernel, stride=stride)[0]  # (k*k, L)
        win = vals.argmax(1)  # (N, L)
        for n in range(2):
            for l_ in range(win.shape[1]):
                j = int(inds[win[n, l_], l_])
                ref[n, c, j] += Rv[n, c, l_]
    assert_close(out.relevance, ref.view(x.shape))


def test_relu_passes_relevance_unchanged() -> None:
    """METHOD.md section 1 (and Zennit's Pass rule): element-wise activations pass relevance."""
    torch.manual_seed(5)
    x = torch.randn(2, 3, 4, 5, dtype=F64)
    out, R = _through(nn.ReLU(), x, lambda n, k: torch.randn(n, k, dtype=F64))
    assert_close(out.relevance, R.view(x.shape))


# ----------------------------------------------------------------------------------------------
# conservation
# ----------------------------------------------------------------------------------------------


def _cnn(bias: bool, pool: str = "max") -> nn.Sequential:
    pool_mod = nn.MaxPool2d(2) if pool == "max" else nn.AvgPool2d(2)
    return (
        nn.Sequential(
            nn.Conv2d(3, 6, 3, padding=1, bias=bias),
            nn.ReLU(),
            pool_mod,
            nn.Conv2d(6, 8, 3, padding=1, bias=bias),
            nn.ReLU(),
            nn.AdaptiveAvgPool2d(2),
            nn.Flatten(),
            nn.Linear(32, 16, bias=bias),
            nn.ReLU(),
            nn.Linear(16, 5, bias=bias),
        )
        .to(F64)
        .eval()
    )


def _mlp(bias: bool) -> nn.Sequential:
    return (
        nn.Sequential(
            nn.Linear(12, 20, bias=bias),
            nn.ReLU(),
            nn.Linear(20, 10, bias=bias),
            nn.ReLU(),
            nn.Linear(10, 4, bias=bias),
        )
        .to(F64)
        .eval()
    )


def _sum_check(e) -> torch.Tensor:
    """Independent conservation error: |sum R_in - logit[target]| / |logit[target]|."""
    tl = e.logits.gather(1, e.target.view(-1, 1)).squeeze(1)
    return (e.relevance.flatten(1).sum(1) - tl).abs() / tl.abs()


TINY = 1e-12  # conservation holds as the stabilizers go to 0
LIN = (nn.Linear, nn.Conv2d)


@pytest.mark.parametrize(
    "net,composite,positive",
    [
        ("mlp", {nn.Linear: lrp.rules.LRP0()}, False),
        ("cnn-max", {LIN: lrp.rules.LRP0()}, False),
        ("cnn-avg", {LIN: lrp.rules.LRP0()}, False),
        ("cnn-max", {LIN: lrp.rules.Epsilon(1e-12)}, False),
        ("mlp", {nn.Linear: lrp.rules.Epsilon(1e-12)}, False),
        ("cnn-max", {LIN: lrp.rules.ZPlus(TINY)}, True),
        ("cnn-avg", {LIN: lrp.rules.ZPlus(TINY)}, True),
        ("mlp", {nn.Linear: lrp.rules.ZPlus(TINY)}, True),
        ("cnn-max", {LIN: lrp.rules.AlphaBeta(2.0, 1.0, TINY)}, True),
        ("cnn-max", {"0": lrp.rules.Flat(TINY), LIN: lrp.rules.LRP0()}, False),
        ("cnn-max", {"0": lrp.rules.WSquare(TINY), LIN: lrp.rules.LRP0()}, False),
        ("cnn-avg", {"0": lrp.rules.WSquare(TINY), LIN: lrp.rules.ZPlus(TINY)}, True),
        ("mlp", {"0": lrp.rules.Flat(TINY), nn.Linear: lrp.rules.LRP0()}, False),
    ],
    ids=[
        "mlp-lrp0",
        "cnn-lrp0",
        "cnnavg-lrp0",
        "cnn-eps",
        "mlp-eps",
        "cnn-zplus",
        "cnnavg-zplus",
        "mlp-zplus",
        "cnn-ab21",
        "cnn-flat",
        "cnn-wsquare",
        "cnnavg-wsquare-zplus",
        "mlp-flat",
    ],
)
def test_conservation_bias_free(net: str, composite: dict, positive: bool) -> None:
    torch.manual_seed(6)
    if net == "mlp":
        model, x = _mlp(False), torch.randn(3, 12, dtype=F64)
    else:
        model, x = _cnn(False, net.split("-")[1]), torch.randn(3, 3, 8, 8, dtype=F64)
    if positive:
        x = x.abs()
    pools = (nn.AvgPool2d, nn.AdaptiveAvgPool2d)
    composite = {**composite, pools: lrp.rules.Proportional(TINY)}
    e = lrp.Explainer(model, composite=composite)(x)
    assert (_sum_check(e) < 1e-5).all(), _sum_check(e)
    assert (lrp.conservation(e) < 1e-5).all()
    assert torch.allclose(lrp.conservation(e), _sum_check(e), rtol=1e-6, atol=1e-12)


def test_conservation_detects_non_conservative_configuration() -> None:
    torch.manual_seed(7)
    model = _mlp(True)
    with torch.no_grad():
        for m in model:
            if isinstance(m, nn.Linear):
                m.bias.uniform_(1.0, 2.0)
    x = torch.randn(3, 12, dtype=F64)
    e = lrp.Explainer(model, composite={nn.Linear: lrp.rules.Epsilon(1e-6)})(x)
    err = _sum_check(e)
    assert (err > 1e-2).all()
    assert torch.allclose(lrp.conservation(e), err, rtol=1e-9)


# ----------------------------------------------------------------------------------------------
# composites on torchvision models
# ----------------------------------------------------------------------------------------------

# First-layer rule and dense-layer rule each composite must assign (METHOD.md section 1/3).
EXPECTED_FIRST = {
    "lrp-0": lrp.rules.LRP0,
    "epsilon": lrp.rules.Epsilon,
    "epsilon-plus": lrp.rules.ZPlus,
    "epsilon-plus-flat": lrp.rules.Flat,
    "epsilon-gamma-box": lrp.rules.ZBox,
    "epsilon-alpha2-beta1": lrp.rules.AlphaBeta,
    "epsilon-alpha2-beta1-flat": lrp.rules.Flat,
    "otsuki2024": lrp.rules.ZPlusOnes,
    "epsilon-transformer": lrp.rules.Epsilon,
}
EXPECTED_CONV = {
    "lrp-0": lrp.rules.LRP0,
    "epsilon": lrp.rules.Epsilon,
    "epsilon-plus": lrp.rules.ZPlus,
    "epsilon-plus-flat": lrp.rules.ZPlus,
    "epsilon-gamma-box": lrp.rules.Gamma,
    "epsilon-alpha2-beta1": lrp.rules.AlphaBeta,
    "epsilon-alpha2-beta1-flat": lrp.rules.AlphaBeta,
    "otsuki2024": lrp.rules.ZPlus,
    "epsilon-transformer": lrp.rules.Epsilon,
}
EXPECTED_DENSE = {
    **dict.fromkeys(EXPECTED_FIRST, lrp.rules.Epsilon),
    "lrp-0": lrp.rules.LRP0,
    "otsuki2024": lrp.rules.ZPlus,
}


@pytest.fixture(scope="module")
def tv_models() -> dict[str, tuple[nn.Module, torch.Tensor, torch.Tensor]]:
    torch.manual_seed(8)
    vgg = torchvision.models.vgg11(num_classes=10).eval()
    vgg_bn = torchvision.models.vgg11_bn(num_classes=10).eval()
    with torch.no_grad():
        for m in vgg_bn.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.normal_(0, 0.1)
                m.running_var.uniform_(0.5, 1.5)
    alex = torchvision.models.alexnet(num_classes=10).eval()
    out = {}
    for name, model, px in [("vgg11", vgg, 32), ("vgg11_bn", vgg_bn, 32), ("alexnet", alex, 64)]:
        x = torch.randn(1, 3, px, px)
        with torch.no_grad():
            out[name] = (model, x, model(x))
    return out


def test_composite_names_complete() -> None:
    assert set(lrp.composites.names()) == set(EXPECTED_FIRST)


@pytest.mark.parametrize("name", list(EXPECTED_FIRST))
@pytest.mark.parametrize("model_name", ["vgg11", "vgg11_bn", "alexnet"])
def test_composites_on_torchvision(tv_models, model_name: str, name: str) -> None:
    model, x, logits = tv_models[model_name]
    opts = {"input_bounds": (-3.0, 3.0)} if name == "epsilon-gamma-box" else {}
    explainer = lrp.Explainer(model, composite=name, **opts)
    e = explainer(x)
    if name == "otsuki2024":
        # the 2x2 average-pool backward is the ResNet stem's (3x3/2, padding 1) only: AlexNet's
        # and VGG's max-pools stay winner-takes-all
        assert not any(isinstance(r, lrp.rules.Proportional) and r.through is not None
                       for r in explainer.rules.values())
    assert e.relevance.shape == x.shape
    assert torch.isfinite(e.relevance).all()
    assert e.relevance.abs().sum() > 0
    assert torch.allclose(e.logits, logits, rtol=1e-4, atol=1e-4)
    assert torch.equal(e.target, logits.argmax(1))
    assert explainer.first_layer == "features.0"
    assert type(explainer.rules[explainer.first_layer]) is EXPECTED_FIRST[name]
    convs = [p for p, m in model.named_modules() if isinstance(m, nn.Conv2d)]
    dense = [p for p, m in model.named_modules() if isinstance(m, nn.Linear)]
    for p in convs[1:]:
        assert type(explainer.rules[p]) is EXPECTED_CONV[name], p
    for p in dense:
        assert type(explainer.rules[p]) is EXPECTED_DENSE[name], p
    assert not model.training
    assert all(not h for m in model.modules() for h in (m._forward_hooks, m._forward_pre_hooks))


def test_epsilon_gamma_box_needs_bounds() -> None:
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.Flatten())
    with pytest.raises(lrp.InvalidInputError, match="input_bounds"):
        lrp.Explainer(model, composite="epsilon-gamma-box")


def test_epsilon_gamma_box_first_layer_uses_bounds() -> None:
    """The ZBox built by the composite uses the given bounds: compare with the dense reference."""
    torch.manual_seed(9)
    layer, shape = layer_factory("conv2d-s2-p1")
    model = nn.Sequential(layer, nn.Flatten()).eval()
    x = torch.randn(2, *shape, dtype=F64)
    low = torch.tensor([-1.0, -2.0, -0.5], dtype=F64)
    high = torch.tensor([1.0, 2.5, 0.5], dtype=F64)
    e = lrp.Explainer(model, composite="epsilon-gamma-box", input_bounds=(low, high))
    R = torch.randn(2, 4 * 3 * 3, dtype=F64)
    out = e(x, output_relevance=R)
    W, b = dense_layer(layer, shape)
    lo_d = low.view(3, 1, 1).expand(shape).reshape(-1)
    hi_d = high.view(3, 1, 1).expand(shape).reshape(-1)
    ref = reference(("zbox",), W, b, x.reshape(2, -1), R, lo_d, hi_d).reshape(x.shape)
    assert_close(out.relevance, ref)


# ----------------------------------------------------------------------------------------------
# identities
# ----------------------------------------------------------------------------------------------


def test_lrp0_equals_gradient_times_input() -> None:
    torch.manual_seed(10)
    model = (
        nn.Sequential(
            nn.Conv2d(3, 6, 3, padding=1),
            nn.ReLU(),
            nn.MaxPool2d(2),
            nn.Conv2d(6, 8, 3, stride=1, padding=1),
            nn.ReLU(),
            nn.MaxPool2d(3, stride=2, padding=1),
            nn.Flatten(),
            nn.Linear(8 * 2 * 2, 16),
            nn.ReLU(),
            nn.Linear(16, 5),
        )
        .to(F64)
        .eval()
    )
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.Conv2d | nn.Linear):
                m.bias.normal_(0, 0.5)
    x = torch.randn(3, 3, 8, 8, dtype=F64)
    e = lrp.Explainer(model, composite="lrp-0")(x)
    xg = x.clone().requires_grad_(True)
    logits = model(xg)
    sel = logits.gather(1, logits.argmax(1, keepdim=True)).sum()
    (grad,) = torch.autograd.grad(sel, xg)
    assert_close(e.relevance, grad * x)


def _bn_model() -> nn.Sequential:
    torch.manual_seed(11)
    model = nn.Sequential(
        nn.Conv2d(3, 5, 3, padding=1),
        nn.BatchNorm2d(5),
        nn.ReLU(),
        nn.Conv2d(5, 4, 3, stride=2, bias=False),
        nn.BatchNorm2d(4),
        nn.ReLU(),
        nn.Flatten(),
        nn.Linear(4 * 3 * 3, 8),
        nn.BatchNorm1d(8),
        nn.ReLU(),
        nn.Linear(8, 3),
    ).to(F64)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.BatchNorm1d | nn.BatchNorm2d):
                m.running_mean.normal_()
                m.running_var.uniform_(0.3, 2.0)
                m.weight.normal_()
                m.bias.normal_()
                m.eps = 1e-3
    return model.eval()


def _fold_manually(model: nn.Sequential) -> nn.Sequential:
    layers = []
    mods = list(model)
    i = 0
    while i < len(mods):
        m = mods[i]
        if i + 1 < len(mods) and isinstance(mods[i + 1], nn.BatchNorm1d | nn.BatchNorm2d):
            bn = mods[i + 1]
            scale = bn.weight.detach() / torch.sqrt(bn.running_var + bn.eps)
            b0 = m.bias.detach() if m.bias is not None else torch.zeros_like(scale)
            if isinstance(m, nn.Linear):
                new = nn.Linear(m.in_features, m.out_features).to(F64)
                w = m.weight.detach() * scale[:, None]
            else:
                new = nn.Conv2d(
                    m.in_channels,
                    m.out_channels,
                    m.kernel_size,
                    m.stride,
                    m.padding,
                    m.dilation,
                    m.groups,
                ).to(F64)
                w = m.weight.detach() * scale[:, None, None, None]
            with torch.no_grad():
                new.weight.copy_(w)
                new.bias.copy_((b0 - bn.running_mean) * scale + bn.bias.detach())
            layers.append(new)
            i += 2
        else:
            layers.append(m)
            i += 1
    return nn.Sequential(*layers).eval()


def test_batchnorm_folding() -> None:
    model = _bn_model()
    folded = _fold_manually(model)
    x = torch.randn(3, 3, 7, 7, dtype=F64)
    with torch.no_grad():
        ref_logits = model(x)
        assert torch.allclose(folded(x), ref_logits, rtol=1e-10, atol=1e-10)
    explainer = lrp.Explainer(model, composite="lrp-0")
    e = explainer(x)
    assert_close(e.logits, ref_logits)
    prepared = explainer.prepared_model()
    assert not any(isinstance(m, nn.BatchNorm1d | nn.BatchNorm2d) for m in prepared.modules())
    e_ref = lrp.Explainer(folded, composite="lrp-0")(x, target=e.target)
    assert_close(e.relevance, e_ref.relevance)
    # without folding BN would need a rule: relevance differs from the folded one (test can fail)
    e_eps = lrp.Explainer(model, composite="epsilon", epsilon=0.5)(x, target=e.target)
    assert (e_eps.relevance - e.relevance).abs().max() > 1e-6


@pytest.mark.parametrize(
    "layer",
    [nn.Conv2d(6, 9, 1, groups=3), nn.Conv1d(4, 2, 1, dilation=3), nn.Conv3d(2, 4, 1),
     nn.Conv2d(4, 6, 1, stride=2), nn.Conv2d(4, 6, 1, padding=1)],
    ids=["2d-g3", "1d-d3", "3d", "2d-stride2", "2d-pad1"],
)
def test_linear_op_transpose_is_the_input_gradient(layer: nn.Module) -> None:
    """LinearOp.transpose (a 1x1 convolution for pointwise layers, convolution_backward for the
    others) equals autograd's input gradient of the same convolution."""
    from lrp.ops import LinearOp

    layer = layer.to(F64)
    op = LinearOp(layer)
    assert op.pointwise == (layer.stride[0] == 1 and layer.padding[0] == 0)
    x = torch.randn(2, layer.in_channels, *([5] * (layer.weight.ndim - 2)), dtype=F64)
    x.requires_grad_(True)
    y = layer(x)
    g = torch.randn_like(y)
    (expected,) = torch.autograd.grad(y, x, g)
    assert_close(op.transpose(g, layer.weight.detach(), x), expected)


@pytest.mark.parametrize("rule", [lrp.rules.ZPlus(), lrp.rules.AlphaBeta(2.0, 1.0)], ids=repr)
@pytest.mark.parametrize(
    "conv",
    [
        nn.Conv2d(3, 8, 1),  # widening: one convolution on [x+, x-] in the forward too
        nn.Conv2d(8, 3, 1, bias=False),  # narrowing: paired transposes only
        nn.Conv2d(3, 5, 2, padding="same"),  # asymmetric: pre-padding
        nn.Conv1d(2, 4, 3, stride=2, padding=1),
        nn.Conv3d(2, 3, 2, padding=1),
    ],
    ids=["1x1-widen", "1x1-narrow", "same-k2", "conv1d-s2", "conv3d"],
)
def test_sign_pair_equals_two_convolutions(
    rule: lrp.rules.AlphaBeta, conv: nn.Module, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Signed inputs of an ungrouped convolution: the x+ and x- terms as one convolution over
    [x+, x-] (lrp/rules/linear.py ``_paired``) give the values of two convolutions."""
    from lrp.rules import linear

    torch.manual_seed(0)
    conv = copy.deepcopy(conv).to(F64)
    with torch.no_grad():
        conv.weight.normal_()
    x = torch.randn(2, conv.in_channels, *([6] * (conv.weight.ndim - 2)), dtype=F64)

    def explain() -> torch.Tensor:
        model = nn.Sequential(conv, nn.Flatten()).eval()
        return lrp.Explainer(model, composite={type(conv): rule})(x).relevance

    calls = []
    pair = linear._sign_pair

    def spy(t: torch.Tensor) -> torch.Tensor:
        if t.shape[0] == len(x):  # an activation (weights are paired too: dim 0 is no batch)
            calls.append(1)
        return pair(t)

    monkeypatch.setattr(linear, "_sign_pair", spy)
    paired = explain()
    assert calls == [1] * (conv.out_channels >= conv.in_channels)
    monkeypatch.setattr(linear, "_paired", lambda layer: False)
    assert_close(paired, explain(), rtol=1e-12)
