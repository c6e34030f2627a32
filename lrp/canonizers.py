"""Canonizers: the rewrites of the explainer's private copy that make the rules apply.

- BatchNorm that follows a Linear/Conv by data flow is folded into it (the rules then see one
  affine layer); which pairs qualify is decided on the traced graph (:mod:`lrp.graph`);
- in-place activations are made out-of-place (autograd needs the saved tensors intact).
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from .ops import CONV_TRANSPOSE_TYPES, scale_output_channels

LINEAR_TYPES = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d, *CONV_TRANSPOSE_TYPES)
BATCHNORM_TYPES = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d)


def disable_inplace(root: nn.Module) -> None:
    for module in root.modules():
        if getattr(module, "inplace", False):
            module.inplace = False


@torch.no_grad()
def batchnorm_affine(linear: nn.Module, bn: nn.Module) -> tuple[Tensor, Tensor]:
    """Per-channel ``(scale, bias)`` with ``bn(linear(x)) = linear_nobias(x) * scale + bias``."""
    scale = (
        bn.weight / torch.sqrt(bn.running_var + bn.eps)
        if bn.affine
        else (1.0 / torch.sqrt(bn.running_var + bn.eps))
    )
    shift = bn.bias if bn.affine else torch.zeros_like(scale)
    bias = linear.bias if linear.bias is not None else torch.zeros_like(bn.running_mean)
    return scale, (bias - bn.running_mean) * scale + shift


def can_fold(linear: nn.Module, bn: nn.Module) -> bool:
    """Whether eval-mode ``bn`` applied to ``linear``'s output is one per-channel affine map."""
    return (
        isinstance(linear, LINEAR_TYPES)
        and isinstance(bn, BATCHNORM_TYPES)
        and bn.track_running_stats
        and bn.running_mean is not None
        and _out_channels(linear) == bn.num_features
        and (not isinstance(linear, nn.Linear) or isinstance(bn, nn.BatchNorm1d))
    )


def _out_channels(linear: nn.Module) -> int:
    return linear.out_features if isinstance(linear, nn.Linear) else linear.out_channels


@torch.no_grad()
def materialize_fold(linear: nn.Module, scale: Tensor, bias: Tensor) -> None:
    """Write a fold into ``linear``'s own (private copy's) weights: for a folded layer that gets a
    weight-free rule and so runs its own forward."""
    # new Parameters: the explainer's copy shares the user's tensors, which must stay untouched
    weight = scale_output_channels(linear, linear.weight, scale)
    linear.weight = nn.Parameter(weight, requires_grad=False)
    linear.bias = nn.Parameter(bias, requires_grad=False)
