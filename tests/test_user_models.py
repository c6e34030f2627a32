"""Models as users write them (issue 11): structure must be found by data flow in the traced
forward, whatever the nesting, naming or functional style, and nothing may fall back silently to
the plain gradient.

The proof that Relevance Splitting applies at every merge of a hand-written ResNet is the
comparison of one block with a propagation written out by hand (explicit epsilon / z+ formulas on
the folded convolutions through ``torch.func.vjp``, ratio |h_m| / (|h_m| + |h_s|) at the merge),
for the usual CIFAR block and for timm's ``BasicBlock``, as ``tests/test_resnet.py`` does for
torchvision's. The other expectations are conservation (LRP-0 without biases is exactly
conservative, so a relevance copy or a differentiated gate shows), autograd's gradient x input
(what LRP-0 equals on bias-carrying ReLU networks), or invariance to a rewrite that leaves the
computation unchanged (a wrapper, a functional layer, an unused optional input).
"""

from __future__ import annotations

from collections.abc import Callable

import pytest
import timm
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from zoo_checks import check_every_composite, randomize_statistics

import lrp

F64 = torch.float64
CONSERVATIVE = {"composite": "lrp-0", "zero_bias": True, "stabilizer": 0.0}
TOL = 1e-8


def _inputs(n: int = 2, size: int = 16, dtype: torch.dtype = F64, seed: int = 1) -> Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 3, size, size, generator=g, dtype=dtype)


def _ready(
    model: nn.Module, dtype: torch.dtype = F64, seed: int = 0, shift: bool = True
) -> nn.Module:
    """Random BN statistics. ``shift=False`` for conservation checks: LRP-0 without biases in
    its denominators divides by pre-activations without their BN shift, which can be ~0 where
    the real one is not; relevance then grows to 1e9 x the logit and float64 rounding alone
    exceeds 1e-8 (measured on CifarResNet)."""
    return randomize_statistics(model, seed, shift).to(dtype).eval().requires_grad_(False)


def _explain(model: nn.Module, x: Tensor, **options: object) -> lrp.Explanation:
    opts = {**CONSERVATIVE, **options}
    composite = opts.pop("composite")
    return lrp.Explainer(model, composite, **opts)(x)


def _close(got: Tensor, expected: Tensor, label: str) -> None:
    try:
        torch.testing.assert_close(got, expected, rtol=1e-10, atol=1e-12)
    except AssertionError as err:
        raise AssertionError(f"{label}: {err}") from None


# ---------------------------------------------------------------------------- model definitions
class CifarBlock(nn.Module):
    """The usual CIFAR ResNet block (kuangliu/pytorch-cifar), ``out +=`` and functional ReLUs."""

    def __init__(self, in_planes: int, planes: int, stride: int = 1) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_planes, planes, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.shortcut = nn.Sequential()
        if stride != 1 or in_planes != planes:
            self.shortcut = nn.Sequential(
                nn.Conv2d(in_planes, planes, 1, stride, bias=False), nn.BatchNorm2d(planes)
            )

    def forward(self, x: Tensor) -> Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        out += self.shortcut(x)
        out = F.relu(out)
        return out


class CifarResNet(nn.Module):
    def __init__(self, widths: tuple[int, ...] = (8, 16, 32), num_classes: int = 10) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, widths[0], 3, 1, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(widths[0])
        layers, planes = [], widths[0]
        for i, w in enumerate(widths):
            stride = 1 if i == 0 else 2
            layers.append(nn.Sequential(CifarBlock(planes, w, stride), CifarBlock(w, w)))
            planes = w
        self.layer1, self.layer2, self.layer3 = layers
        self.linear = nn.Linear(widths[-1], num_classes)

    def forward(self, x: Tensor) -> Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.layer3(self.layer2(self.layer1(out)))
        out = F.avg_pool2d(out, 4)  # 16 px input: the last stage is 4x4
        out = out.view(out.size(0), -1)
        return self.linear(out)


class PreActBlock(nn.Module):
    """Pre-activation block: its first BatchNorm follows the previous merge, not a conv."""

    def __init__(self, in_planes: int, planes: int, stride: int = 1) -> None:
        super().__init__()
        self.bn1 = nn.BatchNorm2d(in_planes)
        self.conv1 = nn.Conv2d(in_planes, planes, 3, stride, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, 1, 1, bias=False)
        if stride != 1 or in_planes != planes:
            self.shortcut = nn.Sequential(nn.Conv2d(in_planes, planes, 1, stride, bias=False))

    def forward(self, x: Tensor) -> Tensor:
        out = F.relu(self.bn1(x))
        shortcut = self.shortcut(out) if hasattr(self, "shortcut") else x
        out = self.conv1(out)
        out = self.conv2(F.relu(self.bn2(out)))
        out += shortcut
        return out


