"""Operations the timm sweep (benchmarks/zoo_sweep.py) found in real models, each against the
rule computed independently: dense matrices of the linear maps (unit vectors pushed through
PyTorch's own functions), the shares written out, or autograd where the rule is the gradient
(docs/ENGINE_API.md "Which operation gets which rule")."""

from __future__ import annotations

import pickle

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import lrp
from lrp.ops import LinearOp, SamePadding, with_pre_padding

F64 = torch.float64
EXACT = {nn.Linear: lrp.rules.Epsilon(0.0, zero_bias=True),
         nn.Conv2d: lrp.rules.Epsilon(0.0, zero_bias=True)}  # LRP-0 without biases


def explain(model: nn.Module, x: torch.Tensor, r_out: torch.Tensor, **options) -> torch.Tensor:
    composite = options.pop("composite", EXACT)
    options.setdefault("stabilizer", 0.0)
    e = lrp.Explainer(model.double().eval(), composite, **options)(x, output_relevance=r_out)
    return e.relevance


def dense(fn, shape: tuple[int, ...]) -> torch.Tensor:
    """(K, J) matrix of the linear map ``fn`` on one sample of ``shape`` (unit vectors)."""
    n = torch.Size(shape).numel()
    eye = torch.eye(n, dtype=F64).view(n, *shape)
    with torch.no_grad():
        return fn(eye).reshape(n, -1).T.contiguous()


def lrp0(W: torch.Tensor, x: torch.Tensor, r: torch.Tensor) -> torch.Tensor:
    """LRP-0 through the dense map W (K, J) for flat samples x (N, J), relevance r (N, K); an
    output with z = 0 passes nothing on (stabiliser 0)."""
    z = x @ W.T
    return x * (torch.where(z == 0, 0.0, r / z) @ W)


def flat_rule(C: torch.Tensor, r: torch.Tensor) -> torch.Tensor:
    """The flat rule through the connectivity C (K, J) (1 where input j feeds output k)."""
    return (r / C.sum(1)) @ C


