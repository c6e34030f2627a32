"""The LRN rule of Binder et al. 2016 (METHOD.md section 2) against independent computations."""

from __future__ import annotations

import itertools

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import lrp
from lrp.errors import InvalidInputError, UnsupportedLayerError
from lrp.layers import ModuleRuleLayer
from lrp.models import caffenet, lrn_cnn
from lrp.rules.lrn import LRNIdentity, LRNTaylor, lrn_contributions, lrn_relevance

F64 = torch.float64


# ----------------------------------------------------------------------------------------------
# Brute-force references: explicit loops over samples, positions, outputs k and inputs j in W(k),
# on Python floats, written straight from METHOD.md section 2 (no code shared with lrp.rules.lrn).
# ----------------------------------------------------------------------------------------------


def window(c: int, size: int, C: int) -> list[int]:
    """W(c) = {c - size//2, ..., c + (size-1)//2} clipped to [0, C-1]."""
    return [i for i in range(c - size // 2, c + (size - 1) // 2 + 1) if 0 <= i < C]


def brute_contributions(
    x: torch.Tensor, size: int, alpha: float, beta: float, k: float
) -> torch.Tensor:
    """Dense T[n, p, j, kk] (input j, output kk) for x of shape (N, C, *spatial)."""
    N, C = x.shape[:2]
    xs = x.reshape(N, C, -1).to(F64).tolist()
    P = len(xs[0][0])
    T = torch.zeros(N, P, C, C, dtype=F64)
    for n, p, kk in itertools.product(range(N), range(P), range(C)):
        xk = xs[n][kk][p]
        if xk == 0:
            continue  # every term of column kk carries the factor x_k (matters only for k = 0)
        S = sum(xs[n][i][p] ** 2 for i in window(kk, size, C))
        s = k + alpha / size * S
        for j in window(kk, size, C):
            if j == kk:
                T[n, p, j, kk] = xk * (k + alpha / size * xk**2) ** (-beta)
            else:
                xj = xs[n][j][p]
                T[n, p, j, kk] = -(2 * alpha * beta / size) * xk * xj**2 * s ** (-beta - 1)
    return T


def stab(d: float, eps: float) -> float:
    return d + eps if d >= 0 else d - eps


def brute_rule(
    T: torch.Tensor,
    R: torch.Tensor,
    eps: float,
    form: str = "epsilon",
    ra: float = 1.0,
    rb: float = 0.0,
) -> torch.Tensor:
    """R_in[n, j, p] = sum_k rule(T[:, :, :, k]) * R_k, one output column at a time."""
    N, P, C, _ = T.shape
    Rs = R.reshape(N, C, P).to(F64)
    out = torch.zeros(N, C, P, dtype=F64)
    for n, p, kk in itertools.product(range(N), range(P), range(C)):
        col = T[n, p, :, kk].tolist()
        r = Rs[n, kk, p].item()
        if form == "epsilon":
            den = stab(sum(col), eps)
            for j in range(C):
                out[n, j, p] += col[j] / den * r
        else:
            pos = sum(t for t in col if t > 0)
            neg = sum(t for t in col if t < 0)
            for j in range(C):
                if col[j] > 0:
                    out[n, j, p] += ra * col[j] / stab(pos, eps) * r
                elif col[j] < 0:
                    out[n, j, p] -= rb * col[j] / stab(neg, eps) * r
    return out.reshape(R.shape)


def banded_to_dense(T_band: torch.Tensor) -> torch.Tensor:
    """(N, size, C, *sp) with T[:, o, c] = T_{c + o - size//2, c}  ->  dense (N, P, C_j, C_k)."""
    N, size, C = T_band.shape[:3]
    band = T_band.reshape(N, size, C, -1)
    dense = torch.zeros(N, band.shape[-1], C, C, dtype=band.dtype)
    for o, c in itertools.product(range(size), range(C)):
        j = c + o - size // 2
        if 0 <= j < C:
            dense[:, :, j, c] = band[:, o, c]
        else:
            assert torch.all(band[:, o, c] == 0)
    return dense


def rand(shape: tuple[int, ...], seed: int, dtype: torch.dtype = F64) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(shape, generator=g, dtype=F64).to(dtype)


# LRN parameter sets: a strong one (alpha large enough that cross terms matter) and Caffe's.
STRONG = {"alpha": 0.9, "beta": 0.75, "k": 1.0}
CAFFE = {"alpha": 1e-4, "beta": 0.75, "k": 1.0}


# ----------------------------------------------------------------------------------------------
# Contributions
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("size", [1, 2, 3, 4, 5])
@pytest.mark.parametrize("C", [1, 3, 7])
def test_contributions_match_brute_force(size: int, C: int) -> None:
    x = rand((2, C, 2, 2), seed=10 * size + C) * 2
    T_band, z = lrn_contributions(x, size, **STRONG)
    assert T_band.shape == (2, size, C, 2, 2)
    assert T_band.dtype == F64
    T = brute_contributions(x, size, **STRONG)
    torch.testing.assert_close(banded_to_dense(T_band), T, rtol=1e-12, atol=1e-14)
    z_ref = T.sum(dim=2).permute(0, 2, 1).reshape(x.shape)  # z_k = sum_j T_jk
    torch.testing.assert_close(z, z_ref, rtol=1e-12, atol=1e-14)


@pytest.mark.parametrize("size", [1, 2, 3, 4, 5, 6])
def test_terms_match_pytorch_lrn(size: int) -> None:
    """Window and formulas checked against torch's own LRN, independently of the brute force.

    Cross terms are x_j * dy_k/dx_j at x (autograd Jacobian of F.local_response_norm); the self term
    is y_k evaluated with every input but x_k set to zero.
    """
    C, p = 7, STRONG
    x = rand((1, C, 1), seed=size)
    jac = torch.autograd.functional.jacobian(
        lambda v: F.local_response_norm(v, size, **p), x
    ).reshape(C, C)  # jac[k, j] = dy_k / dx_j
    T_band, _ = lrn_contributions(x, size, **p)
    T = banded_to_dense(T_band)[0, 0]  # T[j, k]
    for kk in range(C):
        only_k = torch.zeros_like(x)
        only_k[0, kk] = x[0, kk]
        self_ref = F.local_response_norm(only_k, size, **p)[0, kk, 0]
        torch.testing.assert_close(T[kk, kk], self_ref, rtol=1e-12, atol=0)
        for j in range(C):
            if j != kk:
                torch.testing.assert_close(
                    T[j, kk], x[0, j, 0] * jac[kk, j], rtol=1e-12, atol=1e-15
                )
    # the window is PyTorch's: outside it the Jacobian (and T) vanish
    assert torch.equal(T.T != 0, jac != 0)


def test_decomposition_is_first_order_in_alpha() -> None:
    """z_k = sum_j T_jk approximates y_k = LRN(x)_k with an O(alpha) error.

    The cross terms x_j * dy_k/dx_j are first order in x_j, while y_k depends on x_j^2, so they
    count the shrinkage of y_k twice: z_k - T_kk = 2 (y_k - T_kk) + O(alpha^2). Pinned here.
    """
    x = rand((2, 16, 3, 3), seed=3).abs() + 0.1
    errors = []
    for alpha in (1e-2, 1e-3, 1e-4):
        T_band, z = lrn_contributions(x, 5, alpha, 0.75, 1.0)
        y = F.local_response_norm(x, 5, alpha, 0.75, 1.0)
        t_self = T_band[:, 2]
        torch.testing.assert_close(z - t_self, 2 * (y - t_self), rtol=alpha * 5, atol=0)
        errors.append(((z - y).abs() / y.abs()).max().item())
    assert errors[0] < 1e-1
    assert errors[1] < errors[0] / 5 and errors[2] < errors[1] / 5  # linear in alpha
    # CaffeNet's parameters on post-ReLU unit-scale activations: z equals y to ~1e-4
    _, z = lrn_contributions(x, 5, **CAFFE)
    torch.testing.assert_close(z, F.local_response_norm(x, 5, **CAFFE), rtol=1e-3, atol=0)


# ----------------------------------------------------------------------------------------------
# The rule: vectorised == brute force
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("size", [1, 2, 3, 4, 5])
@pytest.mark.parametrize("C", [1, 3, 7])
@pytest.mark.parametrize(
    "form,ra,rb", [("epsilon", 1.0, 0.0), ("alpha-beta", 1.0, 0.0), ("alpha-beta", 2.0, 1.0)]
)
def test_rule_matches_brute_force(size: int, C: int, form: str, ra: float, rb: float) -> None:
    x = rand((2, C, 2, 2), seed=7 * size + C) * 2  # mixed signs: both signs of T in every form
    R = rand((2, C, 2, 2), seed=100 + size)
    eps = 1e-3
    got = lrn_relevance(
        x, R, size=size, **STRONG, epsilon=eps, form=form, rule_alpha=ra, rule_beta=rb
    )
    want = brute_rule(brute_contributions(x, size, **STRONG), R, eps, form, ra, rb)
    assert got.shape == x.shape and got.dtype == F64
    torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize(
    "shape", [(3, 7), (2, 7, 5), (2, 7, 2, 3), (1, 7, 2, 2, 2)], ids=["NC", "NCL", "NCHW", "NCDHW"]
)
@pytest.mark.parametrize("size", [3, 4])
def test_rule_any_rank(shape: tuple[int, ...], size: int) -> None:
    x = rand(shape, seed=len(shape))
    R = rand(shape, seed=50 + len(shape))
    got = lrn_relevance(x, R, size=size, **STRONG, epsilon=1e-4)
    want = brute_rule(brute_contributions(x, size, **STRONG), R, 1e-4)
    torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("size", [2, 5])
def test_float32_matches_float64(size: int) -> None:
    x64 = rand((4, 16, 5, 5), seed=1).relu()
    R64 = rand((4, 16, 5, 5), seed=2)
    x32, R32 = x64.float(), R64.float()
    for form, rb in (("epsilon", 0.0), ("alpha-beta", 1.0)):
        kw = {"size": size, **STRONG, "epsilon": 1e-2, "form": form, "rule_alpha": 1 + rb}
        got = lrn_relevance(x32, R32, **kw, rule_beta=rb)
        want = lrn_relevance(x64, R64, **kw, rule_beta=rb)
        assert got.dtype == torch.float32
        torch.testing.assert_close(got.double(), want, rtol=1e-4, atol=1e-5)
    T_band, z = lrn_contributions(x32, size, **STRONG)
    assert T_band.dtype == z.dtype == torch.float32


def test_no_autograd_graph() -> None:
    x = rand((2, 8, 3, 3), seed=4).requires_grad_()
    R = rand((2, 8, 3, 3), seed=5).requires_grad_()
    out = lrn_relevance(x, R, size=5, **STRONG)
    assert not out.requires_grad and out.grad_fn is None
    T_band, z = lrn_contributions(x, 5, **STRONG)
    assert not T_band.requires_grad and not z.requires_grad


# ----------------------------------------------------------------------------------------------
# Properties (METHOD.md section 2)
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("size", [2, 3, 5])
def test_epsilon_absorbs_exactly_eps_share(size: int) -> None:
    """sum_j R_j = sum_k R_k z_k / stab(z_k): the rule loses exactly the eps share, nothing else."""
    x = rand((2, 12, 4, 4), seed=6)
    R = rand((2, 12, 4, 4), seed=7)
    for eps in (1e-1, 1.0):
        _, z = lrn_contributions(x, size, **STRONG)
        expected = (R * z / torch.where(z >= 0, z + eps, z - eps)).sum(dim=1)
        got = lrn_relevance(x, R, size=size, **STRONG, epsilon=eps).sum(dim=1)
        torch.testing.assert_close(got, expected, rtol=1e-10, atol=1e-12)
        assert not torch.allclose(got, R.sum(dim=1), rtol=1e-3)  # eps this large does lose some


@pytest.mark.parametrize("size", [2, 3, 4, 5])
@pytest.mark.parametrize(
    "form,ra,rb", [("epsilon", 1.0, 0.0), ("alpha-beta", 2.0, 1.0), ("alpha-beta", 1.5, 0.5)]
)
def test_conservation_as_eps_to_zero(size: int, form: str, ra: float, rb: float) -> None:
    # |x| >= 0.5 and a moderate alpha: no z_k (nor positive/negative part) is near zero
    g = torch.Generator().manual_seed(size)
    sign = torch.randint(0, 2, (3, 16, 4, 4), generator=g).to(F64) * 2 - 1
    x = sign * (0.5 + 1.5 * torch.rand((3, 16, 4, 4), generator=g, dtype=F64))
    R = torch.randn((3, 16, 4, 4), generator=g, dtype=F64)
    p = {"alpha": 0.3, "beta": 0.75, "k": 1.0}
    _, z = lrn_contributions(x, size, **p)
    assert z.abs().min() > 0.1
    out = lrn_relevance(x, R, size=size, **p, epsilon=1e-12, form=form, rule_alpha=ra, rule_beta=rb)
    total_in, total_out = out.sum(dim=(1, 2, 3)), R.sum(dim=(1, 2, 3))
    if form == "alpha-beta":
        # alpha - beta = 1 conserves only outputs with contributions of both signs. For size 2 the
        # border output W(0) = {-1, 0} -> {0} has only its self term: it gets alpha (or -beta) R_0.
        T_band, _ = lrn_contributions(x, size, **p)
        has_pos, has_neg = (T_band > 0).any(dim=1), (T_band < 0).any(dim=1)
        assert (has_pos & has_neg).all() == (size != 2)
        total_out = (R * (ra * has_pos - rb * has_neg)).sum(dim=(1, 2, 3))
    torch.testing.assert_close(total_in, total_out, rtol=1e-5, atol=0)
    assert not torch.allclose(out, R, rtol=1e-3)  # conservative, yet not the identity


@pytest.mark.parametrize("dtype", [torch.float32, F64])
@pytest.mark.parametrize("size", [1, 2, 3, 5])
def test_alpha1_beta0_on_nonnegative_input_is_identity(size: int, dtype: torch.dtype) -> None:
    """x >= 0: cross terms are <= 0 and the self term >= 0, so T+ is the self term alone.

    Exactly: R_in = R * T_kk / (T_kk + eps). With eps = 0 that is R where x > 0, and 0 where x = 0
    (then T_kk = 0: the output has no positive contribution and its relevance is dropped).
    """
    x = rand((2, 9, 4, 4), seed=size, dtype=dtype).relu()  # about half exact zeros
    assert (x == 0).any() and (x > 0).any()
    R = rand((2, 9, 4, 4), seed=20 + size, dtype=dtype)
    tol = {"rtol": 1e-12, "atol": 0} if dtype == F64 else {"rtol": 1e-6, "atol": 0}
    kw = {"size": size, **STRONG, "form": "alpha-beta", "rule_alpha": 1.0, "rule_beta": 0.0}
    out = lrn_relevance(x, R, **kw, epsilon=0.0)
    torch.testing.assert_close(out, torch.where(x > 0, R, 0.0), **tol)
    eps = 1e-2
    t_self = x * (1 + STRONG["alpha"] / size * x * x) ** -STRONG["beta"]
    out = lrn_relevance(x, R, **kw, epsilon=eps)
    torch.testing.assert_close(out, R * t_self / (t_self + eps), **tol)
    # the epsilon form on the same input does move relevance across channels
    if size > 1:
        assert not torch.allclose(lrn_relevance(x, R, size=size, **STRONG, epsilon=0.0), out)


@pytest.mark.parametrize("dtype", [torch.float32, F64])
def test_size1_is_identity(dtype: torch.dtype) -> None:
    x = rand((3, 5, 4, 4), seed=8, dtype=dtype)  # mixed signs, no exact zeros
    R = rand((3, 5, 4, 4), seed=9, dtype=dtype)
    tol = {"rtol": 1e-12, "atol": 0} if dtype == F64 else {"rtol": 1e-6, "atol": 0}
    out = lrn_relevance(x, R, size=1, **STRONG, epsilon=0.0)
    torch.testing.assert_close(out, R, **tol)
    # alpha-beta with a single (self) term per output: alpha R where x > 0, -beta R where x < 0
    out = lrn_relevance(
        x, R, size=1, **STRONG, epsilon=0.0, form="alpha-beta", rule_alpha=2.0, rule_beta=1.0
    )
    torch.testing.assert_close(out, torch.where(x > 0, 2 * R, -R), **tol)


def test_eps_zero_drops_zero_outputs() -> None:
    x = torch.zeros(1, 4, 1, dtype=F64)
    x[0, 1] = 1.0
    R = torch.ones(1, 4, 1, dtype=F64)
    out = lrn_relevance(x, R, size=3, **STRONG, epsilon=0.0)
    assert torch.isfinite(out).all()
    # outputs 0, 2, 3 have z = 0 (x = 0) and are dropped; output 1 keeps its relevance on channel 1
    torch.testing.assert_close(out[0, :, 0], torch.tensor([0.0, 1.0, 0.0, 0.0], dtype=F64))


def test_k_zero_gives_finite_relevance() -> None:
    x = rand((2, 6, 3, 3), seed=11).relu()
    R = rand((2, 6, 3, 3), seed=12)
    p = {"alpha": 1.0, "beta": 0.75, "k": 0.0}
    out = lrn_relevance(x, R, size=3, **p, epsilon=1e-3)
    assert torch.isfinite(out).all()
    torch.testing.assert_close(
        out, brute_rule(brute_contributions(x, 3, **p), R, 1e-3), rtol=1e-9, atol=1e-12
    )


def test_invalid_arguments() -> None:
    x = rand((2, 4, 3), seed=0)
    with pytest.raises(InvalidInputError, match="form"):
        lrn_relevance(x, x, size=3, form="gamma")  # type: ignore[arg-type]
    with pytest.raises(InvalidInputError, match="shape"):
        lrn_relevance(x, x[:, :3], size=3)
    with pytest.raises(InvalidInputError, match="size"):
        lrn_relevance(x, x, size=0)
    with pytest.raises(InvalidInputError, match="form"):
        LRNTaylor(form="zplus")  # type: ignore[arg-type]


# ----------------------------------------------------------------------------------------------
# Rule classes and the engine's layer wrapper
# ----------------------------------------------------------------------------------------------


def test_rule_classes_read_module_parameters() -> None:
    module = nn.LocalResponseNorm(4, alpha=0.5, beta=0.6, k=2.0)
    x = rand((2, 6, 3, 3), seed=13)
    R = rand((2, 6, 3, 3), seed=14)
    y = module(x)
    rule = LRNTaylor(epsilon=1e-3, form="alpha-beta", alpha=2.0, beta=1.0)
    got = rule.relevance(module, x, y, R)
    want = brute_rule(
        brute_contributions(x, 4, alpha=0.5, beta=0.6, k=2.0), R, 1e-3, "alpha-beta", 2.0, 1.0
    )
    torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-12)
    assert LRNIdentity().relevance(module, x, y, R) is R
    for bad in (LRNTaylor(), LRNIdentity()):
        with pytest.raises(UnsupportedLayerError, match="LocalResponseNorm"):
            bad.relevance(nn.ReLU(), x, x, R)


def test_module_rule_layer_backward_is_the_rule() -> None:
    module = nn.LocalResponseNorm(5, alpha=0.9, beta=0.75, k=1.0)
    x = rand((2, 8, 3, 3), seed=15).requires_grad_()
    R = rand((2, 8, 3, 3), seed=16)
    layer = ModuleRuleLayer(module, LRNTaylor(epsilon=1e-4))
    y = layer(x)
    torch.testing.assert_close(y, module(x))
    (grad,) = torch.autograd.grad(y, x, R)
    torch.testing.assert_close(grad, lrn_relevance(x, R, size=5, **STRONG, epsilon=1e-4))


# ----------------------------------------------------------------------------------------------
# Model zoo
# ----------------------------------------------------------------------------------------------


def _lrns(model: nn.Module) -> list[nn.LocalResponseNorm]:
    return [m for m in model.modules() if isinstance(m, nn.LocalResponseNorm)]


def test_caffenet_layout() -> None:
    torch.manual_seed(0)
    model = caffenet(num_classes=1000).eval()
    assert isinstance(model.features, nn.Sequential) and isinstance(model.classifier, nn.Sequential)
    lrns = _lrns(model)
    assert [(m.size, m.alpha, m.beta, m.k) for m in lrns] == [(5, 1e-4, 0.75, 1.0)] * 2
    convs = [m for m in model.features if isinstance(m, nn.Conv2d)]
    assert [(c.out_channels, c.kernel_size[0], c.stride[0], c.groups) for c in convs] == [
        (96, 11, 4, 1), (256, 5, 1, 2), (384, 3, 1, 1), (384, 3, 1, 2), (256, 3, 1, 2)
    ]  # fmt: skip
    names = list(dict(model.features.named_children()))
    assert names.index("norm1") == names.index("pool1") + 1  # CaffeNet normalises after pooling
    assert not any(getattr(m, "inplace", False) for m in model.modules())
    fcs = [m for m in model.classifier if isinstance(m, nn.Linear)]
    assert [(f.in_features, f.out_features) for f in fcs] == [
        (9216, 4096),
        (4096, 4096),
        (4096, 1000),
    ]
    with torch.no_grad():
        assert model(torch.randn(1, 3, 227, 227)).shape == (1, 1000)
        assert model.features(torch.randn(1, 3, 227, 227)).shape == (1, 256, 6, 6)


@pytest.mark.parametrize("px", [32, 48, 64])
def test_lrn_cnn_shapes(px: int) -> None:
    model = lrn_cnn(num_classes=10, in_channels=3).eval()
    assert len(_lrns(model)) == 2
    with torch.no_grad():
        assert model(torch.randn(2, 3, px, px)).shape == (2, 10)
    assert lrn_cnn(num_classes=4, in_channels=1)(torch.randn(1, 1, 40, 33)).shape == (1, 4)


# ----------------------------------------------------------------------------------------------
# End to end through lrp.Explainer
# ----------------------------------------------------------------------------------------------

needs_engine = pytest.mark.skipif(
    not hasattr(lrp, "Explainer"), reason="lrp.Explainer not available yet"
)


def _zero_biases(model: nn.Module) -> nn.Module:
    """Biases absorb relevance under the epsilon rule; without them the net is conservative."""
    with torch.no_grad():
        for m in model.modules():
            if getattr(m, "bias", None) is not None:
                m.bias.zero_()
    return model.eval()


@needs_engine
def test_engine_lrn_model_equals_rule() -> None:
    """LRN followed by an identity Linear: the explainer must return exactly the rule's relevance.

    The bias-free identity Linear under the epsilon rule passes R * y / (y + eps) ~ R (y >= 0.1).
    """
    C = 6
    head = nn.Linear(C, C, bias=False)
    with torch.no_grad():
        head.weight.copy_(torch.eye(C))
    lrn = nn.LocalResponseNorm(3, alpha=0.9, beta=0.75, k=1.0)
    model = nn.Sequential(lrn, nn.Flatten(), head).double().eval()
    x = rand((2, C, 1, 1), seed=17).abs() + 0.2
    R = rand((2, C), seed=18)
    kw = {"composite": "epsilon", "epsilon": 1e-12}
    e = lrp.Explainer(model, **kw, lrn=LRNTaylor(epsilon=1e-3))(x, output_relevance=R)
    want = lrn_relevance(x, R.reshape(x.shape), size=3, **STRONG, epsilon=1e-3)
    torch.testing.assert_close(e.relevance, want, rtol=1e-9, atol=1e-12)
    e = lrp.Explainer(model, **kw, lrn="taylor", lrn_epsilon=1e-2)(x, output_relevance=R)
    want = lrn_relevance(x, R.reshape(x.shape), size=3, **STRONG, epsilon=1e-2)
    torch.testing.assert_close(e.relevance, want, rtol=1e-9, atol=1e-12)
    e = lrp.Explainer(model, **kw, lrn="identity")(x, output_relevance=R)
    torch.testing.assert_close(e.relevance, R.reshape(x.shape), rtol=1e-9, atol=1e-12)


@needs_engine
@pytest.mark.parametrize("lrn", ["taylor", "identity"])
def test_engine_lrn_cnn_conserves(lrn: str) -> None:
    torch.manual_seed(0)
    model = _zero_biases(lrn_cnn(num_classes=10))
    x = torch.randn(4, 3, 32, 32, dtype=F64)
    e = lrp.Explainer(
        model.double(), composite="epsilon", lrn=lrn, epsilon=1e-12, lrn_epsilon=1e-12
    )(x)
    assert e.relevance.shape == x.shape
    assert lrp.conservation(e).max() < 1e-5


@needs_engine
def test_engine_taylor_differs_from_identity() -> None:
    torch.manual_seed(1)
    model = _zero_biases(lrn_cnn(num_classes=10, lrn_alpha=2.0)).double()
    x = torch.randn(2, 3, 32, 32, dtype=F64)
    taylor = lrp.Explainer(model, composite="epsilon", lrn="taylor", epsilon=1e-9)(x).relevance
    ident = lrp.Explainer(model, composite="epsilon", lrn="identity", epsilon=1e-9)(x).relevance
    assert not torch.allclose(taylor, ident, rtol=1e-3, atol=1e-6)


@needs_engine
def test_engine_caffenet_conserves() -> None:
    torch.manual_seed(2)
    model = _zero_biases(caffenet(num_classes=10)).double()
    x = torch.randn(1, 3, 67, 67, dtype=F64) * 50  # Caffe pixel scale, so the LRN is not inert
    e = lrp.Explainer(model, composite="epsilon", lrn="taylor", epsilon=1e-12, lrn_epsilon=1e-12)(x)
    assert lrp.conservation(e).max() < 1e-5
