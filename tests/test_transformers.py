"""Vision transformers end to end (torchvision ViT, Swin V1/V2, MaxViT) and the rules they added.

Independent computations: the einsum rule against contribution sums enumerated index by index;
the Swin window attention against gradient x input through torchvision's own function (LRP-0
chains equal gradient x input when each op's gradient is the rule's: softmax detached for CP,
bilinear products halved for AttnLRP); the relevance absorbed by ViT's class token against the
gradient of the prepared copy with respect to the ``class_token`` parameter; conservation
against the explained logit. float64, ``epsilon=0, zero_bias=True, stabilizer=0`` where a sum is
checked (the setting in which CP-LRP is exactly conservative).
"""

from __future__ import annotations

import itertools

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torchvision.models import VisionTransformer, maxvit_t, swin_t, vit_b_16
from torchvision.models import swin_transformer as tv_swin
from torchvision.models.maxvit import MaxVit
from torchvision.models.swin_transformer import (
    PatchMergingV2,
    SwinTransformer,
    SwinTransformerBlockV2,
)

import lrp
from lrp.errors import InvalidInputError, UnsupportedLayerError
from lrp.layers import LinearRuleLayer
from lrp.rules.attention import ShiftedWindowAttentionLRP, _view_linear, einsum, matmul
from lrp.rules.linear import Epsilon

DT = torch.float64
EXACT = {"epsilon": 0.0, "zero_bias": True, "stabilizer": 0.0}


def _head_weights(model: nn.Module, seed: int = 0) -> nn.Module:
    """Random head weights (torchvision zero-initialises ViT's head), float64, eval."""
    torch.manual_seed(seed)
    head = [m for m in model.modules() if isinstance(m, nn.Linear)][-1]
    nn.init.normal_(head.weight)
    return model.to(DT).eval()


def _explain(model: nn.Module, x: Tensor, attention: str = "cp", **options: float) -> lrp.Explanation:
    explainer = lrp.Explainer(model, "epsilon-transformer", attention=attention, **(options or EXACT))
    return explainer(x)


def _gap(e: lrp.Explanation) -> Tensor:
    """Per sample |sum(input relevance) + absorbed - logit| / |logit|."""
    assert e.absorbed is not None
    total = e.relevance.flatten(1).sum(1) + e.absorbed
    return (total - e.initial).abs() / e.initial.abs()


def small_vit(seed: int = 0) -> VisionTransformer:
    torch.manual_seed(seed)
    model = VisionTransformer(image_size=32, patch_size=8, num_layers=2, num_heads=2,
                              hidden_dim=32, mlp_dim=64, num_classes=10)
    with torch.no_grad():
        model.class_token.normal_()  # torchvision starts it at 0: then it would absorb nothing
    return _head_weights(model, seed)


# ---------------------------------------------------------------------------------------------
# class-token accounting


def test_vit_cp_input_plus_absorbed_is_the_logit() -> None:
    model = small_vit()
    x = torch.randn(3, 3, 32, 32, dtype=DT)
    e = _explain(model, x)
    assert (_gap(e) < 1e-8).all(), _gap(e)
    assert (e.absorbed.abs() > 1e-3 * e.initial.abs()).all()  # the token does take a share
    # conservation() still compares the input relevance alone with the initial relevance
    torch.testing.assert_close(
        lrp.conservation(e), (e.relevance.flatten(1).sum(1) - e.initial).abs() / e.initial.abs()
    )
    assert (lrp.conservation(e) > 1e-3).all()


def test_absorbed_is_the_class_token_gradient() -> None:
    """Independent: gradient of the prepared copy w.r.t. its class_token parameter, per sample."""
    model = small_vit(1)
    explainer = lrp.Explainer(model, "epsilon-transformer", attention="cp", **EXACT)
    xs = torch.randn(2, 3, 32, 32, dtype=DT)
    e = explainer(xs)
    prepared = explainer.prepared_model()
    token = prepared.get_parameter("class_token")
    for i in range(2):
        x = xs[i : i + 1].clone().requires_grad_(True)
        token.requires_grad_(True)
        try:
            out = prepared(x)[0, e.target[i]]
            gx, gt = torch.autograd.grad(out, (x, token), out.detach())  # R = the logit
        finally:
            token.requires_grad_(False)
        torch.testing.assert_close(e.absorbed[i], gt.sum(), rtol=1e-10, atol=1e-12)
        torch.testing.assert_close(e.relevance[i], gx[0], rtol=1e-10, atol=1e-12)


