"""Attention rules: softmax, products of two input-dependent tensors, and whole attention calls.

The graph pass calls these in place of the model's own ops. As everywhere in the engine, the
gradient of the prepared copy *is* the relevance: each backward below maps the relevance at an
op's output to the relevance at its inputs. Two modes:

``"cp"`` -- CP-LRP (Ali et al. 2022, "XAI for Transformers: Better Explanations through
Conservative Propagation", ICML): the attention weights are held constant. The softmax output is
detached, so no relevance reaches its input (nor the query-key product or the queries and keys),
and ``attn @ v`` is linear in ``v``, explained by the epsilon rule.

``"attnlrp"`` -- AttnLRP (Achtibat et al. 2024, "AttnLRP: Attention-Aware Layer-Wise Relevance
Propagation for Transformers", ICML): the softmax by its Taylor decomposition at the input with
bias (Proposition 3.1), ``R_in = x * (R - s * sum(R))``; products of two input-dependent tensors
(``q @ k^T``, ``attn @ v``) by the uniform rule (Proposition 3.3): half of each output's relevance
to each factor, each half by the epsilon rule. Both are what ``lxt`` 2.1 (the authors' package)
computes in ``lxt.explicit.functional.softmax`` / ``matmul`` and, as gradient x input, in
``lxt.efficient`` (``divide_gradient`` by 2 on the values and by 4 on queries and keys).

Additive masks and biases on the attention logits (padding/causal masks, Swin's relative position
bias) are biases of the logits: they absorb their share exactly as a bias under the epsilon rule
with epsilon 0, which is what gradient x input through ``softmax(s + b)`` gives and what keeps
masked (-inf) logits at zero relevance. Multiplying the logits by the constant ``scale`` is a
diagonal linear map: relevance passes unchanged.
"""

from __future__ import annotations

import math
import operator
from collections.abc import Callable
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..errors import InvalidInputError, UnsupportedLayerError
from .base import stabilize
from .elementwise import bias_add, passthrough_of

Mode = Literal["cp", "attnlrp"]
MODES: tuple[str, ...] = ("cp", "attnlrp")


def _check_mode(mode: str) -> None:
    if mode not in MODES:
        raise InvalidInputError(f"attention mode {mode!r} is not one of {list(MODES)}")


def _sum_to(t: Tensor, shape: torch.Size) -> Tensor:
    """Sum ``t`` over the leading/broadcast dims so it has ``shape`` (matmul broadcasting)."""
    if t.shape == shape:
        return t
    lead = t.ndim - len(shape)
    if lead:
        t = t.sum(dim=tuple(range(lead)))
    dims = tuple(
        i for i, (a, b) in enumerate(zip(t.shape, shape, strict=True)) if b == 1 and a != 1
    )
    return t.sum(dim=dims, keepdim=True) if dims else t


def _finite_or_zero(x: Tensor) -> Tensor:
    """-inf logits (masked positions) carry no relevance; LXT zeroes them the same way."""
    return torch.where(torch.isfinite(x), x, torch.zeros((), dtype=x.dtype, device=x.device))


# ---------------------------------------------------------------------------------------------
# softmax


class _SoftmaxTaylor(torch.autograd.Function):
    """``s = softmax(x + bias)``; backward ``R_x = x * (R - s * sum_dim(R))`` (AttnLRP Prop. 3.1).

    This is the first-order Taylor expansion of ``s`` at ``x`` with the bias term left out:
    c_ij = x_i ds_j/dx_i, R_x_i = sum_j c_ij R_j / s_j; ds_j/dx_i = s_j (delta_ij - s_i) cancels
    the division, so no stabiliser is needed. ``bias`` (a mask/position bias) is a constant.
    ``safe``: rows that are masked everywhere give 0 (as ``F.scaled_dot_product_attention``),
    not NaN (as ``F.softmax``).
    """

    @staticmethod
    def forward(
        ctx: Any, x: Tensor, dim: int, bias: Tensor | None, dtype: torch.dtype | None, safe: bool
    ) -> Tensor:
        y = x if bias is None else x + bias
        s = F.softmax(y, dim=dim, dtype=dtype)
        if safe:
            s = _safe_rows(s, y, dim)
        ctx.dim = dim
        ctx.in_dtype = x.dtype
        ctx.save_for_backward(x, s)
        return s

    @staticmethod
    def backward(ctx: Any, relevance: Tensor) -> tuple[Tensor, None, None, None, None]:
        x, s = ctx.saved_tensors
        total = relevance.sum(ctx.dim, keepdim=True)
        r = _finite_or_zero(x) * (relevance - s * total)
        return r.to(ctx.in_dtype), None, None, None, None


