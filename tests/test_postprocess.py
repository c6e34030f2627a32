"""Channel reduction, heat quantization and normalisation."""

from __future__ import annotations

import pytest
import torch

from lrp.errors import InvalidInputError
from lrp.postprocess import heat_quantization, normalize, reduce_channels


def test_reduce_channels_all_modes() -> None:
    r = torch.tensor([[[[1.0]], [[-2.0]], [[2.0]]]])  # (1, 3, 1, 1)
    assert reduce_channels(r, "sum").item() == pytest.approx(1.0)
    assert reduce_channels(r, "abs-sum").item() == pytest.approx(5.0)
    assert reduce_channels(r, "max-abs").item() == pytest.approx(2.0)
    assert reduce_channels(r, "l2").item() == pytest.approx(3.0)
    assert reduce_channels(torch.randn(2, 3, 4, 5)).shape == (2, 4, 5)


def test_reduce_channels_errors() -> None:
    with pytest.raises(InvalidInputError, match="how"):
        reduce_channels(torch.zeros(1, 3, 2, 2), "mean")
    with pytest.raises(InvalidInputError, match="relevance"):
        reduce_channels(torch.zeros(3, 2, 2))


def test_heat_quantization_binning() -> None:
    # lo = 0, hi = 1, levels 8: q = floor(8 v) clamped to 7; inner edges go to the upper bin.
    v = torch.tensor([0.0, 0.124, 0.125, 0.5, 0.874, 0.875, 0.999, 1.0], dtype=torch.float64)
    q = heat_quantization(v.view(1, 1, 8), levels=8).flatten() * 7
    assert q.round().tolist() == [0, 0, 1, 4, 6, 7, 7, 7]


def test_heat_quantization_per_image_and_levels() -> None:
    torch.manual_seed(0)
    a = torch.rand(1, 6, 6)
    batch = torch.cat([a, 10 * a - 3])  # affine copy: same levels
    q = heat_quantization(batch, levels=8)
    assert torch.equal(q[0], q[1])
    assert q.min() == 0 and q.max() == 1
    for levels in (2, 3, 8, 16):
        out = heat_quantization(torch.linspace(-1, 5, 1000).view(1, 10, 100), levels=levels)
        assert out.unique().numel() == levels
        # order preserving: a larger value never gets a lower level
        assert (out.flatten().diff() >= 0).all()


def test_heat_quantization_constant_map_and_channels() -> None:
    assert torch.equal(heat_quantization(torch.full((2, 3, 3), 4.0)), torch.zeros(2, 3, 3))
    x = torch.randn(2, 3, 4, 4)
    assert heat_quantization(x).shape == x.shape


def test_heat_quantization_errors() -> None:
    with pytest.raises(InvalidInputError, match="levels"):
        heat_quantization(torch.rand(1, 2, 2), levels=1)
    with pytest.raises(InvalidInputError, match="NaN"):
        heat_quantization(torch.tensor([[[float("nan"), 1.0]]]))
    with pytest.raises(InvalidInputError, match="heatmap"):
        heat_quantization(torch.rand(4))


def test_normalize() -> None:
    h = torch.tensor([[[-2.0, 1.0]], [[0.0, 0.0]]])
    assert normalize(h).tolist() == [[[-1.0, 0.5]], [[0.0, 0.0]]]
    assert normalize(h, "min-max").tolist() == [[[0.0, 1.0]], [[0.0, 0.0]]]
    with pytest.raises(InvalidInputError, match="how"):
        normalize(h, "zscore")
