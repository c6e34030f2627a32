"""ResNet rules of Otsuki et al. 2024: Relevance Splitting at residual merges, the otsuki2024 preset."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
import torchvision
from torch import nn
from torchvision.models.resnet import BasicBlock, Bottleneck

import lrp
from lrp.rules.residual import ResidualMerge

ARCHITECTURES = [
    "resnet18",
    "resnet34",
    "resnet50",
    "resnet101",
    "resnet152",
    "resnext50_32x4d",
    "wide_resnet50_2",
]


def _scale_batchnorms(model: nn.Module, shift: bool = False, seed: int = 0) -> nn.Module:
    """Random BN scales (and optionally shifts), so folding and pass-through are exercised."""
    g = torch.Generator().manual_seed(seed)
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.running_var.copy_(torch.rand(m.num_features, generator=g) * 1.5 + 0.5)
            m.weight.data.copy_(torch.rand(m.num_features, generator=g) + 0.5)
            if shift:
                m.running_mean.copy_(torch.rand(m.num_features, generator=g) * 0.4 - 0.2)
                m.bias.data.copy_(torch.rand(m.num_features, generator=g) * 0.2 - 0.1)
    return model


def _merge_backward(
    mode: str, projection: bool, h_m: torch.Tensor, h_s: torch.Tensor, r: torch.Tensor
):
    h_m = h_m.clone().requires_grad_(True)
    h_s = h_s.clone().requires_grad_(True)
    out = ResidualMerge(mode, projection)(h_m, h_s)
    torch.testing.assert_close(out, h_m + h_s)
    return torch.autograd.grad(out, (h_m, h_s), r)


@pytest.fixture
def merge_inputs():
    g = torch.Generator().manual_seed(0)
    h_m = torch.randn(4, 6, dtype=torch.float64, generator=g)
    h_s = torch.randn(4, 6, dtype=torch.float64, generator=g)
    h_m[0, 0], h_s[0, 0] = 0.0, 0.0  # both zero: ratio undefined
    h_m[0, 1], h_s[0, 1] = 0.7, -0.7  # sum zero, magnitudes not
    h_m[0, 2] = 0.0  # all to the skip
    h_s[0, 3] = 0.0  # all to the branch
    r = torch.randn(4, 6, dtype=torch.float64, generator=g)
    return h_m, h_s, r


def test_splitting_matches_explicit_ratio(merge_inputs) -> None:
    h_m, h_s, r = merge_inputs
    r_m, r_s = _merge_backward("splitting", False, h_m, h_s, r)
    total = h_m.abs() + h_s.abs()
    expected_m = torch.zeros_like(r)
    expected_s = r.clone()  # where |h_m| + |h_s| = 0 everything goes to the skip
    nz = total > 0
    expected_m[nz] = r[nz] * h_m.abs()[nz] / total[nz]
    expected_s[nz] = r[nz] * h_s.abs()[nz] / total[nz]
    assert torch.isfinite(r_m).all() and torch.isfinite(r_s).all()
    torch.testing.assert_close(r_m, expected_m, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(r_s, expected_s, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(r_m + r_s, r, rtol=1e-12, atol=1e-12)
    assert r_m[0, 1] == pytest.approx(r[0, 1] / 2) and r_s[0, 2] == r[0, 2] and r_m[0, 3] == r[0, 3]


@pytest.mark.parametrize(
    ("mode", "projection", "branch_fraction"),
    [
        ("half", False, 0.5),
        ("half", True, 0.5),
        ("ablation-ii", False, 0.5),
        ("ablation-i", False, 1.0),
        ("ablation-i", True, 0.5),
        ("ablation-iii", False, 1.0),
    ],
)
def test_constant_split_modes(merge_inputs, mode, projection, branch_fraction) -> None:
    h_m, h_s, r = merge_inputs
    r_m, r_s = _merge_backward(mode, projection, h_m, h_s, r)
    torch.testing.assert_close(r_m, r * branch_fraction)
    torch.testing.assert_close(r_s, r * (1 - branch_fraction))


def test_ablation_iii_projection_uses_ratio(merge_inputs) -> None:
    h_m, h_s, r = merge_inputs
    expected = _merge_backward("splitting", True, h_m, h_s, r)
    got = _merge_backward("ablation-iii", True, h_m, h_s, r)
    for a, b in zip(got, expected, strict=True):
        torch.testing.assert_close(a, b)


def test_gradient_copies_and_proportional_is_signed(merge_inputs) -> None:
    h_m, h_s, r = merge_inputs
    r_m, r_s = _merge_backward("gradient", False, h_m, h_s, r)
    torch.testing.assert_close(r_m, r)
    torch.testing.assert_close(r_s, r)
    r_m, r_s = _merge_backward("proportional", False, h_m, h_s, r)
    s = h_m + h_s
    den = torch.where(s >= 0, s + 1e-6, s - 1e-6)
    torch.testing.assert_close(r_m, r * h_m / den)
    torch.testing.assert_close(r_s, r * h_s / den)


def test_unknown_residual_mode_is_rejected() -> None:
    with pytest.raises(ValueError, match="residual='bogus'"):
        lrp.Explainer(torchvision.models.resnet18(), residual="bogus")


def _eps_rule(x: torch.Tensor, z_fn, r: torch.Tensor, eps: float) -> torch.Tensor:
    """Epsilon rule via autograd of the plain layer: x * d/dx <z(x), r / stab(z)>."""
    x = x.detach().requires_grad_(True)
    z = z_fn(x)
    den = torch.where(z >= 0, z + eps, z - eps).detach()
    (g,) = torch.autograd.grad(z, x, r / den)
    return x.detach() * g


def _folded(conv: nn.Conv2d, bn: nn.BatchNorm2d):
    scale = bn.weight / torch.sqrt(bn.running_var + bn.eps)
    w = conv.weight * scale.view(-1, 1, 1, 1)
    b = bn.bias - bn.running_mean * scale
    return lambda t: F.conv2d(t, w, b, conv.stride, conv.padding, conv.dilation, conv.groups)


@pytest.mark.parametrize("projection", [False, True])
def test_single_block_against_manual_propagation(projection: bool) -> None:
    """A BasicBlock explained with the epsilon rule equals a hand-written propagation."""
    torch.manual_seed(0)
    downsample = (
        nn.Sequential(nn.Conv2d(4, 6, 1, stride=2, bias=False), nn.BatchNorm2d(6))
        if projection
        else None
    )
    block = BasicBlock(
        4, 6 if projection else 4, stride=2 if projection else 1, downsample=downsample
    )
    block = _scale_batchnorms(block, shift=True).double().eval()
    model = nn.Sequential(block, nn.Flatten()).eval()
    x = torch.rand(2, 4, 6, 6, dtype=torch.float64)  # non-negative, as after a ReLU
    with torch.no_grad():
        n_out = model(x).shape[1]
    r_out = torch.randn(2, n_out, dtype=torch.float64)
    eps = 0.01

    explainer = lrp.Explainer(model, "epsilon", epsilon=eps, residual="splitting")
    got = explainer(x, output_relevance=r_out).relevance

    with torch.no_grad():
        c1, c2 = _folded(block.conv1, block.bn1), _folded(block.conv2, block.bn2)
        z1 = c1(x)
        a1 = z1.clamp(min=0)
        h_m = c2(a1)
        skip_fn = _folded(downsample[0], downsample[1]) if projection else (lambda t: t)
        h_s = skip_fn(x)
        h = h_m + h_s
        r_h = r_out.view_as(h)  # ReLU passes relevance unchanged
        total = h_m.abs() + h_s.abs()
        r_m = r_h * h_m.abs() / total
        r_s = r_h - r_m
    r_a1 = _eps_rule(a1, c2, r_m, eps)
    r_x = _eps_rule(x, c1, r_a1, eps)
    r_x = r_x + (_eps_rule(x, skip_fn, r_s, eps) if projection else r_s)
    torch.testing.assert_close(got, r_x, rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_preset_conserves_relevance_on_every_architecture(arch: str) -> None:
    torch.manual_seed(0)
    model = _scale_batchnorms(getattr(torchvision.models, arch)(num_classes=10)).eval()
    x = torch.randn(2, 3, 32, 32)

    tight = lrp.Explainer(model, "otsuki2024", otsuki_epsilon=1e-7)(x, record_layers=True)
    assert (lrp.conservation(tight) < 1e-4).all(), lrp.conservation(tight)
    torch.testing.assert_close(
        tight.initial, torch.softmax(tight.logits, 1).gather(1, tight.target[:, None])[:, 0]
    )
    blocks = [k for k in tight.layer_relevance if k.count(".") == 1 and k.startswith("layer")]
    assert len(blocks) >= 8
    for name in blocks:  # relevance is conserved at every block boundary
        gap = (tight.layer_relevance[name] - tight.initial).abs() / tight.initial
        assert (gap < 1e-4).all(), (name, gap)

    # the published eps = 1e-5 loses a stabiliser share per layer: small, measured, bounded
    published = lrp.Explainer(model, "otsuki2024")(x)
    assert (lrp.conservation(published) < 1e-3).all(), lrp.conservation(published)

    # what autograd-based tools do at merges multiplies relevance: conservation is violated
    copied = lrp.Explainer(model, "otsuki2024", residual="gradient", otsuki_epsilon=1e-7)(x)
    assert (lrp.conservation(copied) > 0.5).all(), lrp.conservation(copied)


ALL_SPLITS = ("splitting", "half", "ablation-i", "ablation-iii", "proportional")
CONSERVATIVE_SETTINGS = [
    # BN without shift folds into bias-free convs; the fc's bias is left out of the denominators
    *[("lrp-0", False, {"zero_bias": True}, mode) for mode in ALL_SPLITS],
    # fixed 50/50 or all-to-branch splits hand relevance to branches whose output is ~0; there
    # any epsilon absorbs it (that instability is what ratio splitting avoids), so only ratios here
    *[
        ("epsilon", False, {"epsilon": 1e-9, "zero_bias": True}, m)
        for m in ("splitting", "proportional")
    ],
    # with BN shifts the folded biases absorb relevance unless left out of the denominators
    *[
        (c, True, {"epsilon": 1e-9, "stabilizer": 1e-12, "zero_bias": True}, mode)
        for c in ("epsilon-plus", "epsilon-plus-flat")
        for mode in ALL_SPLITS
    ],
]


@pytest.mark.parametrize(("composite", "shift", "options", "residual"), CONSERVATIVE_SETTINGS)
def test_conservative_rules_conserve_through_resnet(composite, shift, options, residual) -> None:
    torch.manual_seed(0)
    model = (
        _scale_batchnorms(torchvision.models.resnet18(num_classes=10), shift=shift).double().eval()
    )
    x = torch.randn(2, 3, 32, 32, dtype=torch.float64)
    e = lrp.Explainer(model, composite, residual=residual, **options)(x)
    # the global average pool's 1e-6 stabiliser leaves ~1e-6; proportional splitting adds its own
    tol = 1e-4 if residual == "proportional" else 1e-5
    assert (lrp.conservation(e) < tol).all(), lrp.conservation(e)
    copied = lrp.Explainer(model, composite, residual="gradient", **options)(x)
    assert (lrp.conservation(copied) > 0.5).all()


def test_preset_layer_rules() -> None:
    explainer = lrp.Explainer(torchvision.models.resnet18(num_classes=10), "otsuki2024")
    explainer(torch.randn(1, 3, 32, 32))
    rules = explainer.rules
    assert isinstance(rules["conv1"], lrp.rules.ZPlusOnes)
    assert isinstance(rules["bn1"], lrp.rules.Pass)  # BatchNorm is not folded
    assert isinstance(rules["relu"], lrp.rules.Pass)
    assert isinstance(rules["maxpool"], lrp.rules.Proportional)
    assert isinstance(rules["maxpool"].through, nn.AvgPool2d)
    fc = rules["fc"]
    assert isinstance(fc, lrp.rules.ZPlus) and not fc.use_bias and fc.stabilizer == 1e-5
    assert isinstance(rules["layer1.0.conv2"], lrp.rules.ZPlus)
    assert explainer.output == "probability"


def test_preset_stem_maxpool_as_average_pool_by_hand() -> None:
    """The preset's max-pool rule on one map equals the 2x2 average-pool share, computed by hand."""
    x = torch.tensor(
        [
            [
                [
                    [1.0, 3.0, 0.0, 0.0],
                    [0.0, 4.0, 0.0, 0.0],
                    [2.0, 2.0, 5.0, 0.0],
                    [2.0, 2.0, 0.0, 5.0],
                ]
            ]
        ],
        dtype=torch.float64,
    )
    maxpool_rule = lrp.composites.get("otsuki2024").stem_pool
    pool = nn.MaxPool2d(3, 2, 1)
    r_out = torch.tensor([[[[8.0, 1.0], [2.0, 4.0]]]], dtype=torch.float64)
    got = maxpool_rule.relevance(pool, x, pool(x), r_out)
    expected = torch.tensor(
        [
            [
                [
                    [1.0, 3.0, 0.25, 0.25],
                    [0.0, 4.0, 0.25, 0.25],
                    [0.5, 0.5, 2.0, 0.0],
                    [0.5, 0.5, 0.0, 2.0],
                ]
            ]
        ],
        dtype=torch.float64,
    )
    torch.testing.assert_close(got, expected)  # the all-zero window shares its relevance evenly


