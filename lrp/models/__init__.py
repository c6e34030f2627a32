"""Small model zoo of networks with LocalResponseNorm layers (no pretrained weights are fetched)."""

from __future__ import annotations

from .caffenet import CaffeNet, caffenet
from .lrn_cnn import LRNCNN, lrn_cnn

__all__ = ["LRNCNN", "CaffeNet", "caffenet", "lrn_cnn"]
