"""Rules for normalisation layers that are not folded into a Linear/Conv layer.

``LayerNormRule`` (LayerNorm, GroupNorm): Ali et al. 2022 (ICML, "XAI for Transformers: Better
Explanations through Conservative Propagation") and AttnLRP (Achtibat et al. 2024, ICML) hold the
standard deviation constant, which leaves a linear map: centring, scaling by 1/sigma, the
element-wise affine part. Its contributions go through the epsilon rule,

    c_ji = x_j * (delta_ij - 1/m) * w_i / sigma,   den_i = y_i (bias b_i included unless zero_bias)
    R_j  = sum_i c_ji / stab(den_i) * R_i = x_j * (v_j - mean(v)),   v_i = w_i R_i / (sigma stab(den_i))

(m: elements per normalised group, stab(d) = d + eps sign(d), sign(0) = +1). The right-hand side is
the input gradient of the sigma-detached map at R / stab(den), in closed form: one mean per group,
no autograd graph and no dense matrix. Since sum_j c_ji = y_i - b_i, it is conservative exactly when
zero_bias and epsilon -> 0; otherwise the bias keeps b_i / stab(y_i) of each R_i.

``InstanceNormRule``: InstanceNorm with each sample's statistics is GroupNorm with one group per
channel, so the same rule.

``AffineEpsilon`` (BatchNorm in eval mode with no Linear/Conv before it to be folded into, or an
InstanceNorm using running statistics): the
per-channel map y = a x + c, a = weight / sqrt(running_var + eps), c = bias - running_mean * a,
under the epsilon rule: R_in = a x / stab(a x + c) * R.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from ..errors import UnsupportedLayerError
from .base import ModuleRule, stabilize

_BATCHNORM = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d)
INSTANCENORM = (nn.InstanceNorm1d, nn.InstanceNorm2d, nn.InstanceNorm3d)


def uses_running_stats(module: nn.Module) -> bool:
    """An InstanceNorm in eval mode with ``track_running_stats``: a fixed affine map per channel
    (:class:`AffineEpsilon`); otherwise it normalises each sample's channel on its own."""
    return not module.training and getattr(module, "running_var", None) is not None


def _grouped(module: nn.Module, x: Tensor) -> tuple[Tensor, Tensor | None, Tensor | None, float]:
    """(x viewed as (N, groups, m), weight and bias broadcastable to x or None, eps)."""
    if isinstance(module, nn.LayerNorm):
        k = len(module.normalized_shape)
        if tuple(x.shape[x.ndim - k :]) != tuple(module.normalized_shape):
            raise UnsupportedLayerError(
                f"LayerNorm over {tuple(module.normalized_shape)} got input {tuple(x.shape)}"
            )
        flat = x.reshape(-1, 1, x.shape[x.ndim - k :].numel())
        return flat, module.weight, module.bias, module.eps
    if isinstance(module, nn.GroupNorm):
        n, c = x.shape[:2]
        view = (c, *([1] * (x.ndim - 2)))
        weight = None if module.weight is None else module.weight.view(view)
        bias = None if module.bias is None else module.bias.view(view)
        return x.reshape(n, module.num_groups, -1), weight, bias, module.eps
    if isinstance(module, INSTANCENORM):  # one group per channel
        n, c = x.shape[:2]
        view = (c, *([1] * (x.ndim - 2)))
        weight = None if module.weight is None else module.weight.view(view)
        bias = None if module.bias is None else module.bias.view(view)
        return x.reshape(n, c, -1), weight, bias, module.eps
    raise UnsupportedLayerError(
        "LayerNormRule applies to nn.LayerNorm, nn.GroupNorm and nn.InstanceNorm*d, not "
        f"{type(module).__name__}"
    )


