"""z+ / alpha-beta outputs whose positive contributions are all zero (issue 11).

Such an output (every x_j w_jk^+ = 0 and no b+) has no input to pass its relevance to under the
plain rule. ``empty="flat"`` (the default) spreads it uniformly over the output's receptive field.
The references below are dense and written from the rule's definition (METHOD.md section 1 plus
the flat rule at empty outputs): contributions from the dense layer matrix, the receptive field
from the dense matrix of the same layer with all weights set to one. The ResNeXt test measures
the cause (relevance arriving at empty outputs, found with plain convolutions in forward hooks)
and the conservation before (``empty="drop"``) and after.
"""

from __future__ import annotations

import copy
import zlib

import pytest
import torch
import torch.nn.functional as F
import torchvision
from test_rules_dense import assert_close, dense_layer, neg, pos, propagate
from torch import nn
from zoo_checks import randomize_statistics

import lrp
from lrp.layers import LinearRuleLayer
from lrp.rules import linear as linear_rules

F64 = torch.float64


def _layer(kind: str, bias: bool) -> tuple[nn.Module, tuple[int, ...]]:
    if kind == "linear":
        layer, shape = nn.Linear(10, 8, bias=bias), (10,)
    elif kind == "conv1d-s2":
        layer, shape = nn.Conv1d(2, 4, 3, stride=2, padding=1, bias=bias), (2, 7)
    elif kind == "conv2d-g2":
        layer, shape = nn.Conv2d(4, 4, 3, padding=1, groups=2, bias=bias), (4, 5, 5)
    elif kind == "conv2d-depthwise":  # one output channel per group: no sum over a group
        layer, shape = nn.Conv2d(3, 3, 3, padding=1, groups=3, bias=bias), (3, 5, 6)
    elif kind == "conv2d-depthwise-s2":
        layer, shape = nn.Conv2d(3, 6, 3, stride=2, padding=1, groups=3, bias=bias), (3, 5, 6)
    elif kind == "conv2d-all":
        layer = nn.Conv2d(4, 6, 3, stride=2, padding=2, dilation=2, groups=2, bias=bias)
        shape = (4, 5, 6)
    else:
        raise AssertionError(kind)
    layer = layer.to(F64)
    with torch.no_grad():
        layer.weight.normal_()
        layer.weight[0].abs_().neg_()  # channel 0 is empty wherever its input is >= 0
        if layer.bias is not None:  # both signs: b+ > 0 channels are never empty, b+ = 0 can be
            layer.bias.normal_().abs_()[::2] *= -1
    return layer, shape


def _receptive_field(layer: nn.Module, shape: tuple[int, ...]) -> torch.Tensor:
    """(K, J) 0/1 matrix: input j is connected to output k (the layer with all weights 1)."""
    ones = copy.deepcopy(layer)
    with torch.no_grad():
        ones.weight.fill_(1.0)
    ones.bias = None
    W1, _ = dense_layer(ones, shape)
    return (W1 != 0).to(F64)


def _positive_part(W, b, x):
    """Positive contributions (N, K, J) of flat samples x through the dense W, and their
    denominators (N, K) with the positive bias."""
    c_pos = pos(x.unsqueeze(1)) * pos(W.unsqueeze(0)) + neg(x.unsqueeze(1)) * neg(W.unsqueeze(0))
    return c_pos, c_pos.sum(2) + pos(b)


def _reference(W, b, conn, x, R, alpha, beta, eps, use_bias, flat=True):
    """alpha-beta on the dense matrix; empty positive denominators share alpha * R_k flat."""
    xb, Wb = x.unsqueeze(1), W.unsqueeze(0)
    bb = b if use_bias else torch.zeros_like(b)
    c_pos, den_pos = _positive_part(W, bb, x)
    r = alpha * propagate(c_pos, den_pos, R, eps)
    if beta:
        c_neg = pos(xb) * neg(Wb) + neg(xb) * pos(Wb)
        r = r - beta * propagate(c_neg, c_neg.sum(2) + neg(bb), R, eps)
    empty = den_pos == 0
    if flat:
        share = conn / conn.sum(1, keepdim=True)  # uniform over each output's receptive field
        r = r + torch.einsum("kj,nk->nj", share, alpha * R * empty)
    return r, empty


RULES = [
    ("zplus", 1e-6, False),
    ("zplus", 1e-6, True),
    ("zplus", 0.0, False),
    ("zplus", 0.0, True),
    ("ab21", 1e-6, False),
    ("ab10", 1e-6, False),
]