def _safe_rows(s: Tensor, y: Tensor, dim: int) -> Tensor:
    dead = torch.isneginf(y).all(dim, keepdim=True)
    return s.masked_fill(dead, 0.0)


def softmax(
    x: Tensor, dim: int = -1, mode: str = "attnlrp", *, dtype: torch.dtype | None = None
) -> Tensor:
    """``F.softmax(x, dim, dtype=dtype)`` carrying the attention rule of ``mode``.

    ``"cp"``: the output is a constant (detached): no relevance flows into ``x`` (CP-LRP).
    ``"attnlrp"``: ``R_x = x * (R - s * sum(R))`` with -inf entries of ``x`` getting 0 (AttnLRP).
    """
    _check_mode(mode)
    if mode == "cp":
        return F.softmax(x, dim=dim, dtype=dtype).detach()
    return _SoftmaxTaylor.apply(x, dim, None, dtype, False)


# ---------------------------------------------------------------------------------------------
# products of two input-dependent tensors


class _MatmulUniform(torch.autograd.Function):
    """``z = a @ b``; half of R_z to each factor, each by the epsilon rule (AttnLRP Prop. 3.3).

    R_a_ij = sum_k a_ij b_jk (R_ik / 2) / (z_ik + eps sign z_ik), R_b likewise; with eps = 0 the
    two sum to R exactly (a product of two tensors has no bias).
    """

    @staticmethod
    def forward(ctx: Any, a: Tensor, b: Tensor, epsilon: float) -> Tensor:
        z = torch.matmul(a, b)
        ctx.epsilon = epsilon
        ctx.save_for_backward(a, b, z)
        return z

    @staticmethod
    def backward(ctx: Any, relevance: Tensor) -> tuple[Tensor | None, Tensor | None, None]:
        a, b, z = ctx.saved_tensors
        s = relevance / (2.0 * stabilize(z, ctx.epsilon))
        ra = rb = None
        if ctx.needs_input_grad[0]:
            ra = _sum_to(torch.matmul(s, b.transpose(-1, -2)) * a, a.shape)
        if ctx.needs_input_grad[1]:
            rb = _sum_to(torch.matmul(a.transpose(-1, -2), s) * b, b.shape)
        return ra, rb, None


class _MatmulConstFirst(torch.autograd.Function):
    """``z = a @ b`` with ``a`` held constant: linear in ``b``, epsilon rule (CP-LRP on attn @ v).

    R_b_jk = sum_i a_ij b_jk R_ik / (z_ik + eps sign z_ik); ``a`` gets no relevance.
    """

    @staticmethod
    def forward(ctx: Any, a: Tensor, b: Tensor, epsilon: float) -> Tensor:
        a = a.detach()
        z = torch.matmul(a, b)
        ctx.epsilon = epsilon
        ctx.save_for_backward(a, b, z)
        return z

    @staticmethod
    def backward(ctx: Any, relevance: Tensor) -> tuple[None, Tensor, None]:
        a, b, z = ctx.saved_tensors
        s = relevance / stabilize(z, ctx.epsilon)
        return None, _sum_to(torch.matmul(a.transpose(-1, -2), s) * b, b.shape), None


def matmul(a: Tensor, b: Tensor, mode: str = "attnlrp", epsilon: float = 1e-6) -> Tensor:
    """``torch.matmul(a, b)`` of two input-dependent tensors (both at least 2-D), with a rule.

    ``"attnlrp"``: uniform rule, half of the relevance to each factor, each by the epsilon rule;
    if only one factor requires grad the product is linear in it and it gets all relevance
    (epsilon rule), as LXT's ``mul2`` does, instead of losing half to a constant.
    ``"cp"``: ``a`` is held constant (it is the attention matrix in ``attn @ v``) and all relevance
    goes to ``b`` by the epsilon rule; if ``b`` is the constant one (``v^T @ attn^T``, the CP
    softmax output is detached), all relevance goes to ``a``. For ``q @ k^T`` under CP the choice is immaterial: its only
    consumer is the CP softmax, whose output is detached, so autograd never reaches this product
    and q and k get no relevance.
    """
    _check_mode(mode)
    if a.ndim < 2 or b.ndim < 2:
        raise InvalidInputError(
            f"attention matmul needs operands of at least 2 dims, got {a.ndim} and {b.ndim}"
        )
    if epsilon < 0:
        raise InvalidInputError(f"attention matmul: epsilon must be >= 0, got {epsilon}")
    if not a.requires_grad or (mode == "cp" and b.requires_grad):  # a detached: its branch
        return _MatmulConstFirst.apply(a.detach(), b, float(epsilon))  # never runs
    if not b.requires_grad:  # a product with a constant is linear: all relevance to a
        return _MatmulConstFirst.apply(
            b.transpose(-1, -2), a.transpose(-1, -2), float(epsilon)
        ).transpose(-1, -2)
    return _MatmulUniform.apply(a, b, float(epsilon))