def test_absorbed_is_zero_without_tokens_and_in_attnlrp_still_reported() -> None:
    conv = nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 36, 5)).to(DT).eval()
    e = lrp.Explainer(conv, "epsilon")(torch.randn(2, 3, 8, 8, dtype=DT))
    assert e.absorbed is not None and torch.equal(e.absorbed, torch.zeros(2, dtype=DT))
    e = _explain(small_vit(), torch.randn(2, 3, 32, 32, dtype=DT), "attnlrp")
    assert (e.absorbed.abs() > 0).all()


@pytest.mark.slow
def test_vit_b_16_cp_input_plus_absorbed_is_the_logit() -> None:
    model = vit_b_16()
    with torch.no_grad():
        model.class_token.normal_(0.0, 0.02)
    model = _head_weights(model)
    e = _explain(model, torch.randn(1, 3, 224, 224, dtype=DT))
    assert (_gap(e) < 1e-8).all(), _gap(e)


# ---------------------------------------------------------------------------------------------
# einsum of two input-dependent tensors


def _stab(z: float, eps: float) -> float:
    return z + eps if z >= 0 else z - eps


def explicit_einsum(
    eq: str, a: Tensor, b: Tensor, R: Tensor, eps: float, share_a: float
) -> tuple[Tensor, Tensor]:
    """Enumerate every index assignment: contribution a[ia] b[ib] to z[out]; R_a gets
    share_a of c R / stab(z), R_b the rest."""
    ins, out = eq.replace(" ", "").split("->")
    sa, sb = ins.split(",")
    sizes = {**dict(zip(sa, a.shape, strict=True)), **dict(zip(sb, b.shape, strict=True))}
    letters = sorted(sizes)
    z: dict[tuple, float] = {}
    terms = []
    for vals in itertools.product(*(range(sizes[c]) for c in letters)):
        v = dict(zip(letters, vals, strict=True))
        ia, ib, io = (tuple(v[c] for c in s) for s in (sa, sb, out))
        c = float(a[ia] * b[ib])
        z[io] = z.get(io, 0.0) + c
        terms.append((ia, ib, io, c))
    ra, rb = torch.zeros_like(a), torch.zeros_like(b)
    for ia, ib, io, c in terms:
        share = c * float(R[io]) / _stab(z[io], eps)
        ra[ia] += share_a * share
        rb[ib] += (1 - share_a) * share
    return ra, rb


EQUATIONS = [
    ("ij,jk->ik", (3, 4), (4, 2)),
    ("bhid,bhjd->bhij", (1, 2, 3, 2), (1, 2, 4, 2)),  # MaxViT's q k^T (as letters)
    ("ij,ij->i", (3, 2), (3, 2)),
    ("i,j->ij", (3,), (2,)),
    ("ii,i->i", (3, 3), (3,)),
]


