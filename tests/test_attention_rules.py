"""Attention rules (lrp.rules.attention) against explicit computations, float64, tiny sizes.

The expected values are built here independently of the code under test: contribution sums with
index loops, softmax Jacobians from ``torch.autograd.functional.jacobian`` at the input (the
linearisation point of the AttnLRP softmax rule), and torch's own ``nn.MultiheadAttention`` /
``F.scaled_dot_product_attention`` for forward values.
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from lrp.errors import InvalidInputError, UnsupportedLayerError
from lrp.layers import LinearRuleLayer
from lrp.rules.attention import (
    FUNCTIONS,
    METHODS,
    MultiheadAttentionLRP,
    matmul,
    scale_pass,
    scaled_dot_product_attention,
    softmax,
)
from lrp.rules.linear import Epsilon

DT = torch.float64


def _stab(z: float, eps: float) -> float:
    return z + eps if z >= 0 else z - eps


def _relevance(out: Tensor, inputs: tuple[Tensor, ...], R: Tensor) -> tuple[Tensor | None, ...]:
    """Relevance at ``inputs`` = gradient of the prepared ops with ``R`` as the output gradient."""
    return torch.autograd.grad(out, inputs, R, allow_unused=True)


# ---------------------------------------------------------------------------------------------
# explicit oracles


def explicit_uniform(a: Tensor, b: Tensor, R: Tensor, eps: float) -> tuple[Tensor, Tensor]:
    """R_a[i,j] = sum_k a_ij b_jk R_ik / (2 stab(z_ik)), R_b[j,k] = sum_i (same), by loops."""
    n, m = a.shape
    p = b.shape[1]
    z = [[sum(float(a[i, j] * b[j, k]) for j in range(m)) for k in range(p)] for i in range(n)]
    ra, rb = torch.zeros(n, m, dtype=DT), torch.zeros(m, p, dtype=DT)
    for i in range(n):
        for j in range(m):
            for k in range(p):
                c = float(a[i, j] * b[j, k]) * float(R[i, k]) / (2 * _stab(z[i][k], eps))
                ra[i, j] += c
                rb[j, k] += c
    return ra, rb


def explicit_const_first(a: Tensor, b: Tensor, R: Tensor, eps: float) -> Tensor:
    """Epsilon rule of z = a b linear in b: R_b[j,k] = sum_i a_ij b_jk R_ik / stab(z_ik)."""
    n, m = a.shape
    p = b.shape[1]
    rb = torch.zeros(m, p, dtype=DT)
    for k in range(p):
        for i in range(n):
            z = sum(float(a[i, j] * b[j, k]) for j in range(m))
            for j in range(m):
                rb[j, k] += float(a[i, j] * b[j, k]) * float(R[i, k]) / _stab(z, eps)
    return rb


def explicit_softmax_rule(y: Tensor, R: Tensor) -> Tensor:
    """Taylor at y (AttnLRP Prop. 3.1): R_in_i = sum_j y_i J_ji R_j / s_j, J from autograd.

    Positions with y = -inf (masked) take no part in the softmax and get 0.
    """
    out = torch.zeros_like(y)
    live = torch.isfinite(y).nonzero().flatten()
    if live.numel() == 0:
        return out
    yl = y[live]
    J = torch.autograd.functional.jacobian(lambda t: F.softmax(t, dim=0), yl)  # J[j, i]
    s = F.softmax(yl, dim=0)
    Rl = R[live]
    for a, i in enumerate(live.tolist()):
        out[i] = sum(float(yl[a] * J[b, a] * Rl[b] / s[b]) for b in range(len(live)))
    return out


def explicit_attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    bias: Tensor | None,
    scale: float,
    R: Tensor,
    mode: str,
    eps: float,
) -> tuple[Tensor, Tensor, Tensor]:
    """Relevance of softmax((q * scale) k^T + bias) v at q, k, v for (N, H, L, D) tensors.

    attnlrp: uniform rule on attn @ v, Taylor softmax rule at y = scores + bias, the bias's share
    absorbed (R_scores = R_y * scores / y, the epsilon-0 rule of a bias add), uniform rule on
    (q * scale) @ k^T. cp: attention constant, epsilon rule on attn @ v in v.
    """
    N, H, L, _ = q.shape
    S = k.shape[2]
    rq, rk, rv = torch.zeros_like(q), torch.zeros_like(k), torch.zeros_like(v)
    full_bias = torch.zeros(N, H, L, S, dtype=DT) if bias is None else bias.expand(N, H, L, S)
    for n in range(N):
        for h in range(H):
            qs = q[n, h] * scale
            scores = qs @ k[n, h].T
            y = scores + full_bias[n, h]
            attn = F.softmax(y, dim=-1)
            if mode == "cp":
                rv[n, h] = explicit_const_first(attn, v[n, h], R[n, h], eps)
                continue
            r_attn, rv[n, h] = explicit_uniform(attn, v[n, h], R[n, h], eps)
            r_scores = torch.zeros(L, S, dtype=DT)
            for i in range(L):
                r_y = explicit_softmax_rule(y[i], r_attn[i])
                for j in range(S):
                    if torch.isfinite(y[i, j]):
                        r_scores[i, j] = r_y[j] * scores[i, j] / y[i, j]
            r_qs, r_kt = explicit_uniform(qs, k[n, h].T, r_scores, eps)
            rq[n, h], rk[n, h] = r_qs, r_kt.T
    return rq, rk, rv


# ---------------------------------------------------------------------------------------------
# softmax


def test_softmax_attnlrp_matches_taylor_contributions() -> None:
    torch.manual_seed(0)
    x = torch.randn(3, 5, dtype=DT, requires_grad=True)
    R = torch.randn(3, 5, dtype=DT)
    s = softmax(x, -1, "attnlrp")
    torch.testing.assert_close(s, F.softmax(x, -1), rtol=0, atol=0)
    (rx,) = _relevance(s, (x,), R)
    expected = torch.stack([explicit_softmax_rule(x[i].detach(), R[i]) for i in range(3)])
    torch.testing.assert_close(rx, expected, rtol=1e-12, atol=1e-13)


def test_softmax_attnlrp_other_dim_and_masked_entries() -> None:
    torch.manual_seed(1)
    x = torch.randn(4, 3, dtype=DT)
    x[1, 0] = x[3, 2] = -math.inf
    x.requires_grad_(True)
    R = torch.randn(4, 3, dtype=DT)
    # outputs that are exactly 0 receive no relevance from any rule above them (R_A = A * ...)
    R[1, 0] = R[3, 2] = 0.0
    (rx,) = _relevance(softmax(x, 0, "attnlrp"), (x,), R)
    expected = torch.stack([explicit_softmax_rule(x[:, j].detach(), R[:, j]) for j in range(3)], 1)
    assert torch.isfinite(rx).all()
    assert rx[1, 0] == 0 and rx[3, 2] == 0
    torch.testing.assert_close(rx, expected, rtol=1e-12, atol=1e-13)


def test_softmax_attnlrp_conserves_with_the_taylor_bias_term() -> None:
    """AttnLRP Prop. 3.1: s(x) = J x + b at x; input relevance plus the bias's share sum to R."""
    torch.manual_seed(2)
    x = torch.randn(6, dtype=DT, requires_grad=True)
    R = torch.randn(6, dtype=DT)
    s = softmax(x, -1, "attnlrp")
    (rx,) = _relevance(s, (x,), R)
    J = torch.autograd.functional.jacobian(lambda t: F.softmax(t, dim=0), x.detach())
    b = s.detach() - J @ x.detach()  # the Taylor bias term of each output
    bias_share = (b * R / s.detach()).sum()
    torch.testing.assert_close(rx.sum() + bias_share, R.sum(), rtol=1e-12, atol=1e-12)
    # and the rule is not conservative without it (a test that could not fail would be useless)
    assert abs(float(rx.sum() - R.sum())) > 1e-3