class _EinsumRule(torch.autograd.Function):
    """``z = einsum(equation, a, b)``, bilinear; backward by the epsilon rule on its contributions.

    ``share`` of R_z goes to ``a`` and ``1 - share`` to ``b`` (``a`` gets none when
    ``needs_input_grad`` says so): R_a = a * d<z, share R / stab(z)>/da, R_b likewise. einsum is
    linear in each operand, so ``a * grad_a`` is the sum of a's contributions whatever the
    equation (repeated, summed, broadcast ``...`` indices); the gradient is recomputed here by
    autograd on detached copies instead of deriving a transposed equation per case.
    """

    @staticmethod
    def forward(
        ctx: Any, equation: str, a: Tensor, b: Tensor, epsilon: float, share: float
    ) -> Tensor:
        z = torch.einsum(equation, a, b)
        ctx.equation, ctx.epsilon, ctx.share = equation, epsilon, share
        ctx.save_for_backward(a, b, z)
        return z

    @staticmethod
    def backward(ctx: Any, relevance: Tensor) -> tuple[Tensor | None, ...]:
        a, b, z = ctx.saved_tensors
        s = relevance / stabilize(z, ctx.epsilon)
        need_a, need_b = ctx.needs_input_grad[1], ctx.needs_input_grad[2]
        with torch.enable_grad():
            a_ = a.detach().requires_grad_(need_a)
            b_ = b.detach().requires_grad_(need_b)
            z_ = torch.einsum(ctx.equation, a_, b_)
            inputs = [t for t, need in ((a_, need_a), (b_, need_b)) if need]
            grads = list(torch.autograd.grad(z_, inputs, s))
        ra = a * grads.pop(0) * ctx.share if need_a else None
        rb = b * grads.pop(0) * (1.0 - ctx.share if need_a else 1.0) if need_b else None
        return None, ra, rb, None, None


def einsum(
    equation: str, *operands: Tensor | list[Tensor], mode: str = "attnlrp", epsilon: float = 1e-6
) -> Tensor:
    """``torch.einsum(equation, a, b)`` of exactly two tensors (MaxViT's ``q k^T`` and ``attn v``).

    The same rules as :func:`matmul`: ``"attnlrp"``: the uniform rule (half of each output's
    relevance to each factor, each by the epsilon rule); ``"cp"``: the first operand is held
    constant, all relevance to the second. Where only one operand requires grad (a constant, or
    the detached CP softmax output) the product is linear in the other, which gets all relevance
    by the epsilon rule. ``torch.einsum(eq, [a, b])`` (operands as one list) is accepted.
    """
    _check_mode(mode)
    if len(operands) == 1 and isinstance(operands[0], list | tuple):
        operands = tuple(operands[0])
    if not isinstance(equation, str) or len(operands) != 2 or not all(
        isinstance(t, Tensor) for t in operands
    ):
        raise InvalidInputError(
            "the einsum rule needs an equation string and exactly two tensor operands, got "
            f"{len(operands)} operands"
        )
    if epsilon < 0:
        raise InvalidInputError(f"einsum: epsilon must be >= 0, got {epsilon}")
    a, b = operands
    if not a.requires_grad and not b.requires_grad:
        return torch.einsum(equation, a, b)
    if not b.requires_grad:
        share = 1.0
    elif not a.requires_grad or mode == "cp":
        a, share = a.detach(), 0.0
    else:
        share = 0.5
    return _EinsumRule.apply(equation, a, b, float(epsilon), share)


class _ScalePass(torch.autograd.Function):
    """``x * c`` for a constant ``c``: a diagonal linear map, relevance passes unchanged."""

    @staticmethod
    def forward(ctx: Any, x: Tensor, c: float) -> Tensor:
        return x * c

    @staticmethod
    def backward(ctx: Any, relevance: Tensor) -> tuple[Tensor, None]:
        return relevance, None


