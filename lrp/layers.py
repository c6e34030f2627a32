"""Modules that carry a rule: the forward is the original layer's, the backward is the rule's.

Each wrapper calls a ``torch.autograd.Function`` whose backward maps relevance at the output to
relevance at the input, so one ``torch.autograd.grad`` call through the prepared model is the whole
LRP pass: no per-layer Python loop at explain time and no second model.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

from .errors import LRPError
from .ops import LinearOp
from .rules.base import ModuleRule, Pass, Rule


class _ModuleRuleFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, x: Tensor, layer: ModuleRuleLayer) -> Tensor:
        output = layer.module(x)
        ctx.layer = layer
        ctx.save_for_backward(x, output)
        return output

    @staticmethod
    def backward(ctx: Any, relevance: Tensor) -> tuple[Tensor, None]:
        x, output = ctx.saved_tensors
        layer = ctx.layer
        try:
            return layer.rule.relevance(layer.module, x, output, relevance), None
        except LRPError as err:
            raise type(err)(f"at '{layer.path}': {err}") from err


class _PassFunction(torch.autograd.Function):
    """Identity backward that keeps no tensors alive (cheaper than the module's own gradient)."""

    @staticmethod
    def forward(ctx: Any, x: Tensor, module: nn.Module, inplace: bool = False) -> Tensor:
        if inplace:  # only set where no one else holds x (see ModuleRuleLayer.inplace)
            ctx.mark_dirty(x)
            return torch.relu_(x)
        output = module(x)
        if output.shape != x.shape:
            raise ValueError(
                f"Pass rule on {type(module).__name__}: output shape {tuple(output.shape)} differs "
                f"from input shape {tuple(x.shape)}"
            )
        return output

    @staticmethod
    def backward(ctx: Any, relevance: Tensor) -> tuple[Tensor, None, None]:
        return relevance, None, None


class ModuleRuleLayer(nn.Module):
    """Wraps a weight-free module (pooling, activation, LRN, BatchNorm as pass) with a ModuleRule."""

    def __init__(self, module: nn.Module, rule: ModuleRule, path: str = "") -> None:
        super().__init__()
        self.module = module
        self.rule = rule
        self.path = path
        # a ReLU whose input tensor nobody else keeps may work in place (set by the explainer)
        self.inplace = False

    def forward(self, x: Tensor) -> Tensor:
        if type(self.rule) is Pass:
            return _PassFunction.apply(x, self.module, self.inplace)
        return _ModuleRuleFunction.apply(x, self)

    def extra_repr(self) -> str:
        return f"rule={self.rule!r}"


class _LinearRuleFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, x: Tensor, layer: LinearRuleLayer) -> Tensor:
        output = layer.op(x, layer.weight, layer.bias)
        saved = layer.rule.forward(layer, x, output)
        ctx.layer = layer
        ctx.save_for_backward(x, *saved)
        return output

    @staticmethod
    def backward(ctx: Any, relevance: Tensor) -> tuple[Tensor, None]:
        x, *saved = ctx.saved_tensors
        layer = ctx.layer
        return layer.rule.backward(layer, x, saved, relevance), None


class LinearRuleLayer(nn.Module):
    """Wraps a Linear/ConvNd layer with a LinearRule.

    ``prepared`` holds the rule's modified parameters, computed once at construction.
    ``input_nonnegative`` is set by the explainer when the layer's input is provably >= 0 (it follows
    a ReLU), which lets sign-splitting rules skip the terms of negative inputs.
    """

    def __init__(self, module: nn.Module, rule: Rule, path: str = "") -> None:
        super().__init__()
        self.module = module
        self.rule = rule
        self.path = path
        self.op = LinearOp(module, path)
        self.weight: Tensor = module.weight.detach()
        self.bias: Tensor | None = None if module.bias is None else module.bias.detach()
        self.input_nonnegative = False
        self.prepared: dict[str, Tensor] = rule.prepare(self.weight, self.bias)
        self.cache: dict[Any, Tensor] = {}

    def forward(self, x: Tensor) -> Tensor:
        return _LinearRuleFunction.apply(x, self)

    def extra_repr(self) -> str:
        return f"rule={self.rule!r}, input_nonnegative={self.input_nonnegative}"
