"""Heatmap post-processing: channel reduction, heat quantization, normalisation.

All functions are batched over the first axis and stay on the input's device.
"""

from __future__ import annotations

import torch
from torch import Tensor

from lrp.errors import InvalidInputError

REDUCTIONS = ("sum", "abs-sum", "max-abs", "l2")


def reduce_channels(relevance: Tensor, how: str = "sum") -> Tensor:
    """Reduce (N, C, H, W) relevance to an (N, H, W) heatmap.

    ``sum`` keeps signs and conservation (the LRP convention, Otsuki et al.), ``abs-sum`` and
    ``l2`` measure magnitude (common for gradient maps), ``max-abs`` the strongest channel.
    """
    if not isinstance(relevance, Tensor) or relevance.dim() != 4:
        shape = tuple(relevance.shape) if isinstance(relevance, Tensor) else type(relevance)
        raise InvalidInputError(f"reduce_channels: relevance must be (N, C, H, W), got {shape}")
    if how == "sum":
        return relevance.sum(dim=1)
    if how == "abs-sum":
        return relevance.abs().sum(dim=1)
    if how == "max-abs":
        return relevance.abs().amax(dim=1)
    if how == "l2":
        return relevance.pow(2).sum(dim=1).sqrt()
    raise InvalidInputError(f"reduce_channels: unknown how={how!r}; choose one of {REDUCTIONS}")


def heat_quantization(heatmap: Tensor, levels: int = 8) -> Tensor:
    """Map each image's heatmap to ``levels`` equal-width levels between its min and max.

    Otsuki et al. (2024) post-process their LRP maps this way. Binning, per image with
    ``lo = min``, ``hi = max``: level ``q = floor(levels * (h - lo) / (hi - lo))`` clamped to
    ``levels - 1`` (so the maximum falls in the top level and a value exactly on an inner edge goes
    to the upper bin). The result is ``q / (levels - 1)`` in [0, 1], same shape as the input. A
    constant map becomes all zeros. Works on (N, H, W) or (N, C, H, W) (min/max over all but N).
    """
    if not isinstance(levels, int) or isinstance(levels, bool) or levels < 2:
        raise InvalidInputError(f"heat_quantization: levels must be an int >= 2, got {levels!r}")
    _check_batched(heatmap, "heat_quantization", "heatmap")
    flat = heatmap.reshape(heatmap.shape[0], -1)
    lo = flat.amin(dim=1, keepdim=True)
    hi = flat.amax(dim=1, keepdim=True)
    span = hi - lo
    safe = torch.where(span > 0, span, torch.ones_like(span))
    q = torch.floor(levels * (flat - lo) / safe).clamp_(0, levels - 1)
    q = torch.where(span > 0, q, torch.zeros_like(q))
    return (q / (levels - 1)).reshape(heatmap.shape)


def normalize(heatmap: Tensor, how: str = "max-abs") -> Tensor:
    """Scale each map for display: ``max-abs`` to [-1, 1], ``min-max`` to [0, 1].

    Constant or all-zero maps are returned as zeros instead of NaN.
    """
    _check_batched(heatmap, "normalize", "heatmap")
    flat = heatmap.reshape(heatmap.shape[0], -1)
    if how == "max-abs":
        scale = flat.abs().amax(dim=1, keepdim=True)
        out = torch.where(scale > 0, flat / torch.where(scale > 0, scale, 1), 0.0)
    elif how == "min-max":
        lo = flat.amin(dim=1, keepdim=True)
        span = flat.amax(dim=1, keepdim=True) - lo
        out = torch.where(span > 0, (flat - lo) / torch.where(span > 0, span, 1), 0.0)
    else:
        raise InvalidInputError(f"normalize: unknown how={how!r}; choose 'max-abs' or 'min-max'")
    return out.reshape(heatmap.shape)


def _check_batched(t: Tensor, fn: str, name: str) -> None:
    if not isinstance(t, Tensor) or t.dim() not in (3, 4):
        shape = tuple(t.shape) if isinstance(t, Tensor) else type(t)
        raise InvalidInputError(f"{fn}: {name} must be (N, H, W) or (N, C, H, W), got {shape}")
    if not t.is_floating_point():
        raise InvalidInputError(f"{fn}: {name} must be a floating tensor, got {t.dtype}")
    if torch.isnan(t).any():
        raise InvalidInputError(f"{fn}: {name} contains NaN")