def _rule(spec: tuple, empty: str = "flat") -> lrp.rules.AlphaBeta:
    name, eps, zero_bias = spec
    if name == "zplus":
        return lrp.rules.ZPlus(eps, zero_bias=zero_bias, empty=empty)
    alpha, beta = (2.0, 1.0) if name == "ab21" else (1.0, 0.0)
    return lrp.rules.AlphaBeta(alpha, beta, eps, empty=empty)


@pytest.mark.parametrize("bias", [True, False], ids=["bias", "nobias"])
@pytest.mark.parametrize("nonnegative", [True, False], ids=["after-relu", "signed-input"])
@pytest.mark.parametrize("spec", RULES, ids=lambda s: "-".join(map(str, s)))
@pytest.mark.parametrize(
    "kind",
    ["linear", "conv1d-s2", "conv2d-g2", "conv2d-depthwise", "conv2d-depthwise-s2", "conv2d-all"],
)
@pytest.mark.parametrize("spread", ["dense", "sparse", "accelerator"])
def test_empty_outputs_share_flat_dense(
    kind: str, spec: tuple, nonnegative: bool, bias: bool, spread: str, monkeypatch
):
    """``spread``: the flat share as one spread over every output, or (CPU, where empty outputs
    are few) added output by output (both forced here, whatever their number), or the path an
    accelerator takes (full masks, no host reads), run on the CPU."""
    monkeypatch.setattr(linear_rules, "SPARSE_FLAT_MAX_PAIRS", 0 if spread == "dense" else 1e9)
    if spread == "accelerator":
        monkeypatch.setattr(linear_rules, "_host", lambda t: False)
    torch.manual_seed(zlib.crc32(repr((kind, spec, nonnegative, bias)).encode()))
    layer, shape = _layer(kind, bias)
    n = 3
    # sparse inputs: many outputs see no positive contribution at all
    density = 0.5 if kind == "linear" else 0.3
    x = torch.randn(n, *shape, dtype=F64) * (torch.rand(n, *shape, dtype=F64) < density)
    x[0].abs_()  # with a non-positive channel 0 (no bias): empty outputs in sample 0
    if nonnegative:  # a ReLU in front: the rule layer takes its non-negative fast path
        model = nn.Sequential(nn.ReLU(), layer, nn.Flatten()).eval()
        x_layer = x.clamp(min=0)
    else:
        model = nn.Sequential(layer, nn.Flatten()).eval()
        x_layer = x
    rule = _rule(spec)
    explainer = lrp.Explainer(model, composite={type(layer): rule})
    with torch.no_grad():
        K = model(x).shape[1]
    R = torch.randn(n, K, dtype=F64)
    out = explainer(x, output_relevance=R)
    rule_layer = next(
        m for m in explainer.prepared_model().modules() if isinstance(m, LinearRuleLayer)
    )
    assert rule_layer.input_nonnegative is nonnegative

    W, b = dense_layer(layer, shape)
    alpha, beta = rule.alpha, rule.beta
    ref, empty = _reference(
        W,
        b,
        _receptive_field(layer, shape),
        x_layer.reshape(n, -1),
        R,
        alpha,
        beta,
        rule.stabilizer,
        rule.use_bias,
    )
    assert 0 < empty.sum() < empty.numel(), "the case must contain empty and non-empty outputs"
    assert_close(out.relevance.reshape(n, -1), ref)

    # empty="drop" is the plain rule: the flat part is what it loses (so this test can fail)
    drop = lrp.Explainer(model, composite={type(layer): _rule(spec, "drop")})
    ref_drop, _ = _reference(
        W,
        b,
        _receptive_field(layer, shape),
        x_layer.reshape(n, -1),
        R,
        alpha,
        beta,
        rule.stabilizer,
        rule.use_bias,
        flat=False,
    )
    out_drop = drop(x, output_relevance=R)
    assert_close(out_drop.relevance.reshape(n, -1), ref_drop)
    assert (ref - ref_drop).abs().max() > 1e-3