class PreActResNet(nn.Module):
    def __init__(self, num_classes: int = 10) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 8, 3, 1, 1, bias=False)
        self.layers = nn.Sequential(PreActBlock(8, 8), PreActBlock(8, 16, 2), PreActBlock(16, 16))
        self.bn = nn.BatchNorm2d(16)
        self.linear = nn.Linear(16, num_classes)

    def forward(self, x: Tensor) -> Tensor:
        out = self.layers(self.conv1(x))
        out = F.relu(self.bn(out))
        out = F.adaptive_avg_pool2d(out, 1).flatten(1)
        return self.linear(out)


def _small_features(out: int = 10) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(3, 6, 3, padding=1),
        nn.BatchNorm2d(6),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Conv2d(6, 8, 3, padding=1),
        nn.ReLU(),
        nn.AdaptiveAvgPool2d(2),
        nn.Flatten(),
        nn.Linear(32, out),
    )


class RootResidual(nn.Module):
    """The root's own forward is the residual merge (issue 11: was 2.0x the logit, silently)."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = _small_features()
        self.body = nn.Sequential(nn.Linear(10, 10), nn.ReLU(), nn.Linear(10, 10))

    def forward(self, x: Tensor) -> Tensor:
        h = self.stem(x)
        return h + self.body(h)


class RootGate(nn.Module):
    """``a(x) * sigmoid(g(pool(x)))`` at the root: a recognisable gate (the sigmoid of a pooled
    copy), so all relevance goes to the signal ``a``."""

    def __init__(self) -> None:
        super().__init__()
        self.signal = nn.Sequential(nn.Flatten(), nn.Linear(3 * 8 * 8, 10))
        self.gate = nn.Linear(3, 10)

    def forward(self, x: Tensor) -> Tensor:
        return self.signal(x) * torch.sigmoid(self.gate(F.adaptive_avg_pool2d(x, 1).flatten(1)))


class RootProduct(nn.Module):
    """A product of two input-dependent factors that is no recognisable gate."""

    def __init__(self, sigmoid: bool) -> None:
        super().__init__()
        self.sigmoid = sigmoid
        self.a = _small_features()
        self.b = _small_features()

    def forward(self, x: Tensor) -> Tensor:
        b = self.b(x)
        return self.a(x) * (torch.sigmoid(b) if self.sigmoid else b)


class Wrapper(nn.Module):
    def __init__(self, net: nn.Module) -> None:
        super().__init__()
        self.net = net

    def forward(self, x: Tensor) -> Tensor:
        return self.net(x)


class FunctionalHead(nn.Module):
    """Classifier as ``F.linear`` on the module's own parameters (issue 11: lost 25 %)."""

    def __init__(self, features: nn.Sequential, head: nn.Linear) -> None:
        super().__init__()
        self.features = features
        self.weight = nn.Parameter(head.weight.detach().clone())
        self.bias = nn.Parameter(head.bias.detach().clone())

    def forward(self, x: Tensor) -> Tensor:
        return F.linear(self.features(x), self.weight, self.bias)


class OptionalInput(nn.Module):
    """A second input defaulting to ``None``: fx must not trace the ``mask is not None`` path."""

    def __init__(self, net: nn.Module) -> None:
        super().__init__()
        self.net = net

    def forward(self, x: Tensor, mask: Tensor | None = None) -> Tensor:
        h = self.net(x)
        if mask is not None:
            h = h * mask
        return h


class ReusedReLU(nn.Module):
    """One ``nn.ReLU(inplace=True)`` module called after every layer."""

    def __init__(self) -> None:
        super().__init__()
        self.relu = nn.ReLU(inplace=True)
        self.conv1 = nn.Conv2d(3, 6, 3, padding=1)
        self.conv2 = nn.Conv2d(6, 8, 3, padding=1)
        self.pool = nn.MaxPool2d(2)
        self.fc1 = nn.Linear(8 * 4 * 4, 16)
        self.fc2 = nn.Linear(16, 10)

    def forward(self, x: Tensor) -> Tensor:
        x = self.pool(self.relu(self.conv1(x)))
        x = self.pool(self.relu(self.conv2(x)))
        x = self.relu(self.fc1(torch.flatten(x, 1)))
        return self.fc2(x)


