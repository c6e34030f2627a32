"""Zennit 0.5.1 as the oracle: its attribution of a model, and the comparison used against it."""

from __future__ import annotations

import torch
from torch import Tensor, nn
from zennit.attribution import Gradient
from zennit.core import Composite


def zennit_relevance(model: nn.Module, x: Tensor, output_relevance: Tensor,
                     composite: Composite) -> Tensor:
    """Zennit's relevance at the input for ``output_relevance`` at the output."""
    with Gradient(model=model, composite=composite) as attributor:
        _, relevance = attributor(x, output_relevance)
    return relevance


def assert_matches(ours: Tensor, expected: Tensor, atol: float = 1e-10) -> None:
    """Equal to ``atol`` relative to the largest expected value (which must not be 0)."""
    scale = expected.abs().max()
    assert scale > 0
    torch.testing.assert_close(ours / scale, expected / scale, rtol=0, atol=atol)