def test_softmax_attnlrp_is_gradient_times_input_of_the_normalised_relevance() -> None:
    """LXT's efficient form: R_x = x * d<softmax(x), R / s>/dx with R / s held constant."""
    torch.manual_seed(3)
    x = torch.randn(2, 7, dtype=DT, requires_grad=True)
    R = torch.randn(2, 7, dtype=DT)
    (rx,) = _relevance(softmax(x, -1, "attnlrp"), (x,), R)
    x2 = x.detach().clone().requires_grad_(True)
    s2 = F.softmax(x2, -1)
    (g,) = torch.autograd.grad(s2, x2, R / s2.detach())
    torch.testing.assert_close(rx, x2.detach() * g, rtol=1e-12, atol=1e-13)


def test_softmax_cp_is_constant() -> None:
    x = torch.randn(2, 4, dtype=DT, requires_grad=True)
    s = softmax(x, -1, "cp")
    torch.testing.assert_close(s, F.softmax(x, -1), rtol=0, atol=0)
    assert not s.requires_grad  # no relevance can reach x


def test_softmax_rejects_unknown_mode() -> None:
    with pytest.raises(InvalidInputError, match="rollout"):
        softmax(torch.zeros(2, 2), -1, "rollout")


# ---------------------------------------------------------------------------------------------
# matmul


