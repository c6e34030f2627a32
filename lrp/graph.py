"""Graph preparation: the explainer's prepared copy, built from the model's traced graph.

The whole model is traced (:mod:`lrp.tracing`); every node that depends on the input then gets
its rule by what it computes, found by data flow, not by class names (the table is
docs/ENGINE_API.md "Which operation gets which rule"):

- layers (Linear/Conv, also written as ``F.linear``/``F.conv2d`` with parameters) get the
  composite's rule; a BatchNorm whose input is a Linear/Conv output used by nothing else is folded
  into it, wherever the two modules live;
- an addition or subtraction of two or more input-dependent tensors is a residual merge with the
  configured ``residual=`` mode (chains ``a + b + c`` inside one module are one n-term merge);
  adding a constant or a parameter is a bias;
- reshapes, concatenations, splits, indexing, max-pools and eval-mode dropout keep their gradient
  (relevance is moved, not changed); functional activations pass; functional sums, means and
  average pools get the proportional rule;
- a product of a signal and a sigmoid/hard-sigmoid gate (squeeze-excitation) gives all relevance
  to the signal; multiplying or dividing by a constant is a linear scaling (relevance passes);
- attention (:mod:`lrp.rules.attention`, ``attention=`` CP-LRP or AttnLRP): softmax, matmul and
  two-operand einsum of input-dependent tensors, fused SDPA, ``nn.MultiheadAttention`` (replaced
  by a decomposed copy) and torchvision Swin's fx-wrapped ``shifted_window_attention`` (replaced
  by a module running it op by op with these rules);
- constant operands of a cat/stack with input-dependent ones (ViT's class token) are tapped
  (:func:`absorb_token`): the relevance they absorb is reported as ``Explanation.absorbed``;
- anything else raises :class:`~lrp.errors.UnresolvedStructureError` naming the operation, the
  module path and the source line. Nothing silently falls back to the gradient.
"""

from __future__ import annotations

import contextvars
import inspect
import operator
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.fx as fx
import torch.nn.functional as F
from torch import Tensor, nn
from torch.fx.operator_schemas import normalize_function
from torchvision.models import swin_transformer
from torchvision.ops import stochastic_depth

from .canonizers import BATCHNORM_TYPES, LINEAR_TYPES, batchnorm_affine, can_fold, materialize_fold
from .composites import Composite
from .errors import InvalidInputError, UnsupportedLayerError, UnsupportedOperationError
from .layers import (
    INPLACE_ACTIVATIONS,
    FunctionModule,
    FunctionRuleLayer,
    LinearRuleLayer,
    ModuleRuleLayer,
)
from .ops import PrePadding, stock_linear_forward, with_pre_padding
from .rules import attention
from .rules.base import ModuleRule, Pass, Rule
from .rules.elementwise import (
    bias_add,
    gate,
    held_constant_of,
    held_statistic,
    passthrough_of,
    uniform_product,
)
from .rules.linear import Epsilon, LinearRule
from .rules.normalization import (
    INSTANCENORM,
    AffineEpsilon,
    GroupNormRule,
    InstanceNormRule,
    LayerNormRule,
    uses_running_stats,
)
from .rules.pooling import Proportional
from .rules.residual import ResidualMerge, recompute_shares
from .tracing import (
    SHAPE_ATTRIBUTES,
    Traced,
    library_pads,
    scope,
    source,
    trace,
)

# ------------------------------------------------------------------ the operation table
# Modules whose ordinary gradient already is the rule: max-pools (winner takes all), reshapes,
# eval-mode dropout, identities.
GRADIENT_MODULES = (
    nn.MaxPool1d,
    nn.MaxPool2d,
    nn.MaxPool3d,
    nn.AdaptiveMaxPool1d,
    nn.AdaptiveMaxPool2d,
    nn.AdaptiveMaxPool3d,
    nn.Flatten,
    nn.Unflatten,
    nn.Dropout,
    nn.Dropout1d,
    nn.Dropout2d,
    nn.Dropout3d,
    nn.AlphaDropout,
    nn.Identity,
    nn.ChannelShuffle,
    nn.PixelShuffle,
    nn.PixelUnshuffle,
    nn.Unfold,  # sliding windows (copies): the gradient sums relevance over the copies
    nn.ConstantPad1d,  # ZeroPad*d are ConstantPad*d
    nn.ConstantPad2d,
    nn.ConstantPad3d,
    nn.ReflectionPad1d,
    nn.ReflectionPad2d,
    nn.ReflectionPad3d,
    nn.ReplicationPad1d,
    nn.ReplicationPad2d,
    nn.ReplicationPad3d,
    nn.CircularPad1d,
    nn.CircularPad2d,
    nn.CircularPad3d,
)
MAXPOOL_MODULES = GRADIENT_MODULES[:6]
CONV_TYPES = (nn.Conv1d, nn.Conv2d, nn.Conv3d)
# Element-wise activations: relevance passes unchanged (METHOD.md section 1; Zennit does the same).
PASS_MODULES = (
    nn.ReLU,
    nn.ELU,
    nn.GELU,
    nn.SiLU,
    nn.Tanh,
    nn.Sigmoid,
    nn.LeakyReLU,
    nn.ReLU6,
    nn.Softplus,
    nn.Hardtanh,
    nn.Hardswish,
    nn.Hardsigmoid,
    nn.Mish,
    nn.PReLU,
    nn.SELU,
    nn.CELU,
    nn.RReLU,
    nn.RMSNorm,  # x / rms(x) * w with rms held constant (as LayerNorm's sigma): a scaling
)
POOL_MODULES = (
    nn.AvgPool1d,
    nn.AvgPool2d,
    nn.AvgPool3d,
    nn.AdaptiveAvgPool1d,
    nn.AdaptiveAvgPool2d,
    nn.AdaptiveAvgPool3d,
    nn.Fold,  # sums overlapping patches: a fixed linear map with weights 1, the sum rule
)
# Pass-rule activations that act element by element (a function of each value alone)
ELEMENTWISE_PASS_MODULES = tuple(m for m in PASS_MODULES if m is not nn.RMSNorm)
# Modules that are the identity in eval mode (the prepared copy is always in eval mode)
IDENTITY_MODULES = (nn.Identity, nn.Dropout, nn.Dropout1d, nn.Dropout2d, nn.Dropout3d,
                    nn.AlphaDropout)
GATE_MODULES = (nn.Sigmoid, nn.Hardsigmoid)
# Outputs that are never negative (used to prove a layer's input is >= 0).
NONNEG_MODULES = (nn.ReLU, nn.ReLU6, nn.Sigmoid, nn.Softplus, nn.Hardsigmoid)
SIGN_KEEPING_MODULES = (*POOL_MODULES, *GRADIENT_MODULES, nn.LocalResponseNorm)

GRADIENT_FUNCTIONS: set[Any] = {
    operator.getitem,
    torch.cat,
    torch.concat,
    torch.concatenate,
    torch.stack,
    torch.chunk,
    torch.split,
    torch.tensor_split,
    torch.unbind,
    torch.flatten,
    torch.reshape,
    torch.permute,
    torch.transpose,
    torch.swapaxes,
    torch.movedim,
    torch.squeeze,
    torch.unsqueeze,
    torch.narrow,
    torch.roll,
    torch.flip,
    torch.fliplr,
    torch.flipud,
    torch.rot90,
    torch.tile,
    torch.repeat_interleave,
    torch.index_select,
    torch.gather,
    torch.amax,
    torch.amin,
    torch.channel_shuffle,
    torch.pixel_shuffle,
    torch.pixel_unshuffle,
    torch.t,
    F.pad,
    F.max_pool1d,
    F.max_pool2d,
    F.max_pool3d,
    F.adaptive_max_pool1d,
    F.adaptive_max_pool2d,
    F.adaptive_max_pool3d,
    F.dropout,
    F.dropout1d,
    F.dropout2d,
    F.dropout3d,
    F.alpha_dropout,
    stochastic_depth,
    F.unfold,  # sliding windows (copies): the gradient sums relevance over the copies
    swin_transformer._patch_merging_pad,  # fx-wrapped in torchvision: pad, strided slices, cat
}
MAXPOOL_FUNCTIONS = {F.max_pool1d, F.max_pool2d, F.max_pool3d}
DROPOUT_FUNCTIONS = {F.dropout, F.dropout1d, F.dropout2d, F.dropout3d, F.alpha_dropout}
GRADIENT_METHODS = {
    "view",
    "view_as",
    "reshape",
    "reshape_as",
    "flatten",
    "unflatten",
    "permute",
    "transpose",
    "swapaxes",
    "movedim",
    "t",
    "contiguous",
    "squeeze",
    "unsqueeze",
    "chunk",
    "split",
    "tensor_split",
    "unbind",
    "narrow",
    "roll",
    "flip",
    "fliplr",
    "flipud",
    "rot90",
    "tile",
    "repeat_interleave",
    "index_select",
    "gather",
    "amax",
    "amin",
    "expand",
    "expand_as",
    "repeat",
    "to",
    "type_as",
    "unfold",  # sliding windows (views that overlap): the gradient sums over the copies
    "float",
    "double",
    "clone",
}
PASS_FUNCTIONS: set[Any] = {
    F.relu,
    torch.relu,
    F.relu6,
    F.hardtanh,
    F.silu,
    F.gelu,
    F.hardswish,
    F.hardsigmoid,
    F.leaky_relu,
    F.elu,
    F.selu,
    F.celu,
    F.mish,
    F.softplus,
    F.prelu,
    torch.tanh,
    F.tanh,
    torch.sigmoid,
    F.sigmoid,
    torch.clamp,
    torch.clamp_min,
}
# x / ||x||, x / rms(x) (times a weight) with the norm held constant (as LayerNorm's sigma)
PASS_FUNCTIONS |= {F.normalize, F.rms_norm}
# a constant power of a signal is an element-wise function of it (StarReLU's relu(x) ** 2); the
# uniform rule of a product gives x * x the same: all of the relevance to x
PASS_FUNCTIONS |= {operator.pow, torch.pow, torch.square}
PASS_METHODS = {"relu", "sigmoid", "tanh", "clamp", "clamp_min", "hardswish", "gelu", "pow",
                "square"}
