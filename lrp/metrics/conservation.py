"""Relative conservation error of an explanation: how much relevance was created or lost."""

from __future__ import annotations

import torch
from torch import Tensor

from lrp.errors import InvalidInputError


def conservation_error(relevance: Tensor, initial: Tensor | float) -> Tensor:
    """``|sum R - R0| / |R0|`` per sample, from input relevance (N, ...) and initial relevance.

    ``initial`` is (N,) or a scalar (the relevance put at the output: e.g. the target logit or
    probability). A sample with ``R0 == 0`` gets 0 when its relevance also sums to 0, else inf;
    a sample with NaN relevance gets NaN (the caller reports it; the others are still measured).
    Computed in float64 so the error of a conservative rule is not hidden by rounding.
    """
    if not isinstance(relevance, Tensor) or relevance.dim() < 1 or relevance.shape[0] == 0:
        raise InvalidInputError("conservation_error: relevance must be a (N, ...) tensor")
    n = relevance.shape[0]
    r0 = torch.as_tensor(initial, dtype=torch.float64, device=relevance.device).reshape(-1)
    if r0.numel() == 1:
        r0 = r0.expand(n)
    if r0.numel() != n:
        raise InvalidInputError(
            f"conservation_error: initial has {r0.numel()} entries for {n} relevance samples"
        )
    total = relevance.reshape(n, -1).double().sum(dim=1)
    diff = (total - r0).abs()
    den = r0.abs()
    safe = torch.where(den > 0, den, torch.ones_like(den))
    zero_case = torch.where(diff > 0, torch.full_like(diff, float("inf")), torch.zeros_like(diff))
    return torch.where(den > 0, diff / safe, zero_case).where(~diff.isnan(), diff)