class Stage(nn.Module):
    def __init__(self, cin: int, cout: int) -> None:
        super().__init__()
        self.entry = nn.Sequential(nn.Conv2d(cin, cout, 3, 2, 1, bias=False), nn.BatchNorm2d(cout))
        self.blocks = nn.ModuleDict(
            {"first": CifarBlock(cout, cout), "second": CifarBlock(cout, cout)}
        )

    def forward(self, x: Tensor) -> Tensor:
        x = F.relu(self.entry(x))
        for name in ("first", "second"):
            x = self.blocks[name](x)
        return x


class Backbone(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.stage_a = Stage(3, 8)
        self.stage_b = Stage(8, 12)

    def forward(self, x: Tensor) -> Tensor:
        return self.stage_b(self.stage_a(x))


class NestedNet(nn.Module):
    """Several nesting levels with user-chosen names (ModuleDict keys included)."""

    def __init__(self) -> None:
        super().__init__()
        self.backbone = Backbone()
        self.classifier = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(12, 10))

    def forward(self, x: Tensor) -> Tensor:
        return self.classifier(self.backbone(x))


# ---------------------------------------------------------------------------- hand-written rules
def _folded(conv: nn.Conv2d, bn: nn.BatchNorm2d) -> tuple[Tensor, Tensor]:
    scale = bn.weight / torch.sqrt(bn.running_var + bn.eps)
    w = conv.weight * scale.view(-1, 1, 1, 1)
    b = bn.bias - bn.running_mean * scale
    if conv.bias is not None:
        b = b + conv.bias * scale
    return w, b


def _conv_fn(conv: nn.Conv2d, w: Tensor, b: Tensor | None) -> Callable[[Tensor], Tensor]:
    return lambda t: F.conv2d(t, w, b, conv.stride, conv.padding, conv.dilation, conv.groups)


def _epsilon(conv: nn.Conv2d, w: Tensor, b: Tensor, x: Tensor, r: Tensor, eps: float) -> Tensor:
    """R_j = x_j sum_k w_jk R_k / (z_k + eps sign z_k), z with the bias, sign(0) = +1."""
    z, vjp = torch.func.vjp(_conv_fn(conv, w, None), x)
    z = z + b.view(1, -1, 1, 1)
    den = torch.where(z >= 0, z + eps, z - eps)
    (g,) = vjp(r / den)
    return x * g


def _zplus(conv: nn.Conv2d, w: Tensor, b: Tensor, x: Tensor, r: Tensor, stab: float) -> Tensor:
    """R_j = (x+_j w+_jk + x-_j w-_jk) / (sum of them + b+_k + stab) R_k (METHOD.md: z+). An
    output whose positive contributions are all exactly 0 (bias included) shares R_k uniformly
    over its receptive field (kernel window inside the image, its group's input channels), as
    docs/ENGINE_API.md documents for ZPlus(empty="flat")."""
    xp, xn = x.clamp(min=0), x.clamp(max=0)
    wp, wn = w.clamp(min=0), w.clamp(max=0)
    zp, vjp_p = torch.func.vjp(_conv_fn(conv, wp, None), xp)
    zn, vjp_n = torch.func.vjp(_conv_fn(conv, wn, None), xn)
    positive = zp + zn + b.clamp(min=0).view(1, -1, 1, 1)
    s = r / (positive + stab)
    relevance = xp * vjp_p(s)[0] + xn * vjp_n(s)[0]
    count, vjp_flat = torch.func.vjp(_conv_fn(conv, torch.ones_like(w), None), torch.ones_like(x))
    empty = positive == 0
    (flat,) = vjp_flat(torch.where(empty, r / count, 0.0))
    return relevance + flat


