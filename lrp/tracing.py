"""Trace a whole model (root included) into a torch.fx graph whose leaves are the layers with rules.

Structure is then found by data flow in the graph, whatever the module nesting or naming: every
module the engine has a rule for (and every module a composite names by path) stays one
``call_module`` node; everything else is traced through down to tensor operations.
"""

from __future__ import annotations

import inspect
import os
import sys
import traceback
from collections.abc import Callable, Collection
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.fx as fx
from torch import nn

from .errors import UnresolvedStructureError, UnsupportedOperationError
from .ops import SamePadding

# Module types with a rule or an exact gradient, when their forward is the stock one. A subclass
# that overrides forward (torchvision's LayerNorm2d, timm's BatchNormAct2d) is traced through, so
# the functional call inside gets the rule.
RULE_MODULE_TYPES: tuple[type[nn.Module], ...] = (
    nn.Linear,
    nn.Conv1d,
    nn.Conv2d,
    nn.Conv3d,
    nn.ConvTranspose1d,
    nn.ConvTranspose2d,
    nn.ConvTranspose3d,
    nn.BatchNorm1d,
    nn.BatchNorm2d,
    nn.BatchNorm3d,
    nn.LayerNorm,
    nn.GroupNorm,
    nn.LocalResponseNorm,
)
_CONTAINERS = (nn.Sequential, nn.ModuleList, nn.ModuleDict)
_TORCH_DIR = os.path.dirname(torch.__file__)
_ENGINE_DIR = os.path.dirname(__file__)

_USER_CONTAINERS: list[type[nn.Module]] = []


def _timm_same(x: Any, kernel_size: Any, stride: Any, dilation: Any = (1, 1),
               value: float = 0) -> SamePadding | None:
    if value != 0:
        return None
    return SamePadding(*(tuple(int(v) for v in a) for a in (kernel_size, stride, dilation)))


def library_pads() -> dict[Any, Callable[..., SamePadding | None]]:
    """Library padding helpers traced as one call: they compute the padding from the input's
    size with Python arithmetic that symbolic tracing cannot follow. Each maps to the
    :class:`SamePadding` it adds (None: not zeros); a pad moves relevance (its gradient), and
    the graph pass fuses a zero pad into the convolution that reads it.

    - timm's ``pad_same(x, kernel_size, stride, dilation=(1, 1), value=0)``: TensorFlow 'SAME'
      padding of ``Conv2dSame``/``MaxPool2dSame``/``AvgPool2dSame`` (every ``tf_*`` model).

    Only libraries already imported count (a timm model was built by an imported timm):
    importing timm here would cost every process that imports the engine 34 MB and 0.4 s.
    """
    pad_same = getattr(sys.modules.get("timm.layers.padding"), "pad_same", None)
    return {} if pad_same is None else {pad_same: _timm_same}


def register_container(cls: type[nn.Module]) -> type[nn.Module]:
    """Declare that ``cls.forward`` only chains its children in registration order.

    The escape hatch for a container whose forward torch.fx cannot trace (data-dependent control
    flow, say): the engine then follows its children one after another. Usable as a decorator.
    """
    _USER_CONTAINERS.append(cls)
    return cls


def _stock_forward(module: nn.Module) -> bool:
    forward = type(module).forward
    return any(isinstance(module, t) and forward is t.forward for t in RULE_MODULE_TYPES)