@pytest.mark.parametrize(("eq", "sa", "sb"), EQUATIONS)
@pytest.mark.parametrize("eps", [0.0, 0.1])
@pytest.mark.parametrize("mode", ["attnlrp", "cp"])
def test_einsum_rule_against_enumerated_contributions(eq, sa, sb, eps, mode) -> None:
    g = torch.Generator().manual_seed(7)
    a = torch.randn(sa, dtype=DT, generator=g).requires_grad_(True)
    b = torch.randn(sb, dtype=DT, generator=g).requires_grad_(True)
    z = einsum(eq, a, b, mode=mode, epsilon=eps)
    torch.testing.assert_close(z, torch.einsum(eq, a, b), rtol=0, atol=0)
    R = torch.randn(z.shape, dtype=DT, generator=g)
    ra, rb = torch.autograd.grad(z, (a, b), R, allow_unused=True)
    ea, eb = explicit_einsum(eq, a.detach(), b.detach(), R, eps, 0.5 if mode == "attnlrp" else 0.0)
    if mode == "cp":
        assert ra is None  # the first operand is held constant, as attention.matmul does
    else:
        torch.testing.assert_close(ra, ea, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(rb, eb, rtol=1e-12, atol=1e-12)
    if eps == 0 and mode == "attnlrp":  # the uniform rule conserves
        torch.testing.assert_close((ra.sum() + rb.sum()), R.sum(), rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("mode", ["attnlrp", "cp"])
def test_einsum_with_one_constant_operand_is_linear(mode: str) -> None:
    """Where only one operand requires grad it gets all relevance (epsilon rule), either side."""
    g = torch.Generator().manual_seed(3)
    a, b = torch.randn(3, 4, dtype=DT, generator=g), torch.randn(4, 2, dtype=DT, generator=g)
    R = torch.randn(3, 2, dtype=DT, generator=g)
    ag = a.clone().requires_grad_(True)
    (ra,) = torch.autograd.grad(einsum("ij,jk->ik", [ag, b], mode=mode, epsilon=0.0), ag, R)
    torch.testing.assert_close(ra, explicit_einsum("ij,jk->ik", a, b, R, 0.0, 1.0)[0])
    bg = b.clone().requires_grad_(True)
    (rb,) = torch.autograd.grad(einsum("ij,jk->ik", a, bg, mode=mode, epsilon=0.0), bg, R)
    torch.testing.assert_close(rb, explicit_einsum("ij,jk->ik", a, b, R, 0.0, 0.0)[1])


def test_einsum_refuses_other_operand_counts() -> None:
    x = torch.randn(2, 2, dtype=DT)
    with pytest.raises(InvalidInputError, match="exactly two tensor operands"):
        einsum("ij,jk,kl->il", x, x, x)


def test_cp_matmul_with_constant_second_operand_gives_the_first_all_relevance() -> None:
    g = torch.Generator().manual_seed(4)
    a = torch.randn(3, 4, dtype=DT, generator=g).requires_grad_(True)
    b = torch.randn(4, 2, dtype=DT, generator=g)  # e.g. a detached CP attention matrix
    R = torch.randn(3, 2, dtype=DT, generator=g)
    (ra,) = torch.autograd.grad(matmul(a, b, "cp", 0.0), a, R)
    torch.testing.assert_close(ra, explicit_einsum("ij,jk->ik", a.detach(), b, R, 0.0, 1.0)[0])


# ---------------------------------------------------------------------------------------------
# Swin: shifted_window_attention op by op


def _swin_call(v2: bool, seed: int = 0) -> tuple[dict, Tensor]:
    """Arguments of one torchvision shifted_window_attention call (padding and shift active)."""
    g = torch.Generator().manual_seed(seed)
    C, heads, win = 8, 2, [3, 3]
    kw = {
        "qkv_weight": torch.randn(3 * C, C, dtype=DT, generator=g) / C**0.5,
        "proj_weight": torch.randn(C, C, dtype=DT, generator=g) / C**0.5,
        "relative_position_bias": torch.randn(1, heads, 9, 9, dtype=DT, generator=g),
        "window_size": win,
        "num_heads": heads,
        "shift_size": [1, 1],
        "qkv_bias": torch.randn(3 * C, dtype=DT, generator=g),
        "proj_bias": torch.randn(C, dtype=DT, generator=g),
        "logit_scale": torch.randn(heads, 1, 1, dtype=DT, generator=g) if v2 else None,
        "training": False,
    }
    return kw, torch.randn(2, 5, 7, C, dtype=DT, generator=g)  # 5 x 7: padded to 6 x 9


def _window_module(kw: dict, mode: str, eps: float, zero_bias: bool) -> ShiftedWindowAttentionLRP:
    bias = kw["qkv_bias"]
    if kw["logit_scale"] is not None and bias is not None:
        bias = bias.clone()
        bias[8:16] = 0
    qkv = LinearRuleLayer(_view_linear(kw["qkv_weight"], bias), Epsilon(eps, zero_bias), "qkv")
    proj = LinearRuleLayer(_view_linear(kw["proj_weight"], kw["proj_bias"]),
                           Epsilon(eps, zero_bias), "proj")
    return ShiftedWindowAttentionLRP(qkv, proj, "attn", mode=mode, epsilon=eps, zero_bias=zero_bias)


def _module_args(kw: dict) -> dict:
    keys = ("window_size", "num_heads", "shift_size", "logit_scale", "training")
    return {k: kw[k] for k in keys}


@pytest.mark.parametrize("v2", [False, True])
def test_window_attention_forward_is_torchvision_s(v2: bool) -> None:
    kw, x = _swin_call(v2)
    ref = tv_swin.shifted_window_attention(x, **kw)
    for mode in ("cp", "attnlrp"):
        out = _window_module(kw, mode, 1e-6, False)(x, kw["relative_position_bias"],
                                                    **_module_args(kw))
        torch.testing.assert_close(out, ref, rtol=0, atol=0)


@pytest.mark.parametrize("v2", [False, True])
@pytest.mark.parametrize("mode", ["cp", "attnlrp"])
def test_window_attention_relevance_is_gradient_x_input_of_torchvision_s(
    v2: bool, mode: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """LRP-0 (epsilon 0, biases in the denominators) through the module equals gradient x input
    through torchvision's function once each op's gradient is made the rule's: CP detaches the
    softmax; AttnLRP halves the gradient into both factors of each product; V2 holds the norms of
    F.normalize constant. R/out is the output gradient (LRP-0 chain = gradient x input)."""
    kw, x = _swin_call(v2, seed=1)
    g = torch.Generator().manual_seed(2)
    R = torch.randn(x.shape, dtype=DT, generator=g)

    xm = x.clone().requires_grad_(True)
    out = _window_module(kw, mode, 0.0, False)(xm, kw["relative_position_bias"], **_module_args(kw))
    (ours,) = torch.autograd.grad(out, xm, R)

    softmax, tmatmul = F.softmax, torch.Tensor.matmul

    class _Half(torch.autograd.Function):
        @staticmethod
        def forward(ctx, t):
            return t.clone()

        @staticmethod
        def backward(ctx, grad):
            return grad / 2

    def matmul_rule(a: Tensor, b: Tensor) -> Tensor:
        return tmatmul(_Half.apply(a), _Half.apply(b)) if mode == "attnlrp" else tmatmul(a, b)

    if mode == "cp":
        monkeypatch.setattr(F, "softmax", lambda *a, **k: softmax(*a, **k).detach())
    monkeypatch.setattr(torch.Tensor, "matmul", matmul_rule)
    monkeypatch.setattr(torch.Tensor, "__matmul__", matmul_rule)
    monkeypatch.setattr(  # F.normalize's max(norm, 1e-12), held constant
        F, "normalize", lambda t, dim: t / t.norm(dim=dim, keepdim=True).clamp_min(1e-12).detach()
    )
    xt = x.clone().requires_grad_(True)
    ref = tv_swin.shifted_window_attention(xt, **kw)
    (grad,) = torch.autograd.grad(ref, xt, R / ref.detach())
    monkeypatch.undo()
    torch.testing.assert_close(out, ref.detach(), rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(ours, xt.detach() * grad, rtol=1e-8, atol=1e-10)


def small_swin(v2: bool = False) -> SwinTransformer:
    torch.manual_seed(0)
    extra = {"block": SwinTransformerBlockV2, "downsample_layer": PatchMergingV2} if v2 else {}
    model = SwinTransformer(patch_size=[4, 4], embed_dim=16, depths=[2, 2], num_heads=[2, 2],
                            window_size=[4, 4], num_classes=10, **extra)
    return _head_weights(model)


@pytest.mark.parametrize("v2", [False, True])
def test_swin_cp_conserves_and_forward_is_unchanged(v2: bool) -> None:
    model = small_swin(v2)
    x = torch.randn(2, 3, 36, 36, dtype=DT)  # 9 x 9 patches: padding, shifted and unshifted
    explainer = lrp.Explainer(model, "epsilon-transformer", attention="cp", **EXACT)
    torch.testing.assert_close(explainer.prepared_model()(x), model(x), rtol=0, atol=0)
    e = explainer(x)
    assert torch.equal(e.absorbed, torch.zeros(2, dtype=DT))
    assert (_gap(e) < 1e-8).all(), _gap(e)
    assert any(p.endswith("attn.qkv") for p in explainer.rules)  # the projections have rules


def test_swin_t_cp_conserves_at_32px() -> None:
    model = _head_weights(swin_t())
    e = _explain(model, torch.randn(1, 3, 32, 32, dtype=DT))
    assert (_gap(e) < 1e-8).all(), _gap(e)


# ---------------------------------------------------------------------------------------------
# MaxViT


def small_maxvit() -> MaxVit:
    torch.manual_seed(0)
    model = MaxVit(input_size=(32, 32), stem_channels=8, partition_size=2, block_channels=[16, 32],
                   block_layers=[1, 1], head_dim=8, stochastic_depth_prob=0.0, num_classes=10)
    return _head_weights(model)


def test_maxvit_cp_conserves() -> None:
    model = small_maxvit()
    x = torch.randn(2, 3, 32, 32, dtype=DT)
    explainer = lrp.Explainer(model, "epsilon-transformer", attention="cp", **EXACT)
    torch.testing.assert_close(explainer.prepared_model()(x), model(x), rtol=1e-12, atol=1e-12)
    e = explainer(x)
    assert (_gap(e) < 1e-8).all(), _gap(e)


@pytest.mark.slow
def test_maxvit_t_cp_conserves_at_224px() -> None:
    model = _head_weights(maxvit_t())
    e = _explain(model, torch.randn(1, 3, 224, 224, dtype=DT))
    assert (_gap(e) < 1e-8).all(), _gap(e)


# ---------------------------------------------------------------------------------------------
# bad input


def test_unknown_attention_module_is_named() -> None:
    class Model(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.embed = nn.Linear(4, 8)
            # (nn.TransformerEncoderLayer is traced through: tests/test_transformer_encoder.py)
            self.block = nn.TransformerDecoderLayer(8, 2, 16, batch_first=True)
            self.head = nn.Linear(8, 3)

        def forward(self, x: Tensor) -> Tensor:
            h = self.embed(x)
            return self.head(self.block(h, h).mean(1))

    explainer = lrp.Explainer(Model().to(DT).eval(), "epsilon-transformer")
    with pytest.raises(UnsupportedLayerError, match=r"TransformerDecoderLayer at 'block'"):
        explainer(torch.randn(2, 5, 4, dtype=DT))


def _custom_attention(q: Tensor, k: Tensor, v: Tensor) -> Tensor:
    return torch.softmax(q @ k.transpose(-1, -2), -1) @ v


torch.fx.wrap("_custom_attention")


def test_fx_wrapped_attention_function_is_named() -> None:
    class Attention(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.qkv = nn.Linear(8, 24)

        def forward(self, x: Tensor) -> Tensor:
            q, k, v = self.qkv(x).chunk(3, -1)
            return _custom_attention(q, k, v)

    model = nn.Sequential(nn.Linear(4, 8), Attention(), nn.Flatten(), nn.Linear(40, 3)).to(DT)
    with pytest.raises(UnsupportedLayerError, match=r"'_custom_attention' at Attention at '1'"):
        lrp.Explainer(model.eval(), "epsilon-transformer")(torch.randn(2, 5, 4, dtype=DT))


def test_vit_wrong_input_size_says_the_expected_size() -> None:
    explainer = lrp.Explainer(small_vit(), "epsilon-transformer")
    with pytest.raises(InvalidInputError, match=r"\(1, 3, 48, 48\).*Expected 32"):
        explainer(torch.randn(1, 3, 48, 48, dtype=DT))



def test_einsum_of_three_tensors_is_refused_by_name() -> None:
    class Model(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.fc = nn.Linear(4, 3)

        def forward(self, x: Tensor) -> Tensor:
            h = self.fc(x)
            return torch.einsum("bi,bi,bi->bi", h, h, h)

    with pytest.raises(UnsupportedLayerError, match="'einsum' with 3 operands"):
        lrp.Explainer(Model().to(DT).eval(), "epsilon-transformer")(torch.randn(2, 4, dtype=DT))


class _SeqFirstToken(nn.Module):
    """A token concatenated along dim 0 of a (L, N, E) sequence (sequence-first layout)."""

    def __init__(self, along_batch: bool = False) -> None:
        super().__init__()
        self.fc = nn.Linear(4, 4)
        self.fc2 = nn.Linear(4, 3)
        self.token = nn.Parameter(torch.randn(1, 1, 4))
        self.along_batch = along_batch

    def forward(self, x: Tensor) -> Tensor:
        h = self.fc(x)
        if self.along_batch:  # (N, 4) + a constant row: the token is no sample's
            return self.fc2(torch.cat([h, self.token[0]], 0))[: x.shape[0]]
        h = torch.cat([self.token.expand(1, x.shape[0], 4), h.unsqueeze(0)], 0)
        return self.fc2(h.sum(0))


def test_absorbed_in_a_sequence_first_cat() -> None:
    torch.manual_seed(0)
    model = _SeqFirstToken().to(DT).eval()
    e = lrp.Explainer(model, "epsilon", **EXACT)(torch.randn(3, 4, dtype=DT))
    assert (e.absorbed.abs() > 1e-6).all()
    assert (_gap(e) < 1e-8).all(), _gap(e)


def test_absorbed_is_none_with_a_warning_when_no_batch_dim() -> None:
    torch.manual_seed(0)
    model = _SeqFirstToken(along_batch=True).to(DT).eval()
    with pytest.warns(UserWarning, match="no batch dim of size 3"):
        e = lrp.Explainer(model, "epsilon", **EXACT)(torch.randn(3, 4, dtype=DT))
    assert e.absorbed is None