# Normalisation statistics of input-dependent tensors (GRN's ||x||, a hand-written norm's std):
# held constant, as LayerNorm's sigma (Ali et al. 2022): their value is computed, detached, and
# what is made of them only scales or shifts the signal.
STATISTIC_FUNCTIONS: set[Any] = {
    torch.norm, torch.linalg.norm, torch.linalg.vector_norm, torch.std, torch.var,
}
STATISTIC_METHODS = {"norm", "std", "var"}
# A factor or divisor of the signal made from a reduction of the input by element-wise
# arithmetic only (a hand-written RMSNorm's rsqrt(mean(x ** 2) + eps), LayerNorm's sqrt(var),
# BAT's p / p.sum()) is a normalisation statistic too: held constant where it meets the signal.
REDUCTION_FUNCTIONS: set[Any] = {torch.mean, torch.sum, torch.amax, torch.amin,
                                 *STATISTIC_FUNCTIONS}
REDUCTION_METHODS = {"mean", "sum", "amax", "amin", *STATISTIC_METHODS}
ELEMENTWISE_FUNCTIONS: set[Any] = {
    operator.pow, torch.pow, torch.sqrt, torch.rsqrt, torch.reciprocal, torch.square, torch.abs,
    torch.clamp, torch.clamp_min, torch.exp, torch.log, torch.unsqueeze, torch.squeeze,
    torch.reshape,
}
ELEMENTWISE_METHODS = {"pow", "sqrt", "rsqrt", "reciprocal", "square", "abs", "clamp",
                       "clamp_min", "exp", "log", "unsqueeze", "squeeze", "view", "reshape",
                       "expand", "expand_as", "to", "float", "double", "type_as"}
# max/min with a dim (values and indices) or over everything: winner takes all, as max-pools
EXTREMA_FUNCTIONS: set[Any] = {torch.max, torch.min}
EXTREMA_METHODS = {"max", "min"}
# x @ W with a constant 2-D W is a Linear layer (its weight W^T); addmm(b, x, W) with its bias
MATMUL_FUNCTIONS: set[Any] = {operator.matmul, torch.matmul, torch.mm}
MATMUL_METHODS = {"matmul", "mm"}
# Fused arithmetic decomposed into + and * before the rules are assigned.
FUSED_ARITHMETIC = {"addcmul": operator.mul, "addcdiv": operator.truediv}
GATE_FUNCTIONS = {torch.sigmoid, F.sigmoid, F.hardsigmoid}
NONNEG_FUNCTIONS = {F.relu, torch.relu, F.relu6, torch.sigmoid, F.sigmoid, F.hardsigmoid, F.softplus}
POOL_FUNCTIONS = {
    F.avg_pool1d,
    F.avg_pool2d,
    F.avg_pool3d,
    F.adaptive_avg_pool1d,
    F.adaptive_avg_pool2d,
    F.adaptive_avg_pool3d,
    torch.mean,
    torch.sum,
    F.fold,  # sums overlapping patches
}
POOL_METHODS = {"mean": torch.mean, "sum": torch.sum}
# Resampling: nearest copies inputs (the gradient moves relevance, summed over the copies); the
# other modes are fixed linear maps (bilinear, bicubic, area weights): the sum rule, as pools.
INTERPOLATE_FUNCTIONS: set[Any] = {F.interpolate, F.upsample, F.upsample_nearest, F.upsample_bilinear}
NEAREST_MODES = ("nearest", "nearest-exact")
# Softmax outputs: a gate when they multiply a signal element-wise (selective kernel, split
# attention); attention weights when a matmul reads them.
SOFTMAX_FUNCTIONS: set[Any] = {F.softmax, torch.softmax}
ADD = {operator.add, operator.iadd, torch.add}
SUB = {operator.sub, operator.isub, torch.sub, torch.subtract}
MUL = {operator.mul, operator.imul, torch.mul, torch.multiply}
DIV = {operator.truediv, operator.itruediv, torch.div, torch.true_divide}
NEG = {operator.neg, torch.neg}
# Results that carry no relevance even when computed from the input (shapes, new constants).
SHAPE_FUNCTIONS: set[Any] = {len, torch._assert, torch.zeros_like, torch.ones_like, torch.empty_like}
SHAPE_METHODS = {"size", "dim", "numel", "new_zeros", "new_ones", "new_empty", "new_full", "new_tensor"}
LAYER_FUNCTIONS = {
    F.linear,
    F.conv1d,
    F.conv2d,
    F.conv3d,
    F.batch_norm,
    F.layer_norm,
    F.group_norm,
    F.local_response_norm,
}
OUTPUT_SOFTMAX = {F.log_softmax, torch.log_softmax}
# Concatenations whose constant operands (a class token) absorb relevance, measured per sample.
CONCAT_FUNCTIONS = {torch.cat, torch.concat, torch.concatenate, torch.stack}
# fx-wrapped (leaf) attention functions the engine re-runs op by op with its rules.
WINDOW_ATTENTION = {swin_transformer.shifted_window_attention}
_ARITHMETIC_METHODS = {"add": ADD, "sub": SUB, "mul": MUL, "div": DIV, "neg": NEG}


def _method(node: fx.Node) -> str:
    """A call_method's name without the in-place underscore (``add_`` -> ``add``)."""
    name = str(node.target)
    return name[:-1] if name.endswith("_") and not name.startswith("_") else name


def _op_name(node: fx.Node) -> str:
    if node.op == "call_method":
        return f"Tensor.{node.target}"
    if node.op == "call_function":
        return getattr(node.target, "__name__", str(node.target))
    return str(node.target)


def _arith(node: fx.Node) -> str | None:
    """'add', 'sub', 'mul', 'div' or 'neg' for the arithmetic forms fx records, else None."""
    if node.op == "call_method":
        return _method(node) if _method(node) in _ARITHMETIC_METHODS else None
    if node.op == "call_function":
        for name, targets in _ARITHMETIC_METHODS.items():
            if node.target in targets:
                return name
    return None


# ------------------------------------------------------------------ recording layer relevance
@dataclass
class LayerRecords:
    """What the probes record during one explanation: per-sample sums at every module's output
    (``sums``, None when not asked for) and the relevance tensor itself at the modules in
    ``keep`` (``maps``). A module called more than once gets the sum over its calls."""

    sums: dict[str, Tensor] | None = None
    keep: frozenset[str] = frozenset()
    maps: dict[str, Tensor] = field(default_factory=dict)


_RECORDS: contextvars.ContextVar[LayerRecords | None] = contextvars.ContextVar(
    "lrp_records", default=None
)


def record_relevance(x: Any, path: str) -> None:
    """Probe at a module's output: while recording, add the relevance there to ``path``'s
    records."""
    records = _RECORDS.get()
    if records is None or not isinstance(x, Tensor) or not x.requires_grad:
        return
    if records.sums is None and path not in records.keep:
        return

    def hook(g: Tensor | None) -> None:
        if g is None:  # a gate branch: no relevance reaches it
            return
        g = g.detach()
        if records.sums is not None:
            total = g.flatten(1).sum(1)
            records.sums[path] = records.sums[path] + total if path in records.sums else total
        if path in records.keep:  # a copy: the rules below may reuse the gradient's storage
            maps = records.maps
            maps[path] = maps[path] + g if path in maps else g.clone()

    x.register_hook(hook)


# ------------------------------------------------------------------ relevance absorbed by tokens
_ABSORBED: contextvars.ContextVar[list[tuple[Tensor, int, str]] | None] = contextvars.ContextVar(
    "lrp_absorbed", default=None
)


def absorb_token(c: Tensor, dim: int | None, path: str) -> Tensor:
    """A constant operand of a concatenation with input-dependent tensors (ViT's class token).

    The relevance that reaches it is absorbed, like a bias's share. While the explainer collects
    (:class:`collecting`), the constant is replaced by a detached leaf whose gradient is that
    relevance, recorded with its batch dim: dim 0, or dim 1 for a concatenation along dim 0
    (sequence-first layouts); ``dim=None`` marks a stack (batch dim 0). Otherwise it is ``c``.
    """
    taps = _ABSORBED.get()
    if taps is None or not isinstance(c, Tensor) or not c.is_floating_point() or (
        not torch.is_grad_enabled()
    ):
        return c
    leaf = c.detach().requires_grad_(True)
    batch = 0 if dim is None or c.ndim < 2 or dim % c.ndim != 0 else 1
    taps.append((leaf, batch, path))
    return leaf


class collecting:  # noqa: N801 (a context manager used like a function)
    """``with collecting(taps):`` records the constant tokens' leaves (:func:`absorb_token`)."""

    def __init__(self, taps: list[tuple[Tensor, int, str]]) -> None:
        self.taps = taps

    def __enter__(self) -> None:
        self.token = _ABSORBED.set(self.taps)

    def __exit__(self, *exc: object) -> None:
        _ABSORBED.reset(self.token)


class recording:  # noqa: N801 (a context manager used like a function)
    """``with recording(records):`` lets the probes fill ``records`` (:class:`LayerRecords`)."""

    def __init__(self, records: LayerRecords) -> None:
        self.records = records

    def __enter__(self) -> None:
        self.token = _RECORDS.set(self.records)

    def __exit__(self, *exc: object) -> None:
        _RECORDS.reset(self.token)


# ------------------------------------------------------------------ the builder
@dataclass
class GraphSettings:
    """What the graph pass needs from the explainer."""

    composite: Composite
    residual: str
    lrn_rule: Rule
    cache_weights: bool = False
    attention: str = "attnlrp"


@dataclass
class Prepared:
    """The prepared copy and what was decided for it."""

    module: fx.GraphModule
    rules: dict[str, Rule] = field(default_factory=dict)
    first_layer: str | None = None
    first_module: nn.Module | None = None
    # the first layer's input channels when it reads the model's input directly (else None)
    input_channels: int | None = None


