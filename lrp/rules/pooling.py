"""The sum rule for average pools, and its use for other linear parameter-free maps."""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor, nn

from ..errors import UnsupportedLayerError
from .base import ModuleRule, check_share, stabilize


class Proportional(ModuleRule):
    """Relevance shared in proportion to each input's share of the (average-)pooled sum.

    ``through``: an optional linear map used instead of the module in the backward pass, e.g.
    Otsuki et al. treat the ResNet stem's max-pool as a 2x2 average pool when propagating.
    ``empty="flat"``: a window whose inputs sum to exactly zero (all zero after a ReLU) shares its
    relevance uniformly instead of dropping it, which keeps the rule conservative when ``through``
    is not the module itself (a 2x2 window can be all zero where the 3x3 max-pool window is not).
    ``stabilizer_share="flat"``: the stabiliser's share of every window's relevance (all of it
    for an all-zero window) is spread the same way instead of absorbed, as in ``AlphaBeta``.
    """

    uses_output = False  # the backward re-runs the (cheap, linear) map on x

    def __init__(
        self,
        stabilizer: float = 1e-6,
        through: Callable[[Tensor], Tensor] | None = None,
        empty: str = "drop",
        stabilizer_share: str = "absorb",
    ) -> None:
        if empty not in ("drop", "flat"):
            raise ValueError(f"Proportional: empty={empty!r} is not one of ['drop', 'flat']")
        self.stabilizer = float(stabilizer)
        self.through = through
        self.empty = empty
        self.stabilizer_share = check_share("Proportional", stabilizer_share)

    def relevance(self, module: nn.Module, x: Tensor, output: Tensor, relevance: Tensor) -> Tensor:
        fn = self.through or module
        with torch.enable_grad():
            xx = x.detach().requires_grad_(True)
            z = fn(xx)
            if z.shape != relevance.shape:
                raise UnsupportedLayerError(
                    f"Proportional rule on {type(module).__name__}: its backward map {fn} gives "
                    f"shape {tuple(z.shape)}, the module's output is {tuple(relevance.shape)} (the "
                    "otsuki2024 preset's 2x2 average-pool backward fits only a max-pool that "
                    "halves the size, as in the ResNet stem)"
                )
            z_value = z.detach()
            share = relevance / stabilize(z_value, self.stabilizer)
            rest = None  # relevance the proportional shares do not carry: spread flat below
            if self.stabilizer_share == "flat" and self.stabilizer > 0:
                rest = relevance - share * z_value  # R eps / stab(z); all of R where z == 0
            elif self.empty == "flat":
                empty = z_value == 0
                share = torch.where(empty, 0.0, share)
                rest = torch.where(empty, relevance, 0.0)
            (grad,) = torch.autograd.grad(z, xx, share, retain_graph=rest is not None)
            result = x * grad
            if rest is not None:
                counts = fn(torch.ones_like(x[:1]))  # the map's weight sum per output
                (flat,) = torch.autograd.grad(z, xx, rest / counts)
                result = result + flat
        return result