@pytest.mark.parametrize("eps", [0.0, 0.3])
def test_matmul_uniform_rule_matches_contribution_loops(eps: float) -> None:
    torch.manual_seed(4)
    a = torch.randn(2, 3, 4, dtype=DT, requires_grad=True)
    b = torch.randn(2, 4, 5, dtype=DT, requires_grad=True)
    R = torch.randn(2, 3, 5, dtype=DT)
    z = matmul(a, b, "attnlrp", eps)
    torch.testing.assert_close(z, a @ b, rtol=0, atol=0)
    ra, rb = _relevance(z, (a, b), R)
    for n in range(2):
        ea, eb = explicit_uniform(a[n].detach(), b[n].detach(), R[n], eps)
        torch.testing.assert_close(ra[n], ea, rtol=1e-11, atol=1e-12)
        torch.testing.assert_close(rb[n], eb, rtol=1e-11, atol=1e-12)


def test_matmul_uniform_rule_conserves_and_halves() -> None:
    """eps = 0, no bias: R_a + R_b = R per sample; for z = a b each factor gets exactly half."""
    torch.manual_seed(5)
    a = torch.randn(3, 4, 6, dtype=DT, requires_grad=True)
    b = torch.randn(3, 6, 2, dtype=DT, requires_grad=True)
    R = torch.randn(3, 4, 2, dtype=DT)
    ra, rb = _relevance(matmul(a, b, "attnlrp", 0.0), (a, b), R)
    torch.testing.assert_close(
        ra.sum((1, 2)) + rb.sum((1, 2)), R.sum((1, 2)), rtol=1e-11, atol=1e-12
    )
    torch.testing.assert_close(ra.sum((1, 2)), R.sum((1, 2)) / 2, rtol=1e-11, atol=1e-12)
    torch.testing.assert_close(rb.sum((1, 2)), R.sum((1, 2)) / 2, rtol=1e-11, atol=1e-12)


def test_matmul_uniform_rule_broadcast_operand_sums_over_the_batch() -> None:
    torch.manual_seed(6)
    a = torch.randn(2, 3, 4, dtype=DT, requires_grad=True)
    b = torch.randn(4, 5, dtype=DT, requires_grad=True)
    R = torch.randn(2, 3, 5, dtype=DT)
    _, rb = _relevance(matmul(a, b, "attnlrp", 0.1), (a, b), R)
    expected_b = sum(explicit_uniform(a[n].detach(), b.detach(), R[n], 0.1)[1] for n in range(2))
    assert rb.shape == b.shape
    torch.testing.assert_close(rb, expected_b, rtol=1e-11, atol=1e-12)


@pytest.mark.parametrize("eps", [0.0, 0.2])
def test_matmul_cp_holds_the_first_factor_constant(eps: float) -> None:
    torch.manual_seed(7)
    a = torch.rand(2, 3, 4, dtype=DT, requires_grad=True)
    b = torch.randn(2, 4, 5, dtype=DT, requires_grad=True)
    R = torch.randn(2, 3, 5, dtype=DT)
    z = matmul(a, b, "cp", eps)
    torch.testing.assert_close(z, a @ b, rtol=0, atol=0)
    ra, rb = _relevance(z, (a, b), R)
    assert ra is None
    for n in range(2):
        eb = explicit_const_first(a[n].detach(), b[n].detach(), R[n], eps)
        torch.testing.assert_close(rb[n], eb, rtol=1e-11, atol=1e-12)
    if eps == 0.0:
        torch.testing.assert_close(rb.sum((1, 2)), R.sum((1, 2)), rtol=1e-11, atol=1e-12)