def scale_pass(x: Tensor, c: float) -> Tensor:
    """``x * c`` with ``c`` a Python number (e.g. timm's ``q * self.scale``): relevance passes."""
    return _ScalePass.apply(x, c)


# ---------------------------------------------------------------------------------------------
# whole attention


def _attend(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    bias: Tensor | None,
    scale: float,
    mode: str,
    epsilon: float,
) -> tuple[Tensor, Tensor]:
    """``softmax((q * scale) k^T + bias) v`` and the weights, composed from the per-op rules.

    The explicit path of ``nn.MultiheadAttention`` with ``need_weights=True`` (queries scaled
    first, as torch does), and the reference :class:`_SDPARule` is tested against.
    """
    kt = k.transpose(-2, -1)
    if mode == "cp":
        with torch.no_grad():  # constants: no graph, nothing saved for a backward
            y = _bias((q * scale) @ kt, bias)
            attn = _safe_rows(F.softmax(y, dim=-1), y, -1)
        return _MatmulConstFirst.apply(attn, v, epsilon), attn
    scores = _MatmulUniform.apply(_ScalePass.apply(q, scale), kt, epsilon)
    attn = _SoftmaxTaylor.apply(scores, -1, bias, None, True)
    return _MatmulUniform.apply(attn, v, epsilon), attn


class _SDPARule(torch.autograd.Function):
    """``F.scaled_dot_product_attention`` itself in the forward (its exact values, its fused
    kernel); the backward recomputes the weights and applies the same rules as :func:`_attend`:

    attnlrp: R_v, R_A by the uniform rule on ``A @ v``; R_scores = s * (R_A - A sum(R_A)) on the
    scaled scores s; R_q, R_k by the uniform rule on ``s = (q * scale) @ k^T``.
    cp: R_v = v * A^T (R / (z + eps sign z)); q and k get none.
    """

    @staticmethod
    def forward(
        ctx: Any,
        q: Tensor,
        k: Tensor,
        v: Tensor,
        attn_mask: Tensor | None,
        is_causal: bool,
        scale: float,
        bias: Tensor | None,
        mode: str,
        epsilon: float,
    ) -> Tensor:
        out = F.scaled_dot_product_attention(
            q, k, v, attn_mask=attn_mask, is_causal=is_causal, scale=scale
        )
        ctx.scale, ctx.mode, ctx.epsilon = scale, mode, epsilon
        ctx.save_for_backward(q, k, v, bias)
        return out

    @staticmethod
    def backward(ctx: Any, relevance: Tensor) -> tuple[Tensor | None, ...]:
        q, k, v, bias = ctx.saved_tensors
        eps = ctx.epsilon
        scores = torch.matmul(q * ctx.scale, k.transpose(-2, -1))
        y = _bias(scores, bias)
        attn = _safe_rows(F.softmax(y, dim=-1), y, -1)
        z = torch.matmul(attn, v)
        rest = (None,) * 6
        if ctx.mode == "cp":
            g = relevance / stabilize(z, eps)
            rv = _sum_to(torch.matmul(attn.transpose(-1, -2), g) * v, v.shape)
            return None, None, rv, *rest
        g = relevance / (2.0 * stabilize(z, eps))
        r_attn = torch.matmul(g, v.transpose(-1, -2)).mul_(attn)
        rv = _sum_to(torch.matmul(attn.transpose(-1, -2), g) * v, v.shape)
        r_scores = _finite_or_zero(scores) * (r_attn - attn * r_attn.sum(-1, keepdim=True))
        g = r_scores.div_(stabilize(scores, eps).mul_(2.0))
        rq = _sum_to(torch.matmul(g, k).mul_(q * ctx.scale), q.shape)
        rk = _sum_to(torch.matmul(g.transpose(-1, -2), q) * ctx.scale * k, k.shape)
        return rq, rk, rv, *rest


def _bias(scores: Tensor, bias: Tensor | None) -> Tensor:
    return scores if bias is None else scores + bias