def test_empty_output_by_hand() -> None:
    """One Linear output with only negative weights on a non-negative input: R goes flat."""
    layer = nn.Linear(3, 2, bias=False).to(F64)
    with torch.no_grad():
        layer.weight.copy_(torch.tensor([[-1.0, -2.0, 0.5], [1.0, 2.0, 0.0]], dtype=F64))
    x = torch.tensor([[1.0, 1.0, 0.0]], dtype=F64)  # output 0: x w+ = (0, 0, 0)
    R = torch.tensor([[3.0, 2.0]], dtype=F64)
    model = nn.Sequential(layer).eval()
    out = lrp.Explainer(model, composite={nn.Linear: lrp.rules.ZPlus(0.0)})(x, output_relevance=R)
    expected = torch.tensor([[1.0 + 2.0 / 3, 1.0 + 4.0 / 3, 1.0]], dtype=F64)
    assert_close(out.relevance, expected)
    assert out.relevance.sum().item() == pytest.approx(5.0, abs=1e-14)


def test_bias_positive_channel_is_not_empty() -> None:
    """With b+ > 0 the bias is a positive contribution: it absorbs R_k, nothing goes flat."""
    layer = nn.Linear(2, 1).to(F64)
    with torch.no_grad():
        layer.weight.copy_(torch.tensor([[-1.0, -1.0]], dtype=F64))
        layer.bias.fill_(0.5)
    x = torch.tensor([[1.0, 2.0]], dtype=F64)
    R = torch.tensor([[1.0]], dtype=F64)
    for model in (nn.Sequential(layer), nn.Sequential(nn.ReLU(), layer)):
        e = lrp.Explainer(model.eval(), composite={nn.Linear: lrp.rules.ZPlus(1e-6)})
        assert e(x, output_relevance=R).relevance.abs().max() == 0


# ----------------------------------------------------------------------------------------------
# conservation
# ----------------------------------------------------------------------------------------------


def _grouped_net(groups: tuple[int, int]) -> nn.Sequential:
    torch.manual_seed(1)
    net = nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1),
        nn.ReLU(),
        nn.Conv2d(8, 8, 3, padding=1, groups=groups[0]),
        nn.ReLU(),
        nn.Conv2d(8, 16, 3, stride=2, padding=1, groups=groups[1]),
        nn.ReLU(),
        nn.AdaptiveAvgPool2d(2),
        nn.Flatten(),
        nn.Linear(64, 4),
    ).to(F64)
    with torch.no_grad():
        for m in net:
            if isinstance(m, nn.Conv2d):
                m.weight.normal_()
                # positive biases switch on outputs whose input terms are all <= 0: under
                # zero_bias they are empty z+ outputs that do receive relevance
                m.bias.uniform_(-0.5, 1.5)
    return net.eval()


@pytest.mark.parametrize("groups", [(4, 8), (8, 8)], ids=["g4-g8", "g8-g8"])
def test_grouped_conv_net_conserves(groups: tuple[int, int]) -> None:
    """z+ with zero_bias everywhere is conservative; before the fix it was not."""
    net = _grouped_net(groups)
    x = torch.randn(3, 3, 8, 8, dtype=F64)

    def comp(empty: str) -> dict:
        rule = lrp.rules.ZPlus(1e-12, zero_bias=True, empty=empty)
        return {
            (nn.Conv2d, nn.Linear): rule,
            nn.AdaptiveAvgPool2d: lrp.rules.Proportional(1e-12, empty="flat"),
        }

    e = lrp.Explainer(net, composite=comp("flat"))(x)
    err = lrp.conservation(e)
    assert (err < 1e-9).all(), err
    tl = e.logits.gather(1, e.target[:, None])[:, 0]  # independent of lrp.conservation
    torch.testing.assert_close(e.relevance.flatten(1).sum(1), tl, rtol=1e-9, atol=1e-12)
    dropped = lrp.Explainer(net, composite=comp("drop"))(x, target=e.target)
    assert (lrp.conservation(dropped) > 1e-5).all(), lrp.conservation(dropped)


# ----------------------------------------------------------------------------------------------
# ResNeXt-50 32x4d under the otsuki2024 preset (the case of issue 11)
# ----------------------------------------------------------------------------------------------


def _resnext(dtype: torch.dtype) -> nn.Module:
    torch.manual_seed(0)
    model = torchvision.models.resnext50_32x4d(num_classes=10)
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():  # non-trivial BatchNorm statistics, with shifts
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_var.copy_(torch.rand(m.num_features, generator=g) * 1.5 + 0.5)
                m.weight.copy_(torch.rand(m.num_features, generator=g) + 0.5)
                m.running_mean.copy_(torch.rand(m.num_features, generator=g) * 0.4 - 0.2)
                m.bias.copy_(torch.rand(m.num_features, generator=g) * 0.2 - 0.1)
    return model.to(dtype).eval()