def _transformer_forward(m: nn.Module, path: str) -> Callable[..., Any] | None:
    """The slow-path forward of ``nn.TransformerEncoderLayer``/``nn.TransformerEncoder`` (a
    subclass that keeps the stock forward included), to trace instead of the stock one; None for
    any other module.

    The stock forwards pick a fused kernel (``torch._transformer_encoder_layer_fwd``, nested
    tensors) by Python control flow on the input and the weights, which torch.fx cannot follow,
    and that kernel has no rule. Their slow path (what torch runs whenever autograd records, so
    the function explained; the fused kernel computes the same up to rounding, except that it
    takes any ``nn.GELU`` for the exact GELU) is made of parts with rules: ``self_attn``
    (``nn.MultiheadAttention``), ``linear1/2``, ``norm1/2``, dropout, ``activation`` (a function
    or a module) and the residual additions; each submodule is called as itself, so keeps its path (``encoder.layers.0.self_attn``).
    Masks go to ``self_attn`` as given (``MultiheadAttentionLRP`` reads bool and float masks as
    torch's ``_canonical_mask`` does, and ``is_causal`` with a mask is a hint: the mask is used).
    Refused (:class:`UnsupportedOperationError` naming ``path``): ``is_causal=True`` without a
    mask (torch raises), and a ``src_key_padding_mask`` given to an encoder whose nested-tensor
    fast path may run (``enable_nested_tensor``: it zeroes the padded positions' outputs).
    """
    def refuse(kind: str, what: str) -> None:
        raise UnsupportedOperationError(f"{kind} at '{path}' is called with {what}")

    if isinstance(m, nn.TransformerEncoderLayer) and (
        type(m).forward is nn.TransformerEncoderLayer.forward
    ):
        def encoder_layer(src: Any, src_mask: Any = None, src_key_padding_mask: Any = None,
                          is_causal: bool = False) -> Any:
            if is_causal and src_mask is None:
                refuse("nn.TransformerEncoderLayer", "is_causal=True but no src_mask (torch "
                       "needs the mask too)")

            def sa_block(x: Any) -> Any:
                return m._sa_block(x, src_mask, src_key_padding_mask, is_causal=bool(is_causal))

            x = src  # torch's slow path, as in TransformerEncoderLayer.forward
            if m.norm_first:
                x = x + sa_block(m.norm1(x))
                x = x + m._ff_block(m.norm2(x))
            else:
                x = m.norm1(x + sa_block(x))
                x = m.norm2(x + m._ff_block(x))
            return x

        return encoder_layer
    if isinstance(m, nn.TransformerEncoder) and type(m).forward is nn.TransformerEncoder.forward:
        def encoder(src: Any, mask: Any = None, src_key_padding_mask: Any = None,
                    is_causal: bool | None = None) -> Any:
            if is_causal and mask is None:
                refuse("nn.TransformerEncoder", "is_causal=True but no mask (torch needs the "
                       "mask too)")
            if src_key_padding_mask is not None and getattr(m, "use_nested_tensor", False):
                refuse("nn.TransformerEncoder", "src_key_padding_mask and may take its nested-"
                       "tensor path, which sets the padded positions' outputs to 0 (build it "
                       "with enable_nested_tensor=False)")
            x = src
            for layer in m.layers:  # is_causal: a hint the layers' masked attention ignores
                x = layer(x, src_mask=mask, is_causal=bool(is_causal),
                          src_key_padding_mask=src_key_padding_mask)
            return m.norm(x) if m.norm is not None else x

        return encoder
    return None


@dataclass
class Traced:
    """A traced model: the graph, and the node that carries each module's output (by path)."""

    graph: fx.Graph
    outputs: list[tuple[str, fx.Node]] = field(default_factory=list)


class _Tracer(fx.Tracer):
    def __init__(self, leaf_paths: Collection[str], leaf_types: Collection[type] = ()) -> None:
        super().__init__(autowrap_functions=tuple(library_pads()))
        self.record_stack_traces = True
        self.leaf_paths = set(leaf_paths)
        self.leaf_types = set(leaf_types)
        self.outputs: list[tuple[str, fx.Node]] = []

    def _filter_traceback_frames(
        self, user_stack_summary: traceback.StackSummary
    ) -> traceback.StackSummary:
        """The user's frames from the first ``forward`` on, PyTorch's and the engine's left out.

        fx's own filter asks ``symbolic_shapes.uninteresting_files()``, which imports PyTorch's
        compiler stack (inductor, export, networkx: about 500 modules and 33 MB held by every
        process that explains); ``source`` reads only the user's frames, so this keeps those.
        """
        frames = list(user_stack_summary)
        first = next((i for i, f in enumerate(frames) if f.name == "forward"), len(frames))
        return traceback.StackSummary.from_list(
            [f for f in frames[first:] if not _internal(f.filename) and f.filename != "<string>"]
        )

    def is_leaf_module(self, m: nn.Module, module_qualified_name: str) -> bool:
        if module_qualified_name in self.leaf_paths or _stock_forward(m) or (
            type(m) in self.leaf_types
        ):
            return True
        if isinstance(m, _CONTAINERS) or any(type(m) is c for c in _USER_CONTAINERS):
            return False
        if _transformer_forward(m, module_qualified_name) is not None:
            return False  # call_module traces its slow path
        # other torch.nn modules (activations, pools, dropout, LSTM, attention) are leaves: the
        # engine gives them a rule or names them in an error
        return type(m).__module__.startswith("torch.nn") and type(m).forward is not nn.Module.forward

    def call_module(self, m: nn.Module, forward: Any, args: tuple, kwargs: dict) -> Any:
        path = self.path_of_module(m)
        if any(type(m) is c for c in _USER_CONTAINERS) and path not in self.leaf_paths:
            def chain(*a: Any, **k: Any) -> Any:
                (x,) = a
                for child in m.children():
                    x = self.call_module(child, child.forward, (x,), {})
                return x

            forward = chain
        else:  # (a leaf's forward is not called)
            forward = _transformer_forward(m, path) or forward
        out = super().call_module(m, forward, args, kwargs)
        if path and isinstance(out, fx.Proxy):
            self.outputs.append((path, out.node))
        return out