def _sdpa_bias(q: Tensor, k: Tensor, attn_mask: Tensor | None, is_causal: bool) -> Tensor | None:
    """The additive logit bias of ``F.scaled_dot_product_attention`` (bool mask: True attends)."""
    L, S = q.shape[-2], k.shape[-2]
    bias = None
    if is_causal:
        if attn_mask is not None:
            raise InvalidInputError(
                "scaled_dot_product_attention: attn_mask and is_causal both set"
            )
        keep = torch.ones(L, S, dtype=torch.bool, device=q.device).tril()
        bias = torch.zeros(L, S, dtype=q.dtype, device=q.device).masked_fill(~keep, -math.inf)
    elif attn_mask is not None:
        if attn_mask.dtype == torch.bool:
            bias = torch.zeros(attn_mask.shape, dtype=q.dtype, device=q.device).masked_fill(
                ~attn_mask, -math.inf
            )
        else:
            bias = attn_mask.to(q.dtype)
    return bias


def scaled_dot_product_attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    attn_mask: Tensor | None = None,
    dropout_p: float = 0.0,
    is_causal: bool = False,
    scale: float | None = None,
    *,
    enable_gqa: bool = False,
    mode: str = "attnlrp",
    epsilon: float = 1e-6,
    path: str = "",
) -> Tensor:
    """``F.scaled_dot_product_attention`` composed from :func:`matmul` and :func:`softmax` rules.

    Same arguments and values as torch's (bool masks: True takes part; fully masked rows give 0);
    ``dropout_p`` must be 0 (eval-mode explanation), else :class:`UnsupportedLayerError` naming
    ``path``. ``mode``/``epsilon`` select the rules (see the module docstring).
    """
    _check_mode(mode)
    if dropout_p != 0.0:
        raise UnsupportedLayerError(
            f"attention at '{path}' uses dropout_p={dropout_p}: explain the model in eval mode"
        )
    if epsilon < 0:
        raise InvalidInputError(f"attention: epsilon must be >= 0, got {epsilon}")
    if enable_gqa and k.ndim >= 3 and q.shape[-3] != k.shape[-3]:
        groups = q.shape[-3] // k.shape[-3]
        k = k.repeat_interleave(groups, dim=-3)  # copies: relevance of the copies is summed
        v = v.repeat_interleave(groups, dim=-3)
    if scale is None:
        scale = 1.0 / math.sqrt(q.shape[-1])
    bias = _sdpa_bias(q, k, attn_mask, is_causal)
    if mode == "cp":  # constants: autograd then never runs the q/k branches (not even with zeros)
        q, k = q.detach(), k.detach()
    return _SDPARule.apply(q, k, v, attn_mask, is_causal, float(scale), bias, mode, float(epsilon))


# ---------------------------------------------------------------------------------------------
# nn.MultiheadAttention


def _view_linear(weight: Tensor, bias: Tensor | None) -> nn.Linear:
    """A temporary ``nn.Linear`` whose weight and bias are views of (share) the given tensors."""
    lin = nn.Linear(weight.shape[1], weight.shape[0], bias=bias is not None, device="meta")
    lin.weight = nn.Parameter(weight.detach(), requires_grad=False)
    if bias is not None:
        lin.bias = nn.Parameter(bias.detach(), requires_grad=False)
    return lin


def _float_mask(mask: Tensor, dtype: torch.dtype, name: str, path: str) -> Tensor:
    """MHA semantics: a bool mask is True where attention is *not* allowed; float masks add."""
    if mask.dtype == torch.bool:
        return torch.zeros(mask.shape, dtype=dtype, device=mask.device).masked_fill(mask, -math.inf)
    if not torch.is_floating_point(mask):
        raise InvalidInputError(
            f"nn.MultiheadAttention at '{path}': {name} must be bool or float, got {mask.dtype}"
        )
    return mask.to(dtype)


