"""Relevance at a residual merge ``h = h_m + h_s`` (Otsuki et al. 2024, ECCV).

``splitting`` (the paper's Ratio-Based Relevance Splitting) divides the relevance element-wise in
proportion to |h_m| and |h_s|, so the two parts sum to the incoming relevance and conservation holds
through the whole ResNet. The other modes exist for comparison:

- ``half``: 50/50 everywhere (paper ablation ii);
- ``gradient``: relevance copied into both branches, as generic autograd-based tools do (not
  conservative: every merge doubles the relevance it passes on);
- ``ablation-i``: identity skips get 0, projection shortcuts 50/50;
- ``ablation-iii``: identity skips get 0, projection shortcuts by ratio;
- ``ablation-ii`` / ``ablation-iv`` are aliases of ``half`` / ``splitting``;
- ``proportional``: signed shares h_m / (h_m + h_s) (stabilised), what Zennit's ResNet canonizer
  does (its summation module gets the Norm rule); conservative up to the stabiliser, but shares
  can be negative or exceed 1 when the branches have opposite signs.

Where |h_m| + |h_s| = 0 (both exactly zero) the ratio is undefined; the relevance then goes to the
skip connection, so none is lost and no NaN appears.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

from .base import stabilize

MODES = ("splitting", "half", "gradient", "proportional", "ablation-i", "ablation-iii")
ALIASES = {"ratio": "splitting", "ablation-iv": "splitting", "ablation-ii": "half"}


def resolve_mode(mode: str) -> str:
    """Canonical residual mode name, or a ValueError that lists the valid ones."""
    canonical = ALIASES.get(mode, mode)
    if canonical not in MODES:
        valid = sorted((*MODES, *ALIASES))
        raise ValueError(f"residual={mode!r} is not one of {valid}")
    return canonical


PROPORTIONAL_STABILIZER = 1e-6


def branch_share(
    h_m: Tensor, h_s: Tensor, mode: str, projection: bool, skip_nonnegative: bool = False
) -> Tensor | float | None:
    """Fraction of the merge's relevance that goes to the residual branch (None: gradient copy).

    The skip connection gets the rest (except in ``proportional`` mode, see ``_MergeFunction``).
    ``skip_nonnegative``: h_s is known to be >= 0 (an identity skip after a ReLU), so |h_s| = h_s.
    """
    if mode == "gradient":
        return None
    if mode == "proportional":
        return h_m / stabilize(h_m + h_s, PROPORTIONAL_STABILIZER)
    if mode == "ablation-i":
        mode = "half" if projection else "branch-only"
    elif mode == "ablation-iii":
        mode = "splitting" if projection else "branch-only"
    if mode == "branch-only":
        return 1.0
    if mode == "half":
        return 0.5
    # |h_m| / (|h_m| + |h_s|) in place; where both are 0 the floor makes it 0/tiny = 0 (all to the
    # skip). A total below the floor (subnormal) still gives a share in [0, 1].
    a_m = h_m.abs()
    total = torch.add(h_s, a_m) if skip_nonnegative else h_s.abs().add_(a_m)
    return a_m.div_(total.clamp_min_(torch.finfo(a_m.dtype).tiny))


class _MergeFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, h_m: Tensor, h_s: Tensor, merge: ResidualMerge) -> Tensor:
        share = branch_share(h_m, h_s, merge.mode, merge.projection, merge.skip_nonnegative)
        out = h_m + h_s
        ctx.mode = merge.mode
        ctx.share = share if not isinstance(share, Tensor) else "tensor"
        if isinstance(share, Tensor):
            # proportional mode gives the skip its own signed share, not the rest
            skip = (
                h_s / stabilize(out, PROPORTIONAL_STABILIZER)
                if merge.mode == "proportional"
                else None
            )
            ctx.save_for_backward(share, *(() if skip is None else (skip,)))
        return out

    @staticmethod
    def backward(ctx: Any, relevance: Tensor) -> tuple[Tensor, Tensor, None]:
        if ctx.share is None:
            return relevance, relevance, None
        if ctx.share == "tensor":
            saved = ctx.saved_tensors
            r_m = relevance * saved[0]
            if len(saved) == 2:
                return r_m, relevance * saved[1], None
            # the share is private to this merge and used once: the skip's part goes into it
            return r_m, torch.sub(relevance, r_m, out=saved[0]), None
        r_m = relevance * ctx.share
        return r_m, relevance - r_m, None


class ResidualMerge(nn.Module):
    """``h_m + h_s`` whose backward splits relevance by ``mode`` (see module docstring)."""

    def __init__(self, mode: str = "splitting", projection: bool = False) -> None:
        super().__init__()
        self.mode = resolve_mode(mode)
        self.projection = projection
        self.skip_nonnegative = False  # set by the explainer where the skip follows a ReLU

    def forward(self, h_m: Tensor, h_s: Tensor) -> Tensor:
        if not (h_m.requires_grad or h_s.requires_grad):
            return h_m + h_s
        return _MergeFunction.apply(h_m, h_s, self)

    def extra_repr(self) -> str:
        return f"mode={self.mode!r}, projection={self.projection}"
