"""Models built from torch's ``nn.TransformerEncoderLayer`` / ``nn.TransformerEncoder``.

The tracer replaces their stock forwards (a fused fast path and control flow torch.fx cannot
follow) by torch's slow path. Independent oracle: the same ViT-like model with the encoder
written out by hand (``x = x + self_attn(norm1(x))[0]`` ...) from the very same submodules, at
the same paths, which the engine explains without the substitution; the relevance must agree to
rounding, for several composites, both attention modes, norm_first, batch_first, relu/gelu;
and with masks (float/bool attention masks, padding masks, the causal hint) against hand-written
layers that pass them to ``self_attn``.
"""

from __future__ import annotations

import copy
import itertools
import re
from collections.abc import Callable

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn

import lrp
from lrp.rules import Epsilon, ZPlus

DT = torch.float64
D, HEADS, FF, CLASSES = 8, 2, 16, 5


class TinyViT(nn.Module):
    """Conv2d patches (8x8 image -> 4 tokens), optional class token (torch.cat), position
    embedding, ``nn.TransformerEncoder`` (2 layers), class token or token mean, LayerNorm, head."""

    def __init__(self, norm_first: bool, batch_first: bool, activation: str | nn.Module,
                 cls_token: bool, seed: int = 0) -> None:
        super().__init__()
        torch.manual_seed(seed)
        self.batch_first = batch_first
        self.patch = nn.Conv2d(3, D, 4, 4)
        self.cls = nn.Parameter(torch.randn(1, 1, D)) if cls_token else None
        self.pos = nn.Parameter(0.1 * torch.randn(1, 4 + cls_token, D))
        layer = nn.TransformerEncoderLayer(D, HEADS, FF, dropout=0.1, activation=activation,
                                           batch_first=batch_first, norm_first=norm_first)
        self.encoder = nn.TransformerEncoder(layer, 2, norm=nn.LayerNorm(D) if norm_first else None,
                                             enable_nested_tensor=False)
        for p in self.encoder.parameters():  # torch starts LayerNorm at 1/0 and biases at 0
            nn.init.normal_(p, std=0.3 if p.dim() > 1 else 0.1)
        self.norm = nn.LayerNorm(D)
        self.head = nn.Linear(D, CLASSES)

    def forward(self, x: Tensor) -> Tensor:
        x = self.patch(x).flatten(2).transpose(1, 2)
        if self.cls is not None:
            x = torch.cat([self.cls.expand(x.shape[0], -1, -1), x], dim=1)
        x = x + self.pos
        if not self.batch_first:
            x = x.transpose(0, 1)
        x = self.encoder(x)
        if not self.batch_first:
            x = x.transpose(0, 1)
        x = x[:, 0] if self.cls is not None else x.mean(1)
        return self.head(self.norm(x))


class HandLayer(nn.Module):
    """``nn.TransformerEncoderLayer``'s slow path written out, on that layer's own submodules."""

    def __init__(self, layer: nn.TransformerEncoderLayer) -> None:
        super().__init__()
        for name, child in layer.named_children():
            setattr(self, name, child)
        self.act: Callable[[Tensor], Tensor] = layer.activation  # a function or the module
        self.norm_first = layer.norm_first

    def sa(self, x: Tensor) -> Tensor:
        return self.dropout1(self.self_attn(x, x, x, need_weights=False)[0])

    def ff(self, x: Tensor) -> Tensor:
        return self.dropout2(self.linear2(self.dropout(self.act(self.linear1(x)))))

    def forward(self, x: Tensor) -> Tensor:
        if self.norm_first:
            x = x + self.sa(self.norm1(x))
            return x + self.ff(self.norm2(x))
        x = self.norm1(x + self.sa(x))
        return self.norm2(x + self.ff(x))


class HandEncoder(nn.Module):
    def __init__(self, encoder: nn.TransformerEncoder) -> None:
        super().__init__()
        self.layers = nn.ModuleList(HandLayer(layer) for layer in encoder.layers)
        self.norm = encoder.norm

    def forward(self, x: Tensor) -> Tensor:
        for layer in self.layers:
            x = layer(x)
        return self.norm(x) if self.norm is not None else x


def hand_written(model: TinyViT) -> TinyViT:
    """The same model (same weights, same module paths) with the encoder written out."""
    hand = copy.deepcopy(model)
    hand.encoder = HandEncoder(hand.encoder)  # type: ignore[assignment]
    return hand


CONFIGS = [  # norm_first, batch_first, activation, class token (both forms of pooling covered)
    (nf, bf, act, nf != bf)
    for nf, bf, act in itertools.product((False, True), (False, True), ("relu", "gelu"))
]


def _ids(c: tuple) -> str:
    return f"nf{int(c[0])}-bf{int(c[1])}-{c[2]}-{'cls' if c[3] else 'mean'}"