class MultiheadAttentionLRP(nn.Module):
    """``nn.MultiheadAttention`` decomposed into projections, head reshapes, products and softmax.

    Built from the user's module (never modified): the q/k/v in-projections are temporary
    ``nn.Linear`` modules whose weights are views of ``in_proj_weight``/``in_proj_bias`` (or of
    ``q/k/v_proj_weight`` when kdim/vdim differ), ``out_proj`` is the user's; ``wrap_linear(linear,
    path)`` puts the composite's linear rule on each. The products and the softmax carry the
    rules of ``mode`` (:func:`matmul`, :func:`softmax`). Same forward as ``nn.MultiheadAttention``
    for batch_first either way, batched or unbatched input, key_padding_mask/attn_mask (bool or
    float), need_weights/average_attn_weights; add_bias_kv, add_zero_attn and dropout in training
    mode raise :class:`UnsupportedLayerError` naming ``path``.
    """

    def __init__(
        self,
        module: nn.MultiheadAttention,
        wrap_linear: Callable[[nn.Linear, str], nn.Module],
        path: str = "",
        *,
        mode: str = "attnlrp",
        epsilon: float = 1e-6,
    ) -> None:
        super().__init__()
        _check_mode(mode)
        if not isinstance(module, nn.MultiheadAttention):
            raise UnsupportedLayerError(
                f"{type(module).__name__} at '{path}' is not an nn.MultiheadAttention"
            )
        where = f"nn.MultiheadAttention at '{path}'"
        if module.bias_k is not None or module.bias_v is not None:
            raise UnsupportedLayerError(f"{where} uses add_bias_kv=True, which is not supported")
        if module.add_zero_attn:
            raise UnsupportedLayerError(f"{where} uses add_zero_attn=True, which is not supported")
        if epsilon < 0:
            raise InvalidInputError(f"{where}: epsilon must be >= 0, got {epsilon}")
        E = module.embed_dim
        self.path = path
        self.mode = mode
        self.epsilon = float(epsilon)
        self.embed_dim = E
        self.num_heads = module.num_heads
        self.head_dim = module.head_dim
        self.batch_first = module.batch_first
        self.dropout = module.dropout
        self.training = module.training
        b = module.in_proj_bias
        bq, bk, bv = (None, None, None) if b is None else (b[:E], b[E : 2 * E], b[2 * E :])
        if module._qkv_same_embed_dim:
            w = module.in_proj_weight
            wq, wk, wv = w[:E], w[E : 2 * E], w[2 * E :]
        else:
            wq, wk, wv = module.q_proj_weight, module.k_proj_weight, module.v_proj_weight
        self.q_proj = wrap_linear(_view_linear(wq, bq), f"{path}.q_proj")
        self.k_proj = wrap_linear(_view_linear(wk, bk), f"{path}.k_proj")
        self.v_proj = wrap_linear(_view_linear(wv, bv), f"{path}.v_proj")
        self.out_proj = wrap_linear(module.out_proj, f"{path}.out_proj")

    def extra_repr(self) -> str:
        return (
            f"embed_dim={self.embed_dim}, num_heads={self.num_heads}, mode={self.mode!r}, "
            f"epsilon={self.epsilon}, batch_first={self.batch_first}"
        )

    def forward(
        self,
        query: Tensor,
        key: Tensor,
        value: Tensor,
        key_padding_mask: Tensor | None = None,
        need_weights: bool = True,
        attn_mask: Tensor | None = None,
        average_attn_weights: bool = True,
        is_causal: bool = False,
    ) -> tuple[Tensor, Tensor | None]:
        where = f"nn.MultiheadAttention at '{self.path}'"
        if self.training and self.dropout > 0:
            raise UnsupportedLayerError(
                f"{where} has dropout={self.dropout} in training mode: explain in eval mode"
            )
        if is_causal and attn_mask is None:
            raise InvalidInputError(
                f"{where}: is_causal=True needs attn_mask (a hint, as in torch)"
            )
        batched = query.dim() == 3
        if not batched:  # (L, E): one sample
            query, key, value = query.unsqueeze(0), key.unsqueeze(0), value.unsqueeze(0)
            if key_padding_mask is not None:
                key_padding_mask = key_padding_mask.unsqueeze(0)
            if attn_mask is not None and attn_mask.dim() == 3:
                attn_mask = attn_mask.unsqueeze(0)
        elif not self.batch_first:  # (L, N, E) -> (N, L, E); relevance is moved by transposes
            query, key, value = (t.transpose(0, 1) for t in (query, key, value))
        N, L, _ = query.shape
        S = key.shape[1]
        H, D = self.num_heads, self.head_dim
        q = self.q_proj(query).reshape(N, L, H, D).transpose(1, 2)
        k = self.k_proj(key).reshape(N, S, H, D).transpose(1, 2)
        v = self.v_proj(value).reshape(N, S, H, D).transpose(1, 2)
        bias = None
        if attn_mask is not None:
            bias = _float_mask(attn_mask, q.dtype, "attn_mask", self.path)
            if bias.dim() == 3:  # (N * H, L, S); unbatched (H, L, S) is (1, H, L, S) by now
                bias = bias.view(N, H, L, S)
        if key_padding_mask is not None:
            kpm = _float_mask(key_padding_mask, q.dtype, "key_padding_mask", self.path)
            kpm = kpm.view(N, 1, 1, S)
            bias = kpm if bias is None else bias + kpm
        attn = None
        if self.mode == "cp":  # as in scaled_dot_product_attention: q, k branches never run
            q, k = q.detach(), k.detach()
        if need_weights:  # torch's explicit path (it returns the weights; q * sqrt(1 / D) first)
            out, attn = _attend(q, k, v, bias, math.sqrt(1.0 / D), self.mode, self.epsilon)
        else:  # torch's fused path: F.scaled_dot_product_attention with the merged float mask
            scale = 1.0 / math.sqrt(D)
            out = _SDPARule.apply(q, k, v, bias, False, scale, bias, self.mode, self.epsilon)
        out = self.out_proj(out.transpose(1, 2).reshape(N, L, self.embed_dim))
        if not batched:
            out = out.squeeze(0)
        elif not self.batch_first:
            out = out.transpose(0, 1)
        if attn is None:
            return out, None
        if average_attn_weights:
            attn = attn.mean(dim=1)
        return out, attn.squeeze(0) if not batched else attn


