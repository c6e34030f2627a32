"""LXT 2.1 (the AttnLRP authors' package) as an oracle for the transformer rules.

LXT is loaded from its source without running its package ``__init__`` (which imports the
Hugging Face patches and so needs ``transformers``, ``accelerate``, ``bitsandbytes`` and
``open_clip_torch``, none of which the engine needs): point ``LXT_PATH`` at an unpacked
``lxt-2.1`` sdist, e.g.::

    pip download --no-deps lxt==2.1 -d /tmp/lxt && tar xzf /tmp/lxt/lxt-2.1.tar.gz -C /tmp/lxt
    LXT_PATH=/tmp/lxt/lxt-2.1 pytest tests/test_vit_lxt.py

or install it (``pip install --no-deps lxt==2.1``). Without either, the tests skip.

What LXT computes (read from its source):
- ``lxt.efficient`` is gradient x input through a model whose forward is patched so that its
  gradient carries the rules: Linear/Conv plain (LRP-0, i.e. epsilon -> 0, biases absorb);
  GELU identity (``identity_rule_implicit``: gradient out / (in + 1e-10)); LayerNorm with the
  std detached (``layer_norm_forward``); residual adds, class-token concat and position-embedding
  add plain (so a residual sum splits in proportion to the *signed* branch values and additive
  parameters absorb like biases); attention in CP mode by ``stop_gradient`` on query and key
  (``cp_multi_head_attention_forward``, which is the map LXT ships for torchvision ViT), in
  AttnLRP mode by ``divide_gradient`` of q and k by 4 and v by 2 (``wrap_attention_forward``,
  shipped for the Hugging Face models; torchvision gets the same wrapper here, applied before the
  in-projection, which is equivalent because the projection is linear).
- ``lxt.explicit.functional`` has the rules as autograd Functions: ``softmax`` (Prop. 3.1,
  x * (R - s * sum R), -inf inputs zeroed) and ``matmul`` (uniform rule, R / (2 z + eps)).

Differences to the engine (each one is why a number below is not exactly 1):
- stabilisers: LXT adds ``+eps`` (not sign-aware) and uses none on linear layers; the engine uses
  ``z + eps * sign(z)``; at the tiny epsilons used here this is below 1e-9 relative.
- residual adds: the engine's Relevance Splitting (METHOD.md section 3) splits by ``|h_i|``,
  LXT's gradient by the signed ``h_i``; these agree where both branches have the same sign.
"""

from __future__ import annotations

import importlib
import importlib.util
import os
import sys
import types
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torchvision.models import VisionTransformer

from lrp.rules.attention import matmul, scaled_dot_product_attention, softmax
from lrp.rules.elementwise import uniform_product

DT = torch.float64
LXT_MODULES = (
    "efficient.rules",
    "efficient.patches",
    "efficient.models.vit_torch",
    "explicit.functional",
)


def _lxt_root() -> Path | None:
    env = os.environ.get("LXT_PATH")
    if env:
        root = Path(env)
        return root / "lxt" if (root / "lxt").is_dir() else root
    spec = importlib.util.find_spec("lxt")  # an installed lxt: locate it without importing it
    if spec is not None and spec.submodule_search_locations:
        return Path(next(iter(spec.submodule_search_locations)))
    return None


@pytest.fixture(scope="module")
def lxt() -> Iterator[types.SimpleNamespace]:
    """LXT's rule, patch and functional modules, loaded as LXT ships them (no edits)."""
    root = _lxt_root()
    if root is None or not (root / "efficient" / "patches.py").is_file():
        pytest.skip("lxt 2.1 source not found: set LXT_PATH (see the module docstring)")
    saved = {k: v for k, v in sys.modules.items() if k == "lxt" or k.startswith("lxt.")}
    for name in ("lxt", "lxt.efficient", "lxt.efficient.models", "lxt.explicit"):
        stub = types.ModuleType(name)  # package shells: their __init__ would import transformers
        stub.__path__ = [str(root.joinpath(*name.split(".")[1:]))]
        sys.modules[name] = stub
    try:
        mods = {m: importlib.import_module(f"lxt.{m}") for m in LXT_MODULES}
        yield types.SimpleNamespace(
            rules=mods["efficient.rules"],
            patches=mods["efficient.patches"],
            vit_map=mods["efficient.models.vit_torch"].cp_LRP,
            functional=mods["explicit.functional"],
        )
    finally:
        for k in [k for k in sys.modules if k == "lxt" or k.startswith("lxt.")]:
            del sys.modules[k]
        sys.modules.update(saved)