def _manual_basic_block(
    convs: tuple[nn.Conv2d, nn.Conv2d],
    bns: tuple[nn.BatchNorm2d, nn.BatchNorm2d],
    shortcut: tuple[nn.Conv2d, nn.BatchNorm2d] | None,
    x: Tensor,
    r_out: Tensor,
    rule: str,
) -> Tensor:
    """relu(bn2(conv2(relu(bn1(conv1(x))))) + shortcut(x)), propagated by hand: the final ReLU
    passes, the merge splits by |h_m| / (|h_m| + |h_s|), each branch gets the conv rule."""
    eps = 0.01
    step = (lambda *a: _epsilon(*a, eps)) if rule == "epsilon" else (lambda *a: _zplus(*a, 1e-6))
    with torch.no_grad():
        w1, b1 = _folded(convs[0], bns[0])
        w2, b2 = _folded(convs[1], bns[1])
        a1 = _conv_fn(convs[0], w1, b1)(x).clamp(min=0)
        h_m = _conv_fn(convs[1], w2, b2)(a1)
        if shortcut is None:
            h_s = x
        else:
            ws, bs = _folded(*shortcut)
            h_s = _conv_fn(shortcut[0], ws, bs)(x)
        r_h = r_out.view_as(h_m)
        total = h_m.abs() + h_s.abs()
        r_m = r_h * h_m.abs() / total
        r_s = r_h * h_s.abs() / total
    r_a1 = step(convs[1], w2, b2, a1, r_m)
    r_x = step(convs[0], w1, b1, x, r_a1)
    if shortcut is None:
        return r_x + r_s
    return r_x + step(shortcut[0], ws, bs, x, r_s)


COMPOSITE_OF_RULE = {"epsilon": ("epsilon", {"epsilon": 0.01}), "zplus": ("epsilon-plus", {})}


def _block_relevance(block: nn.Module, x: Tensor, r_out: Tensor, rule: str) -> Tensor:
    composite, options = COMPOSITE_OF_RULE[rule]
    model = nn.Sequential(block, nn.Flatten()).eval()
    explainer = lrp.Explainer(model, composite, residual="splitting", **options)
    return explainer(x, output_relevance=r_out).relevance