# ---------------------------------------------------------------------------------------------
# what the graph pass maps (fx call_function targets and call_method names) to the rules above

#: call_function targets -> rule function, called as ``rule(*args, mode=..., epsilon=...)``
#: (softmax: ``softmax(x, dim, mode=..., dtype=...)``, no epsilon, F.softmax's ``_stacklevel``
#: dropped). The products apply only where both operands depend on the input (else linear).
FUNCTIONS: dict[Any, Callable[..., Tensor]] = {
    F.scaled_dot_product_attention: scaled_dot_product_attention,
    torch.matmul: matmul,
    torch.bmm: matmul,
    operator.matmul: matmul,
    F.softmax: softmax,
    torch.softmax: softmax,
}
#: call_method names (``attn.softmax(dim=-1)``, ``q.matmul(k)``) -> rule function
METHODS: dict[str, Callable[..., Tensor]] = {"softmax": softmax, "matmul": matmul, "bmm": matmul}
#: call_function targets whose first argument is an equation: ``rule(eq, *operands, mode=...,
#: epsilon=...)``
EQUATION_FUNCTIONS: dict[Any, Callable[..., Tensor]] = {torch.einsum: einsum}


# ---------------------------------------------------------------------------------------------
# torchvision Swin: shifted_window_attention (fx-wrapped, so one leaf call in the traced graph)