def test_matmul_attnlrp_with_one_constant_factor_is_linear_in_the_other() -> None:
    torch.manual_seed(8)
    a = torch.randn(2, 3, 4, dtype=DT, requires_grad=True)
    b = torch.randn(2, 4, 5, dtype=DT)  # a constant (no grad)
    R = torch.randn(2, 3, 5, dtype=DT)
    z = matmul(a, b, "attnlrp", 0.1)
    torch.testing.assert_close(z, a @ b, rtol=0, atol=0)
    (ra,) = _relevance(z, (a,), R)
    for n in range(2):  # z^T = b^T a^T is linear in a^T with b^T constant
        ea = explicit_const_first(b[n].T, a[n].detach().T, R[n].T, 0.1).T
        torch.testing.assert_close(ra[n], ea, rtol=1e-11, atol=1e-12)


def test_scale_pass_moves_relevance_unchanged() -> None:
    x = torch.randn(3, 2, dtype=DT, requires_grad=True)
    R = torch.randn(3, 2, dtype=DT)
    y = scale_pass(x, 0.125)
    torch.testing.assert_close(y, x * 0.125, rtol=0, atol=0)
    (rx,) = _relevance(y, (x,), R)
    torch.testing.assert_close(rx, R, rtol=0, atol=0)


# ---------------------------------------------------------------------------------------------
# scaled_dot_product_attention


def _qkv(seed: int, N: int = 2, H: int = 2, L: int = 3, S: int = 4, D: int = 3) -> list[Tensor]:
    g = torch.Generator().manual_seed(seed)
    shapes = [(N, H, L, D), (N, H, S, D), (N, H, S, D)]
    return [torch.randn(s, dtype=DT, generator=g).requires_grad_(True) for s in shapes]


MASKS = ["none", "bool", "float"]


def _mask(kind: str, L: int = 3, S: int = 4) -> Tensor | None:
    if kind == "none":
        return None
    g = torch.Generator().manual_seed(11)
    if kind == "bool":  # True takes part; row 1 only sees keys 0 and 2
        m = torch.ones(L, S, dtype=torch.bool)
        m[1, 1] = m[1, 3] = False
        m[2, 0] = False
        return m
    return torch.randn(L, S, dtype=DT, generator=g)  # an additive position bias


def _bias(mask: Tensor | None) -> Tensor | None:
    if mask is None or mask.dtype != torch.bool:
        return mask
    return torch.zeros(mask.shape, dtype=DT).masked_fill(~mask, -math.inf)