def _custom() -> lrp.Composite:
    """A composite naming modules inside the encoder by path (they keep their paths)."""
    return lrp.Composite("custom", {nn.Linear: Epsilon(1e-6), nn.Conv2d: Epsilon(1e-6),
                                    "encoder.layers.1.linear1": ZPlus(),
                                    "encoder.layers.0.self_attn.out_proj": ZPlus()})


COMPOSITES: list[str | Callable[[], lrp.Composite]] = ["epsilon", "lrp-0", "epsilon-plus-flat",
                                                       _custom]


@pytest.mark.parametrize(("i", "config"), list(enumerate(CONFIGS)), ids=[_ids(c) for c in CONFIGS])
def test_relevance_equals_the_hand_written_encoder(i: int, config: tuple) -> None:
    model = TinyViT(*config).to(DT).eval()
    hand = hand_written(model)
    x = torch.randn(2, 3, 8, 8, dtype=DT)
    with torch.no_grad():
        torch.testing.assert_close(hand(x), model(x), rtol=1e-12, atol=1e-12)
    composites = [COMPOSITES[i % 4], COMPOSITES[(i + 1) % 4]]  # each one on 4 configs (speed)
    for composite, attention in itertools.product(composites, ("attnlrp", "cp")):
        c = composite() if callable(composite) else composite
        explainer = lrp.Explainer(model, c, attention=attention)
        explained = explainer(x, target=1)
        if c is not composite:  # the rules named by path reached the layers inside the encoder
            assert isinstance(explainer.rules["encoder.layers.1.linear1"], ZPlus)
            assert isinstance(explainer.rules["encoder.layers.0.self_attn.out_proj"], ZPlus)
        oracle = lrp.Explainer(hand, c, attention=attention)(x, target=1)
        scale = oracle.relevance.abs().max()
        assert scale > 0
        torch.testing.assert_close(explained.relevance, oracle.relevance, rtol=0,
                                   atol=1e-10 * float(scale),
                                   msg=lambda m, w=f"{composite}, {attention}": f"{w}: {m}")
        torch.testing.assert_close(explained.initial, oracle.initial, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("config", CONFIGS[::3], ids=_ids)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_prepared_model_computes_the_stock_output(config: tuple, dtype: torch.dtype) -> None:
    model = TinyViT(*config).to(dtype).eval()
    x = torch.randn(3, 3, 8, 8, dtype=dtype)
    explainer = lrp.Explainer(model, "epsilon")
    prepared = explainer.prepared_model()
    paths = dict(prepared.named_modules())
    assert {"encoder.layers.0.self_attn", "encoder.layers.1.linear1",
            "encoder.layers.0.norm2"} <= set(paths)
    tol = 1e-12 if dtype == torch.float64 else 1e-5
    for grad in (False, True):  # torch's fused fast path (no grad) and its slow path
        with torch.set_grad_enabled(grad):
            torch.testing.assert_close(prepared(x), model(x), rtol=tol, atol=tol)


def test_traced_with_an_example_input() -> None:
    """A forward fx can only follow with shapes known (``_ShapeTracer``) around the encoder."""

    class SizeCheck(TinyViT):
        def forward(self, x: Tensor) -> Tensor:
            if x.shape[-1] % 4:  # Python control flow on a size
                raise ValueError("image side must be a multiple of 4")
            return super().forward(x)

    model = SizeCheck(True, True, "gelu", True).to(DT).eval()
    hand = hand_written(model)
    x = torch.randn(2, 3, 8, 8, dtype=DT)
    for attention in ("attnlrp", "cp"):
        explained = lrp.Explainer(model, "epsilon", attention=attention)(x)
        oracle = lrp.Explainer(hand, "epsilon", attention=attention)(x)
        torch.testing.assert_close(explained.relevance, oracle.relevance, rtol=1e-10, atol=1e-12)


def test_single_layer_activation_module_and_subclass() -> None:
    """A bare ``nn.TransformerEncoderLayer`` (a subclass keeping the stock forward) with an
    activation module: the module is called at its path, ``layer.activation``."""

    class MyLayer(nn.TransformerEncoderLayer):
        pass

    class Net(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            torch.manual_seed(0)
            self.layer = MyLayer(D, HEADS, FF, activation=nn.ReLU(), batch_first=True)
            self.head = nn.Linear(D, CLASSES)

        def forward(self, x: Tensor) -> Tensor:
            return self.head(self.layer(x).mean(1))

    model = Net().to(DT).eval()
    hand = copy.deepcopy(model)
    hand.layer = HandLayer(hand.layer)  # type: ignore[assignment]
    x = torch.randn(2, 4, D, dtype=DT)
    explained = lrp.Explainer(model, "epsilon")(x)
    oracle = lrp.Explainer(hand, "epsilon")(x)
    torch.testing.assert_close(explained.relevance, oracle.relevance, rtol=1e-10, atol=1e-12)
    assert "layer.activation" in dict(lrp.Explainer(model, "epsilon").prepared_model().named_modules())


class MaskedHandLayer(HandLayer):
    def forward(self, x: Tensor, src_mask: Tensor | None = None,  # type: ignore[override]
                src_key_padding_mask: Tensor | None = None, is_causal: bool = False) -> Tensor:
        def sa(y: Tensor) -> Tensor:
            return self.dropout1(self.self_attn(y, y, y, attn_mask=src_mask, need_weights=False,
                                                key_padding_mask=src_key_padding_mask)[0])

        if self.norm_first:
            x = x + sa(self.norm1(x))
            return x + self.ff(self.norm2(x))
        x = self.norm1(x + sa(x))
        return self.norm2(x + self.ff(x))


class Masked(nn.Module):
    """Tokens (N=2, L=4, D) through an encoder (or one layer) called with masks (buffers)."""

    def __init__(self, call: str, nested: bool = False, norm_first: bool = False) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.call = call
        self.encoder = nn.TransformerEncoder(
            nn.TransformerEncoderLayer(D, HEADS, FF, batch_first=True, norm_first=norm_first), 2,
            enable_nested_tensor=nested)
        self.register_buffer("causal", nn.Transformer.generate_square_subsequent_mask(4))
        self.register_buffer("bool_mask", torch.rand(4, 4) > 0.7)
        self.register_buffer("padding", torch.tensor([[False] * 4, [False] * 3 + [True]]))
        self.head = nn.Linear(D, CLASSES)

    def forward(self, x: Tensor) -> Tensor:
        if self.call == "causal":  # a float mask, detected as causal by torch
            x = self.encoder(x, mask=self.causal)
        elif self.call == "causal-hint":
            x = self.encoder(x, mask=self.causal, is_causal=True)
        elif self.call == "bool+padding":
            x = self.encoder(x, mask=self.bool_mask, src_key_padding_mask=self.padding)
        elif self.call == "padding":
            x = self.encoder(x, src_key_padding_mask=self.padding)
        elif self.call == "hint-only":
            x = self.encoder(x, is_causal=True)
        else:  # one layer
            x = self.encoder.layers[0](x, src_mask=self.bool_mask, src_key_padding_mask=self.padding)
        return self.head(x.mean(1))


class MaskedHandEncoder(nn.Module):
    def __init__(self, encoder: nn.TransformerEncoder) -> None:
        super().__init__()
        self.layers = nn.ModuleList(MaskedHandLayer(layer) for layer in encoder.layers)

    def forward(self, x: Tensor, mask: Tensor | None = None,
                src_key_padding_mask: Tensor | None = None, is_causal: bool = False) -> Tensor:
        for layer in self.layers:
            x = layer(x, mask, src_key_padding_mask)
        return x


@pytest.mark.parametrize("call", ["causal", "causal-hint", "bool+padding", "padding", "layer"])
def test_masks_go_to_the_attention(call: str) -> None:
    model = Masked(call, norm_first=call == "padding").to(DT).eval()
    x = torch.randn(2, 4, D, dtype=DT)
    prepared = lrp.Explainer(model, "epsilon").prepared_model()
    hand = copy.deepcopy(model)
    hand.encoder = MaskedHandEncoder(hand.encoder)  # type: ignore[assignment]
    with torch.no_grad():
        torch.testing.assert_close(hand(x), model(x), rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(prepared(x), model(x), rtol=1e-12, atol=1e-12)
    for attention in ("attnlrp", "cp"):
        explained = lrp.Explainer(model, "epsilon", attention=attention)(x)
        oracle = lrp.Explainer(hand, "epsilon", attention=attention)(x)
        torch.testing.assert_close(explained.relevance, oracle.relevance, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize(("call", "nested", "what"), [
    ("hint-only", False, "is_causal=True but no mask"),
    ("padding", True, "src_key_padding_mask and may take its nested-tensor path"),
])
def test_refused_calls_name_the_module(call: str, nested: bool, what: str) -> None:
    model = Masked(call, nested=nested).eval()
    with pytest.raises(lrp.UnsupportedOperationError,
                       match=re.escape(f"nn.TransformerEncoder at 'encoder' is called with {what}")):
        lrp.Explainer(model, "epsilon")(torch.randn(2, 4, D))


def test_a_leaf_path_keeps_the_layer_one_node() -> None:
    """Named by path in the composite, the layer stays one module (and needs a rule of its own)."""
    model = TinyViT(False, True, "relu", False).eval()
    rules = {nn.Linear: Epsilon(), nn.Conv2d: Epsilon(), "encoder.layers.0": Epsilon()}
    with pytest.raises(lrp.UnsupportedLayerError, match=r"encoder\.layers\.0"):
        lrp.Explainer(model, rules)(torch.randn(1, 3, 8, 8))


def test_f_relu_is_what_the_string_gives() -> None:
    assert nn.TransformerEncoderLayer(D, HEADS, activation="relu").activation is F.relu