class ShiftedWindowAttentionLRP(nn.Module):
    """torchvision's ``shifted_window_attention`` (Swin V1 and V2) op by op with the engine's rules.

    torchvision marks the function ``torch.fx.wrap``: its Python control flow depends on the
    feature-map size (``if window_size[0] >= pad_H``: no shift when one window covers the map),
    which symbolic tracing cannot follow. The graph pass therefore replaces the leaf call by this
    module, which runs torchvision's code line by line (same values, tested bit for bit) with each
    op under the rule the graph pass gives it elsewhere: pad, roll, window partition/reverse and
    head reshapes move relevance (gradient); the qkv and output projections are the composite's
    linear rule (``qkv``/``proj`` are the user's ``nn.Linear`` modules, wrapped by path); ``q *
    scale`` and V2's ``* logit_scale`` are constant scalings (relevance passes); V2's
    ``F.normalize`` of q and k holds the norm constant (relevance passes, as LayerNorm holds its
    std); ``q @ k^T`` and ``attn @ v`` by :func:`matmul`, the softmax by :func:`softmax`; the
    relative position bias and the shift mask (-100 off-window) are biases of the logits
    (:func:`lrp.rules.elementwise.bias_add` with the composite's epsilon and zero_bias).
    """

    def __init__(
        self,
        qkv: nn.Module,
        proj: nn.Module,
        path: str = "",
        *,
        mode: str = "attnlrp",
        epsilon: float = 1e-6,
        zero_bias: bool = False,
    ) -> None:
        super().__init__()
        _check_mode(mode)
        self.qkv, self.proj = qkv, proj
        self.path, self.mode = path, mode
        self.epsilon, self.zero_bias = float(epsilon), zero_bias

    def extra_repr(self) -> str:
        return f"mode={self.mode!r}, epsilon={self.epsilon}, zero_bias={self.zero_bias}"

    def forward(
        self,
        input: Tensor,
        relative_position_bias: Tensor,
        window_size: list[int],
        num_heads: int,
        shift_size: list[int],
        attention_dropout: float = 0.0,
        dropout: float = 0.0,
        logit_scale: Tensor | None = None,
        training: bool = True,
    ) -> Tensor:
        if training and (attention_dropout > 0 or dropout > 0):
            raise UnsupportedLayerError(
                f"shifted_window_attention at '{self.path}' has dropout in training mode: "
                "explain in eval mode"
            )
        eps, zb = self.epsilon, self.zero_bias
        B, H, W, C = input.shape
        pad_r = (window_size[1] - W % window_size[1]) % window_size[1]
        pad_b = (window_size[0] - H % window_size[0]) % window_size[0]
        x = F.pad(input, (0, 0, 0, pad_r, 0, pad_b))
        _, pad_H, pad_W, _ = x.shape
        shift_size = list(shift_size)
        if window_size[0] >= pad_H:
            shift_size[0] = 0
        if window_size[1] >= pad_W:
            shift_size[1] = 0
        if sum(shift_size) > 0:
            x = torch.roll(x, shifts=(-shift_size[0], -shift_size[1]), dims=(1, 2))
        num_windows = (pad_H // window_size[0]) * (pad_W // window_size[1])
        x = x.view(B, pad_H // window_size[0], window_size[0], pad_W // window_size[1],
                   window_size[1], C)
        x = x.permute(0, 1, 3, 2, 4, 5).reshape(B * num_windows, window_size[0] * window_size[1], C)
        qkv = self.qkv(x)
        qkv = qkv.reshape(x.size(0), x.size(1), 3, num_heads, C // num_heads).permute(2, 0, 3, 1, 4)
        q, k, v = qkv[0], qkv[1], qkv[2]
        if logit_scale is not None:  # V2: cosine attention, norms held constant
            normalize = passthrough_of(F.normalize)
            attn = matmul(normalize(q, dim=-1), normalize(k, dim=-1).transpose(-2, -1),
                          self.mode, eps)
            scale = torch.clamp(logit_scale, max=math.log(100.0)).exp()
            attn = passthrough_of(operator.mul)(attn, scale)
        else:
            q = scale_pass(q, (C // num_heads) ** -0.5)
            attn = matmul(q, k.transpose(-2, -1), self.mode, eps)
        attn = bias_add(attn, relative_position_bias, eps, zb)
        if sum(shift_size) > 0:
            attn = bias_add(attn.view(x.size(0) // num_windows, num_windows, num_heads, x.size(1),
                                      x.size(1)),
                            _shift_mask(x, pad_H, pad_W, window_size, shift_size, num_windows),
                            eps, zb)
            attn = attn.view(-1, num_heads, x.size(1), x.size(1))
        attn = softmax(attn, -1, self.mode)
        x = matmul(attn, v, self.mode, eps).transpose(1, 2).reshape(x.size(0), x.size(1), C)
        x = self.proj(x)
        x = x.view(B, pad_H // window_size[0], pad_W // window_size[1], window_size[0],
                   window_size[1], C)
        x = x.permute(0, 1, 3, 2, 4, 5).reshape(B, pad_H, pad_W, C)
        if sum(shift_size) > 0:
            x = torch.roll(x, shifts=(shift_size[0], shift_size[1]), dims=(1, 2))
        return x[:, :H, :W, :].contiguous()


def _shift_mask(
    x: Tensor, pad_H: int, pad_W: int, window_size: list[int], shift_size: list[int],
    num_windows: int,
) -> Tensor:
    """torchvision's shifted-window mask (0 within a region, -100 across), (1, nW, 1, L, L)."""
    attn_mask = x.new_zeros((pad_H, pad_W))
    h_slices = ((0, -window_size[0]), (-window_size[0], -shift_size[0]), (-shift_size[0], None))
    w_slices = ((0, -window_size[1]), (-window_size[1], -shift_size[1]), (-shift_size[1], None))
    count = 0
    for h in h_slices:
        for w in w_slices:
            attn_mask[h[0] : h[1], w[0] : w[1]] = count
            count += 1
    attn_mask = attn_mask.view(pad_H // window_size[0], window_size[0], pad_W // window_size[1],
                               window_size[1])
    attn_mask = attn_mask.permute(0, 2, 1, 3).reshape(num_windows, window_size[0] * window_size[1])
    attn_mask = attn_mask.unsqueeze(1) - attn_mask.unsqueeze(2)
    attn_mask = attn_mask.masked_fill(attn_mask != 0, -100.0).masked_fill(
        attn_mask == 0, 0.0)
    return attn_mask.unsqueeze(1).unsqueeze(0)