# ---------------------------------------------------------------------------- block comparisons
@pytest.mark.parametrize("rule", ["epsilon", "zplus"])
@pytest.mark.parametrize("projection", [False, True])
def test_cifar_block_against_manual_propagation(projection: bool, rule: str) -> None:
    """Relevance Splitting at the ``out += self.shortcut(x)`` merge of the usual CIFAR block."""
    torch.manual_seed(0)
    block = _ready(CifarBlock(4, 6, stride=2) if projection else CifarBlock(4, 4))
    x = torch.randn(2, 4, 6, 6, dtype=F64, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        n_out = block(x).flatten(1).shape[1]
    r_out = torch.randn(2, n_out, dtype=F64, generator=torch.Generator().manual_seed(4))
    got = _block_relevance(block, x, r_out, rule)
    shortcut = (block.shortcut[0], block.shortcut[1]) if projection else None
    expected = _manual_basic_block(
        (block.conv1, block.conv2), (block.bn1, block.bn2), shortcut, x, r_out, rule
    )
    torch.testing.assert_close(got, expected, rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("rule", ["epsilon", "zplus"])
@pytest.mark.parametrize("projection", [False, True])
def test_timm_block_against_manual_propagation(projection: bool, rule: str) -> None:
    """The same for timm's ResNet ``BasicBlock`` (``x += shortcut`` after its own downsample)."""
    torch.manual_seed(0)
    net = _ready(timm.create_model("resnet18", pretrained=False, num_classes=10))
    block = net.layer2[0] if projection else net.layer1[0]
    assert (block.downsample is not None) == projection
    cin = block.conv1.in_channels
    x = torch.randn(1, cin, 6, 6, dtype=F64, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        n_out = block(x).flatten(1).shape[1]
    r_out = torch.randn(1, n_out, dtype=F64, generator=torch.Generator().manual_seed(4))
    got = _block_relevance(block, x, r_out, rule)
    shortcut = (block.downsample[0], block.downsample[1]) if projection else None
    expected = _manual_basic_block(
        (block.conv1, block.conv2), (block.bn1, block.bn2), shortcut, x, r_out, rule
    )
    torch.testing.assert_close(got, expected, rtol=1e-9, atol=1e-12)


# ---------------------------------------------------------------------------- whole user models
@pytest.mark.parametrize("model_cls", [CifarResNet, PreActResNet], ids=["cifar", "preact"])
def test_hand_written_resnets_conserve_and_split(model_cls: type[nn.Module]) -> None:
    """Conservative rules conserve; copying relevance at the merges (the gradient) does not:
    so the merges were found and split."""
    torch.manual_seed(0)
    model = _ready(model_cls(), shift=False)
    x = _inputs()
    e = _explain(model, x)
    assert (lrp.conservation(e) < TOL).all(), lrp.conservation(e)
    copied = _explain(model, x, residual="gradient")
    assert (lrp.conservation(copied) > 0.1).all(), lrp.conservation(copied)
    preset = lrp.Explainer(_ready(model_cls(), torch.float32), "otsuki2024")(x.float())
    assert (lrp.conservation(preset) < 1e-3).all(), lrp.conservation(preset)


@pytest.mark.parametrize("model_cls", [CifarResNet, PreActResNet], ids=["cifar", "preact"])
def test_hand_written_resnets_run_with_every_composite(model_cls: type[nn.Module]) -> None:
    torch.manual_seed(0)
    model = _ready(model_cls(), torch.float32)
    failures = check_every_composite(model, _inputs(2, dtype=torch.float32).clamp(-3, 3))
    assert not failures, "\n".join(failures)


def test_root_residual_conserves_and_splits_by_ratio() -> None:
    """``h + self.body(h)`` in the root forward: conserved (not 2x), and the body's share is the
    ratio |b| / (|h| + |b|) of the explained logit."""
    torch.manual_seed(0)
    model = _ready(RootResidual(), shift=False)
    x = _inputs()
    e = lrp.Explainer(model, "lrp-0", zero_bias=True, stabilizer=0.0)(x, record_layers=True)
    assert (lrp.conservation(e) < TOL).all(), lrp.conservation(e)
    with torch.no_grad():
        h = model.stem(x)
        b = model.body(h)
    r = torch.zeros_like(h).scatter_(1, e.target[:, None], e.logits.gather(1, e.target[:, None]))
    share_b = (r * b.abs() / (h.abs() + b.abs())).sum(1)
    torch.testing.assert_close(e.layer_relevance["body"], share_b, rtol=1e-10, atol=1e-12)
    # the stem's output receives the skip's share and what the body passes back: all of it
    torch.testing.assert_close(e.layer_relevance["stem"], e.initial, rtol=1e-8, atol=1e-12)


def test_root_gate_gives_all_relevance_to_the_signal() -> None:
    """The gate is a constant: relevance = LRP-0 of the signal's one Linear layer, by hand."""
    torch.manual_seed(0)
    model = _ready(RootGate(), shift=False)
    x = _inputs(2, 8)
    e = _explain(model, x)
    assert (lrp.conservation(e) < TOL).all(), lrp.conservation(e)
    linear = model.signal[1]
    w = linear.weight[e.target]  # (N, D)
    xf = x.flatten(1)
    contributions = xf * w
    expected = contributions / contributions.sum(1, keepdim=True) * e.initial[:, None]
    torch.testing.assert_close(e.relevance.flatten(1), expected, rtol=1e-10, atol=1e-12)
    # the layer sums (record_layers) see the same: all relevance passes through the signal
    recorded = lrp.Explainer(model, "lrp-0", zero_bias=True, stabilizer=0.0)(x, record_layers=True)
    torch.testing.assert_close(recorded.relevance, e.relevance, rtol=0, atol=0)
    torch.testing.assert_close(recorded.layer_relevance["signal"], e.initial, rtol=1e-10, atol=0)


@pytest.mark.parametrize("sigmoid", [False, True], ids=["product", "sigmoid-product"])
def test_unrecognised_product_raises_or_conserves(sigmoid: bool) -> None:
    """``a(x) * b(x)`` that is no gate: a clear error naming the op, or a conservative result;
    never a silent non-conservative number (issue 11 measured 1.6-2.1x)."""
    torch.manual_seed(0)
    model = _ready(RootProduct(sigmoid), shift=False)
    x = _inputs()
    try:
        e = _explain(model, x)
    except lrp.LRPError as err:
        assert "mul" in str(err) or "*" in str(err), str(err)
        return
    assert (lrp.conservation(e) < TOL).all(), lrp.conservation(e)


COMPOSITES = [(c, {"input_bounds": (-3.0, 3.0)} if c == "epsilon-gamma-box" else {})
              for c in lrp.composites.names()]  # fmt: skip


@pytest.mark.parametrize(("composite", "options"), COMPOSITES, ids=[c for c, _ in COMPOSITES])
def test_wrapper_functional_head_and_optional_input_change_nothing(
    composite: str, options: dict[str, object]
) -> None:
    """Rewrites that leave the computation unchanged leave the relevance unchanged: a wrapper
    (``return self.net(x)``), an ``F.linear`` head on own parameters, an unused optional input."""
    torch.manual_seed(0)
    features = _small_features(out=16)
    head = nn.Linear(16, 10)
    plain = _ready(nn.Sequential(features, head))
    x = _inputs().clamp(-3, 3)
    reference = lrp.Explainer(plain, composite, **options)(x)
    variants = {
        "wrapper": Wrapper(plain),
        "functional head": FunctionalHead(features, head),
        "optional input": OptionalInput(plain),
    }
    for label, variant in variants.items():
        with torch.no_grad():
            torch.testing.assert_close(variant(x), plain(x))
        e = lrp.Explainer(variant.eval(), composite, **options)(x)
        _close(e.logits, reference.logits, f"{label}, logits")
        _close(e.relevance, reference.relevance, f"{label}, relevance")


def test_compiled_and_data_parallel_models_are_explained_as_the_wrapped_model() -> None:
    """``torch.compile``'s wrapper and ``nn.DataParallel`` (also nested) are seen through: their
    own forward (compiled code, a scatter over devices) is not traceable, the wrapped module is
    the same function. The compiled model is never run (no compiler needed)."""
    torch.manual_seed(0)
    plain = _ready(nn.Sequential(_small_features(out=16), nn.Linear(16, 10)))
    x = _inputs()
    reference = lrp.Explainer(plain, "epsilon-plus-flat")(x)
    for label, wrapped in {
        "compiled": torch.compile(plain),
        "data parallel": nn.DataParallel(plain),
        "data parallel of compiled": nn.DataParallel(torch.compile(plain)),
    }.items():
        explainer = lrp.Explainer(wrapped, "epsilon-plus-flat")
        assert explainer.model is plain, label
        _close(explainer(x).relevance, reference.relevance, label)


@pytest.mark.parametrize("variant", ["functional head", "optional input"])
def test_functional_head_and_optional_input_conserve(variant: str) -> None:
    torch.manual_seed(0)
    features = _small_features(out=16)
    head = nn.Linear(16, 10)
    plain = nn.Sequential(features, head)
    model = FunctionalHead(features, head) if variant == "functional head" else OptionalInput(plain)
    e = _explain(_ready(model, shift=False), _inputs())
    assert (lrp.conservation(e) < TOL).all(), lrp.conservation(e)


def test_reused_relu_module_equals_gradient_times_input() -> None:
    """LRP-0 (biases in the denominators) equals gradient x input on a ReLU network; the one
    in-place ReLU module called three times must not corrupt any activation."""
    torch.manual_seed(0)
    model = _ready(ReusedReLU())
    x = _inputs(2, 16)
    e = lrp.Explainer(model, "lrp-0")(x)
    xg = x.clone().requires_grad_(True)
    out = model(xg)
    (grad,) = torch.autograd.grad(out.gather(1, e.target[:, None]).sum(), xg)
    torch.testing.assert_close(e.relevance, x * grad, rtol=1e-9, atol=1e-12)
    with torch.no_grad():
        torch.testing.assert_close(e.logits, model(x))
    assert (lrp.conservation(_explain(model, x)) < TOL).all()


def test_nested_user_names_are_reported_by_record_layers() -> None:
    """Layer sums are keyed by the user's module paths at every nesting level, and conserved at
    every block boundary."""
    torch.manual_seed(0)
    model = _ready(NestedNet(), shift=False)
    x = _inputs(2, 16)
    e = lrp.Explainer(model, "lrp-0", zero_bias=True, stabilizer=0.0)(x, record_layers=True)
    assert (lrp.conservation(e) < TOL).all(), lrp.conservation(e)

    def computes(m: nn.Module) -> bool:  # ModuleDicts and the empty shortcut have no output
        return not isinstance(m, nn.ModuleDict | nn.ModuleList) and not (
            isinstance(m, nn.Sequential) and len(m) == 0
        )

    paths = {n for n, m in model.named_modules() if n and computes(m)}
    reported = set(e.layer_relevance)
    assert reported <= {n for n, _ in model.named_modules()}, sorted(reported - paths)
    assert paths <= reported, sorted(paths - reported)
    for path in ("backbone", "backbone.stage_a", "backbone.stage_a.blocks.first",
                 "backbone.stage_a.blocks.second", "backbone.stage_b.blocks.first",
                 "backbone.stage_b.entry"):  # fmt: skip
        gap = (e.layer_relevance[path] - e.initial).abs() / e.initial.abs()
        assert (gap < TOL).all(), (path, gap)
