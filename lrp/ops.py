"""The linear operator of a Linear/ConvNd layer and its transpose, with parameters passed in.

Rules evaluate the same layer with modified weights (W+, W-, W^2, ones), so the operator is kept
apart from the module's own parameters. The transpose is the input-gradient of the operator,
computed without building an autograd graph.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .errors import UnsupportedLayerError

_CONV_FN = {1: F.conv1d, 2: F.conv2d, 3: F.conv3d}


class LinearOp:
    """``z = op(x, w, b)`` and ``op.transpose(g, w, x) = d<g, op(x, w)>/dx``."""

    def __init__(self, module: nn.Module, path: str = "") -> None:
        self.path = path
        if isinstance(module, nn.Linear):
            self.kind = "linear"
            return
        if not isinstance(module, nn.Conv1d | nn.Conv2d | nn.Conv3d):
            raise UnsupportedLayerError(
                f"{type(module).__name__} at '{path}' is not a Linear or ConvNd layer"
            )
        if module.padding_mode != "zeros":
            raise UnsupportedLayerError(
                f"{type(module).__name__} at '{path}' uses padding_mode='{module.padding_mode}'; "
                "only zero padding is supported"
            )
        self.kind = "conv"
        self.dims = module.weight.ndim - 2
        self.stride = tuple(module.stride)
        self.dilation = tuple(module.dilation)
        self.groups = module.groups
        self.padding = self._int_padding(module, path)
        # a 1x1 stride-1 convolution without padding: its transpose is a 1x1 convolution too
        self.pointwise = all(
            v == 1 for v in (*module.kernel_size, *self.stride)
        ) and not any(self.padding)

    @staticmethod
    def _int_padding(module: nn.Module, path: str) -> tuple[int, ...]:
        padding = module.padding
        if not isinstance(padding, str):
            return tuple(padding)
        if padding == "valid":
            return (0,) * len(module.kernel_size)
        totals = [d * (k - 1) for d, k in zip(module.dilation, module.kernel_size, strict=True)]
        if any(t % 2 for t in totals):
            raise UnsupportedLayerError(
                f"{type(module).__name__} at '{path}' uses asymmetric padding='same'; "
                "give explicit integer padding instead"
            )
        return tuple(t // 2 for t in totals)

    def __call__(self, x: Tensor, w: Tensor, b: Tensor | None = None) -> Tensor:
        if self.kind == "linear":
            return F.linear(x, w, b)
        return _CONV_FN[self.dims](x, w, b, self.stride, self.padding, self.dilation, self.groups)

    def transpose(self, g: Tensor, w: Tensor, x: Tensor) -> Tensor:
        """Gradient of ``sum(g * op(x, w))`` with respect to ``x`` (``x`` only gives the shape)."""
        if self.kind == "linear":
            return g.matmul(w)
        if self.pointwise:
            # the 1x1 convolution with each group's weight matrix transposed: the CPU's forward
            # kernel is 25-50 % faster than its input-gradient path (no col2im), same sums
            groups, (c_out, c_in_g) = self.groups, w.shape[:2]
            wt = w.reshape(groups, c_out // groups, c_in_g).transpose(1, 2)
            wt = wt.reshape(groups * c_in_g, c_out // groups, *w.shape[2:])
            return _CONV_FN[self.dims](g, wt, None, 1, 0, 1, groups)
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
            self.groups,
            (True, False, False),
        )
        return grad_input