def test_lxt_source_is_version_2_1() -> None:
    root = _lxt_root()
    if root is None:
        pytest.skip("lxt source not found")
    info = root.parent / "PKG-INFO"
    if info.is_file():
        assert "Version: 2.1\n" in info.read_text()
    else:
        assert importlib.metadata.version("lxt") == "2.1"


# ---------------------------------------------------------------------------------------------
# op by op: the engine's rule functions against LXT's on the same tensors


def test_softmax_rule_equals_lxt_explicit(lxt: types.SimpleNamespace) -> None:
    torch.manual_seed(0)
    x = torch.randn(2, 3, 4, 5, dtype=DT)
    x[0, 1, 2, 3] = x[1, 0, 0, :2] = -torch.inf
    R = torch.randn(2, 3, 4, 5, dtype=DT)
    x1 = x.clone().requires_grad_(True)
    x2 = x.clone().requires_grad_(True)
    (ours,) = torch.autograd.grad(softmax(x1, -1, "attnlrp"), x1, R)
    (theirs,) = torch.autograd.grad(lxt.functional.softmax(x2, -1), x2, R)
    torch.testing.assert_close(ours, theirs, rtol=1e-14, atol=1e-15)


@pytest.mark.parametrize("eps", [0.0, 0.1])
def test_uniform_matmul_rule_equals_lxt_explicit(lxt: types.SimpleNamespace, eps: float) -> None:
    """Same rule; LXT's denominator is 2 z + eps, ours 2 (z + eps sign z): with eps > 0 they
    coincide for LXT's eps = 2 eps where z > 0 (positive factors here)."""
    torch.manual_seed(1)
    a = torch.randn(2, 3, 4, 6, dtype=DT)
    b = torch.randn(2, 3, 6, 5, dtype=DT)
    if eps:
        a, b = a.abs(), b.abs()
    R = torch.randn(2, 3, 4, 5, dtype=DT)
    a1, b1 = a.clone().requires_grad_(True), b.clone().requires_grad_(True)
    a2, b2 = a.clone().requires_grad_(True), b.clone().requires_grad_(True)
    ours = torch.autograd.grad(matmul(a1, b1, "attnlrp", eps), (a1, b1), R)
    theirs = torch.autograd.grad(lxt.functional.matmul(a2, b2, False, 2 * eps), (a2, b2), R)
    for o, t in zip(ours, theirs, strict=True):
        torch.testing.assert_close(o, t, rtol=1e-13, atol=1e-14)


@pytest.mark.parametrize("shape_b", [(2, 3, 4, 5), (2, 3, 1, 5)], ids=["same", "broadcast"])
def test_uniform_product_rule_equals_lxt_explicit(lxt: types.SimpleNamespace,
                                                  shape_b: tuple[int, ...]) -> None:
    """The element-wise product of two signals (GLU MLPs, StarNet): LXT's ``mul2``."""
    torch.manual_seed(2)
    a = torch.randn(2, 3, 4, 5, dtype=DT)
    b = torch.randn(*shape_b, dtype=DT)
    R = torch.randn(2, 3, 4, 5, dtype=DT)
    a1, b1 = a.clone().requires_grad_(True), b.clone().requires_grad_(True)
    a2, b2 = a.clone().requires_grad_(True), b.clone().requires_grad_(True)
    ours = torch.autograd.grad(uniform_product(a1, b1), (a1, b1), R)
    theirs = torch.autograd.grad(lxt.functional.mul2(a2, b2), (a2, b2), R)
    for o, t in zip(ours, theirs, strict=True):
        torch.testing.assert_close(o, t, rtol=1e-13, atol=1e-14)