# ------------------------------------------------------------------ merges
class ContextAdd(nn.Module):
    """``a + c`` with ``c`` (N, C, 1, 1) broadcast over the map (timm's global-context block)."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 3, 1, bias=False)
        self.fc = nn.Linear(3, 3, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        c = self.fc(x.mean((2, 3)))[:, :, None, None]
        return (self.conv(x) + c).flatten(1)


def test_merge_with_a_broadcast_term_splits_per_element_and_sums_the_copies() -> None:
    torch.manual_seed(0)
    model = ContextAdd().double().eval()
    x = torch.randn(2, 3, 4, 4, dtype=F64)
    r = torch.randn(2, 48, dtype=F64)
    got = explain(model, x, r)
    with torch.no_grad():
        a, m = model.conv(x), x.mean((2, 3))
        c = model.fc(m)[:, :, None, None].expand_as(a)
    ra = r.view_as(a) * a.abs() / (a.abs() + c.abs())
    rc = (r.view_as(a) - ra).sum((2, 3))  # the broadcast copies' relevance, summed
    r_conv = lrp0(dense(model.conv, (3, 4, 4)), x.flatten(1), ra.flatten(1)).view_as(x)
    r_m = lrp0(model.fc.weight, m, rc)
    r_mean = x / (16 * m[:, :, None, None]) * r_m[:, :, None, None]  # the sum rule of the mean
    torch.testing.assert_close(got, r_conv + r_mean)
    assert got.sum().item() == pytest.approx(r.sum().item())


class PoolMinus(nn.Module):
    """PoolFormer/EfficientFormer token mixer ``pool(x) - x`` on a ReLU output (x >= 0)."""

    def __init__(self) -> None:
        super().__init__()
        self.pool = nn.AvgPool2d(3, 1, 1, count_include_pad=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        p = F.relu(x)
        return (self.pool(p) - p).flatten(1)


def test_subtracting_a_nonnegative_skip_splits_by_magnitudes() -> None:
    """The ratio uses |c_i h_i|: a term known to be >= 0 that is subtracted is <= 0 in the
    sum (this blew up to 1e305 on efficientformer_l1 when its sign was taken as >= 0)."""
    torch.manual_seed(1)
    x = torch.randn(2, 2, 4, 4, dtype=F64)
    r = torch.randn(2, 32, dtype=F64)
    got = explain(PoolMinus(), x, r)
    p = F.relu(x)
    q = PoolMinus().pool(p)
    rq = r.view_as(q) * q.abs() / (q.abs() + p.abs()).clamp_min(torch.finfo(F64).tiny)
    pool = dense(PoolMinus().pool, (2, 4, 4))
    expected = lrp0(pool, p.flatten(1), rq.flatten(1)) + (r - rq.flatten(1))
    torch.testing.assert_close(got, expected.view_as(x))
    assert got.sum().item() == pytest.approx(r.sum().item())


# ------------------------------------------------------------------ softmax gates
class SelectPaths(nn.Module):
    """Selective kernel / split attention: paths weighted by a softmax over the path dim."""

    def __init__(self, softmax: str) -> None:
        super().__init__()
        self.a = nn.Conv2d(2, 2, 1, bias=False)
        self.b = nn.Conv2d(2, 2, 3, padding=1, bias=False)
        self.fc = nn.Linear(2, 4, bias=False)
        self.softmax = nn.Softmax(dim=1) if softmax == "module" else None
        self.drop = nn.Dropout(0.1)  # eval mode: between the softmax and the product

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        paths = torch.stack([self.a(x), self.b(x)], 1)  # (N, 2, C, H, W)
        logits = self.fc(paths.sum(1).mean((2, 3))).view(x.shape[0], 2, 2, 1, 1)
        w = self.softmax(logits) if self.softmax is not None else logits.softmax(dim=1)
        return (paths * self.drop(w)).sum(1).flatten(1)


@pytest.mark.parametrize("attention", ["attnlrp", "cp"])
@pytest.mark.parametrize("softmax", ["method", "module"])
def test_softmax_over_paths_is_a_gate(softmax: str, attention: str) -> None:
    torch.manual_seed(2)
    model = SelectPaths(softmax).double().eval()
    x = torch.randn(2, 2, 3, 3, dtype=F64)
    r = torch.randn(2, 18, dtype=F64)
    got = explain(model, x, r, attention=attention)
    with torch.no_grad():
        pa, pb = model.a(x), model.b(x)
        w = torch.softmax(model.fc((pa + pb).mean((2, 3))).view(2, 2, 2, 1, 1), 1)
    out = pa * w[:, 0] + pb * w[:, 1]
    rv = r.view_as(out)  # the sum over paths: shares of the weighted paths; the gate passes
    ra, rb = rv * pa * w[:, 0] / out, rv * pb * w[:, 1] / out
    expected = lrp0(dense(model.a, (2, 3, 3)), x.flatten(1), ra.flatten(1)) + lrp0(
        dense(model.b, (2, 3, 3)), x.flatten(1), rb.flatten(1))
    torch.testing.assert_close(got, expected.view_as(x))


# ------------------------------------------------------------------ resampling
class Resample(nn.Module):
    def __init__(self, how: str) -> None:
        super().__init__()
        self.how = how
        self.up = nn.Upsample(scale_factor=2, mode=how.split("-")[1]) if "module" in how else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.up is not None:
            return self.up(x).flatten(1)
        if self.how == "runtime-size":  # a size read from the input: known when the model runs
            return F.interpolate(x, size=(x.shape[2] * 2, x.shape[3] * 2), mode="bilinear")
        return F.interpolate(x, scale_factor=2, mode=self.how).flatten(1)


@pytest.mark.parametrize("how", ["nearest", "module-nearest"])
def test_nearest_upsampling_sums_the_copies(how: str) -> None:
    x = torch.randn(2, 2, 3, 3, dtype=F64)
    r = torch.randn(2, 72, dtype=F64)
    got = explain(Resample(how), x, r)
    torch.testing.assert_close(got, r.view(2, 2, 3, 2, 3, 2).sum((3, 5)))


@pytest.mark.parametrize("how", ["bilinear", "bicubic", "module-bilinear", "runtime-size"])
def test_interpolation_is_the_sum_rule(how: str) -> None:
    torch.manual_seed(3)
    x = torch.rand(2, 2, 3, 3, dtype=F64) + 0.5
    r = torch.randn(2, 72, dtype=F64)
    mode = "bicubic" if how == "bicubic" else "bilinear"
    U = dense(lambda t: F.interpolate(t, scale_factor=2, mode=mode), (2, 3, 3))
    got = explain(Resample(how), x, r.view(2, 2, 6, 6) if how == "runtime-size" else r)
    torch.testing.assert_close(got.flatten(1), lrp0(U, x.flatten(1), r))


def test_average_pool_over_the_input_size() -> None:
    class GlobalPool(nn.Module):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return F.avg_pool2d(x, x.size()[2:]).flatten(1)

    x = torch.rand(2, 3, 4, 4, dtype=F64) + 0.1
    r = torch.randn(2, 3, dtype=F64)
    got = explain(GlobalPool(), x, r)
    torch.testing.assert_close(got, x / x.sum((2, 3), keepdim=True) * r[:, :, None, None])


# ------------------------------------------------------------------ convolutions
class Blur(nn.Module):
    """BlurPool-like: ``F.conv2d`` with a constant filter, groups by keyword only (an overload
    torch.fx's schema matching finds ambiguous) after a reflection pad."""

    def __init__(self) -> None:
        super().__init__()
        filt = torch.tensor([1.0, 2.0, 1.0])
        self.register_buffer("filt", (filt[:, None] * filt[None, :] / 16).expand(2, 1, 3, 3))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.conv2d(F.pad(x, (1, 1, 1, 1), "reflect"), self.filt, stride=2, groups=2)


def test_functional_conv_with_keyword_groups_is_a_layer() -> None:
    torch.manual_seed(4)
    model = nn.Sequential(Blur(), nn.Flatten(), nn.Linear(8, 3, bias=False)).double().eval()
    x = torch.randn(2, 2, 4, 4, dtype=F64)
    e = lrp.Explainer(model, "lrp-0")(x)
    xg = x.clone().requires_grad_(True)
    (g,) = torch.autograd.grad(model(xg).gather(1, e.target[:, None]).sum(), xg)
    torch.testing.assert_close(e.relevance, g * x)  # LRP-0 on a linear model: gradient x input


def same_conv() -> nn.Module:
    return nn.Conv2d(2, 3, 4, padding="same", bias=False)  # total padding 3: 1 before, 2 after


class PadConv(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(2, 3, 3, stride=2, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(F.pad(x, (1, 2, 0, 1)))


def tf_same_conv() -> nn.Module:
    timm_layers = pytest.importorskip("timm.layers")
    return timm_layers.Conv2dSame(2, 3, 3, stride=2, bias=False)  # TF 'SAME': 7 px -> 0 / 1


@pytest.mark.parametrize("kind", ["same", "pad", "tf-same"])
def test_zero_padding_is_no_input_of_the_flat_rule(kind: str) -> None:
    """Asymmetric padding (PyTorch's ``padding="same"`` with an even kernel, an ``F.pad``
    before a convolution, timm's TF 'SAME' ``Conv2dSame``) is part of the convolution: the flat
    rule spreads over real inputs only and conserves; LRP-0 stays gradient x input."""
    make = {"same": same_conv, "pad": PadConv, "tf-same": tf_same_conv}[kind]
    torch.manual_seed(5)
    model = nn.Sequential(make().double(), nn.Flatten()).eval()
    x = torch.randn(2, 2, 7, 7, dtype=F64)
    ones = nn.Sequential(make().double(), nn.Flatten())
    with torch.no_grad():
        y = model(x)
        for p in ones.parameters():  # the connectivity: the layer's own forward, weights 1
            p.fill_(1.0)
        C = dense(ones, (2, 7, 7))
    r = torch.randn_like(y)
    flat = explain(model, x, r, composite={nn.Conv2d: lrp.rules.Flat(0.0)})
    torch.testing.assert_close(flat.flatten(1), flat_rule(C, r))
    torch.testing.assert_close(flat.sum(), r.sum())
    e = lrp.Explainer(model, "lrp-0")(x, output_relevance=y * r)  # R_k = z_k s_k
    torch.testing.assert_close(e.logits, y)
    xg = x.clone().requires_grad_(True)
    (g,) = torch.autograd.grad(model(xg), xg, r)
    torch.testing.assert_close(e.relevance, g * x)  # LRP-0: x_j sum_k w_jk s_k


def test_fused_pad_leaves_no_pad_in_the_prepared_graph() -> None:
    model = nn.Sequential(PadConv(), nn.Flatten()).double().eval()
    explainer = lrp.Explainer(model, "epsilon-plus-flat")
    code = explainer.prepared_model().code
    assert "pad" not in code.replace("PrePadded", ""), code


@pytest.mark.parametrize(
    "padding", [(1, 2, 0, 1), SamePadding((3, 3), (2, 2), (1, 1)), SamePadding((4, 2), (1, 3), (2, 1))]
)
def test_linear_op_with_pre_padding_transposes_like_autograd(padding) -> None:
    torch.manual_seed(6)
    conv = with_pre_padding(nn.Conv2d(4, 6, (4, 2), dilation=(2, 1), groups=2).double(), padding)
    op = LinearOp(conv)
    x = torch.randn(2, 4, 7, 8, dtype=F64, requires_grad=True)
    y = conv(x)
    torch.testing.assert_close(op(x, conv.weight, conv.bias), y)
    g = torch.randn_like(y)
    (expected,) = torch.autograd.grad(y, x, g)
    torch.testing.assert_close(op.transpose(g, conv.weight.detach(), x), expected)


class StdConv(nn.Conv2d):
    """Weight standardisation in the forward (timm's ScaledStdConv2d, NF-Nets)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w = F.batch_norm(self.weight.reshape(1, self.out_channels, -1), None, None,
                         training=True, momentum=0.0, eps=1e-6).reshape_as(self.weight)
        return F.conv2d(x, w, self.bias, self.stride, self.padding)


def test_weight_computed_in_the_forward_is_traced_and_named_paths_refuse_it() -> None:
    torch.manual_seed(7)
    model = nn.Sequential(StdConv(2, 3, 3), nn.Flatten(), nn.Linear(12, 2)).double().eval()
    x = torch.randn(2, 2, 4, 4, dtype=F64)
    e = lrp.Explainer(model, "lrp-0")(x)
    xg = x.clone().requires_grad_(True)
    (g,) = torch.autograd.grad(model(xg).gather(1, e.target[:, None]).sum(), xg)
    torch.testing.assert_close(e.relevance, g * x)
    with pytest.raises(lrp.UnsupportedLayerError, match=r"'0' is a StdConv whose forward"):
        lrp.Explainer(model, {"0": lrp.rules.Epsilon(), nn.Linear: lrp.rules.Epsilon()})(x)


# ------------------------------------------------------------------ in-place operations
class InPlace(nn.Module):
    def __init__(self, how: str) -> None:
        super().__init__()
        self.how = how
        self.conv = nn.Conv2d(2, 2, 3, padding=1, bias=False)
        self.gain = nn.Parameter(torch.tensor(0.5))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.conv(x)
        if self.how == "method":
            out.mul_(self.gain)  # result unused: NF-ResNet's skipinit gain
        else:
            F.relu(out, inplace=True)
        return (out * 2.0 + x).flatten(1)


@pytest.mark.parametrize("how", ["method", "inplace-relu"])
def test_inplace_operations_change_what_later_readers_read(how: str) -> None:
    torch.manual_seed(8)
    model = InPlace(how).double().eval()
    x = torch.randn(2, 2, 3, 3, dtype=F64)
    r = torch.randn(2, 18, dtype=F64)
    e = lrp.Explainer(model, EXACT, stabilizer=0.0)(x, output_relevance=r)
    torch.testing.assert_close(e.logits, model(x).detach())
    with torch.no_grad():
        a = model.conv(x)
        h = 2 * (a * model.gain if how == "method" else F.relu(a))
    r1 = r.view_as(x) * h.abs() / (h.abs() + x.abs())  # x is the identity skip: the rest
    expected = lrp0(dense(model.conv, (2, 3, 3)), x.flatten(1), r1.flatten(1))
    torch.testing.assert_close(e.relevance, expected.view_as(x) + r.view_as(x) - r1)


# ------------------------------------------------------------------ norms held constant
class GRN(nn.Module):
    """ConvNeXt-V2's global response normalisation (channels last), as timm writes it."""

    def __init__(self) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.tensor([0.5, -1.5, 2.0]))
        self.bias = nn.Parameter(torch.tensor([0.1, 0.2, -0.3]))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        g = x.norm(p=2, dim=(1, 2), keepdim=True)
        n = g / (g.mean(dim=-1, keepdim=True) + 1e-6)
        return (x + torch.addcmul(self.bias, self.weight, x * n)).flatten(1)


@pytest.mark.parametrize("zero_bias", [False, True])
def test_grn_holds_the_norm_constant(zero_bias: bool) -> None:
    torch.manual_seed(9)
    model = GRN().double().eval()
    x = torch.randn(2, 3, 3, 3, dtype=F64)
    r = torch.randn(2, 27, dtype=F64)
    got = explain(model, x, r, composite="epsilon", epsilon=0.1, zero_bias=zero_bias)
    g = x.norm(p=2, dim=(1, 2), keepdim=True)
    t = model.weight.detach() * x * (g / (g.mean(-1, keepdim=True) + 1e-6))
    h = t + model.bias.detach()
    rh = r.view_as(x) * h.abs() / (h.abs() + x.abs())  # x is the identity skip: the rest
    rt = rh if zero_bias else rh * t / (h + 0.1 * torch.where(h >= 0, 1.0, -1.0))  # the bias
    torch.testing.assert_close(got, rt + r.view_as(x) - rh)


def test_affine_addcmul_is_a_scaling_and_a_bias() -> None:
    class Affine(nn.Module):  # ResMLP
        def __init__(self) -> None:
            super().__init__()
            self.alpha = nn.Parameter(torch.tensor([2.0, -0.5]))
            self.beta = nn.Parameter(torch.tensor([0.3, 0.4]))

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return torch.addcmul(self.beta, self.alpha, x)

    x = torch.randn(3, 2, dtype=F64)
    r = torch.randn(3, 2, dtype=F64)
    got = explain(Affine(), x, r, composite="epsilon", epsilon=0.1)
    z = torch.tensor([2.0, -0.5], dtype=F64) * x
    y = z + torch.tensor([0.3, 0.4], dtype=F64)
    torch.testing.assert_close(got, r * z / (y + 0.1 * torch.where(y >= 0, 1.0, -1.0)))


@pytest.mark.parametrize("sigma", ["std", "mean-of-squares"])
def test_hand_written_layer_norm_holds_the_std_constant(sigma: str) -> None:
    """``(x - mu) / x.std()``, or ``/ sqrt(mean((x - mu) ** 2) + eps)`` (a held statistic made
    of a reduction): a held scale does not change the relevance."""

    class Norm(nn.Module):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            d = x - x.mean(-1, keepdim=True)
            if sigma == "std":
                return d / x.std(-1, keepdim=True)
            return d / torch.sqrt((d**2).mean(-1, keepdim=True) + 1e-5)

    torch.manual_seed(10)
    x = torch.randn(3, 4, dtype=F64)
    r = torch.randn(3, 4, dtype=F64)
    got = explain(Norm(), x, r)
    m = x.mean(-1, keepdim=True).expand_as(x)
    rm = r * m.abs() / (m.abs() + x.abs())  # x is the identity skip: the rest
    expected = r - rm + x / (4 * m[:, :1]) * rm.sum(-1, keepdim=True)  # the mean: sum rule
    torch.testing.assert_close(got, expected)


def test_normalize_passes_and_unfold_moves_relevance() -> None:
    class Windows(nn.Module):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return F.normalize(x, dim=1).unfold(3, 2, 1).flatten(1)

    x = torch.randn(2, 3, 2, 4, dtype=F64)
    r = torch.randn(2, 3 * 2 * 3 * 2, dtype=F64)
    got = explain(Windows(), x, r)
    xg = x.clone().requires_grad_(True)
    (g,) = torch.autograd.grad(xg.unfold(3, 2, 1).flatten(1), xg, r)  # copies summed
    torch.testing.assert_close(got, g)


# ------------------------------------------------------------------ products and powers of signals
class StarReLU(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.scale = nn.Parameter(torch.tensor(0.8))
        self.bias = nn.Parameter(torch.tensor(-0.1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.scale * F.relu(x) ** 2 + self.bias


def test_constant_power_passes_as_an_activation() -> None:
    """MetaFormer's ``s * relu(x) ** 2 + b`` traced op by op gives what the whole module as one
    Pass activation gives (``zero_bias``: b absorbs nothing)."""
    torch.manual_seed(11)
    model = nn.Sequential(nn.Conv2d(2, 2, 1, bias=False), StarReLU(), nn.Flatten(),
                          nn.Linear(8, 2, bias=False)).double().eval()
    x = torch.randn(2, 2, 2, 2, dtype=F64)
    r = torch.randn(2, 2, dtype=F64)
    got = explain(model, x, r, zero_bias=True)
    with torch.no_grad():
        h = model[1](model[0](x)).flatten(1)
    r_h = lrp0(model[3].weight, h, r)
    torch.testing.assert_close(got.flatten(1), lrp0(dense(model[0], (2, 2, 2)), x.flatten(1), r_h))
    leaf = {**EXACT, StarReLU: lrp.rules.Pass()}
    torch.testing.assert_close(got, explain(model, x, r, composite=leaf, zero_bias=True))


class GatedLinearUnit(nn.Module):
    """``act(a(x)) * b(x)``: StarNet's star, GLU/SwiGLU MLPs; ``b`` one value per sample
    (broadcast) when ``broadcast``."""

    def __init__(self, broadcast: bool = False) -> None:
        super().__init__()
        self.a = nn.Linear(4, 3, bias=False)
        self.b = nn.Linear(4, 1 if broadcast else 3, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.gelu(self.a(x)) * self.b(x)


@pytest.mark.parametrize("broadcast", [False, True])
def test_product_of_two_signals_gives_half_to_each_factor(broadcast: bool) -> None:
    """The uniform rule (AttnLRP Prop. 3.3): each factor gets half of the product's relevance
    (summed over the copies of a broadcast factor), then its own layer's LRP-0."""
    torch.manual_seed(12)
    model = GatedLinearUnit(broadcast).double().eval()
    x = torch.randn(5, 4, dtype=F64)
    r = torch.randn(5, 3, dtype=F64)
    got = explain(model, x, r)
    half = r / 2
    expected = lrp0(model.a.weight, x, half) + lrp0(model.b.weight, x,
                                                     half.sum(1, keepdim=True) if broadcast else half)
    torch.testing.assert_close(got, expected)
    torch.testing.assert_close(got.sum(1), r.sum(1))  # conservative


def test_square_of_a_signal_gives_it_all() -> None:
    """``x * x``: both halves go to x, as ``x ** 2`` (a power passes)."""

    class Square(nn.Module):
        def __init__(self, power: bool) -> None:
            super().__init__()
            self.fc = nn.Linear(4, 3, bias=False)
            self.power = power

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            h = self.fc(x)
            return h**2 if self.power else h * h

    torch.manual_seed(13)
    x = torch.randn(3, 4, dtype=F64)
    r = torch.randn(3, 3, dtype=F64)
    product = Square(power=False).double()
    power = Square(power=True).double()
    power.load_state_dict(product.state_dict())
    got = explain(product, x, r)
    torch.testing.assert_close(got, lrp0(product.fc.weight, x, r))
    torch.testing.assert_close(explain(power, x, r), got)


# ------------------------------------------------------------------ no rule: the escape hatch
class CumulativeSum(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cumsum(x, dim=1)


def test_op_without_rule_names_it_and_a_module_type_in_the_composite_is_one_layer() -> None:
    """``cumsum`` has no rule: the error names the op, the module path, the source line and the
    escape hatch; a module type named in the composite is then one layer (all its instances),
    here one whose relevance passes."""
    torch.manual_seed(11)
    model = nn.Sequential(nn.Conv2d(2, 2, 1, bias=False), CumulativeSum(), nn.Flatten(),
                          nn.Linear(8, 2, bias=False)).double().eval()
    x = torch.randn(2, 2, 2, 2, dtype=F64)
    with pytest.raises(lrp.UnsupportedOperationError, match=r"'cumsum' at CumulativeSum at '1'"
                       ) as err:
        lrp.Explainer(model)(x)
    assert "torch.cumsum(x, dim=1)" in str(err.value) and "composite={" in str(err.value)
    r = torch.randn(2, 2, dtype=F64)
    got = explain(model, x, r, composite={**EXACT, CumulativeSum: lrp.rules.Pass()})
    with torch.no_grad():
        h = model[1](model[0](x)).flatten(1)
    r_h = lrp0(model[3].weight, h, r)
    torch.testing.assert_close(got.flatten(1), lrp0(dense(model[0], (2, 2, 2)), x.flatten(1), r_h))


# ------------------------------------------------------------------ control flow on sizes
class SizeCheck(nn.Module):
    """timm's VGG head: pools only when the map is larger than its kernel (Python control flow
    on the input's size, which symbolic tracing cannot follow)."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(2, 3, 3, padding=1, bias=False)
        self.fc = nn.Linear(12, 2, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.conv(x)
        if x.shape[-1] > 2:
            x = F.adaptive_avg_pool2d(x, 2)
        n, c, h, w = x.size()
        return self.fc(x.reshape(n, c * h * w))


def test_control_flow_on_sizes_is_traced_per_input_shape() -> None:
    torch.manual_seed(12)
    model = SizeCheck().double().eval()
    explainer = lrp.Explainer(model, "lrp-0", stabilizer=0.0)
    with pytest.raises(lrp.UnresolvedStructureError, match="with an input"):
        explainer.prepared_model()  # no input yet: the sizes are unknown
    for shape in [(2, 2, 6, 6), (2, 2, 2, 2), (3, 2, 6, 6)]:  # a new shape: a new copy
        x = torch.randn(*shape, dtype=F64)
        e = explainer(x)
        torch.testing.assert_close(e.logits, model(x).detach())
        xg = x.clone().requires_grad_(True)
        (g,) = torch.autograd.grad(model(xg).gather(1, e.target[:, None]).sum(), xg)
        torch.testing.assert_close(e.relevance, g * x)  # LRP-0 on a linear model
    assert explainer.prepared_model() is explainer.prepared_model(x)  # the last shape's copy
    clone = pickle.loads(pickle.dumps(explainer))  # traced again with the next call's input
    assert torch.equal(clone(x).relevance, e.relevance)


def test_control_flow_on_values_is_still_refused() -> None:
    class Branchy(nn.Module):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return x.flatten(1) if x.sum() > 0 else -x.flatten(1)

    with pytest.raises(lrp.UnresolvedStructureError, match=r"shapes known.*if x.sum\(\) > 0"):
        lrp.Explainer(Branchy())(torch.randn(2, 3, dtype=F64))
