"""Modules that carry a rule: the forward is the original layer's, the backward is the rule's.

Each wrapper calls a ``torch.autograd.Function`` whose backward maps relevance at the output to
relevance at the input, so one ``torch.autograd.grad`` call through the prepared model is the whole
LRP pass: no per-layer Python loop at explain time and no second model.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .errors import LRPError
from .ops import LinearOp, scale_output_channels
from .rules.base import ModuleRule, Pass, Rule


class _ModuleRuleFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, x: Tensor, layer: ModuleRuleLayer) -> Tensor:
        output = layer.module(x)
        ctx.layer = layer
        # an output the rule does not read is not kept (an activation-sized tensor less)
        ctx.save_for_backward(x, output if layer.rule.uses_output else None)
        return output

    @staticmethod
    def backward(ctx: Any, relevance: Tensor) -> tuple[Tensor, None]:
        x, output = ctx.saved_tensors
        layer = ctx.layer
        try:
            return layer.rule.relevance(layer.module, x, output, relevance), None
        except LRPError as err:
            raise type(err)(f"at '{layer.path}': {err}") from err


#: in-place forms of the stock element-wise activations (the same values, no new tensor); a
#: subclass may compute something else and is run as itself
INPLACE_ACTIVATIONS: dict[type[nn.Module], Callable[[Any, Tensor], Tensor]] = {
    nn.ReLU: lambda m, x: torch.relu_(x),
    nn.SiLU: lambda m, x: F.silu(x, inplace=True),
    nn.Hardswish: lambda m, x: F.hardswish(x, inplace=True),
    nn.Hardsigmoid: lambda m, x: F.hardsigmoid(x, inplace=True),
    nn.ReLU6: lambda m, x: F.hardtanh(x, 0.0, 6.0, inplace=True),
    nn.Hardtanh: lambda m, x: F.hardtanh(x, m.min_val, m.max_val, inplace=True),
    nn.LeakyReLU: lambda m, x: F.leaky_relu(x, m.negative_slope, inplace=True),
    nn.ELU: lambda m, x: F.elu(x, m.alpha, inplace=True),
    nn.CELU: lambda m, x: F.celu(x, m.alpha, inplace=True),
    nn.SELU: lambda m, x: F.selu(x, inplace=True),
    nn.Mish: lambda m, x: F.mish(x, inplace=True),
    nn.Sigmoid: lambda m, x: torch.sigmoid_(x),
    nn.Tanh: lambda m, x: torch.tanh_(x),
}


def _hooked(module: nn.Module) -> bool:
    """Whether calling ``module`` runs forward hooks (its own or global ones): a hooked
    activation is called as itself, so that its hooks fire and see its input unchanged."""
    return bool(module._forward_hooks or module._forward_pre_hooks
                or nn.modules.module._global_forward_hooks
                or nn.modules.module._global_forward_pre_hooks)


class _PassFunction(torch.autograd.Function):
    """Identity backward that keeps no tensors alive (cheaper than the module's own gradient)."""

    @staticmethod
    def forward(ctx: Any, x: Tensor, module: nn.Module, inplace: bool = False) -> Tensor:
        # only set where no one else holds x (see ModuleRuleLayer.inplace); a view (F.linear's
        # output on 3-d input, say) cannot be modified in place inside a Function
        if inplace and x._base is None and not _hooked(module):
            ctx.mark_dirty(x)
            return INPLACE_ACTIVATIONS[type(module)](module, x)
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
        # an activation whose input tensor nobody else keeps may work in place (set by the
        # explainer, only for the types in INPLACE_ACTIVATIONS)
        self.inplace = False

    def forward(self, x: Tensor) -> Tensor:
        if type(self.rule) is Pass:
            return _PassFunction.apply(x, self.module, self.inplace)
        return _ModuleRuleFunction.apply(x, self)

    def extra_repr(self) -> str:
        return f"rule={self.rule!r}"


class _LinearRuleFunction(torch.autograd.Function):
    @staticmethod
    def forward(
        ctx: Any, x: Tensor, layer: LinearRuleLayer, source: Tensor | None = None
    ) -> Tensor:
        # with an input activation: its input, which the layer before keeps anyway; with a
        # ``source`` (the input of the LayerNorm that made x): that, from which x is recomputed
        kept = x if source is None else source
        if layer.input_fn is not None:
            x = layer.input_fn(x)
        # the folded weight is made once per pass: it gives the output (bias fused into the
        # convolution), then the rule may turn it into W+ in place
        weight = layer.folded_weight()
        output = layer.op(x, weight, layer.bias)
        params = layer.rule_params(weight)
        saved = layer.rule.forward(layer, params, x, output)
        ctx.layer = layer
        # a rule may keep the output itself (no output-sized copy): it is held detached with its
        # version, so that an in-place consumer (a ReLU the engine runs in place) is noticed and
        # the backward recomputes the output instead of failing or reading the changed values
        ctx.keep = [t is output for t in saved]
        ctx.output = output.detach() if any(ctx.keep) else None
        ctx.output_version = output._version
        ctx.save_for_backward(kept, *(t for t, k in zip(saved, ctx.keep, strict=True) if not k))
        return output

    @staticmethod
    def backward(ctx: Any, relevance: Tensor) -> tuple[Tensor, None, None]:
        x, *rest = ctx.saved_tensors
        layer = ctx.layer
        if layer.input_recompute_fn is not None:  # the activation again, from its kept input
            x = layer.input_recompute_fn(x)
        elif layer.source_fn is not None:  # the LayerNorm again, from its kept input
            x = layer.source_fn(x)
        saved = rest
        if any(ctx.keep):
            output = ctx.output
            ctx.output = None  # the graph outlives this call: release the output now
            if output is None or output._version != ctx.output_version:
                output = layer.op(x, layer.folded_weight(), layer.bias)
            it = iter(rest)
            saved = [output if k else next(it) for k in ctx.keep]
        return layer.rule.backward(layer, layer.rule_params(), x, saved, relevance), None, None


class LinearRuleLayer(nn.Module):
    """Wraps a Linear/ConvNd layer, possibly with a BatchNorm folded in, with a LinearRule.

    The layer computes ``op(x, W * scale) + bias`` from the user's own weight tensor ``W`` and the
    folded BatchNorm's per-channel ``scale`` (None: no BatchNorm). The folded weight and the rule's
    modified weights (W+, W-, ...) are made when a pass needs them, one layer at a time, and
    dropped after it, unless ``cache_weights`` keeps them (faster for small batches, one or two
    more sets of weights in memory). ``input_nonnegative`` is set by the explainer when the
    layer's input is provably >= 0 (it follows a ReLU), which lets sign-splitting rules skip the
    terms of negative inputs.
    """

    def __init__(
        self,
        module: nn.Module,
        rule: Rule,
        path: str = "",
        *,
        scale: Tensor | None = None,
        bias: Tensor | None = None,
        cache_weights: bool = False,
    ) -> None:
        super().__init__()
        self.module = module
        self.rule = rule
        self.path = path
        self.op = LinearOp(module, path)
        self.weight: Tensor = module.weight.detach()
        self.scale = None if scale is None else scale.detach()
        if bias is None and module.bias is not None:
            bias = module.bias
        self.bias: Tensor | None = None if bias is None else bias.detach()
        self.input_nonnegative = False
        # set by the explainer (``_Builder.fuse_input_activations``): an element-wise activation
        # with the pass rule, run here on the layer's input; the backward recomputes it from its
        # input instead of keeping its output, and returns the relevance at its output as the
        # relevance at its input (the pass rule)
        self.input_fn: Callable[[Tensor], Tensor] | None = None
        self.input_recompute_fn: Callable[[Tensor], Tensor] | None = None  # the same, hook-free
        # set by the explainer (``_Builder.recompute_normalised_inputs``): the LayerNorm whose
        # output is this layer's input; the layer is then also given that LayerNorm's input
        # (which the LayerNorm's rule keeps) and keeps it instead, recomputing x in the backward
        self.source_fn: Callable[[Tensor], Tensor] | None = None
        # set by the explainer: the output is kept anyway (the next layer recomputes its input
        # activation from it), so a rule may keep it instead of recomputing it
        self.output_kept = False
        self.cache_weights = cache_weights
        self._rule_params: dict[str, Tensor] | None = None
        self._folded: Tensor | None = None
        self.cache: dict[Any, Tensor] = {}

    def forward(self, x: Tensor, source: Tensor | None = None) -> Tensor:
        if source is None or self.source_fn is None:
            return _LinearRuleFunction.apply(x, self)
        return _LinearRuleFunction.apply(x, self, source)

    def _scale_view(self, like: Tensor) -> Tensor:
        assert self.scale is not None
        return self.scale.view(-1, *([1] * (like.ndim - 2))) if like.ndim > 2 else self.scale

    def linear(self, x: Tensor) -> Tensor:
        """The layer's output without its bias, ``op(x, W) * scale`` (no folded weight made)."""
        z = self.op(x, self.weight)
        return z if self.scale is None else z.mul_(self._scale_view(z))

    def linear_transpose(self, g: Tensor, x: Tensor) -> Tensor:
        """Transpose of :meth:`linear` applied to ``g`` (``x`` gives the shape)."""
        if self.scale is not None:
            g = g * self._scale_view(g)
        return self.op.transpose(g, self.weight, x)

    def folded_weight(self) -> Tensor:
        """``W * scale`` per output channel: the weight the rules see (a new tensor if folded,
        kept only with ``cache_weights``)."""
        if self.scale is None:
            return self.weight
        if self._folded is not None:
            return self._folded
        folded = scale_output_channels(self.module, self.weight, self.scale)
        if self.cache_weights:
            self._folded = folded
        return folded

    def rule_params(self, weight: Tensor | None = None) -> dict[str, Tensor]:
        """The rule's modified weights and biases (cached only with ``cache_weights``).

        ``weight``: this pass's :meth:`folded_weight`, which the rule may then overwrite.
        """
        if self._rule_params is not None:
            return self._rule_params
        if weight is None:
            weight = self.folded_weight()
        private = weight is not self.weight and weight is not self._folded
        params = self.rule.prepare(weight, self.bias, self.input_nonnegative, private=private)
        if self.cache_weights:
            self._rule_params = params
        return params

    def extra_repr(self) -> str:
        folded = self.scale is not None
        return f"rule={self.rule!r}, input_nonnegative={self.input_nonnegative}, bn_folded={folded}"


class FunctionModule(nn.Module):
    """A functional call of the traced graph (``F.avg_pool2d(x, 2)``, ``x.mean((2, 3))``) as a
    one-input module, so the module rules (Proportional, the stem pool rule) apply to it."""

    def __init__(self, fn: Any, args: tuple = (), kwargs: dict | None = None) -> None:
        super().__init__()
        self.fn = fn
        self.args = args
        self.kwargs = kwargs or {}

    def forward(self, x: Tensor) -> Tensor:
        return self.fn(x, *self.args, **self.kwargs)

    def extra_repr(self) -> str:
        return f"fn={getattr(self.fn, '__name__', self.fn)}, args={self.args}, kwargs={self.kwargs}"


class FunctionRuleLayer(nn.Module):
    """``fn(x, *args, **kwargs)`` under a ModuleRule, with ``args``/``kwargs`` given at run time:
    for a functional call whose other arguments the model computes from a tensor's shape
    (``F.avg_pool2d(x, x.shape[2:])``, ``F.interpolate(x, size=y.shape[-2:])``)."""

    def __init__(self, fn: Any, rule: ModuleRule, path: str = "") -> None:
        super().__init__()
        self.fn = fn
        self.rule = rule
        self.path = path

    def forward(self, x: Tensor, *args: Any, **kwargs: Any) -> Tensor:
        return ModuleRuleLayer(FunctionModule(self.fn, args, kwargs), self.rule, self.path)(x)

    def extra_repr(self) -> str:
        return f"fn={getattr(self.fn, '__name__', self.fn)}, rule={self.rule!r}"