def _relevance_at_empty_outputs(explainer: lrp.Explainer, x: torch.Tensor, target) -> torch.Tensor:
    """Per sample, the relevance that reaches z+ outputs with no positive contribution.

    Found with plain convolutions of the conv's own weights in forward hooks (bias-free: the
    preset uses zero_bias), independent of the rule code.
    """
    found: list[torch.Tensor] = []

    def hook(layer, args, out):
        m = layer.module
        xin = args[0].detach()
        conv = lambda a, w: F.conv2d(a, w, None, m.stride, m.padding, m.dilation, m.groups)  # noqa: E731
        w = m.weight.detach()
        den = conv(xin.clamp(min=0), w.clamp(min=0)) + conv(xin.clamp(max=0), w.clamp(max=0))
        empty = den == 0
        out.register_hook(lambda g: found.append((g * empty).flatten(1).sum(1)))

    handles = [
        m.register_forward_hook(hook)
        for m in explainer.prepared_model().modules()
        if isinstance(m, LinearRuleLayer)
        and isinstance(m.module, nn.Conv2d)
        and isinstance(m.rule, lrp.rules.ZPlus)
    ]
    try:
        e = explainer(x, target=target)
    finally:
        for h in handles:
            h.remove()
    return torch.stack(found).sum(0), e


def _set_empty(explainer: lrp.Explainer, empty: str) -> None:
    explainer.prepared_model()
    for rule in explainer.rules.values():
        if isinstance(rule, lrp.rules.AlphaBeta):
            rule.empty = empty


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["f32", "f64"])
def test_resnext_otsuki_conserves(dtype: torch.dtype) -> None:
    model = _resnext(dtype)
    x = torch.randn(2, 3, 64, 64, dtype=dtype)

    # cause: with the plain rule (drop, the stabiliser's share absorbed) and a tight stabiliser,
    # what is lost is what reaches the empty outputs (the rest is the stabiliser's share, ~2e-5)
    plain = {"stabilizer_share": "absorb"}
    tight_drop = lrp.Explainer(model, "otsuki2024", otsuki_epsilon=1e-7, **plain)
    _set_empty(tight_drop, "drop")
    at_empty, e_drop = _relevance_at_empty_outputs(tight_drop, x, None)
    lost = (e_drop.initial - e_drop.relevance.flatten(1).sum(1)) / e_drop.initial
    assert (lost > 0.01).all(), lost
    torch.testing.assert_close(lost, (at_empty / e_drop.initial).to(lost), atol=1e-4, rtol=0)

    tight = lrp.Explainer(model, "otsuki2024", otsuki_epsilon=1e-7, **plain)(
        x, target=e_drop.target, record_layers=True
    )
    assert (lrp.conservation(tight) < 1e-4).all(), lrp.conservation(tight)
    blocks = [k for k in tight.layer_relevance if k.startswith("layer") and k.count(".") == 1]
    assert len(blocks) == 16
    for name in blocks:  # at every block boundary, layer1's grouped convs included
        gap = (tight.layer_relevance[name] - tight.initial).abs() / tight.initial
        assert (gap < 1e-4).all(), (name, gap)

    # absorbed, the published stabiliser 1e-5 keeps its share (1e-5 / (z_k + 1e-5)) at every
    # output: measured ~1.3e-3 here, 3 % before the fix
    absorbed = lrp.Explainer(model, "otsuki2024", **plain)(x, target=e_drop.target)
    assert (lrp.conservation(absorbed) < 2.5e-3).all(), lrp.conservation(absorbed)
    published_drop = lrp.Explainer(model, "otsuki2024", **plain)
    _set_empty(published_drop, "drop")
    e = published_drop(x, target=e_drop.target)
    assert (lrp.conservation(e) > 0.01).all(), lrp.conservation(e)

    # the preset's default spreads the share: conserved to rounding at every block boundary
    default = lrp.Explainer(model, "otsuki2024")(x, target=e_drop.target, record_layers=True)
    bound = 1e-5 if dtype == torch.float32 else 1e-12
    for name in [*blocks, "fc"]:
        gap = (default.layer_relevance[name] - default.initial).abs() / default.initial
        assert (gap < bound).all(), (name, gap)
    assert (lrp.conservation(default) < bound).all(), lrp.conservation(default)


