"""The linear operator of a Linear/ConvNd layer and its transpose, with parameters passed in.

Rules evaluate the same layer with modified weights (W+, W-, W^2, ones), so the operator is kept
apart from the module's own parameters. The transpose is the input-gradient of the operator,
computed without building an autograd graph.

Zero padding that is not the convolution's own symmetric ``padding`` (PyTorch's asymmetric
``padding="same"`` for even kernels, TensorFlow 'SAME' padding, an explicit ``F.pad`` the graph
pass fused into the layer) is the layer's *pre-padding*: zeros added before the convolution,
part of the operator. Padded positions are then no inputs, so rules that replace the input
(flat, w^2, z+ with ones, z^B) give them nothing, as they give the convolution's own padding
nothing.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .errors import UnsupportedLayerError

_CONV_FN = {1: F.conv1d, 2: F.conv2d, 3: F.conv3d}
_CONV_TRANSPOSE_FN = {1: F.conv_transpose1d, 2: F.conv_transpose2d, 3: F.conv_transpose3d}
CONV_TRANSPOSE_TYPES = (nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d)


def scale_output_channels(module: nn.Module, weight: Tensor, scale: Tensor) -> Tensor:
    """``weight`` with each output channel's entries times ``scale`` (a new tensor): dim 0 of a
    Linear/ConvNd weight; dim 1 within each group of a ConvTransposeNd weight
    (in_channels, out_channels / groups, *kernel)."""
    rest = (1,) * (weight.ndim - 2)
    if isinstance(module, CONV_TRANSPOSE_TYPES):
        groups = module.groups
        w = weight.view(groups, weight.shape[0] // groups, *weight.shape[1:])
        return (w * scale.view(groups, 1, -1, *rest)).view(weight.shape)
    return weight * scale.view(-1, 1, *rest)


@dataclass(frozen=True)
class SamePadding:
    """TensorFlow 'SAME' zero padding, computed from the input size: per spatial dim of size i,
    total = max((ceil(i / s) - 1) * s + (k - 1) * d + 1 - i, 0), total // 2 before, the rest
    after (timm's ``pad_same``, every ``tf_*`` model)."""

    kernel_size: tuple[int, ...]
    stride: tuple[int, ...]
    dilation: tuple[int, ...]

    def amounts(self, sizes: tuple[int, ...]) -> tuple[int, ...]:
        """``F.pad`` amounts (last dim first) for spatial ``sizes``."""
        pads: list[int] = []
        for i, k, s, d in zip(sizes, self.kernel_size, self.stride, self.dilation, strict=True):
            total = max((math.ceil(i / s) - 1) * s + (k - 1) * d + 1 - i, 0)
            pads[:0] = [total // 2, total - total // 2]
        return tuple(pads)


PrePadding = tuple[int, ...] | SamePadding


def pre_pad(x: Tensor, padding: PrePadding | None, dims: int) -> Tensor:
    """``x`` with a layer's pre-padding (zeros) added."""
    if padding is None:
        return x
    amounts = padding.amounts(tuple(x.shape[-dims:])) if isinstance(padding, SamePadding) else (
        padding)
    return F.pad(x, amounts) if any(amounts) else x


class _PrePadded:
    """Mixin: a ConvNd whose forward zero-pads its input by ``pre_padding`` first."""

    pre_padding: PrePadding

    def forward(self, x: Tensor) -> Tensor:
        return super().forward(pre_pad(x, self.pre_padding, self.weight.ndim - 2))  # type: ignore[misc]


_PADDED_CLASSES: dict[type, type] = {}
_STOCK_FORWARDS = {nn.Linear.forward, nn.Conv1d.forward, nn.Conv2d.forward, nn.Conv3d.forward,
                   *(t.forward for t in CONV_TRANSPOSE_TYPES), _PrePadded.forward}


def stock_linear_forward(module: nn.Module) -> bool:
    """Whether ``module``'s forward is the plain Linear/ConvNd one (or the pre-padded one), i.e.
    what :class:`LinearOp` computes."""
    return type(module).forward in _STOCK_FORWARDS


def with_pre_padding(conv: nn.Module, padding: PrePadding) -> nn.Module:
    """A copy of ``conv`` (sharing its parameters) that zero-pads its input by ``padding`` before
    its own convolution (padding amounts as ``F.pad``'s, or :class:`SamePadding`)."""
    cls = type(conv)
    if cls not in _PADDED_CLASSES:
        _PADDED_CLASSES[cls] = type(f"PrePadded{cls.__name__}", (_PrePadded, cls), {})
    new = cls.__new__(_PADDED_CLASSES[cls])
    new.__dict__.update(conv.__dict__)
    for name in ("_parameters", "_buffers", "_modules"):
        setattr(new, name, dict(getattr(conv, name)))
    new.pre_padding = padding
    return new


class LinearOp:
    """``z = op(x, w, b)`` and ``op.transpose(g, w, x) = d<g, op(x, w)>/dx``."""

    def __init__(self, module: nn.Module, path: str = "") -> None:
        self.path = path
        if isinstance(module, nn.Linear):
            self.kind = "linear"
            return
        if not isinstance(module, (nn.Conv1d, nn.Conv2d, nn.Conv3d, *CONV_TRANSPOSE_TYPES)):
            raise UnsupportedLayerError(
                f"{type(module).__name__} at '{path}' is not a Linear, ConvNd or ConvTransposeNd "
                "layer"
            )
        if module.padding_mode != "zeros":
            raise UnsupportedLayerError(
                f"{type(module).__name__} at '{path}' uses padding_mode='{module.padding_mode}'; "
                "only zero padding is supported"
            )
        self.dims = module.weight.ndim - 2
        self.stride = tuple(module.stride)
        self.dilation = tuple(module.dilation)
        self.groups = module.groups
        if isinstance(module, CONV_TRANSPOSE_TYPES):
            # its transpose is the convolution with the same weight and geometry
            self.kind = "conv_transpose"
            self.padding = tuple(module.padding)
            self.output_padding = tuple(module.output_padding)
            self.pre_padding = None
            self.pointwise = False
            return
        self.kind = "conv"
        self.pre_padding: PrePadding | None = getattr(module, "pre_padding", None)
        self.padding = self._int_padding(module)
        # a 1x1 stride-1 convolution without padding: its transpose is a 1x1 convolution too
        self.pointwise = (
            all(v == 1 for v in (*module.kernel_size, *self.stride))
            and not any(self.padding)
            and self.pre_padding is None
        )

    def _int_padding(self, module: nn.Module) -> tuple[int, ...]:
        """The convolution's symmetric padding; an asymmetric ``padding="same"`` (an even
        ``dilation * (kernel - 1)``) becomes pre-padding: ``total // 2`` zeros before, the rest
        after, as PyTorch pads it."""
        padding = module.padding
        if not isinstance(padding, str):
            return tuple(padding)
        if padding == "valid":
            return (0,) * len(module.kernel_size)
        totals = [d * (k - 1) for d, k in zip(module.dilation, module.kernel_size, strict=True)]
        if all(t % 2 == 0 for t in totals):
            return tuple(t // 2 for t in totals)
        if self.pre_padding is not None:
            raise UnsupportedLayerError(
                f"{type(module).__name__} at '{self.path}': asymmetric padding='same' after "
                "pre-padding"
            )
        pads: list[int] = []
        for t in totals:
            pads[:0] = [t // 2, t - t // 2]
        self.pre_padding = tuple(pads)
        return (0,) * len(totals)

    def out_channels(self, w: Tensor) -> int:
        """The number of outputs (channels) of the operator with weight ``w``."""
        return w.shape[1] * self.groups if self.kind == "conv_transpose" else w.shape[0]

    def pre_amounts(self, sizes: tuple[int, ...]) -> tuple[int, ...]:
        """The pre-padding (``F.pad`` amounts, last dim first) for spatial ``sizes``; () if none."""
        if self.pre_padding is None:
            return ()
        if isinstance(self.pre_padding, SamePadding):
            return self.pre_padding.amounts(sizes)
        return tuple(self.pre_padding)

    def conv(self, x: Tensor, w: Tensor, b: Tensor | None = None, groups: int | None = None
             ) -> Tensor:
        """The layer's convolution geometry (pre-padding, stride, padding, dilation) with weight
        ``w`` and ``groups`` (default: the layer's)."""
        x = pre_pad(x, self.pre_padding, self.dims)
        return _CONV_FN[self.dims](x, w, b, self.stride, self.padding, self.dilation,
                                   groups or self.groups)

    def __call__(self, x: Tensor, w: Tensor, b: Tensor | None = None) -> Tensor:
        if self.kind == "linear":
            return F.linear(x, w, b)
        if self.kind == "conv_transpose":
            return _CONV_TRANSPOSE_FN[self.dims](x, w, b, self.stride, self.padding,
                                                 self.output_padding, self.groups, self.dilation)
        return self.conv(x, w, b)

    def transpose(self, g: Tensor, w: Tensor, x: Tensor, groups: int | None = None) -> Tensor:
        """Gradient of ``sum(g * op(x, w))`` with respect to ``x`` (``x`` only gives the shape);
        ``groups`` as in :meth:`conv`."""
        if self.kind == "linear":
            return g.matmul(w)
        groups = groups or self.groups
        if self.kind == "conv_transpose":
            return _CONV_FN[self.dims](g, w, None, self.stride, self.padding, self.dilation, groups)
        if self.pointwise:
            # the 1x1 convolution with each group's weight matrix transposed: the CPU's forward
            # kernel is 25-50 % faster than its input-gradient path (no col2im), same sums
            c_out, c_in_g = w.shape[:2]
            wt = w.reshape(groups, c_out // groups, c_in_g).transpose(1, 2)
            wt = wt.reshape(groups * c_in_g, c_out // groups, *w.shape[2:])
            return _CONV_FN[self.dims](g, wt, None, 1, 0, 1, groups)
        shape = x.shape
        amounts: tuple[int, ...] = ()
        if self.pre_padding is not None:
            sizes = tuple(shape[-self.dims:])
            amounts = self.pre_amounts(sizes)
            padded = [n + amounts[2 * (self.dims - 1 - i)] + amounts[2 * (self.dims - 1 - i) + 1]
                      for i, n in enumerate(sizes)]
            x = x.new_empty(()).expand(*shape[:-self.dims], *padded)  # the shape only
        grad_input, _, _ = torch.ops.aten.convolution_backward(
            g,
            x,
            w,
            None,
            self.stride,
            self.padding,
            self.dilation,
            False,
            (0,) * self.dims,
            groups,
            (True, False, False),
        )
        if any(amounts):  # the padded positions are no inputs: crop them
            index = [slice(None)] * (grad_input.ndim - self.dims)
            for i, n in enumerate(shape[-self.dims:]):
                before = amounts[2 * (self.dims - 1 - i)]
                index.append(slice(before, before + n))
            grad_input = grad_input[tuple(index)]
        return grad_input
