"""The sum rule for average pools, and its use for other linear parameter-free maps."""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor, nn

from .base import ModuleRule, stabilize


class Proportional(ModuleRule):
    """Relevance shared in proportion to each input's share of the (average-)pooled sum.

    ``through``: an optional linear map used instead of the module in the backward pass, e.g.
    Otsuki et al. treat the ResNet stem's max-pool as a 2x2 average pool when propagating.
    """

    def __init__(
        self, stabilizer: float = 1e-6, through: Callable[[Tensor], Tensor] | None = None
    ) -> None:
        self.stabilizer = float(stabilizer)
        self.through = through

    def relevance(self, module: nn.Module, x: Tensor, output: Tensor, relevance: Tensor) -> Tensor:
        fn = self.through or module
        with torch.enable_grad():
            xx = x.detach().requires_grad_(True)
            z = fn(xx)
            if z.shape != relevance.shape:
                raise ValueError(
                    f"Proportional rule on {type(module).__name__}: the backward map gives shape "
                    f"{tuple(z.shape)}, the module's output is {tuple(relevance.shape)}"
                )
            (grad,) = torch.autograd.grad(z, xx, relevance / stabilize(z.detach(), self.stabilizer))
        return x * grad