SHAPE_ATTRIBUTES = ("shape", "ndim", "dtype", "device", "is_cuda")
_ORIGINAL_MODULE_METHODS = (nn.Module.__call__, nn.Module.__getattr__)
SHAPE_METHODS = ("size", "dim", "numel")


class _ShapeProxy(fx.Proxy):
    """A proxy whose tensor's shape is known (:class:`_ShapeTracer`): shape queries, ``len`` and
    unpacking give plain Python values; the tensor's values stay symbolic (control flow on them
    still fails)."""

    tracer: _ShapeTracer

    def __getattr__(self, k: str) -> Any:
        if k in SHAPE_ATTRIBUTES:
            return getattr(self.tracer.values[self.node], k)
        return super().__getattr__(k)

    def __len__(self) -> int:
        return len(self.tracer.values[self.node])

    def __iter__(self) -> Any:
        return (self[i] for i in range(len(self)))


class _ShapeTracer(_Tracer):
    """Traces with an example input, evaluating every operation on it as it is recorded, so
    each tensor's shape is known while tracing: shape queries (``x.shape``, ``x.size()``,
    ``len(x)``) return numbers and Python control flow on sizes (timm's VGG head, MobileViT's
    and TinyViT's padding checks) runs as it does for that input. The graph then holds those
    numbers: it is valid for inputs of the example's shape only. Control flow on tensor values
    still fails."""

    def __init__(self, leaf_paths: Collection[str], leaf_types: Collection[type],
                 example: torch.Tensor) -> None:
        super().__init__(leaf_paths, leaf_types)
        self.example = example
        self.values: dict[fx.Node, Any] = {}
        self.placeholders = 0

    def proxy(self, node: fx.Node) -> fx.Proxy:
        return _ShapeProxy(node, self)

    def create_proxy(self, kind: str, target: Any, args: tuple, kwargs: dict,
                     name: str | None = None, type_expr: Any = None,
                     proxy_factory_fn: Any = None) -> Any:
        if kind == "call_method" and target in SHAPE_METHODS and isinstance(args[0], fx.Proxy):
            values = fx.node.map_aggregate((args, kwargs), self._value)
            return getattr(values[0][0], target)(*values[0][1:], **values[1])
        proxy = super().create_proxy(kind, target, args, kwargs, name, type_expr,
                                     proxy_factory_fn)
        self.values[proxy.node] = self._evaluate(proxy.node)
        return proxy

    def _value(self, a: Any) -> Any:
        return self.values[a.node] if isinstance(a, fx.Proxy) else a

    def _node_value(self, node: fx.Node) -> Any:
        if node not in self.values:  # fx makes get_attr nodes for tensor constants directly
            self.values[node] = self._evaluate(node)
        return self.values[node]

    def _evaluate(self, node: fx.Node) -> Any:
        # while tracing, fx patches nn.Module.__call__/__getattr__ to record calls: run eagerly
        patched = nn.Module.__call__, nn.Module.__getattr__
        nn.Module.__call__, nn.Module.__getattr__ = _ORIGINAL_MODULE_METHODS  # type: ignore[method-assign]
        try:
            with torch.no_grad():
                return self._run(node)
        finally:
            nn.Module.__call__, nn.Module.__getattr__ = patched  # type: ignore[method-assign]

    def _run(self, node: fx.Node) -> Any:
        if node.op == "placeholder":
            self.placeholders += 1
            return self.example if self.placeholders == 1 else (
                node.args[0] if node.args else None)
        if node.op == "get_attr":
            obj: Any = self.root
            for part in str(node.target).split("."):
                obj = getattr(obj, part)
            return obj
        args = fx.node.map_arg(node.args, self._node_value)
        kwargs = fx.node.map_arg(node.kwargs, self._node_value)
        if node.op == "call_module":
            return self.root.get_submodule(str(node.target))(*args, **kwargs)
        if node.op == "call_method":
            return getattr(args[0], str(node.target))(*args[1:], **kwargs)
        return node.target(*args, **kwargs)