@pytest.mark.parametrize("mode", ["attnlrp", "cp"])
def test_sdpa_rules_equal_lxt_efficient_gradient_x_input(
    lxt: types.SimpleNamespace, mode: str
) -> None:
    """LXT's efficient attention (divide_gradient 4/4/2 or stop_gradient on q, k) as grad x input.

    Gradient x input of an op equals its LRP rule when the incoming gradient is R / output, so
    the relevance at q, k, v of LXT is ``t * d<out, R / out>/dt``.
    """
    torch.manual_seed(2)
    q, k, v = (torch.randn(2, 2, 4, 3, dtype=DT) for _ in range(3))
    mask = torch.ones(4, 4, dtype=torch.bool).tril()
    R = torch.randn(2, 2, 4, 3, dtype=DT)
    ours_in = [t.clone().requires_grad_(True) for t in (q, k, v)]
    out = scaled_dot_product_attention(*ours_in, attn_mask=mask, mode=mode, epsilon=0.0)
    ours = torch.autograd.grad(out, ours_in, R, allow_unused=True)

    theirs_in = [t.clone().requires_grad_(True) for t in (q, k, v)]
    r = lxt.rules
    if mode == "attnlrp":
        qq, kk, vv = (r.divide_gradient(t, f) for t, f in zip(theirs_in, (4, 4, 2), strict=True))
    else:
        qq, kk, vv = r.stop_gradient(theirs_in[0]), r.stop_gradient(theirs_in[1]), theirs_in[2]
    out2 = F.scaled_dot_product_attention(qq, kk, vv, attn_mask=mask)
    torch.testing.assert_close(out, out2, rtol=0, atol=0)
    grads = torch.autograd.grad(out2, theirs_in, R / out2.detach(), allow_unused=True)
    for o, t, g in zip(ours, theirs_in, grads, strict=True):
        if g is None:
            assert mode == "cp" and o is None
            continue
        torch.testing.assert_close(o, t.detach() * g, rtol=1e-10, atol=1e-12)


# ---------------------------------------------------------------------------------------------
# whole torchvision ViT


def small_vit(seed: int = 0, zero_biases: bool = False) -> VisionTransformer:
    """image 32, patch 8, 2 layers, hidden 32, MLP 64, 2 heads, float64, random weights.

    torchvision zero-initialises the head and the class token; random values here so every part
    carries relevance. ``zero_biases``: every bias, LayerNorm shift, class token and position
    embedding 0 (the bias-free model on which CP relevance is conserved).
    """
    torch.manual_seed(seed)
    model = VisionTransformer(
        image_size=32,
        patch_size=8,
        num_layers=2,
        num_heads=2,
        hidden_dim=32,
        mlp_dim=64,
        num_classes=10,
    )
    with torch.no_grad():
        for name, p in model.named_parameters():
            if zero_biases and (
                name.endswith("bias") or name in ("class_token",) or "pos_embedding" in name
            ):
                p.zero_()
            elif name.endswith("bias") or name in ("class_token",) or "pos_embedding" in name:
                p.normal_(0.0, 0.3)
            elif "ln" in name.split(".")[-2] and name.endswith("weight"):
                p.uniform_(0.5, 1.5)
            elif p.ndim >= 2:
                p.normal_(0.0, 1.0 / p[0].numel() ** 0.5)
    return model.to(DT).eval()


class _Patched:
    """LXT's monkey patch of torch.nn classes (global!) for one block, undone afterwards."""

    def __init__(self, lxt: types.SimpleNamespace, attention: str) -> None:
        self.lxt = lxt
        self.attention = attention
        self.classes = (nn.GELU, nn.LayerNorm, nn.MultiheadAttention)

    def __enter__(self) -> None:
        self.saved = {c: c.__dict__.get("forward") for c in self.classes}
        for target, patch in self.lxt.vit_map.items():  # what lxt.monkey_patch does for ViT
            assert patch(target)
        if self.attention == "attnlrp":
            divide = self.lxt.rules.divide_gradient

            def attnlrp_forward(mha, query, key, value, *args, **kwargs):
                # LXT's wrap_attention_forward (q, k / 4; v / 2), before the linear in-projection
                return mha.original_forward(
                    divide(query, 4), divide(key, 4), divide(value, 2), *args, **kwargs
                )

            nn.MultiheadAttention.forward = attnlrp_forward

    def __exit__(self, *exc: object) -> None:
        for c, fwd in self.saved.items():
            c.forward = fwd
            if "original_forward" in c.__dict__:
                delattr(c, "original_forward")


def lxt_relevance(
    lxt: types.SimpleNamespace, model: nn.Module, x: Tensor, target: Tensor, attention: str
) -> Tensor:
    """LXT's relevance at the pixels: input x gradient of the explained logit (its README)."""
    x = x.clone().requires_grad_(True)
    with _Patched(lxt, attention):
        logits = model(x)
        logits.gather(1, target[:, None]).sum().backward()
    return x.detach() * x.grad


