"""Rules for element-wise graph operations that are not layers: activations written as functions,
scaling and shifting by constants, and gating.

- an element-wise activation (``F.relu``, ``F.gelu``, ``torch.sigmoid``, ...) passes relevance
  unchanged, as its module form does (METHOD.md section 1);
- ``x * c``, ``x / c``, ``-x`` with a constant or parameter ``c`` (ConvNeXt's layer scale) are a
  diagonal linear map: relevance passes unchanged (the epsilon rule of ``x_j c_j`` over itself);
- ``x + c`` with a constant or parameter ``c`` (a position embedding, a shift) is a bias: under
  the epsilon rule ``R_x = R * x / stab(x + c)``, so the constant absorbs its share, exactly as a
  layer bias does; ``zero_bias=True`` leaves it out of the denominator (``R_x = R``);
- ``signal * gate`` (squeeze-excitation): all relevance goes to the signal and the gate is a
  constant. The gate only rescales the signal's channels; it contributes no evidence of its own,
  and the rule is conservative (METHOD.md section 5);
- ``a * b`` of two signals, neither a gate (StarNet's star, GLU/SwiGLU MLPs, MambaOut's gated
  conv): the uniform rule of AttnLRP (Achtibat et al. 2024, Prop. 3.3), half of the product's
  relevance to each factor, as LXT's ``mul2``. A product is first-order in each factor and both
  Taylor terms ``a db + b da`` equal ``a b``, so neither is preferred; exactly conservative.
  ``x * x`` gives x all of it, as ``x ** 2`` (an element-wise function: passes);
- a normalisation statistic of the input (a norm, standard deviation or variance: GRN's
  ``||x||``) is held constant, as LayerNorm's sigma (Ali et al. 2022): no relevance enters it,
  and scaling the signal by it passes relevance.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor

from .base import stabilize


def _fit(relevance: Tensor, shape: torch.Size) -> Tensor:
    """Relevance summed over the dims along which an input of ``shape`` was broadcast."""
    if relevance.shape == shape:
        return relevance
    extra = relevance.ndim - len(shape)
    if extra:
        relevance = relevance.sum(dim=tuple(range(extra)))
    dims = tuple(i for i, s in enumerate(shape) if s == 1 and relevance.shape[i] != 1)
    return relevance.sum(dim=dims, keepdim=True) if dims else relevance


class _Passthrough(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, x: Tensor, fn: Callable[..., Tensor], args: tuple, kwargs: dict) -> Tensor:
        ctx.shape = x.shape
        return fn(x, *args, **kwargs)

    @staticmethod
    def backward(ctx: Any, relevance: Tensor) -> tuple[Tensor, None, None, None]:
        return _fit(relevance, ctx.shape), None, None, None


def passthrough(x: Tensor, fn: Callable[..., Tensor], *args: Any, **kwargs: Any) -> Tensor:
    """``fn(x, *args, **kwargs)`` whose backward passes relevance unchanged (summed over the dims
    a constant argument broadcast ``x`` along)."""
    return _Passthrough.apply(x, fn, args, kwargs)


@functools.cache
def passthrough_of(fn: Callable[..., Tensor]) -> Callable[..., Tensor]:
    """``passthrough`` bound to ``fn``: one named function per ``fn``, a graph node target."""

    def call(x: Tensor, *args: Any, **kwargs: Any) -> Tensor:
        return _Passthrough.apply(x, fn, args, kwargs)

    call.__name__ = call.__qualname__ = f"lrp_pass_{getattr(fn, '__name__', 'fn')}"
    call.passthrough_fn = fn  # type: ignore[attr-defined]
    return call


class _BiasAdd(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, x: Tensor, constant: Tensor | float, epsilon: float, zero_bias: bool) -> Tensor:
        out = x + constant
        ctx.shape = x.shape
        ctx.zero_bias = zero_bias
        if not zero_bias:
            ctx.save_for_backward(x, stabilize(out, epsilon))
        return out

    @staticmethod
    def backward(ctx: Any, relevance: Tensor) -> tuple[Tensor, None, None, None]:
        if ctx.zero_bias:
            return _fit(relevance, ctx.shape), None, None, None
        x, den = ctx.saved_tensors
        return _fit(relevance * x / den, ctx.shape), None, None, None


def bias_add(x: Tensor, constant: Tensor | float, epsilon: float, zero_bias: bool) -> Tensor:
    """``x + constant`` under the epsilon rule (the constant is a bias; see module docstring)."""
    return _BiasAdd.apply(x, constant, epsilon, zero_bias)


class _Gate(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, signal: Tensor, gate: Tensor) -> Tensor:
        ctx.shape = signal.shape
        return signal * gate

    @staticmethod
    def backward(ctx: Any, relevance: Tensor) -> tuple[Tensor, None]:
        return _fit(relevance, ctx.shape), None


def gate(signal: Tensor, gate: Tensor) -> Tensor:
    """``signal * gate``: all relevance to the signal, none to the gate (see module docstring).

    The gate enters detached: autograd then never runs the gate branch's rules (a zero
    relevance returned for it would still be materialised and propagated through them: the
    squeeze-excitation's pool over the whole signal, its convolutions and activations)."""
    return _Gate.apply(signal, gate.detach())


class _UniformProduct(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, a: Tensor, b: Tensor) -> Tensor:
        ctx.shapes = a.shape, b.shape
        return a * b

    @staticmethod
    def backward(ctx: Any, relevance: Tensor) -> tuple[Tensor, Tensor]:
        half = relevance * 0.5
        return _fit(half, ctx.shapes[0]), _fit(half, ctx.shapes[1])


def uniform_product(a: Tensor, b: Tensor) -> Tensor:
    """``a * b`` of two signals: half of the relevance to each factor (see module docstring)."""
    return _UniformProduct.apply(a, b)


@functools.cache
def held_constant_of(fn: Callable[..., Tensor]) -> Callable[..., Tensor]:
    """``fn`` (a norm, standard deviation or variance of the input) computed and detached: a
    normalisation statistic held constant, as LayerNorm's sigma (Ali et al. 2022). Dividing or
    multiplying the signal by it is then a scaling (relevance passes); no relevance enters it."""

    def call(*args: Any, **kwargs: Any) -> Tensor:
        return fn(*args, **kwargs).detach()

    call.__name__ = call.__qualname__ = f"lrp_held_{getattr(fn, '__name__', 'fn')}"
    call.held_constant = True  # type: ignore[attr-defined]
    return call


def _statistic(t: Tensor) -> Tensor:
    return t


#: a normalisation statistic made of reductions and element-wise arithmetic (a hand-written
#: RMSNorm's rsqrt(mean(x ** 2) + eps)), held constant where it scales the signal
held_statistic = held_constant_of(_statistic)