@pytest.mark.parametrize("mode", ["attnlrp", "cp"])
@pytest.mark.parametrize("mask", MASKS)
def test_sdpa_forward_and_relevance_against_explicit(mode: str, mask: str) -> None:
    q, k, v = _qkv(8)
    m = _mask(mask)
    eps = 0.05
    out = scaled_dot_product_attention(q, k, v, attn_mask=m, mode=mode, epsilon=eps)
    torch.testing.assert_close(
        out, F.scaled_dot_product_attention(q, k, v, attn_mask=m), rtol=0, atol=0
    )
    R = torch.randn(out.shape, dtype=DT, generator=torch.Generator().manual_seed(9))
    rq, rk, rv = _relevance(out, (q, k, v), R)
    scale = 1 / math.sqrt(q.shape[-1])
    eq, ek, ev = explicit_attention(
        q.detach(), k.detach(), v.detach(), _bias(m), scale, R, mode, eps
    )
    torch.testing.assert_close(rv, ev, rtol=1e-10, atol=1e-12)
    if mode == "cp":  # CP-LRP: the attention weights are constants, q and k get nothing
        assert rq is None and rk is None
    else:
        torch.testing.assert_close(rq, eq, rtol=1e-10, atol=1e-12)
        torch.testing.assert_close(rk, ek, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("mode", ["attnlrp", "cp"])
def test_sdpa_fused_rule_equals_the_composed_public_ops(mode: str) -> None:
    """The fused SDPA rule = the graph pass's composition of matmul/scale_pass/softmax."""
    q, k, v = _qkv(10)
    scale = 0.7
    m = _mask("bool")
    out = scaled_dot_product_attention(q, k, v, attn_mask=m, scale=scale, mode=mode, epsilon=1e-3)
    R = torch.randn(out.shape, dtype=DT)
    fused = _relevance(out, (q, k, v), R)
    scores = matmul(scale_pass(q, scale), k.transpose(-2, -1), mode, 1e-3)
    attn = softmax(scores.masked_fill(~m, -math.inf), -1, mode)
    composed_out = matmul(attn, v, mode, 1e-3)
    torch.testing.assert_close(composed_out, out, rtol=1e-14, atol=1e-14)
    composed = _relevance(composed_out, (q, k, v), R)
    for a, b in zip(fused, composed, strict=True):
        if a is None or b is None:
            assert mode == "cp" and a is None and (b is None or not b.any())
            continue
        torch.testing.assert_close(a, b, rtol=1e-11, atol=1e-12)


def test_sdpa_cp_conserves_into_the_values() -> None:
    q, k, v = _qkv(12)
    out = scaled_dot_product_attention(q, k, v, mode="cp", epsilon=0.0)
    R = torch.randn(out.shape, dtype=DT)
    (rv,) = _relevance(out, (v,), R)
    torch.testing.assert_close(rv.sum((1, 2, 3)), R.sum((1, 2, 3)), rtol=1e-11, atol=1e-12)


def test_sdpa_causal_scale_and_fully_masked_rows() -> None:
    q, k, v = _qkv(13, L=4, S=4)
    for kw in ({"is_causal": True}, {"scale": 0.3}):
        out = scaled_dot_product_attention(q, k, v, mode="attnlrp", **kw)
        torch.testing.assert_close(
            out, F.scaled_dot_product_attention(q, k, v, **kw), rtol=0, atol=0
        )
    m = torch.ones(4, 4, dtype=torch.bool)
    m[2] = False  # query 2 sees nothing: torch gives 0 there
    out = scaled_dot_product_attention(q, k, v, attn_mask=m, mode="attnlrp", epsilon=1e-6)
    torch.testing.assert_close(
        out, F.scaled_dot_product_attention(q, k, v, attn_mask=m), rtol=0, atol=0
    )
    rel = _relevance(out, (q, k, v), torch.randn(out.shape, dtype=DT))
    assert all(torch.isfinite(r).all() for r in rel)
    assert not rel[0][:, :, 2].any()


def test_sdpa_rejects_dropout() -> None:
    q, k, v = _qkv(14)
    with pytest.raises(UnsupportedLayerError, match=r"blocks\.0\.attn"):
        scaled_dot_product_attention(q, k, v, dropout_p=0.1, mode="cp", path="blocks.0.attn")


# ---------------------------------------------------------------------------------------------
# MultiheadAttentionLRP


def _wrap(eps: float):
    return lambda linear, path: LinearRuleLayer(linear, Epsilon(eps), path)


def _mha(seed: int, batch_first: bool, bias: bool, kdim: int | None) -> nn.MultiheadAttention:
    torch.manual_seed(seed)
    m = nn.MultiheadAttention(6, 2, bias=bias, batch_first=batch_first, kdim=kdim, vdim=kdim)
    with torch.no_grad():  # non-zero biases so a misplaced bias would show
        for name, p in m.named_parameters():
            if "bias" in name:
                p.normal_()
    return m.to(DT).eval()


ULPS = 1e-14  # float64, values O(1): a misplaced bias or scale shows as O(1)


@pytest.mark.parametrize("batch_first", [True, False])
@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("kdim", [None, 4])
@pytest.mark.parametrize("need_weights", [False, True])
def test_mha_forward_equals_torch(
    batch_first: bool, bias: bool, kdim: int | None, need_weights: bool
) -> None:
    m = _mha(0, batch_first, bias, kdim)
    lrp_m = MultiheadAttentionLRP(m, _wrap(1e-6), "enc.attn", mode="attnlrp")
    g = torch.Generator().manual_seed(1)
    x = torch.randn(2, 3, 6, dtype=DT, generator=g)
    kv = torch.randn(2, 5, kdim or 6, dtype=DT, generator=g)
    if not batch_first:
        x, kv = x.transpose(0, 1), kv.transpose(0, 1)
    kpm = torch.tensor([[False, False, True, False, False], [False] * 4 + [True]])
    am = torch.randn(3, 5, dtype=DT, generator=g)
    for kw in ({}, {"key_padding_mask": kpm}, {"attn_mask": am}, {"attn_mask": am > 1.0}):
        ref_out, ref_w = m(x, kv, kv, need_weights=need_weights, **kw)
        out, w = lrp_m(x, kv, kv, need_weights=need_weights, **kw)
        # a few float64 ulps: torch's fused kernel and the decomposed ops sum in a CPU-dependent order
        torch.testing.assert_close(out, ref_out, rtol=0, atol=ULPS)
        if need_weights:
            torch.testing.assert_close(w, ref_w, rtol=0, atol=ULPS)
        else:
            assert w is None and ref_w is None


def test_mha_forward_unbatched_self_attention_and_per_head_weights() -> None:
    m = _mha(2, False, True, None)
    lrp_m = MultiheadAttentionLRP(m, _wrap(1e-6), "attn", mode="cp")
    x = torch.randn(4, 6, dtype=DT)
    for need in (False, True):
        ref = m(x, x, x, need_weights=need, average_attn_weights=False)
        got = lrp_m(x, x, x, need_weights=need, average_attn_weights=False)
        torch.testing.assert_close(got[0], ref[0], rtol=0, atol=0)
        if need:
            torch.testing.assert_close(got[1], ref[1], rtol=0, atol=0)


@pytest.mark.parametrize("mode", ["attnlrp", "cp"])
@pytest.mark.parametrize("need_weights", [False, True])
def test_mha_relevance_against_explicit(mode: str, need_weights: bool) -> None:
    """Epsilon rule on each projection (explicit x * W^T (R / stab(z))) around the attention."""
    eps = 0.01
    m = _mha(3, True, True, None)
    lrp_m = MultiheadAttentionLRP(m, _wrap(eps), "attn", mode=mode, epsilon=eps)
    g = torch.Generator().manual_seed(4)
    x = torch.randn(2, 3, 6, dtype=DT, generator=g, requires_grad=True)
    kpm = torch.tensor([[False, True, False], [False, False, False]])
    out, _ = lrp_m(x, x, x, key_padding_mask=kpm, need_weights=need_weights)
    R = torch.randn(out.shape, dtype=DT, generator=g)
    (rx,) = _relevance(out, (x,), R)

    E, H, D = 6, 2, 3
    W, b = m.in_proj_weight.detach(), m.in_proj_bias.detach()
    Wo, bo = m.out_proj.weight.detach(), m.out_proj.bias.detach()
    xd = x.detach()

    def eps_rule(inp: Tensor, w: Tensor, bb: Tensor, r: Tensor) -> Tensor:
        z = inp @ w.T + bb
        den = torch.where(z >= 0, z + eps, z - eps)
        return inp * ((r / den) @ w)

    heads = lambda t: t.view(2, -1, H, D).transpose(1, 2)  # noqa: E731
    q, k, v = (heads(xd @ W[i * E : (i + 1) * E].T + b[i * E : (i + 1) * E]) for i in range(3))
    bias = torch.zeros(2, 1, 1, 3, dtype=DT).masked_fill(kpm.view(2, 1, 1, 3), -math.inf)
    attn = F.softmax((q / math.sqrt(D)) @ k.transpose(-2, -1) + bias, -1)
    ctx = (attn @ v).transpose(1, 2).reshape(2, 3, E)
    r_ctx = eps_rule(ctx, Wo, bo, R)
    rq, rk, rv = explicit_attention(q, k, v, bias, 1 / math.sqrt(D), heads(r_ctx), mode, eps)
    unheads = lambda t: t.transpose(1, 2).reshape(2, 3, E)  # noqa: E731
    expected = sum(
        eps_rule(xd, W[i * E : (i + 1) * E], b[i * E : (i + 1) * E], unheads(r))
        for i, r in enumerate((rq, rk, rv))
    )
    torch.testing.assert_close(rx, expected, rtol=1e-10, atol=1e-12)


def test_mha_cp_gives_queries_and_keys_nothing_and_conserves() -> None:
    m = _mha(5, True, False, None)  # bias-free projections, eps 0: CP is conservative
    lrp_m = MultiheadAttentionLRP(m, _wrap(0.0), "attn", mode="cp", epsilon=0.0)
    g = torch.Generator().manual_seed(6)
    query, key, value = (
        torch.randn(2, 3, 6, dtype=DT, generator=g, requires_grad=True) for _ in range(3)
    )
    out, _ = lrp_m(query, key, value, need_weights=False)
    R = torch.randn(out.shape, dtype=DT, generator=g)
    rq, rk, rv = _relevance(out, (query, key, value), R)
    assert rq is None and rk is None
    torch.testing.assert_close(rv.sum((1, 2)), R.sum((1, 2)), rtol=1e-10, atol=1e-12)


def test_mha_shares_and_never_changes_the_users_tensors() -> None:
    m = _mha(7, True, True, None)
    before = {k: v.clone() for k, v in m.state_dict().items()}
    seen: list[nn.Linear] = []

    def wrap(linear: nn.Linear, path: str) -> nn.Module:
        seen.append(linear)
        return LinearRuleLayer(linear, Epsilon(1e-6), path)

    lrp_m = MultiheadAttentionLRP(m, wrap, "attn")
    q_lin, k_lin, v_lin, out_lin = seen
    assert out_lin is m.out_proj
    base, step = m.in_proj_weight.data_ptr(), m.in_proj_weight.element_size() * 36
    assert [lin.weight.data_ptr() for lin in (q_lin, k_lin, v_lin)] == [
        base,
        base + step,
        base + 2 * step,
    ]
    assert v_lin.bias.data_ptr() == m.in_proj_bias.data_ptr() + 12 * m.in_proj_bias.element_size()
    x = torch.randn(2, 3, 6, dtype=DT, requires_grad=True)
    out, _ = lrp_m(x, x, x)
    out.sum().backward()
    for k, v in m.state_dict().items():
        assert torch.equal(v, before[k]), k
    assert m.in_proj_weight.grad is None


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [({"add_bias_kv": True}, "add_bias_kv"), ({"add_zero_attn": True}, "add_zero_attn")],
)
def test_mha_unsupported_options_name_the_module(kwargs: dict, match: str) -> None:
    m = nn.MultiheadAttention(6, 2, **kwargs)
    with pytest.raises(UnsupportedLayerError, match=rf"encoder\.layers\.3\.attn.*{match}"):
        MultiheadAttentionLRP(m, _wrap(1e-6), "encoder.layers.3.attn")