@pytest.mark.parametrize("planted", [3, 40], ids=["few-planes", "most-planes"])
@pytest.mark.parametrize("stabilizer", [1e-6, 0.0])
def test_empty_outputs_are_found_plane_by_plane(planted: int, stabilizer: float) -> None:
    """On the CPU the empty outputs of a convolution are searched only in the (sample, channel)
    planes whose extreme is the stabiliser (inf for 0), as indices; in most planes, as a mask.
    Either equals the full comparison, and a channel with b+ > 0 holding the value is not empty."""
    torch.manual_seed(planted)
    rule = lrp.rules.ZPlus(stabilizer=stabilizer)
    layer = LinearRuleLayer(nn.Conv2d(2, 8, 3).to(F64), rule)
    value = stabilizer if stabilizer else float("inf")
    den = torch.rand(4, 8, 5, 5, dtype=F64) + 1.0
    den.view(-1)[torch.randperm(den.numel())[:planted]] = value
    bp = torch.zeros(8, dtype=F64)
    bp[::3] = 0.5  # channels 0, 3, 6: never empty
    got = rule._empty_mask(layer, {"bp": bp}, den)
    expected = ((den == value) & (bp == 0).view(-1, 1, 1)).flatten().nonzero().squeeze(1)
    if planted > 10:  # empty outputs in most planes: one mask
        assert got.dtype == torch.bool
        got = got.flatten().nonzero().squeeze(1)
    assert torch.equal(got.sort().values, expected)


@pytest.mark.parametrize("padding", [None, (1, 2, 2, 1), "tf-same"])
@pytest.mark.parametrize("groups", [1, 2, 6])
def test_sparse_flat_share_equals_the_dense_spread(padding, groups: int, monkeypatch) -> None:
    """The flat share added output by output (CPU, few empty outputs) equals the dense spread,
    pre-padding (zeros that are no inputs) included."""
    from lrp.ops import SamePadding, with_pre_padding

    monkeypatch.setattr(linear_rules, "SPARSE_FLAT_MAX_PAIRS", 1e9)
    torch.manual_seed(groups)
    conv = nn.Conv2d(6, 12, 3, stride=2, padding=1 if padding is None else 0, dilation=1,
                     groups=groups).to(F64)
    if padding == "tf-same":
        conv = with_pre_padding(conv, SamePadding((3, 3), (2, 2), (1, 1)))
    elif padding is not None:
        conv = with_pre_padding(conv, padding)
    layer = LinearRuleLayer(conv, lrp.rules.ZPlus())
    x = torch.randn(2, 6, 9, 8, dtype=F64)
    relevance = torch.randn_like(conv(x))
    empty = torch.rand(relevance.shape) < 0.1
    dense = linear_rules._flat_transpose(layer, torch.where(empty, 2.0 * relevance, 0.0), x)
    sparse = linear_rules._flat_fallback(layer, empty, relevance, x, scale=2.0)
    assert isinstance(sparse, linear_rules._Scatter)
    assert_close(linear_rules._add_flat(torch.zeros_like(x), sparse), dense)


@pytest.mark.parametrize("dims", [1, 3])
def test_sparse_flat_share_in_one_and_three_dimensions(dims: int, monkeypatch) -> None:
    """The output-by-output share equals the dense spread for 1-d and 3-d convolutions too
    (strides, dilation and padding per dimension)."""
    monkeypatch.setattr(linear_rules, "SPARSE_FLAT_MAX_PAIRS", 1e9)
    torch.manual_seed(dims)
    conv_type = {1: nn.Conv1d, 3: nn.Conv3d}[dims]
    stride, dilation, padding = (2, 1, 2)[:dims], (1, 2, 1)[:dims], (1, 2, 0)[:dims]
    conv = conv_type(4, 6, 3, stride=stride, padding=padding, dilation=dilation,
                     groups=2).to(F64)
    layer = LinearRuleLayer(conv, lrp.rules.ZPlus())
    x = torch.randn(2, 4, *(9, 8, 7)[:dims], dtype=F64)
    relevance = torch.randn_like(conv(x))
    empty = torch.rand(relevance.shape) < 0.2
    dense = linear_rules._flat_transpose(layer, torch.where(empty, relevance, 0.0), x)
    sparse = linear_rules._flat_fallback(layer, empty, relevance, x)
    assert isinstance(sparse, linear_rules._Scatter)
    assert_close(linear_rules._add_flat(torch.zeros_like(x), sparse), dense)


