"""LRP for ``nn.LocalResponseNorm``: the first-order Taylor rule of Binder et al. 2016.

LRN is a product-type non-linearity, so the linear-layer rules do not apply. PyTorch computes, along
the channel axis (``n = size``)::

    W(c) = {c - n//2, ..., c + (n-1)//2} within [0, C-1]
    s_c  = k + (alpha / n) * sum_{i in W(c)} x_i^2,      y_c = x_c * s_c^(-beta)

Binder et al. (ICANN 2016, arXiv 1604.00825) decompose y_k additively into contributions of its
inputs (self term at the point where only x_k is kept, cross terms from the gradient at x)::

    T_kk = x_k * (k + (alpha/n) * x_k^2)^(-beta)
    T_jk = x_j * dy_k/dx_j (x) = -(2 alpha beta / n) * x_k * x_j^2 * s_k^(-beta-1)  (j != k in W(k))
    z_k  = sum_j T_jk

and use T_jk as the contributions of an epsilon or alpha-beta LRP rule. Every cross term of a column
k has the form ``x_j^2 * g_k`` with ``g_k = -(2 alpha beta / n) x_k s_k^(-beta-1)``, so the rule
factorises: no C x C (nor banded) matrix is built. Relevance at input j is::

    R_j = T_jj * A_j + x_j^2 * sum_{k != j, j in W(k)} g_k * B_k

where A_k, B_k are the per-output multipliers of the self and the cross terms (``R_k / stab(z_k)``
in the epsilon form). ``j in W(k)`` is ``k in {j - (n-1)//2, ..., j + n//2}``: the transposed
window, which differs from W(j) for even n. The cost is a few element-wise passes plus ``n - 1``
shifted adds, independent of C.
"""

from __future__ import annotations

from typing import Literal

import torch
from torch import Tensor, nn

from ..errors import InvalidInputError, UnsupportedLayerError
from .base import ModuleRule, Pass, stabilize

Form = Literal["epsilon", "alpha-beta"]
_FORMS = ("epsilon", "alpha-beta")

__all__ = ["MODES", "LRNIdentity", "LRNTaylor", "lrn_contributions", "lrn_relevance"]

#: the explainer's ``lrn=`` names: Binder et al.'s Taylor rule, and the identity baseline
MODES = ("taylor", "identity")


def _shift_sum(t: Tensor, lo: int, hi: int) -> Tensor:
    """``out[:, c] = sum_{d in [lo, hi], d != 0} t[:, c + d]`` with zeros outside [0, C).

    ``t`` is (N, C, P). One vectorised add per window offset (size - 1 of them), none per channel.
    Excluding d = 0 here (instead of subtracting the centre afterwards) keeps neighbour sums of
    squares exactly non-negative, which the alpha-beta sign split relies on.
    """
    C = t.shape[1]
    out = torch.zeros_like(t)
    for d in range(lo, hi + 1):
        if d == 0 or abs(d) >= C:
            continue
        if d > 0:
            out[:, : C - d] += t[:, d:]
        else:
            out[:, -d:] += t[:, : C + d]
    return out


def _check(x: Tensor, size: int) -> int:
    if x.dim() < 2:
        raise InvalidInputError(f"LRN input must be (N, C, ...), got shape {tuple(x.shape)}")
    if not x.is_floating_point():
        raise InvalidInputError(f"LRN input must be floating point, got {x.dtype}")
    if int(size) != size or size < 1:
        raise InvalidInputError(f"LRN size must be a positive integer, got {size!r}")
    return int(size)