def test_user_model_built_from_torchvision_blocks() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1, bias=False),
        nn.BatchNorm2d(8),
        nn.ReLU(),
        BasicBlock(8, 8),
        Bottleneck(
            8,
            4,
            stride=2,
            downsample=nn.Sequential(nn.Conv2d(8, 16, 1, 2, bias=False), nn.BatchNorm2d(16)),
        ),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(16, 5),
    )
    model = _scale_batchnorms(model).double().eval()
    explainer = lrp.Explainer(model, "epsilon", epsilon=1e-12, zero_bias=True)
    e = explainer(torch.randn(3, 3, 16, 16, dtype=torch.float64))
    assert (lrp.conservation(e) < 1e-5).all()
    assert sum(isinstance(m, ResidualMerge) for m in explainer.prepared_model().modules()) == 2


class _HandWrittenResidual(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 3, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.conv(x)


def test_hand_written_residual_is_split_like_a_torchvision_block() -> None:
    """``x + self.conv(x)``: the merge is found by data flow, x is the identity skip (it gets
    nothing under ablation-i), and the ratio split is the explicit formula."""
    torch.manual_seed(0)
    model = nn.Sequential(_HandWrittenResidual(), nn.Flatten()).double().eval()
    x = torch.randn(2, 3, 4, 4, dtype=torch.float64)
    r_out = torch.randn(2, 48, dtype=torch.float64)
    explainer = lrp.Explainer(model, "epsilon", epsilon=1e-3, residual="splitting")
    got = explainer(x, output_relevance=r_out).relevance
    merges = [m for m in explainer.prepared_model().modules() if isinstance(m, ResidualMerge)]
    assert len(merges) == 1 and merges[0].identity == (False, True)
    conv = model[0].conv
    with torch.no_grad():
        h_m, h_s = conv(x), x
        r = r_out.view_as(h_m)
        r_m = r * h_m.abs() / (h_m.abs() + h_s.abs())
    expected = _eps_rule(x, conv, r_m, 1e-3) + (r - r_m)
    torch.testing.assert_close(got, expected, rtol=1e-9, atol=1e-12)
    ablated = lrp.Explainer(model, "epsilon", epsilon=1e-3, residual="ablation-i")
    torch.testing.assert_close(
        ablated(x, output_relevance=r_out).relevance, _eps_rule(x, conv, r, 1e-3)
    )


@pytest.mark.parametrize("composite", [c for c in lrp.composites.names() if c != "otsuki2024"])
def test_all_composites_run_on_resnet_with_splitting(composite: str) -> None:
    model = _scale_batchnorms(torchvision.models.resnet18(num_classes=10), shift=True).eval()
    options = {"input_bounds": (-3.0, 3.0)} if composite == "epsilon-gamma-box" else {}
    e = lrp.Explainer(model, composite, **options)(torch.randn(2, 3, 32, 32))
    assert e.relevance.shape == (2, 3, 32, 32)
    assert torch.isfinite(e.relevance).all()
    assert e.relevance.abs().sum() > 0


@pytest.mark.parametrize("arch", ["resnet18", "resnet50"])
def test_skip_marked_nonnegative_only_where_it_is(arch: str) -> None:
    """Merges skip |h_s| where the explainer proved h_s >= 0; that proof holds on real inputs and
    the relevance equals the one computed with |h_s| everywhere."""
    torch.manual_seed(0)
    model = _scale_batchnorms(getattr(torchvision.models, arch)(weights=None), shift=True)
    model = model.double().eval()
    x = torch.randn(2, 3, 64, 64, dtype=torch.float64)
    explainer = lrp.Explainer(model, "epsilon-plus-flat")
    prepared = explainer.prepared_model()
    merges = [m for m in prepared.modules() if isinstance(m, ResidualMerge)]
    marked = [m for m in merges if m.skip_nonnegative]
    assert marked and len(marked) < len(merges)  # identity skips only, not the projections
    seen: list[torch.Tensor] = []
    handles = [m.register_forward_hook(lambda mod, args, out: seen.append(args[1].min()))
               for m in marked]
    fast = explainer(x, target=1).relevance
    for h in handles:
        h.remove()
    assert len(seen) == len(marked) and all(v >= 0 for v in seen)
    for m in marked:
        m.skip_nonnegative = False
    reference = explainer(x, target=1).relevance
    torch.testing.assert_close(fast, reference, rtol=1e-12, atol=1e-15)