def _input(seed: int = 1) -> tuple[Tensor, Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(3, 3, 32, 32, dtype=DT, generator=g), torch.tensor([0, 3, 7])


def test_lxt_patches_are_undone(lxt: types.SimpleNamespace) -> None:
    before = {c: c.forward for c in (nn.GELU, nn.LayerNorm, nn.MultiheadAttention)}
    model = small_vit()
    x, t = _input()
    ref = model(x)
    lxt_relevance(lxt, model, x, t, "attnlrp")
    assert {c: c.forward for c in before} == before
    torch.testing.assert_close(model(x), ref, rtol=0, atol=0)


@pytest.mark.parametrize("attention", ["cp", "attnlrp"])
def test_lxt_vit_forward_unchanged_and_rules_active(
    lxt: types.SimpleNamespace, attention: str
) -> None:
    """The LXT side alone: same logits, and its relevance differs from plain gradient x input."""
    model = small_vit()
    x, t = _input()
    ref = model(x)
    with _Patched(lxt, attention):
        torch.testing.assert_close(model(x), ref, rtol=1e-12, atol=1e-12)
    rel = lxt_relevance(lxt, model, x, t, attention)
    xg = x.clone().requires_grad_(True)
    model(xg).gather(1, t[:, None]).sum().backward()
    plain = (xg.detach() * xg.grad).flatten(1)
    cos = F.cosine_similarity(rel.flatten(1), plain, dim=1)
    assert (cos < 0.99).all(), cos  # the patches change the propagation


def test_lxt_cp_conserves_on_the_bias_free_vit(lxt: types.SimpleNamespace) -> None:
    """CP-LRP with identity GELU, std-detached LayerNorm and LRP-0 is conservative once every
    bias is 0: sum of pixel relevance = the explained logit (validates how LXT is applied)."""
    model = small_vit(seed=2, zero_biases=True)
    x, t = _input(3)
    rel = lxt_relevance(lxt, model, x, t, "cp")
    logit = model(x).gather(1, t[:, None]).squeeze(1)
    torch.testing.assert_close(rel.sum((1, 2, 3)), logit, rtol=1e-8, atol=1e-10)
    xg = x.clone().requires_grad_(True)  # unpatched gradient x input is not conservative
    model(xg).gather(1, t[:, None]).sum().backward()
    assert ((xg.detach() * xg.grad).sum((1, 2, 3)) - logit).abs().max() > 1e-3


# ---------------------------------------------------------------------------------------------
# a hand-built prepared copy of the torchvision ViT (a check independent of the graph pass): the
# attention module under test inside a whole model, the other parts by test-local rules


class _BiasAdd(torch.autograd.Function):
    """x + b with b constant: the epsilon-0 rule of a bias (b absorbs its share)."""

    @staticmethod
    def forward(ctx, x, b):
        z = x + b
        ctx.save_for_backward(x, z)
        return z

    @staticmethod
    def backward(ctx, r):
        x, z = ctx.saved_tensors
        return r * x / z, None


class _Residual(torch.autograd.Function):
    """a + b split in proportion to the signed branches (LXT) or to |a|, |b| (METHOD.md sec. 3)."""

    @staticmethod
    def forward(ctx, a, b, absolute):
        ctx.absolute = absolute
        ctx.save_for_backward(a, b)
        return a + b

    @staticmethod
    def backward(ctx, r):
        a, b = ctx.saved_tensors
        if ctx.absolute:
            a, b = a.abs(), b.abs()
        return r * a / (a + b), r * b / (a + b), None


class _LayerNormStd(torch.autograd.Function):
    """LayerNorm with the std held constant, epsilon 0 on the affine chain (Ali et al. 2022)."""

    @staticmethod
    def forward(ctx, x, ln):
        mean = x.mean(-1, keepdim=True)
        std = (x.var(-1, unbiased=False, keepdim=True) + ln.eps).sqrt()
        y = F.layer_norm(x, ln.normalized_shape, ln.weight, ln.bias, ln.eps)
        ctx.save_for_backward(x, y, std, ln.weight)
        del mean
        return y

    @staticmethod
    def backward(ctx, r):
        x, y, std, w = ctx.saved_tensors
        g = r / y * w / std
        return x * (g - g.mean(-1, keepdim=True)), None


class _Pass(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, fn):
        return fn(x)

    @staticmethod
    def backward(ctx, r):
        return r, None


def prepared_vit_relevance(
    model: VisionTransformer, x: Tensor, target: Tensor, attention: str, absolute: bool
) -> Tensor:
    """Relevance at the pixels through a hand-built prepared copy; attention by the module
    under test (:class:`MultiheadAttentionLRP`), linear layers by :class:`LinearRuleLayer`
    with the epsilon rule at epsilon 0."""
    from lrp.layers import LinearRuleLayer
    from lrp.rules.attention import MultiheadAttentionLRP
    from lrp.rules.linear import Epsilon

    def lin(m: nn.Module, path: str = "") -> nn.Module:
        return LinearRuleLayer(m, Epsilon(0.0), path)

    x = x.clone().requires_grad_(True)
    n = x.shape[0]
    h = lin(model.conv_proj)(x).reshape(n, model.hidden_dim, -1).permute(0, 2, 1)
    h = torch.cat([model.class_token.expand(n, -1, -1), h], dim=1)
    h = _BiasAdd.apply(h, model.encoder.pos_embedding)
    for i, block in enumerate(model.encoder.layers):
        attn = MultiheadAttentionLRP(
            block.self_attention, lin, f"l{i}", mode=attention, epsilon=0.0
        )
        a = _LayerNormStd.apply(h, block.ln_1)
        a, _ = attn(a, a, a, need_weights=False)
        h = _Residual.apply(a, h, absolute)
        m = _LayerNormStd.apply(h, block.ln_2)
        m = lin(block.mlp[3])(_Pass.apply(lin(block.mlp[0])(m), block.mlp[1]))
        h = _Residual.apply(h, m, absolute)
    h = _LayerNormStd.apply(h, model.encoder.ln)[:, 0]
    logits = lin(model.heads.head)(h)
    torch.testing.assert_close(logits, model(x), rtol=1e-12, atol=1e-12)
    out = logits.gather(1, target[:, None])
    (rel,) = torch.autograd.grad(out, x, out.detach())
    return rel


@pytest.mark.parametrize("attention", ["cp", "attnlrp"])
def test_hand_prepared_vit_with_the_attention_module_equals_lxt(
    lxt: types.SimpleNamespace, attention: str
) -> None:
    """Same rules everywhere (signed residual split, epsilon 0): the maps agree to ~1e-9."""
    model = small_vit()
    x, t = _input()
    ours = prepared_vit_relevance(model, x, t, attention, absolute=False).flatten(1)
    theirs = lxt_relevance(lxt, model, x, t, attention).flatten(1)
    cos = F.cosine_similarity(ours, theirs, dim=1)
    assert (cos > 1 - 1e-9).all(), cos
    torch.testing.assert_close(ours, theirs, rtol=1e-6, atol=1e-9 * theirs.abs().max())


# ---------------------------------------------------------------------------------------------
# the engine's explainer (needs the graph pass and the epsilon-transformer composite)


def _engine_has_transformers() -> bool:
    from lrp import composites

    return "epsilon-transformer" in composites.names()


@pytest.mark.skipif(
    not _engine_has_transformers(), reason="engine graph pass (epsilon-transformer) not merged"
)
@pytest.mark.parametrize("attention", ["cp", "attnlrp"])
def test_explainer_matches_lxt_on_torchvision_vit(
    lxt: types.SimpleNamespace, attention: str
) -> None:
    """``lrp.Explainer(..., composite="epsilon-transformer", attention=...)`` against LXT.

    Same rules only with ``residual="proportional"`` (signed shares: the epsilon rule on the
    addition, AttnLRP Eq. 8, which is what LXT's gradient gives) and a tiny epsilon (LXT has
    none on linear layers). With the engine's default ``residual="splitting"`` (shares by
    |h_i|) the hand-built copy above reaches only cosine 0.02-0.46 on this random-weight ViT.
    """
    import lrp

    model = small_vit()
    x, t = _input()
    theirs = lxt_relevance(lxt, model, x, t, attention).flatten(1)
    explainer = lrp.Explainer(
        model,
        composite="epsilon-transformer",
        attention=attention,
        residual="proportional",
        epsilon=1e-12,
    )
    ours = explainer(x, t).relevance.flatten(1)
    cos = F.cosine_similarity(ours, theirs, dim=1)
    assert (cos > 0.999).all(), cos


def test_small_vit_builder() -> None:
    from lrp.models import small_vit as zoo_vit

    model = zoo_vit(num_classes=5).eval()
    assert (model.image_size, model.patch_size, len(model.encoder.layers)) == (64, 8, 4)
    assert model(torch.zeros(2, 3, 64, 64)).shape == (2, 5)
    with pytest.raises(AssertionError, match="64"):  # fixed position embeddings
        model(torch.zeros(1, 3, 32, 32))