@pytest.mark.parametrize("form", ["mask", "indices"])
@pytest.mark.parametrize("sparse", [True, False])
def test_empty_outputs_without_relevance_share_nothing(form: str, sparse: bool, monkeypatch
                                                       ) -> None:
    """Behind a ReLU an empty output's relevance is 0 (its value is <= 0): the CPU path leaves
    such outputs out and skips the spread when none is left; an empty output with relevance
    still gets exactly its flat share, on the sparse and the dense path."""
    monkeypatch.setattr(linear_rules, "SPARSE_FLAT_MAX_PAIRS", 1e9 if sparse else 0.0)
    torch.manual_seed(7)
    layer = LinearRuleLayer(nn.Conv2d(4, 4, 3, stride=2, padding=1, groups=4).to(F64),
                            lrp.rules.ZPlus())
    x = torch.randn(2, 4, 9, 9, dtype=F64)
    empty = torch.rand(2, 4, 5, 5) < 0.3
    relevance = torch.randn(2, 4, 5, 5, dtype=F64).masked_fill(empty, 0.0)

    def given(mask: torch.Tensor) -> torch.Tensor:
        return mask if form == "mask" else mask.flatten().nonzero().squeeze(1)

    assert linear_rules._flat_fallback(layer, given(empty), relevance, x) is None
    one = torch.zeros_like(empty)
    one.view(-1)[empty.flatten().nonzero()[3]] = True
    relevance[one] = 1.5
    got = linear_rules._flat_fallback(layer, given(empty), relevance, x, scale=2.0)
    assert isinstance(got, linear_rules._Scatter) is sparse
    expected = linear_rules._flat_transpose(layer, torch.where(one, 3.0, 0.0).to(F64), x)
    assert_close(linear_rules._add_flat(torch.zeros_like(x), got), expected)


ACCELERATOR_CASES = [
    ("resnext", "otsuki2024", {}),
    ("resnext", "otsuki2024", {"stabilizer_share": "absorb"}),
    ("resnext", "epsilon-alpha2-beta1-flat", {}),
    ("mobilenet", "epsilon-plus-flat", {}),
    ("mobilenet", "lrp-0", {"zero_bias": True, "stabilizer": 0.0}),
    ("mobilenet", "epsilon-gamma-box", {"input_bounds": (-3.0, 3.0)}),
]


@pytest.mark.parametrize(("arch", "composite", "options"), ACCELERATOR_CASES,
                         ids=[f"{a}-{c}-{'-'.join(map(str, o.values()))}"
                              for a, c, o in ACCELERATOR_CASES])
def test_accelerator_path_gives_the_host_values(arch, composite, options, monkeypatch) -> None:
    """The rules' accelerator path (every empty-output test a full mask, no host reads) gives the
    CPU path's relevance on whole networks with empty outputs (grouped and depthwise layers,
    ReLU-sparse inputs): the GPU's branches are run here, where CI has no GPU."""
    if arch == "resnext":
        model = _resnext(F64)
    else:
        torch.manual_seed(0)
        model = randomize_statistics(torchvision.models.mobilenet_v3_small(num_classes=10), 0)
        model = model.to(F64).eval()
    x = torch.randn(2, 3, 64, 64, dtype=F64).clamp(-3, 3)
    found = []
    real = linear_rules._flat_fallback

    def fallback(layer, empty, *args, **kwargs):
        found.append(empty is not None and bool(empty.any() if empty.dtype == torch.bool
                                                else empty.numel()))
        return real(layer, empty, *args, **kwargs)

    monkeypatch.setattr(linear_rules, "_flat_fallback", fallback)
    host = lrp.Explainer(model, composite, **options)(x)
    # otsuki2024 spreads the stabiliser's share (no mask); the gamma rule has no empty outputs
    if "stabilizer_share" in options or composite not in ("otsuki2024", "epsilon-gamma-box"):
        assert any(found), "the case must have empty outputs"
    monkeypatch.setattr(linear_rules, "_host", lambda t: False)
    accelerator = lrp.Explainer(model, composite, **options)(x, target=host.target)
    assert torch.isfinite(host.relevance).all()
    torch.testing.assert_close(accelerator.relevance, host.relevance, rtol=1e-10, atol=1e-12)