def prepare(
    model: nn.Module, settings: GraphSettings, example: Tensor | None = None
) -> Prepared:
    """Build the prepared copy from ``model`` (already the explainer's private eval-mode copy);
    with an ``example`` input, traced with its shapes known (valid for that shape only)."""
    keys = settings.composite.rules
    leaf_paths = [k for k in keys if isinstance(k, str)]
    # a module type the composite names is one layer with that rule (exact type: a subclass
    # that overrides forward, e.g. timm's Conv2dSame for nn.Conv2d, is still traced through)
    leaf_types = [t for k in keys if not isinstance(k, str)
                  for t in (k if isinstance(k, tuple) else (k,))]
    return _Builder(model, trace(model, leaf_paths, leaf_types, example), settings).build()


class _Builder:
    def __init__(self, root: nn.Module, traced: Traced, settings: GraphSettings) -> None:
        self.root = root
        self.graph = traced.graph
        self.outputs = traced.outputs
        self.s = settings
        self.options = settings.composite.options
        self.rules: dict[str, Rule] = {}
        self.display: dict[str, str] = {}  # engine-made module targets -> path shown to users
        self.owners: dict[str, str] = {}  # engine-made module targets -> the owning module
        self.replaced: dict[fx.Node, fx.Node] = {}
        self.folds: dict[str, tuple[Tensor, Tensor]] = {}
        # activations run inside the next layer (``fuse_input_activations``): kept at their paths
        self.fused: dict[str, nn.Module] = {}
        self.counter = 0
        # library pads traced as one call (timm's TF 'same' padding, lrp.tracing) move relevance
        # as their gradient does
        self.pads = library_pads()
        self.gradient_functions = GRADIENT_FUNCTIONS | set(self.pads)
        placeholders = [n for n in self.graph.nodes if n.op == "placeholder"]
        if not placeholders:
            raise InvalidInputError(f"{type(root).__name__}.forward takes no input")
        self.input = placeholders[0]
        self.index = {n: i for i, n in enumerate(self.graph.nodes)}

    # ---------------------------------------------------------------- helpers
    def module(self, node: fx.Node) -> nn.Module:
        return self.root.get_submodule(str(node.target))

    def path(self, node: fx.Node) -> str:
        if node.op == "call_module":
            return self.display.get(str(node.target), str(node.target))
        return scope(node)

    def where(self, node: fx.Node) -> str:
        """"'op' in Type at 'path' (file:line: code)" for error messages."""
        target = str(node.target)
        made = node.op == "call_module" and target in self.display
        owner_path = scope(node) if node.op != "call_module" or made else target
        if made:
            owner_path = self.owners.get(target, "")
        try:
            owner = type(self.root.get_submodule(owner_path)).__name__
        except AttributeError:
            owner = type(self.root).__name__
        op = f"'{self.display[target].rpartition('.')[2]}' in " if made else ""
        src = source(node)
        return f"{op}{owner} at '{owner_path or '<root>'}'" + (f" ({src})" if src else "")

    def new_target(self, module: nn.Module, node: fx.Node) -> str:
        """Register an engine-made module for ``node``; shown as 'owner path.op name'."""
        self.counter += 1
        name = f"_lrp_{self.counter}"
        self.root.add_module(name, module)
        self.owners[name] = scope(node)
        self.display[name] = ".".join(p for p in (scope(node), node.name) if p)
        return name

    def replace(self, node: fx.Node, new: fx.Node) -> None:
        new.meta.update({k: v for k, v in node.meta.items() if k not in new.meta})
        node.replace_all_uses_with(new)
        self.graph.erase_node(node)
        self.replaced[node] = new
        self.index[new] = self.index[node]

    def resolve(self, node: fx.Node) -> fx.Node | None:
        while node in self.replaced:
            node = self.replaced[node]
        return node if node.graph is self.graph and node in self.index else None

    def set_module(self, target: str, module: nn.Module) -> None:
        parent, _, name = target.rpartition(".")
        setattr(self.root.get_submodule(parent) if parent else self.root, name, module)

    def dependent(self) -> set[fx.Node]:
        """Nodes whose value depends on the input (shape queries excepted)."""
        dep = {self.input}
        for node in self.graph.nodes:
            if node.op not in ("call_module", "call_function", "call_method"):
                continue
            if _shape_query(node) or getattr(node.target, "held_constant", False):
                continue
            if any(a in dep for a in node.all_input_nodes):
                dep.add(node)
        return dep

    def constant(self, arg: Any) -> Any:
        """The value of an argument that does not depend on the input, computed now."""
        def value(node: fx.Node) -> Any:
            if node.op == "get_attr":
                obj: Any = self.root
                for part in str(node.target).split("."):
                    obj = getattr(obj, part)
                return obj
            if node.op == "placeholder":
                return node.args[0] if node.args else None
            args = fx.node.map_arg(node.args, value)
            kwargs = fx.node.map_arg(node.kwargs, value)
            with torch.no_grad():
                if node.op == "call_module":
                    return self.module(node)(*args, **kwargs)
                if node.op == "call_method":
                    return getattr(args[0], str(node.target))(*args[1:], **kwargs)
                return node.target(*args, **kwargs)

        return fx.node.map_arg(arg, value)

    def reads_input(self, arg: Any) -> bool:
        """Whether an argument that carries no relevance is still computed from the input (a
        shape query): it is then only known when the model runs."""
        stack, seen = list(_iter_nodes(arg)), set()
        while stack:
            n = stack.pop()
            if n is self.input:
                return True
            if n not in seen:
                seen.add(n)
                stack.extend(n.all_input_nodes)
        return False

    def unsupported(self, node: fx.Node, what: str) -> UnsupportedOperationError:
        return UnsupportedOperationError(
            f"{what} at {self.where(node)}: the engine has no LRP rule for it and will not fall "
            "back to the plain gradient. Wrap the code in a module and give that module a rule "
            "by path (composite={..., 'path.to.module': rule}), or, if it only chains its "
            "children in registration order, decorate its class with lrp.register_container."
        )

    # ---------------------------------------------------------------- passes
    def build(self) -> Prepared:
        self.functionalize()
        self.decompose()
        self.hold_statistics()
        self.index = {n: i for i, n in enumerate(self.graph.nodes)}
        self.kinds = {n: _kind(n, self) for n in self.graph.nodes}
        self.dep = self.dependent()
        if self.hold_statistic_operands():
            self.dep = self.dependent()
        self.linear_products()
        self.functional_layers()
        self.fuse_padding()
        if self.s.composite.fold_batchnorm:
            self.fold_batchnorms()
        self.first_node = next(
            (n for n in self.graph.nodes if n.op == "call_module" and n in self.dep
             and isinstance(self.module(n), LINEAR_TYPES)),
            None,
        )
        first_module = self.module(self.first_node) if self.first_node is not None else None
        first_path = self.path(self.first_node) if self.first_node is not None else None
        input_channels = None
        if (self.first_node is not None and self.first_node.args
                and self.first_node.args[0] is next(iter(self.graph.nodes))
                and not isinstance(first_module, nn.Linear)):
            input_channels = first_module.in_channels
        self.stem_pool = self.find_stem_pool()
        self.pending_merges: dict[fx.Node, list[tuple[fx.Node, float]]] = {}
        self.wrapped: set[str] = set()
        live = self.live()
        for node in list(self.graph.nodes):
            if node.graph is not self.graph or node not in self.dep or node not in live:
                continue
            if node.op == "call_module":
                self.wrap_module(node)
            elif node.op in ("call_function", "call_method"):
                self.rewrite_function(node)
        self.finish_merges()
        self.check_output()
        self.mark_signs()
        self.fuse_input_activations()
        self.recompute_normalised_inputs()
        self.derive_merge_terms()
        self.mark_inplace_activations()
        self.add_probes()
        self.retarget_attributes()
        self.graph.lint()
        gm = fx.GraphModule(self.root, self.graph, class_name=type(self.root).__name__)
        present = dict(gm.named_modules())
        for path, module in self.fused.items():  # no node calls them: the copy would drop them
            if path not in present:
                gm.add_submodule(path, module)
        gm.eval()
        return Prepared(gm, self.rules, first_path, first_module, input_channels)

    def retarget_attributes(self) -> None:
        """A parameter read from a module the engine wrapped (``self.norm.weight`` next to a
        call of ``self.norm``) is read from the wrapped module (``norm.module.weight``)."""
        for node in self.graph.nodes:
            if node.op != "get_attr":
                continue
            obj: Any = self.root
            parts: list[str] = []
            for part in str(node.target).split("."):
                if isinstance(obj, ModuleRuleLayer) and part not in obj._modules | obj._parameters | obj._buffers:
                    obj = obj.module
                    parts.append("module")
                obj = getattr(obj, part)
                parts.append(part)
            node.target = ".".join(parts)

    def functionalize(self) -> None:
        """In-place tensor operations (``out.mul_(g)`` whose result is not used, ``F.relu(x,
        inplace=True)``, ``x += y``) change their first argument: every later reader of that
        tensor reads the operation's result instead. The rules then run out of place and the
        prepared copy computes what the model computes (timm's NF-ResNets scale the residual
        branch by ``out.mul_(skipinit_gain)``; torch.fx records that as a node nobody reads)."""
        order = {n: i for i, n in enumerate(self.graph.nodes)}
        for node in list(self.graph.nodes):
            target = node.args[0] if node.args else None
            if not isinstance(target, fx.Node) or not _inplace(node):
                continue
            for user in list(target.users):
                if user is not node and order[user] > order[node]:
                    user.replace_input_with(target, node)

    def decompose(self) -> None:
        """``torch.addcmul(a, b, c, value=v)`` / ``addcdiv`` (and the methods) become
        ``a + (b * c) * v`` / ``a + (b / c) * v``, so each part gets its rule (ResMLP's
        ``Affine``, ConvNeXt-V2's GRN: ``addcmul(bias, weight, x)`` is a scaling and a bias)."""
        for node in list(self.graph.nodes):
            name = (_method(node) if node.op == "call_method" else
                    getattr(node.target, "__name__", "") if node.target in (
                        torch.addcmul, torch.addcdiv) else "")
            if name not in FUSED_ARITHMETIC:
                continue
            fn = getattr(torch, name)
            k = _call_kwargs(fn, node.args, node.kwargs) or {}
            if not {"input", "tensor1", "tensor2"} <= set(k):
                continue
            with self.graph.inserting_before(node):
                part = self.graph.call_function(FUSED_ARITHMETIC[name], (k["tensor1"], k["tensor2"]))
                parts = [part]
                if k.get("value", 1) != 1:
                    part = self.graph.call_function(operator.mul, (part, k["value"]))
                    parts.append(part)
                new = self.graph.call_function(operator.add, (k["input"], part))
            for n in (*parts, new):
                n.meta.update(node.meta)
            node.replace_all_uses_with(new)
            self.graph.erase_node(node)
            self.outputs = [(p, new if n is node else n) for p, n in self.outputs]

    def hold_statistics(self) -> None:
        """Norms, standard deviations and variances computed from the input become detached
        calls (:func:`held_constant_of`); :meth:`dependent` then counts them, and what is made
        of them alone, as constants: dividing or multiplying the signal by them is a scaling."""
        for node in list(self.graph.nodes):
            if node.op == "call_method" and _method(node) in STATISTIC_METHODS:
                fn: Any = getattr(torch.Tensor, _method(node))
            elif node.op == "call_function" and node.target in STATISTIC_FUNCTIONS:
                fn = node.target
            else:
                continue
            with self.graph.inserting_before(node):
                new = self.graph.call_function(held_constant_of(fn), node.args, node.kwargs)
            new.meta.update(node.meta)
            node.replace_all_uses_with(new)
            self.graph.erase_node(node)

    def is_statistic(self, node: Any, memo: dict[fx.Node, bool]) -> bool:
        """Whether input-dependent ``node`` is a reduction of the input (a mean, sum, max or
        norm) carried through element-wise arithmetic only."""
        if not isinstance(node, fx.Node) or node not in self.dep:
            return False
        if node not in memo:
            if node.op == "call_method":
                name = _method(node)
                reduction = name in REDUCTION_METHODS
                elementwise = name in ELEMENTWISE_METHODS or _arith(node) is not None
            elif node.op == "call_function":
                reduction = node.target in REDUCTION_FUNCTIONS
                elementwise = node.target in ELEMENTWISE_FUNCTIONS or _arith(node) is not None
            else:
                reduction = elementwise = False
            deps = [a for a in node.all_input_nodes if a in self.dep]
            memo[node] = reduction or (elementwise and bool(deps) and all(
                self.is_statistic(a, memo) for a in deps))
        return memo[node]

    def hold_statistic_operands(self) -> bool:
        """A statistic (:meth:`is_statistic`) that divides the signal, or multiplies it, is held
        constant there (:func:`held_statistic`): the signal then gets all the relevance of the
        product, as LayerNorm's input does with sigma held (Ali et al. 2022). What the statistic
        was computed from then carries no relevance (:meth:`live`). Returns whether any was held."""
        memo: dict[fx.Node, bool] = {}
        held = False
        for node in list(self.graph.nodes):
            arith = _arith(node)
            if arith not in ("mul", "div") or node not in self.dep or len(node.args) < 2:
                continue
            a, b = node.args[0], node.args[1]
            stats = [self.is_statistic(f, memo) for f in (a, b)]
            if not all(isinstance(f, fx.Node) and f in self.dep for f in (a, b)) or all(stats):
                continue
            factor = b if stats[1] else a if stats[0] and arith == "mul" else None
            if factor is None:
                continue
            with self.graph.inserting_before(node):
                new = self.graph.call_function(held_statistic, (factor,))
            new.meta.update(factor.meta)
            node.replace_input_with(factor, new)
            held = True
        return held

    def live(self) -> set[fx.Node]:
        """Input-dependent nodes the relevance reaches: those the output depends on through
        input-dependent nodes. The rest (what only a held statistic reads) keep their op."""
        out = next(n for n in self.graph.nodes if n.op == "output")
        stack, live = [out], set()
        while stack:
            node = stack.pop()
            for a in node.all_input_nodes:
                if a in self.dep and a not in live:
                    live.add(a)
                    stack.append(a)
        return live

    def linear_products(self) -> None:
        """``x @ W``, ``torch.mm(x, W)`` and ``torch.addmm(b, x, W)`` with a constant 2-D ``W``
        (and ``b``) become ``F.linear(x, W^T, b)``: the composite's Linear rule, not the rule of
        a product of two tensors."""
        for node in list(self.graph.nodes):
            if node not in self.dep or node.kwargs.keys() - {"input", "mat1", "mat2", "other"}:
                continue
            bias = None
            if (node.op == "call_function" and node.target in MATMUL_FUNCTIONS) or (
                    node.op == "call_method" and _method(node) in MATMUL_METHODS):
                args = node.args
            elif node.op == "call_function" and node.target is torch.addmm and len(node.args) == 3:
                bias, *args = node.args
            else:
                continue
            if len(args) != 2 or any(isinstance(t, fx.Node) and (t in self.dep or self.reads_input(
                    t)) for t in (args[1], bias)) or args[0] not in self.dep:
                continue
            weight = self.constant(args[1])
            if not isinstance(weight, Tensor) or weight.ndim != 2:
                continue
            with self.graph.inserting_before(node):
                w = self.graph.call_method("t", (args[1],))
                new = self.graph.call_function(F.linear, (args[0], w, bias))
            self.index[w] = self.index[node]
            self.kinds[new] = ("function", F.linear)
            self.dep.add(new)
            self.replace(node, new)

    def functional_layers(self) -> None:
        """``F.linear``/``F.conv*``/``F.*_norm`` with constant parameters become modules sharing
        those tensors, so the layer rules and BatchNorm folding treat them like modules."""
        for node in list(self.graph.nodes):
            if node.op != "call_function" or node.target not in LAYER_FUNCTIONS:
                continue
            if node not in self.dep:
                continue
            kwargs = _call_kwargs(node.target, node.args, node.kwargs) or {}
            x = kwargs.pop("input", None)
            if not isinstance(x, fx.Node) or any(a in self.dep for a in _iter_nodes(kwargs)):
                raise self.unsupported(
                    node, f"'{_op_name(node)}' with input-dependent parameters"
                )
            values = {k: self.constant(v) for k, v in kwargs.items()}
            module = _layer_module(node.target, values)
            if module is None:
                raise self.unsupported(node, f"'{_op_name(node)}' in training mode")
            target = self.new_target(module, node)
            with self.graph.inserting_before(node):
                new = self.graph.call_module(target, (x,))
            self.kinds[new] = ("module", type(module))
            self.dep.add(new)
            self.replace(node, new)

    def zero_padding(self, node: fx.Node) -> PrePadding | None:
        """The zeros ``node`` adds around its input, if it is a constant-zero pad (``F.pad``, a
        ``ZeroPad``/``ConstantPad`` module with value 0, a library's 'same' pad)."""
        if node.op == "call_module":
            m = self.module(node)
            if type(m).forward is not nn.ConstantPad2d.forward or not isinstance(
                m, nn.ConstantPad1d | nn.ConstantPad2d | nn.ConstantPad3d) or m.value != 0:
                return None
            return tuple(m.padding)
        if node.op != "call_function" or self.reads_input((node.args[1:], node.kwargs)):
            return None
        if node.target in self.pads:
            args, kwargs = self.constant((node.args[1:], node.kwargs))
            return self.pads[node.target](None, *args, **kwargs)
        if node.target is not F.pad:
            return None
        k = _call_kwargs(F.pad, (None, *node.args[1:]), dict(node.kwargs)) or {}
        k = self.constant({name: v for name, v in k.items() if name != "input"})
        if k.get("mode", "constant") != "constant" or k.get("value") not in (None, 0):
            return None
        return tuple(int(v) for v in k["pad"])

    def fuse_padding(self) -> None:
        """A zero pad whose only reader is a convolution becomes that layer's pre-padding
        (:mod:`lrp.ops`): padded positions are no inputs, so the flat, w^2, z+-with-ones and
        z^B rules spread nothing onto them (as onto the convolution's own padding), which they
        would if the pad stayed a separate (gradient) step before the layer."""
        uses: dict[str, int] = {}
        for node in self.graph.nodes:
            if node.op == "call_module":
                uses[str(node.target)] = uses.get(str(node.target), 0) + 1
        for node in list(self.graph.nodes):
            if node.op != "call_module" or node not in self.dep or uses[str(node.target)] != 1:
                continue
            conv, pad = self.module(node), node.args[0] if node.args else None
            if not (isinstance(conv, CONV_TYPES) and _stock_forward_of(conv)
                    and conv.padding_mode == "zeros" and getattr(conv, "pre_padding", None) is None
                    and isinstance(pad, fx.Node) and pad in self.dep
                    and pad.op in ("call_module", "call_function") and pad.args
                    and isinstance(pad.args[0], fx.Node) and self.value_users(pad) == 1):
                continue
            padding = self.zero_padding(pad)
            dims = conv.weight.ndim - 2
            if isinstance(padding, tuple):
                if len(padding) > 2 * dims or len(padding) % 2:
                    continue
                padding = padding + (0,) * (2 * dims - len(padding))
                if not any(padding):
                    padding = None
            elif padding is not None and len(padding.kernel_size) != dims:
                continue
            if padding is None:
                continue
            self.set_module(str(node.target), with_pre_padding(conv, padding))
            node.args = (pad.args[0], *node.args[1:])
            self.outputs = [(p, n) for p, n in self.outputs if n is not pad]
            if not pad.users:
                self.graph.erase_node(pad)
                self.dep.discard(pad)

    def fold_batchnorms(self) -> None:
        uses: dict[str, int] = {}
        for node in self.graph.nodes:
            if node.op == "call_module":
                uses[str(node.target)] = uses.get(str(node.target), 0) + 1
        for node in list(self.graph.nodes):
            if node.op != "call_module" or not isinstance(self.module(node), BATCHNORM_TYPES):
                continue
            prev = node.args[0] if node.args else None
            if not (isinstance(prev, fx.Node) and prev.op == "call_module"):
                continue
            lin, bn = self.module(prev), self.module(node)
            if (self.value_users(prev) != 1 or uses[str(prev.target)] != 1
                    or uses[str(node.target)] != 1):
                continue
            if str(prev.target) in self.folds or not can_fold(lin, bn):
                continue
            self.folds[str(prev.target)] = batchnorm_affine(lin, bn)
            for i, (p, n) in enumerate(self.outputs):
                if n is node:
                    self.outputs[i] = (p, prev)
            node.replace_all_uses_with(prev)
            self.graph.erase_node(node)
            self.replaced[node] = prev

    def find_stem_pool(self) -> fx.Node | None:
        """Otsuki et al.'s stem pool: the first max-pool, if it is a 3x3 stride-2 pool with
        padding 1 (the ResNet stem's, whose output a 2x2 average pool reproduces) and no residual
        merge comes before it. Other max-pools stay winner-takes-all."""
        if self.s.composite.stem_pool is None:
            return None
        for node in self.graph.nodes:
            if node not in self.dep:
                continue
            kind = self.kinds.get(node)
            if kind and kind[0] == "module" and issubclass(kind[1], MAXPOOL_MODULES):
                m = self.module(node)
                hyper = (getattr(m, "kernel_size", None), getattr(m, "stride", None),
                         getattr(m, "padding", None), getattr(m, "dilation", 1))
                return node if _is_stem_pool(*hyper) else None
            if node.op == "call_function" and node.target in MAXPOOL_FUNCTIONS:
                k = _call_kwargs(node.target, node.args, node.kwargs) or {}
                hyper = (k.get("kernel_size"), k.get("stride"), k.get("padding", 0),
                         k.get("dilation", 1))
                return node if _is_stem_pool(*hyper) else None
            if _arith(node) in ("add", "sub") and sum(
                a in self.dep for a in node.all_input_nodes
            ) >= 2:
                return None
        return None

    # ---------------------------------------------------------------- modules
    def proportional(self) -> Proportional:
        """The sum rule of average pools, means and sums, with the composite's stabiliser."""
        o = self.options
        return Proportional(o["stabilizer"], stabilizer_share=o.get("stabilizer_share", "absorb"))

    def module_rule(self, node: fx.Node, path: str, module: nn.Module) -> Rule | None:
        composite = self.s.composite
        if node is self.stem_pool:
            return composite.stem_pool
        rule = composite.rule_for(path, module, is_first=node is self.first_node)
        if rule is not None:
            return rule
        if isinstance(module, GRADIENT_MODULES):
            return None
        if isinstance(module, PASS_MODULES):
            return Pass()
        if isinstance(module, POOL_MODULES):
            return self.proportional()
        if isinstance(module, nn.Upsample):
            return None if module.mode in NEAREST_MODES else self.proportional()
        if isinstance(module, nn.LocalResponseNorm):
            return self.s.lrn_rule
        eps, zero_bias = self.options["epsilon"], self.options["zero_bias"]
        if isinstance(module, BATCHNORM_TYPES):  # not folded: no Linear/Conv feeds it alone
            return AffineEpsilon(eps, zero_bias)
        if isinstance(module, nn.GroupNorm):
            return GroupNormRule(eps, zero_bias)
        if isinstance(module, nn.LayerNorm):
            return LayerNormRule(eps, zero_bias)
        if isinstance(module, INSTANCENORM):
            if uses_running_stats(module):
                return AffineEpsilon(eps, zero_bias)
            return InstanceNormRule(eps, zero_bias)
        where = self.where(node)
        if isinstance(module, LINEAR_TYPES):
            raise UnsupportedLayerError(f"composite '{composite.name}' assigns no rule to {where}")
        if isinstance(module, nn.Softmax | nn.LogSoftmax):
            raise UnsupportedLayerError(
                f"{where}: explain the logits; remove the final softmax (use output='probability')"
            )
        raise UnsupportedLayerError(
            f"no LRP rule for {where}. Supported: Linear/Conv, BatchNorm, LayerNorm/GroupNorm, "
            "pooling, element-wise activations, LocalResponseNorm, reshapes, residual additions, "
            "gates (docs/ENGINE_API.md). Give it a rule by path: composite={..., '" + path
            + "': rule}."
        )

    def wrap_module(self, node: fx.Node) -> None:
        target = str(node.target)
        module = self.module(node)
        if (isinstance(module, nn.Softmax) and self.path(node) not in self.s.composite.rules
                and not self.is_final(node)):  # inside the model: as F.softmax there
            with self.graph.inserting_before(node):
                call = self.graph.call_function(F.softmax, (node.args[0], module.dim))
            self.kinds[call] = ("function", F.softmax)
            self.dep.add(call)
            self.replace(node, call)
            return self.to_attention(call, attention.softmax)
        if target in self.wrapped:
            return
        self.wrapped.add(target)
        path = self.path(node)
        if isinstance(module, ResidualMerge | LinearRuleLayer | ModuleRuleLayer):
            return
        if isinstance(module, nn.MultiheadAttention) and path not in self.s.composite.rules:
            self.set_module(target, attention.MultiheadAttentionLRP(
                module, self.wrap_projection, path, mode=self.s.attention,
                epsilon=self.options["epsilon"]))
            return
        rule = self.module_rule(node, path, module)
        fold = self.folds.get(target)
        if fold is not None and not isinstance(rule, LinearRule):
            materialize_fold(module, *fold)  # the module runs its own forward
        if rule is None:
            return
        self.rules[path] = rule
        if isinstance(rule, LinearRule):
            if not isinstance(module, LINEAR_TYPES):
                raise UnsupportedLayerError(
                    f"{rule!r} needs a Linear/Conv layer, but '{path}' is {type(module).__name__}"
                )
            if not stock_linear_forward(module):
                raise UnsupportedLayerError(
                    f"'{path}' is a {type(module).__name__} whose forward is not "
                    f"{type(module).__mro__[1].__name__}'s (it computes its weight or pads "
                    "itself); a linear rule would run the plain layer instead. Leave its path and "
                    "type out of the composite: the engine then traces its forward and gives the "
                    "layer call inside it the composite's rule for nn.Linear/nn.ConvNd."
                )
            extra = next((n for n in self.graph.nodes if n.op == "call_module"
                          and n.target == node.target and (len(n.args) > 1 or n.kwargs)), None)
            if extra is not None:
                given = [*(repr(a) for a in extra.args[1:]), *extra.kwargs]
                raise UnsupportedOperationError(
                    f"'{path}' ({type(module).__name__}) is called with more than its input "
                    f"({', '.join(given)}); a linear rule runs the layer on its input alone "
                    "(for a ConvTranspose, set its output_padding instead of passing output_size)"
                )
            scale, bias = fold if fold is not None else (None, None)
            wrapped: nn.Module = LinearRuleLayer(
                module, rule, path, scale=scale, bias=bias, cache_weights=self.s.cache_weights
            )
        elif isinstance(rule, ModuleRule):
            wrapped = ModuleRuleLayer(module, rule, path)
        else:
            raise InvalidInputError(f"rule for '{path}' must be a lrp.rules rule, got {rule!r}")
        self.set_module(target, wrapped)

    def wrap_projection(self, linear: nn.Linear, path: str) -> nn.Module:
        """The composite's rule on an attention projection (MultiheadAttention's in/out proj)."""
        rule = self.s.composite.rule_for(path, linear, is_first=False)
        if not isinstance(rule, LinearRule):
            raise UnsupportedLayerError(
                f"composite '{self.s.composite.name}' assigns no Linear rule to the attention "
                f"projection '{path}'"
            )
        self.rules[path] = rule
        return LinearRuleLayer(linear, rule, path, cache_weights=self.s.cache_weights)

    def to_attention(self, node: fx.Node, fn: Callable[..., Tensor]) -> None:
        """Softmax, products of input-dependent tensors and fused attention: the attention rules
        of ``attention=`` (CP-LRP or AttnLRP)."""
        mode = self.s.attention
        if fn is attention.softmax:
            if self.is_final(node):
                raise self.softmax_error(node)
            target = F.softmax if node.op == "call_method" else node.target
            k = _call_kwargs(target, node.args, node.kwargs) or {}
            x = k.pop("input", node.args[0])
            args, kwargs = (x, k.get("dim", -1)), {"mode": mode, "dtype": k.get("dtype")}
        else:  # a constant operand (a parameter: it may require grad) gets no relevance
            args = fx.node.map_arg(node.args, lambda a: a if a in self.dep else self.detached(a))
            kwargs = {**node.kwargs, "mode": mode, "epsilon": self.options["epsilon"]}
        with self.graph.inserting_before(node):
            new = self.graph.call_function(fn, args, kwargs)
        self.kinds[new] = ("attention", fn)
        self.dep.add(new)
        self.replace(node, new)

    def detached(self, node: fx.Node) -> fx.Node:
        with self.graph.inserting_after(node):
            new = self.graph.call_method("detach", (node,))
        self.index[new] = self.index[node]
        return new

    def tap_constants(self, node: fx.Node) -> None:
        """Constant operands of a cat/stack with input-dependent ones go through
        :func:`absorb_token`, so the relevance they absorb is reported per sample."""
        tensors = node.args[0] if node.args else node.kwargs.get("tensors")
        if not isinstance(tensors, list | tuple):
            return
        if node.target is torch.stack:
            dim = None
        else:
            dim = node.args[1] if len(node.args) > 1 else node.kwargs.get("dim", 0)
            if not isinstance(dim, int):
                raise self.unsupported(node, f"'{_op_name(node)}' along a computed dim")
        new = []
        for t in tensors:
            if isinstance(t, fx.Node) and t not in self.dep:
                with self.graph.inserting_before(node):
                    t = self.graph.call_function(absorb_token, (t, dim, self.path(node)))
            new.append(t)
        if node.args:
            node.args = (type(tensors)(new), *node.args[1:])
        else:
            node.kwargs = {**node.kwargs, "tensors": type(tensors)(new)}

    def to_window_attention(self, node: fx.Node) -> None:
        """torchvision Swin's fx-wrapped ``shifted_window_attention`` (V1 and V2): a module running
        it op by op with the engine's rules (:class:`attention.ShiftedWindowAttentionLRP`)."""
        bound = inspect.signature(node.target).bind(*node.args, **node.kwargs)
        bound.apply_defaults()
        a = dict(bound.arguments)
        if a["input"] not in self.dep or any(
            isinstance(v, fx.Node) and v in self.dep for k, v in a.items() if k != "input"
        ):
            raise self.unsupported(node, "'shifted_window_attention' with input-dependent weights")
        logit_scale = a["logit_scale"]

        def linear(weight: Any, bias: Any, name: str, zero_key_bias: bool = False) -> nn.Module:
            w, b = self.constant(weight), self.constant(bias)
            if zero_key_bias and b is not None:  # V2 zeroes the key bias (torchvision does too)
                b = b.clone()
                b[b.numel() // 3 : 2 * (b.numel() // 3)] = 0
            attr = isinstance(weight, fx.Node) and weight.op == "get_attr"
            path = (str(weight.target).rpartition(".")[0] if attr else "") or ".".join(
                p for p in (scope(node), name) if p)
            return self.wrap_projection(attention._view_linear(w, b), path)

        module = attention.ShiftedWindowAttentionLRP(
            linear(a["qkv_weight"], a["qkv_bias"], "qkv", logit_scale is not None),
            linear(a["proj_weight"], a["proj_bias"], "proj"),
            scope(node), mode=self.s.attention, epsilon=self.options["epsilon"],
            zero_bias=self.options["zero_bias"])
        target = self.new_target(module, node)
        kwargs = {k: a[k] for k in ("window_size", "num_heads", "shift_size", "attention_dropout",
                                    "dropout", "logit_scale", "training")}
        with self.graph.inserting_before(node):
            new = self.graph.call_module(target, (a["input"], a["relative_position_bias"]), kwargs)
        self.kinds[new] = ("attention", type(module))
        self.dep.add(new)
        self.replace(node, new)

    def is_final(self, node: fx.Node) -> bool:
        """Whether ``node``'s value is the model output (up to reshapes): an output softmax."""
        out = next(n for n in self.graph.nodes if n.op == "output").args[0]
        while isinstance(out, fx.Node) and out is not node and out.args and (
            (out.op == "call_method" and _method(out) in GRADIENT_METHODS)
            or (out.op == "call_function" and out.target in self.gradient_functions)
        ):
            out = out.args[0]
        return out is node

    # ---------------------------------------------------------------- functions and methods
    def rewrite_function(self, node: fx.Node) -> None:
        dep_args = [a for a in _iter_nodes((node.args, node.kwargs)) if a in self.dep]
        arith = _arith(node)
        if node.op == "call_method":
            name = _method(node)
            if name in GRADIENT_METHODS:
                return
            if name in PASS_METHODS:
                return self.to_passthrough(node, getattr(torch, name))
            if name in EXTREMA_METHODS and not list(_iter_nodes((node.args[1:], node.kwargs))):
                return
            if name in POOL_METHODS:
                return self.to_module_rule(node, POOL_METHODS[name], self.proportional())
            if name in attention.METHODS:
                return self.to_attention(node, attention.METHODS[name])
        elif node.op == "call_function":
            fn = node.target
            if fn is getattr:
                if node.args[1] in ("T", "mT", "values", "indices"):
                    return
                raise self.unsupported(node, f"attribute '{node.args[1]}' of a tensor")
            if fn in WINDOW_ATTENTION:
                return self.to_window_attention(node)
            if fn in CONCAT_FUNCTIONS:
                self.tap_constants(node)
            if fn in self.gradient_functions:
                if node is self.stem_pool:
                    return self.to_module_rule(node, fn, self.s.composite.stem_pool)
                if (fn in DROPOUT_FUNCTIONS or fn is stochastic_depth) and _training_flag(node):
                    raise self.unsupported(node, f"'{_op_name(node)}' in training mode")
                return
            if fn in PASS_FUNCTIONS:
                return self.to_passthrough(node, fn)
            if fn in EXTREMA_FUNCTIONS and not list(_iter_nodes((node.args[1:], node.kwargs))):
                return
            if fn in INTERPOLATE_FUNCTIONS:
                if _interpolation_mode(node) in NEAREST_MODES:
                    return  # copies of inputs: the gradient sums relevance over the copies
                return self.to_module_rule(node, fn, self.proportional())
            if fn in POOL_FUNCTIONS:
                return self.to_module_rule(node, fn, self.proportional())
            if fn in attention.FUNCTIONS:
                return self.to_attention(node, attention.FUNCTIONS[fn])
            if fn in attention.EQUATION_FUNCTIONS:
                ops = node.args[1:]
                ops = ops[0] if len(ops) == 1 and isinstance(ops[0], list | tuple) else ops
                if not isinstance(node.args[0], str) or len(ops) != 2:
                    raise self.unsupported(
                        node, f"'{_op_name(node)}' with {len(ops)} operands or no equation string "
                        "(the rule is for a product of two tensors)")
                return self.to_attention(node, attention.EQUATION_FUNCTIONS[fn])
            if fn in OUTPUT_SOFTMAX:
                raise self.softmax_error(node)
        if arith in ("add", "sub"):
            return self.to_sum(node, arith)
        if arith in ("mul", "div", "neg"):
            return self.to_product(node, arith, dep_args)
        raise self.unsupported(node, f"'{_op_name(node)}'")

    def softmax_error(self, node: fx.Node) -> UnsupportedLayerError:
        return UnsupportedLayerError(
            f"softmax at {self.where(node)}: explain the logits; remove the final softmax "
            "(use output='probability')"
        )

    def to_passthrough(self, node: fx.Node, fn: Any) -> None:
        x, *rest = node.args
        if any(isinstance(a, fx.Node) and a in self.dep for a in (*rest, *node.kwargs.values())):
            raise self.unsupported(node, f"'{_op_name(node)}' of several input-dependent tensors")
        if not (isinstance(x, fx.Node) and x in self.dep):  # e.g. 2 ** x: the exponent is
            raise self.unsupported(node, f"'{_op_name(node)}' of a constant by an input-dependent "
                                   "argument")
        kwargs = {k: v for k, v in node.kwargs.items() if k != "inplace"}
        with self.graph.inserting_before(node):
            new = self.graph.call_function(passthrough_of(fn), (x, *rest), kwargs)
        self.kinds[new] = self.kinds[node]
        self.dep.add(new)
        self.replace(node, new)

    def to_module_rule(self, node: fx.Node, fn: Any, rule: Rule | None) -> None:
        x, *rest = node.args
        if not isinstance(x, fx.Node) or x not in self.dep or any(
            isinstance(a, fx.Node) and a in self.dep for a in (*rest, *node.kwargs.values())
        ):
            raise self.unsupported(node, f"'{_op_name(node)}' of several input-dependent tensors")
        assert isinstance(rule, ModuleRule)
        if self.reads_input((rest, node.kwargs)):  # e.g. a size taken from a tensor's shape
            layer: nn.Module = FunctionRuleLayer(fn, rule)
            inputs, kwargs = (x, *rest), dict(node.kwargs)
        else:
            args = self.constant(tuple(rest))
            layer = ModuleRuleLayer(FunctionModule(fn, args, self.constant(dict(node.kwargs))), rule)
            inputs, kwargs = (x,), {}
        target = self.new_target(layer, node)
        layer.path = self.display[target]
        self.rules[layer.path] = rule
        with self.graph.inserting_before(node):
            new = self.graph.call_module(target, inputs, kwargs)
        self.kinds[new] = ("function", fn)
        self.dep.add(new)
        self.replace(node, new)

    def to_sum(self, node: fx.Node, arith: str) -> None:
        a, b = node.args[0], node.args[1] if len(node.args) > 1 else node.kwargs.get("other")
        alpha = node.kwargs.get("alpha", 1)
        sign = -1.0 if arith == "sub" else 1.0
        a_dep = isinstance(a, fx.Node) and a in self.dep
        b_dep = isinstance(b, fx.Node) and b in self.dep
        if a_dep and b_dep:
            terms: list[tuple[fx.Node, float]] = []
            for arg, coef in ((a, 1.0), (b, sign * alpha)):
                inner = self.pending_merges.get(arg)
                if (inner is not None and self.value_users(arg) == 1
                        and not self.is_module_output(arg)):
                    terms.extend((t, c * coef) for t, c in inner)
                    del self.pending_merges[arg]
                else:
                    terms.append((arg, coef))
            self.pending_merges[node] = terms
            return
        eps, zero_bias = self.options["epsilon"], self.options["zero_bias"]
        with self.graph.inserting_before(node):
            if a_dep:  # x + c, x - c
                const = b if sign * alpha == 1 else self.graph.call_function(
                    operator.mul, (b, sign * alpha))
                new = self.graph.call_function(bias_add, (a, const, eps, zero_bias))
            else:  # c + x, c - x
                x = b
                if sign * alpha != 1:
                    x = self.graph.call_function(passthrough_of(operator.mul), (b, sign * alpha))
                    self.dep.add(x)
                new = self.graph.call_function(bias_add, (x, a, eps, zero_bias))
        self.kinds[new] = ("bias", None)
        self.dep.add(new)
        self.replace(node, new)

    def value_users(self, node: fx.Node) -> int:
        """How many nodes read ``node``'s values (shape queries do not)."""
        return sum(1 for u in node.users if u in self.dep or u.op == "output")

    def is_module_output(self, node: fx.Node) -> bool:
        return any(n is node for _, n in self.outputs)

    def to_product(self, node: fx.Node, arith: str, dep_args: list[fx.Node]) -> None:
        if arith == "neg":
            fn, args = torch.neg, ()
            x = node.args[0]
        elif len(dep_args) == 1:
            x = dep_args[0]
            a, b = node.args[0], node.args[1] if len(node.args) > 1 else node.kwargs.get("other")
            if arith == "div" and x is not a:
                raise self.unsupported(node, "division by an input-dependent tensor")
            if arith == "div" and node.kwargs.get("rounding_mode") is not None:
                raise self.unsupported(node, "rounded division")
            fn = operator.mul if arith == "mul" else operator.truediv
            args = (b if x is a else a,)
        elif arith == "mul":
            return self.to_product_of_signals(node)
        else:
            raise self.unsupported(node, f"'{_op_name(node)}' of two input-dependent tensors")
        with self.graph.inserting_before(node):
            new = self.graph.call_function(passthrough_of(fn), (x, *args))
        self.kinds[new] = ("scale", fn)
        self.dep.add(new)
        self.replace(node, new)

    def to_product_of_signals(self, node: fx.Node) -> None:
        """``a * b`` of two input-dependent tensors: a gate if exactly one factor is one (all
        relevance to the other), else the uniform rule (half to each)."""
        a, b = node.args[0], node.args[1]
        gates = [f for f in (a, b) if isinstance(f, fx.Node) and self.is_gate(f)]
        with self.graph.inserting_before(node):
            if len(gates) == 1 and a is not b:
                signal = b if gates[0] is a else a
                new = self.graph.call_function(gate, (signal, gates[0]))
                self.kinds[new] = ("gate", None)
            else:
                new = self.graph.call_function(uniform_product, (a, b))
                self.kinds[new] = ("product", None)
        self.dep.add(new)
        self.replace(node, new)

    def is_gate(self, node: fx.Node) -> bool:
        """Whether ``node`` is a sigmoid/hard-sigmoid output, possibly reshaped or broadcast."""
        while True:
            kind = self.kinds.get(node)
            if kind is None:
                return False
            if kind[0] == "module" and issubclass(kind[1], (*GATE_MODULES, nn.Softmax)):
                return True
            if kind[0] == "function" and kind[1] in GATE_FUNCTIONS | SOFTMAX_FUNCTIONS:
                return True
            if kind[0] == "method" and kind[1] in ("sigmoid", "hardsigmoid", "softmax"):
                return True
            if kind == ("attention", attention.softmax):  # a softmax the graph pass rewrote
                return True
            reshaping = (kind[0] == "method" and kind[1] in GRADIENT_METHODS) or (
                kind[0] == "function" and kind[1] in self.gradient_functions | INTERPOLATE_FUNCTIONS
            ) or (kind[0] == "module" and issubclass(kind[1], (nn.Upsample, *GRADIENT_MODULES)))
            if not reshaping or not isinstance(node.args[0], fx.Node):
                return False
            node = node.args[0]

    def finish_merges(self) -> None:
        for node, terms in self.pending_merges.items():
            nodes = [self.resolve(t) or t for t, _ in terms]
            identity = [
                any(j != i and self.is_ancestor(nodes[i], nodes[j]) for j in range(len(nodes)))
                for i in range(len(nodes))
            ]
            order = sorted(range(len(nodes)), key=lambda i: identity[i])  # identity skips last
            merge = ResidualMerge(
                self.s.residual,
                identity=[identity[i] for i in order],
                coefficients=[terms[i][1] for i in order],
            )
            target = self.new_target(merge, node)
            with self.graph.inserting_before(node):
                new = self.graph.call_module(target, tuple(nodes[i] for i in order))
            self.kinds[new] = ("merge", None)
            self.dep.add(new)
            self.replace(node, new)

    def is_ancestor(self, a: fx.Node, b: fx.Node) -> bool:
        """Whether ``b`` is computed from ``a`` (``a`` reaches the merge as an identity skip)."""
        if a is b:
            return False
        limit = self.index[a]
        stack, seen = [b], set()
        while stack:
            n = stack.pop()
            for p in n.all_input_nodes:
                if p is a:
                    return True
                if p not in seen and p in self.dep and self.index.get(p, -1) > limit:
                    seen.add(p)
                    stack.append(p)
        return False

    def check_output(self) -> None:
        out = next(n for n in self.graph.nodes if n.op == "output")
        value = out.args[0]
        if not isinstance(value, fx.Node):
            raise InvalidInputError(
                f"{type(self.root).__name__}.forward must return one tensor (the logits), got a "
                f"{type(value).__name__}; wrap the model so that it returns the logits"
            )

    # ---------------------------------------------------------------- signs and memory
    def mark_signs(self) -> None:
        """Propagate 'provably >= 0' along the graph; layers and merges use it to skip work."""
        nonneg: dict[fx.Node, bool] = {}
        layer_inputs: dict[int, bool] = {}
        for node in self.graph.nodes:
            value = False
            args = [a for a in node.all_input_nodes if a in self.dep]
            first = nonneg.get(node.args[0], False) if node.args and isinstance(
                node.args[0], fx.Node) else False
            if node.op == "call_module":
                m = self.module(node)
                if isinstance(m, LinearRuleLayer):
                    layer_inputs[id(m)] = layer_inputs.get(id(m), True) and first
                    m.input_nonnegative = layer_inputs[id(m)]
                elif isinstance(m, ResidualMerge):
                    # the shares read the signed terms c_i h_i: h_i >= 0 is c_i h_i >= 0 only
                    # for c_i > 0 (``pool(x) - x`` after a ReLU: -x <= 0)
                    m.nonnegative = tuple(nonneg.get(a, False) and c > 0
                                          for a, c in zip(node.args, m.coefficients, strict=True))
                    value = all(m.nonnegative) and all(c > 0 for c in m.coefficients)
                else:
                    inner = m.module if isinstance(m, ModuleRuleLayer) else m
                    if isinstance(inner, NONNEG_MODULES):
                        value = True
                    elif isinstance(inner, SIGN_KEEPING_MODULES) or (
                        isinstance(inner, FunctionModule | FunctionRuleLayer)
                        and inner.fn in POOL_FUNCTIONS
                    ):
                        value = first
            elif node.op == "call_function":
                fn = getattr(node.target, "passthrough_fn", None)
                if fn is not None:
                    if fn in NONNEG_FUNCTIONS:
                        value = True
                    elif fn in (operator.mul, operator.truediv):
                        value = first and isinstance(node.args[1], int | float) and node.args[1] > 0
                elif node.target is gate:
                    value = first
                elif node.target is uniform_product:
                    value = all(nonneg.get(a, False) for a in node.args)
                elif node.target in self.gradient_functions:
                    value = bool(args) and all(nonneg.get(a, False) for a in args)
            elif node.op == "call_method" and _method(node) in GRADIENT_METHODS:
                value = first
            nonneg[node] = value

    def fuse_input_activations(self) -> None:
        """Linear -> activation -> Linear with an expanding first layer (a transformer's or
        ConvNeXt's MLP): the second layer runs the activation on its input (``input_fn``) and
        keeps the activation's input instead of its output; the first layer, whose epsilon rule
        would recompute its wide output in the backward (one more matmul), keeps that output,
        which is now kept anyway. The same tensors are kept, one matmul less per block; the
        activation (pass rule) is recomputed instead, an element-wise pass.

        Only where nothing else reads the tensors in between, each layer is called once and
        eval-mode dropouts or identities are all that separates the activation from the layer.
        """
        calls = self.call_counts()
        for node in list(self.graph.nodes):
            second = self.module(node) if node.op == "call_module" else None
            if not (isinstance(second, LinearRuleLayer) and calls[str(node.target)] == 1
                    and len(node.args) == 1 and not node.kwargs):
                continue
            chain, cur = [], node.args[0]
            while (isinstance(cur, fx.Node) and cur.op == "call_module" and len(cur.users) == 1
                   and isinstance(self.module(cur), IDENTITY_MODULES)):
                chain.append(cur)
                cur = cur.args[0]
            fn = self.pass_activation(cur)
            if fn is None or len(cur.users) != 1:
                continue
            first_node = cur.args[0]
            first = self.module(first_node) if (
                isinstance(first_node, fx.Node) and first_node.op == "call_module") else None
            if not (isinstance(first, LinearRuleLayer) and calls[str(first_node.target)] == 1
                    and self.value_users(first_node) == 1 and isinstance(first.rule, Epsilon)
                    and first.rule.kept_source(first) == "recompute"):
                continue
            second.input_fn = second.input_recompute_fn = fn
            if cur.op == "call_module":  # the activation stays at its path in the copy
                self.fused[str(cur.target)] = self.module(cur)
                # recomputed through ``forward``: a hook on it fires once per pass, not twice
                second.input_recompute_fn = self.module(cur).module.forward
            first.output_kept = True
            for gone in (*chain, cur):  # their outputs' relevance is the first layer's
                gone.replace_all_uses_with(first_node)
                self.graph.erase_node(gone)
                self.replaced[gone] = first_node

    def call_counts(self) -> Counter[str]:
        """How many nodes call each module target (a layer called twice keeps two inputs)."""
        return Counter(str(n.target) for n in self.graph.nodes if n.op == "call_module")

    def recompute_normalised_inputs(self) -> None:
        """LayerNorm -> Linear (ConvNeXt's and a transformer's MLP): the Linear keeps the
        LayerNorm's input, which the LayerNorm's rule keeps anyway, and recomputes the LayerNorm's
        output from it in the backward: one block-wide tensor less per block for one LayerNorm
        pass. Only where the Linear (called once) is the LayerNorm's only reader."""
        calls = self.call_counts()
        for node in self.graph.nodes:
            layer = self.module(node) if node.op == "call_module" else None
            if not (isinstance(layer, LinearRuleLayer) and calls[str(node.target)] == 1
                    and layer.input_fn is None and len(node.args) == 1 and not node.kwargs):
                continue
            norm_node = node.args[0]
            norm = self.module(norm_node) if (
                isinstance(norm_node, fx.Node) and norm_node.op == "call_module") else None
            if not (isinstance(norm, ModuleRuleLayer) and isinstance(norm.rule, LayerNormRule)
                    and not norm.rule.uses_output and calls[str(norm_node.target)] == 1
                    and len(norm_node.args) == 1 and not norm_node.kwargs
                    and self.value_users(norm_node) == 1):
                continue
            # its forward, not __call__: hooks on the LayerNorm fire once per pass, not again
            layer.source_fn = norm.module.forward
            node.args = (norm_node, norm_node.args[0])

    def derive_merge_terms(self) -> None:
        """A merge whose output a rule keeps anyway (the next block's first layer: ConvNeXt,
        the next LayerNorm: a transformer) and whose other terms are identity skips keeps its
        output instead of its branch term, and derives that term in the backward
        (``ResidualMerge.derived``): the branch term need not outlive the forward."""
        for node in self.graph.nodes:
            merge = self.module(node) if node.op == "call_module" else None
            if not (isinstance(merge, ResidualMerge) and recompute_shares(merge)
                    and merge.identity.count(False) == 1):
                continue
            if any(self.keeps_input(user, node) for user in node.users):
                merge.derived = merge.identity.index(False)

    def keeps_input(self, node: fx.Node, x: fx.Node) -> bool:
        """Whether ``node`` is a layer whose Function saves its first input ``x`` unchanged."""
        if node.op != "call_module" or not node.args or node.args[0] is not x:
            return False
        m = self.module(node)
        if isinstance(m, LinearRuleLayer):
            return m.source_fn is None
        return isinstance(m, ModuleRuleLayer) and type(m.rule) is not Pass

    def pass_activation(self, node: Any) -> Callable[[Tensor], Tensor] | None:
        """The function of an element-wise activation with the pass rule at ``node``, or None."""
        if not isinstance(node, fx.Node):
            return None
        if node.op == "call_module":
            m = self.module(node)
            if (isinstance(m, ModuleRuleLayer) and type(m.rule) is Pass
                    and isinstance(m.module, ELEMENTWISE_PASS_MODULES) and len(node.args) == 1):
                return m.module.__call__  # a bound method: not registered under the layer
            return None
        fn = getattr(node.target, "passthrough_fn", None) if node.op == "call_function" else None
        if fn is None or next(_iter_nodes((node.args[1:], node.kwargs)), None) is not None:
            return None
        rest, kwargs = tuple(node.args[1:]), dict(node.kwargs)
        return lambda x: fn(x, *rest, **kwargs)

    def mark_inplace_activations(self) -> None:
        """Let Pass activations with an in-place form (ReLU, SiLU, Hardswish, ...) overwrite
        their input where only they read it: one activation-sized tensor less, and no new
        allocation (on the CPU a fresh tensor of tens of MB costs page faults)."""
        candidates: dict[int, list[bool]] = {}
        modules: dict[int, ModuleRuleLayer] = {}
        for node in self.graph.nodes:
            if node.op != "call_module":
                continue
            m = self.module(node)
            if not (isinstance(m, ModuleRuleLayer) and type(m.rule) is Pass
                    and type(m.module) in INPLACE_ACTIVATIONS):
                continue
            prev = node.args[0]
            ok = (
                isinstance(prev, fx.Node)
                and prev.op == "call_module"
                and self.value_users(prev) == 1
                and _private_output(self.module(prev))
            )
            candidates.setdefault(id(m), []).append(ok)
            modules[id(m)] = m
        for key, oks in candidates.items():
            modules[key].inplace = all(oks)

    def add_probes(self) -> None:
        for path, node in self.outputs:
            live = self.resolve(node)
            if live is None or live not in self.dep:
                continue
            with self.graph.inserting_after(live):
                self.graph.call_function(record_relevance, (live, path))


def _is_stem_pool(kernel: Any, stride: Any, padding: Any, dilation: Any) -> bool:
    def pair(v: Any) -> tuple:
        return tuple(v) if isinstance(v, list | tuple) else (v, v)

    return (pair(kernel), pair(stride if stride is not None else kernel), pair(padding),
            pair(dilation)) == ((3, 3), (2, 2), (1, 1), (1, 1))


def _private_output(module: nn.Module) -> bool:
    """Whether a module's output tensor is new and kept by no autograd node of the engine."""
    if isinstance(module, ResidualMerge):
        return module.derived is None  # else its Function keeps its output
    if isinstance(module, LinearRuleLayer):
        return True  # its Function saves inputs, never its outputs
    if not isinstance(module, ModuleRuleLayer):
        return False
    # a stand-alone BatchNorm (DenseNet) makes a new tensor; its rule keeps only the input
    bn_unkept = isinstance(module.module, BATCHNORM_TYPES) and not module.rule.uses_output
    return type(module.rule) is Pass or bn_unkept


def _shape_query(node: fx.Node) -> bool:
    if node.op == "call_method":
        return str(node.target) in SHAPE_METHODS
    if node.op == "call_function":
        if node.target is getattr:
            return node.args[1] in SHAPE_ATTRIBUTES
        return node.target in SHAPE_FUNCTIONS or getattr(node.target, "__name__", "") in (
            "_assert", "_assert_is_none")
    return False


INPLACE_OPERATORS = {operator.iadd, operator.isub, operator.imul, operator.itruediv}


def _inplace(node: fx.Node) -> bool:
    """Whether ``node`` writes its result into its first argument."""
    if node.op == "call_method":
        name = str(node.target)
        return name.endswith("_") and not name.startswith("_")
    if node.op != "call_function":
        return False
    if node.target in INPLACE_OPERATORS:
        return True
    if node.kwargs.get("inplace") is True:
        return True
    name = getattr(node.target, "__name__", "")
    if name.endswith("_") and not name.startswith("_"):  # torch.relu_, F.relu_, F.elu_
        return True
    if node.target in PASS_FUNCTIONS and len(node.args) > 1:  # F.relu(x, True)
        return (_call_kwargs(node.target, node.args, {}) or {}).get("inplace") is True
    return False


def _stock_forward_of(conv: nn.Module) -> bool:
    return any(type(conv).forward is t.forward for t in CONV_TYPES)


def _interpolation_mode(node: fx.Node) -> str:
    if node.target is F.upsample_nearest:
        return "nearest"
    if node.target is F.upsample_bilinear:
        return "bilinear"
    return str((_call_kwargs(node.target, node.args, node.kwargs) or {}).get("mode", "nearest"))


def _training_flag(node: fx.Node) -> bool:
    return bool((_call_kwargs(node.target, node.args, node.kwargs) or {}).get("training", False))


# Parameter names of builtins whose overloads fx's schema matching can find ambiguous
# (``F.conv2d(x, w, groups=c)`` with no padding given: str or int padding).
_BUILTIN_PARAMETERS: dict[Any, tuple[str, ...]] = {
    F.linear: ("input", "weight", "bias"),
    torch.addcmul: ("input", "tensor1", "tensor2"),
    torch.addcdiv: ("input", "tensor1", "tensor2"),
    **{fn: ("input", "weight", "bias", "stride", "padding", "dilation", "groups")
       for fn in (F.conv1d, F.conv2d, F.conv3d)},
}


def _call_kwargs(target: Any, args: tuple, kwargs: dict) -> dict[str, Any] | None:
    """A call's arguments by parameter name (None: unknown)."""
    try:
        norm = normalize_function(target, args, kwargs, normalize_to_only_use_kwargs=True)
    except RuntimeError:  # fx found the overload ambiguous: bind by the names above
        norm = None
    if norm is not None:
        return dict(norm.kwargs)
    names = _BUILTIN_PARAMETERS.get(target)
    if names is not None and len(args) <= len(names):
        return {**dict(zip(names, args, strict=False)), **kwargs}
    try:
        bound = inspect.signature(target).bind(*args, **kwargs)
    except (TypeError, ValueError):
        return None
    return dict(bound.arguments)


def _kind(node: fx.Node, builder: _Builder) -> tuple[str, Any] | None:
    if node.op == "call_module":
        return ("module", type(builder.module(node)))
    if node.op == "call_function":
        return ("function", node.target)
    if node.op == "call_method":
        return ("method", _method(node))
    return None


class _AnyBatchNorm(nn.BatchNorm2d):
    """BatchNorm for a functional ``F.batch_norm`` call, whatever its input's rank."""

    def _check_input_dim(self, input: Tensor) -> None:
        if input.dim() < 2:
            raise ValueError(f"expected at least 2D input (got {input.dim()}D input)")


def _param(t: Tensor | None) -> nn.Parameter | None:
    # a Parameter of the same storage: the prepared copy holds no second set of weights
    return None if t is None else nn.Parameter(t.detach(), requires_grad=False)


def _layer_module(fn: Any, v: dict[str, Any]) -> nn.Module | None:
    """A module computing ``fn`` with the constant arguments ``v`` (None: not in eval mode)."""
    if fn is F.linear:
        w = v["weight"]
        m: nn.Module = nn.Linear(w.shape[1], w.shape[0], bias=v.get("bias") is not None,
                                 device=w.device, dtype=w.dtype)
    elif fn in (F.conv1d, F.conv2d, F.conv3d):
        w = v["weight"]
        cls = {F.conv1d: nn.Conv1d, F.conv2d: nn.Conv2d, F.conv3d: nn.Conv3d}[fn]
        m = cls(w.shape[1] * v.get("groups", 1), w.shape[0], tuple(w.shape[2:]),
                stride=v.get("stride", 1), padding=v.get("padding", 0),
                dilation=v.get("dilation", 1), groups=v.get("groups", 1),
                bias=v.get("bias") is not None, device=w.device, dtype=w.dtype)
    elif fn is F.batch_norm:
        if v.get("training") or v.get("running_mean") is None:
            return None
        mean = v["running_mean"]
        m = _AnyBatchNorm(mean.numel(), eps=v.get("eps", 1e-5), affine=v.get("weight") is not None,
                          device=mean.device, dtype=mean.dtype)
        m.running_mean = mean
        m.running_var = v["running_var"]
        if v.get("weight") is None and v.get("bias") is not None:
            return None
    elif fn is F.layer_norm:
        w, b = v.get("weight"), v.get("bias")
        m = nn.LayerNorm(v["normalized_shape"], eps=v.get("eps", 1e-5),
                         elementwise_affine=w is not None, bias=b is not None)
    elif fn is F.group_norm:
        w, b = v.get("weight"), v.get("bias")
        m = nn.GroupNorm(v["num_groups"], w.numel() if w is not None else v["num_groups"],
                         eps=v.get("eps", 1e-5), affine=w is not None)
    elif fn is F.local_response_norm:
        return nn.LocalResponseNorm(v["size"], v.get("alpha", 1e-4), v.get("beta", 0.75),
                                    v.get("k", 1.0))
    else:
        return None
    for name in ("weight", "bias"):
        if name in v and hasattr(m, name) and getattr(m, name) is not None:
            setattr(m, name, _param(v[name]))
    return m.eval()


def _iter_nodes(arg: Any) -> Iterator[fx.Node]:
    if isinstance(arg, fx.Node):
        yield arg
    elif isinstance(arg, list | tuple):
        for a in arg:
            yield from _iter_nodes(a)
    elif isinstance(arg, dict):
        for a in arg.values():
            yield from _iter_nodes(a)