def test_mha_dropout_in_training_mode_is_refused() -> None:
    m = nn.MultiheadAttention(6, 2, dropout=0.1).to(DT)
    lrp_m = MultiheadAttentionLRP(m, _wrap(1e-6), "blk.attn")
    x = torch.randn(3, 1, 6, dtype=DT)
    with pytest.raises(UnsupportedLayerError, match=r"blk\.attn"):
        lrp_m(x, x, x)
    lrp_m.eval()
    torch.testing.assert_close(lrp_m(x, x, x)[0], m.eval()(x, x, x)[0], rtol=0, atol=ULPS)


@pytest.mark.parametrize("mode", ["attnlrp", "cp"])
def test_graph_pass_maps_keep_the_forward(mode: str) -> None:
    q, k, v = _qkv(15)
    kt = k.transpose(-2, -1)
    for target, rule in FUNCTIONS.items():
        if target is F.scaled_dot_product_attention:
            args, kw = (q, k, v), {"mode": mode, "epsilon": 1e-6}
        elif rule is softmax:
            args, kw = (q, -1), {"mode": mode}
        else:
            args, kw = (q.flatten(0, 1), kt.flatten(0, 1)), {"mode": mode, "epsilon": 1e-6}
        torch.testing.assert_close(rule(*args, **kw), target(*args), rtol=0, atol=0)
    assert METHODS["softmax"] is softmax and METHODS["matmul"] is matmul