class LayerNormRule(ModuleRule):
    """LayerNorm / GroupNorm with the standard deviation held constant, then the epsilon rule.

    Conservative as epsilon -> 0 when ``zero_bias`` leaves the bias out of the denominators.
    Compared with LXT 2.1 (``lxt.explicit.functional.layer_norm``, which backs AttnLRP's and
    CP-LRP's LayerNorm): the same contributions and the same denominator (the output with bias),
    but LXT stabilises with ``y + eps`` whatever the sign of y and normalises over the last
    dimension only; here the stabiliser follows the sign of the denominator (the engine's
    convention, ``stabilize``), any ``normalized_shape`` and GroupNorm are handled, and
    ``zero_bias`` is available. LXT's efficient mode only detaches sigma and takes the gradient
    (no per-layer division), which equals this rule with zero_bias and epsilon -> 0.
    """

    # the output is recomputed from x (one multiply-add on the normalised input the rule makes
    # anyway), so it is not kept: the layer after a LayerNorm may then recompute its input too
    uses_output = False

    def __init__(self, epsilon: float = 1e-6, zero_bias: bool = False) -> None:
        if epsilon < 0:
            raise ValueError(f"{type(self).__name__}: epsilon must be >= 0, got {epsilon}")
        self.epsilon = float(epsilon)
        self.zero_bias = zero_bias

    def relevance(
        self, module: nn.Module, x: Tensor, output: Tensor | None, relevance: Tensor
    ) -> Tensor:
        grouped, weight, bias, eps = _grouped(module, x)
        shape = grouped.shape
        wide = torch.promote_types(x.dtype, torch.float32)  # statistics as torch computes them
        # the normalised input and 1/sigma per group from torch's own kernel: 3-4x faster on
        # the CPU than a var_mean over the group
        normalised, _, rstd = torch.native_layer_norm(grouped.to(wide), shape[-1:], None, None, eps)
        del grouped  # possibly a copy of x: not held through the rest of the rule
        with_bias = not (self.zero_bias or bias is None)
        if output is not None and with_bias:
            den = output
        else:  # the output (with the bias) or its bias-free part, from the private normalised x
            den = normalised.to(x.dtype).view(x.shape)
            if weight is not None:
                den = den * weight
            if with_bias:
                den = den.add_(bias)
        del normalised
        # every tensor below is private to the rule: in place from here
        v = stabilize(den, self.epsilon)
        v = torch.div(relevance, v, out=v)
        if weight is not None:
            v.mul_(weight)
        vg = v.reshape(shape).to(wide) * rstd
        vg.sub_(vg.mean(-1, keepdim=True))
        return vg.to(x.dtype).view(x.shape).mul_(x)


class GroupNormRule(LayerNormRule):
    """The :class:`LayerNormRule` under the name of the module it is mapped to (nn.GroupNorm)."""


class InstanceNormRule(LayerNormRule):
    """The :class:`LayerNormRule` on nn.InstanceNorm1d/2d/3d normalising with each sample's own
    statistics: GroupNorm with one group per channel."""


class AffineEpsilon(ModuleRule):
    """An eval-mode BatchNorm on its own (pre-activation ResNets, DenseNet): y = a x + c per channel
    under the epsilon rule, R_in = a x / stab(a x + c) * R.

    This is the epsilon rule on a diagonal linear layer (METHOD.md section 5: BatchNorm with no
    conv before it; Hui and Binder 2019 discuss alternatives). The shift c (bias and mean) is a
    bias: it keeps c / stab(y) of the relevance. ``zero_bias`` leaves c out of the denominator;
    each output then has one contribution, a x, whose share is exactly 1, so the rule is the
    identity (including where a x = 0, where a stabilised division would drop R).
    """

    uses_output = False  # a x + c is recomputed from x: the output need not be kept

    def __init__(self, epsilon: float = 1e-6, zero_bias: bool = False) -> None:
        if epsilon < 0:
            raise ValueError(f"AffineEpsilon: epsilon must be >= 0, got {epsilon}")
        self.epsilon = float(epsilon)
        self.zero_bias = zero_bias

    @staticmethod
    def scale_shift(module: nn.Module, x: Tensor) -> tuple[Tensor, Tensor]:
        """(a, c) viewed to broadcast against ``x`` (N, C, *)."""
        if not isinstance(module, _BATCHNORM + INSTANCENORM):
            raise UnsupportedLayerError(
                "AffineEpsilon applies to BatchNorm1d/2d/3d (and InstanceNorm with running "
                f"statistics), not {type(module).__name__}"
            )
        if module.training or module.running_var is None or module.running_mean is None:
            raise UnsupportedLayerError(
                f"{type(module).__name__} uses batch statistics (training mode or "
                "track_running_stats=False): it is not a fixed affine map per sample"
            )
        a = torch.rsqrt(module.running_var + module.eps)
        if module.weight is not None:
            a = a * module.weight
        c = -module.running_mean * a
        if module.bias is not None:
            c = c + module.bias
        view = (-1, *([1] * (x.ndim - 2)))
        return a.view(view).to(x.dtype), c.view(view).to(x.dtype)

    def relevance(self, module: nn.Module, x: Tensor, output: Tensor, relevance: Tensor) -> Tensor:
        a, c = self.scale_shift(module, x)
        if self.zero_bias:
            if relevance.shape != x.shape:
                raise UnsupportedLayerError(
                    f"AffineEpsilon: relevance {tuple(relevance.shape)} vs input {tuple(x.shape)}"
                )
            return relevance
        ax = a * x
        return ax * (relevance / stabilize(ax + c, self.epsilon))