def _concrete_args(model: nn.Module) -> dict[str, Any]:
    """Every forward parameter after the first must have a default: it is fixed to that value."""
    params = list(inspect.signature(model.forward).parameters.values())
    concrete: dict[str, Any] = {}
    for p in params[1:]:
        if p.kind in (p.VAR_POSITIONAL, p.VAR_KEYWORD):
            continue
        if p.default is inspect.Parameter.empty:
            raise UnresolvedStructureError(
                f"{type(model).__name__}.forward takes a second input '{p.name}' without a "
                "default; the explainer feeds one tensor. Wrap the model in a module whose "
                "forward takes the image only."
            )
        concrete[p.name] = p.default
    return concrete


def _internal(filename: str) -> bool:
    return filename.startswith((_TORCH_DIR, _ENGINE_DIR))


def user_frame(tb: Any) -> str:
    """'file:line: code' of the innermost frame outside PyTorch ('' if none)."""
    frames = [f for f in traceback.extract_tb(tb) if not _internal(f.filename)]
    if not frames:
        return ""
    f = frames[-1]
    return f"{f.filename}:{f.lineno}: {(f.line or '').strip()}"


class TraceFailure(UnresolvedStructureError):  # noqa: N818 (an UnresolvedStructureError)
    """torch.fx could not trace a forward; with an example input (shapes known) it may."""


def trace(
    model: nn.Module,
    leaf_paths: Collection[str] = (),
    leaf_types: Collection[type] = (),
    example: torch.Tensor | None = None,
) -> Traced:
    """Trace ``model`` (its root forward included); errors name the module and source line.

    Modules at ``leaf_paths`` and modules whose type is exactly one of ``leaf_types`` (the paths
    and types a composite names) stay one node each. With an ``example`` input the trace knows
    every tensor's shape (:class:`_ShapeTracer`) and the graph is valid for that shape only."""
    if example is None:
        tracer: _Tracer = _Tracer(leaf_paths, leaf_types)
    else:
        tracer = _ShapeTracer(leaf_paths, leaf_types, example)
    try:
        graph = tracer.trace(model, concrete_args=_concrete_args(model) or None)
    except UnresolvedStructureError:
        raise
    except Exception as err:  # fx fails in many ways on untraceable Python (control flow, len)
        stack = list(tracer.module_stack)
        where = stack[-1] if stack and stack[-1] else "<root>"
        line = user_frame(err.__traceback__)
        shapes = " (with the input's shapes known)" if example is not None else ""
        raise TraceFailure(
            f"cannot follow the forward of the module at '{where}': torch.fx could not trace it"
            f"{shapes} ({type(err).__name__}: {err}){' at ' + line if line else ''}. If that "
            "forward only calls its children in registration order, decorate its class with "
            "lrp.register_container; or name the module in the composite with a rule, "
            "composite={..., '" + where + "': rule}, so it is treated as one layer."
        ) from err
    return Traced(graph, tracer.outputs)


def scope(node: fx.Node) -> str:
    """Path of the innermost module whose forward created ``node`` ('' for the root)."""
    if node.op == "call_module":
        return str(node.target)
    stack = node.meta.get("nn_module_stack") or {}
    return next(reversed(stack), "") if stack else ""


def source(node: fx.Node) -> str:
    """'file:line: code' of the user code that created ``node`` ('' if fx recorded none)."""
    trace_text = node.stack_trace or node.meta.get("stack_trace") or ""
    lines = [ln.strip() for ln in trace_text.strip().splitlines()]
    for i in range(len(lines) - 1, -1, -1):
        if lines[i].startswith("File ") and not _internal(lines[i][5:].strip('"').split('"')[0]):
            code = lines[i + 1] if i + 1 < len(lines) and not lines[i + 1].startswith("File ") else ""
            loc = lines[i][5:].replace('"', "").split(", in ")[0].replace(", line ", ":")
            return f"{loc}: {code}" if code else loc
    return ""