def _terms(
    x3: Tensor, size: int, alpha: float, beta: float, k: float
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Self term T_kk, cross factor g_k, x^2 and the neighbour sum of x^2 over W(k) minus k."""
    sq = x3 * x3
    nb = _shift_sum(sq, -(size // 2), (size - 1) // 2)
    a_n = alpha / size
    s = (sq + nb).mul_(a_n).add_(k)
    t_self = x3 * (sq * a_n + k).pow_(-beta)
    g = s.pow_(-beta - 1.0).mul_(x3).mul_(-2.0 * a_n * beta)
    if k <= 0:
        # s = 0 only where the whole window is 0; x = 0 there, so the terms are 0 (not 0 * inf).
        zero = x3 == 0
        t_self = t_self.masked_fill(zero, 0.0)
        g = g.masked_fill(zero, 0.0)
    return t_self, g, sq, nb


def lrn_contributions(
    x: Tensor, size: int, alpha: float = 1e-4, beta: float = 0.75, k: float = 1.0
) -> tuple[Tensor, Tensor]:
    """Taylor contributions T_jk of Binder et al. 2016 in a banded layout, and z_k = sum_j T_jk.

    Returns ``(T, z)``, ``T`` of shape (N, size, C, *spatial): ``T[:, o, c]`` is the contribution of
    input ``j = c + o - size//2`` to output ``c`` (0 where j is outside [0, C)); the self term sits
    at ``o = size//2``. ``z`` has the shape of ``x``. For inspection and tests: the rule itself
    (:func:`lrn_relevance`) never materialises T.
    """
    size = _check(x, size)
    N, C = x.shape[:2]
    before, after = size // 2, (size - 1) // 2
    with torch.no_grad():
        x3 = x.detach().reshape(N, C, -1)
        t_self, g, sq, nb = _terms(x3, size, alpha, beta, k)
        sq_pad = torch.nn.functional.pad(sq, (0, 0, before, after))
        # windows[n, c, p, o] = sq_pad[n, c + o, p] = x_{c + o - size//2}^2
        windows = sq_pad.unfold(1, size, 1)
        T = (windows * g.unsqueeze(-1)).permute(0, 3, 1, 2).clone()
        T[:, before] = t_self
        z = t_self + g * nb
    return T.reshape(N, size, *x.shape[1:]), z.reshape(x.shape)


def lrn_relevance(
    x: Tensor,
    relevance: Tensor,
    *,
    size: int,
    alpha: float = 1e-4,
    beta: float = 0.75,
    k: float = 1.0,
    epsilon: float = 1e-6,
    form: Form = "epsilon",
    rule_alpha: float = 1.0,
    rule_beta: float = 0.0,
) -> Tensor:
    """Relevance at the input of ``local_response_norm(x, size, alpha, beta, k)``.

    ``form="epsilon"``: ``R_j = sum_{k: j in W(k)} T_jk / stab(z_k) * R_k``, with
    stab(z) = z + eps sign(z), sign(0) = +1 (eps = 0 drops outputs with z_k = 0); conservative up
    to what eps absorbs.
    ``form="alpha-beta"``: ``rule_alpha * T+ / stab(sum T+) - rule_beta * T- / stab(sum T-)``.
    ``alpha, beta, k`` are the LRN's parameters; ``rule_alpha, rule_beta`` the rule's. Works for
    inputs (N, C, *spatial) of any rank >= 2, keeps the input dtype and builds no autograd graph.
    """
    size = _check(x, size)
    if relevance.shape != x.shape:
        raise InvalidInputError(
            f"LRN relevance shape {tuple(relevance.shape)} differs from input {tuple(x.shape)}"
        )
    if form not in _FORMS:
        raise InvalidInputError(f"LRN rule form must be one of {_FORMS}, got {form!r}")
    N, C = x.shape[:2]
    with torch.no_grad():
        x3 = x.detach().reshape(N, C, -1)
        r3 = relevance.detach().to(x.dtype).reshape(N, C, -1)
        t_self, g, sq, nb = _terms(x3, size, alpha, beta, k)
        cross = g * nb  # sum of the cross terms of column k; every one has the sign of g_k
        if form == "epsilon":
            mult_self = r3 / stabilize(t_self + cross, epsilon)
            mult_cross = mult_self
        else:
            pos = t_self.clamp(min=0) + cross.clamp(min=0)
            neg = t_self.clamp(max=0) + cross.clamp(max=0)
            f_pos = r3 * rule_alpha / stabilize(pos, epsilon)
            f_neg = r3 * -rule_beta / stabilize(neg, epsilon)
            mult_self = torch.where(t_self > 0, f_pos, f_neg)
            mult_cross = torch.where(g > 0, f_pos, f_neg)
        gathered = _shift_sum(g * mult_cross, -((size - 1) // 2), size // 2)
        out = t_self * mult_self + sq * gathered
    return out.reshape(x.shape)


def _lrn_params(module: nn.Module) -> tuple[int, float, float, float]:
    if not isinstance(module, nn.LocalResponseNorm):
        raise UnsupportedLayerError(
            f"LRN rules apply to nn.LocalResponseNorm only, got {type(module).__name__}"
        )
    return int(module.size), float(module.alpha), float(module.beta), float(module.k)


class LRNTaylor(ModuleRule):
    """Binder et al. 2016 Taylor rule for ``nn.LocalResponseNorm`` (see the module docstring).

    ``form="epsilon"`` (default) conserves relevance as epsilon -> 0; ``form="alpha-beta"`` splits
    the contributions by sign with weights ``alpha`` and ``beta`` (alpha1-beta0 after a ReLU keeps
    only the self terms, i.e. the identity rule, up to epsilon).
    """

    def __init__(
        self, epsilon: float = 1e-6, form: Form = "epsilon", alpha: float = 1.0, beta: float = 0.0
    ) -> None:
        if form not in _FORMS:
            raise InvalidInputError(f"LRNTaylor form must be one of {_FORMS}, got {form!r}")
        if epsilon < 0:
            raise InvalidInputError(f"LRNTaylor epsilon must be >= 0, got {epsilon}")
        self.epsilon = epsilon
        self.form = form
        self.alpha = alpha
        self.beta = beta

    def relevance(self, module: nn.Module, x: Tensor, output: Tensor, relevance: Tensor) -> Tensor:
        size, alpha, beta, k = _lrn_params(module)
        return lrn_relevance(
            x,
            relevance,
            size=size,
            alpha=alpha,
            beta=beta,
            k=k,
            epsilon=self.epsilon,
            form=self.form,
            rule_alpha=self.alpha,
            rule_beta=self.beta,
        )


class LRNIdentity(Pass):
    """The paper's baseline: ignore the LRN layer, ``R_in = R_out``."""

    def relevance(self, module: nn.Module, x: Tensor, output: Tensor, relevance: Tensor) -> Tensor:
        _lrn_params(module)
        return super().relevance(module, x, output, relevance)
