"""Small model zoo: networks with LocalResponseNorm layers and a small ViT (no pretrained weights
are fetched)."""

from __future__ import annotations

from .caffenet import CaffeNet, caffenet
from .lrn_cnn import LRNCNN, lrn_cnn
from .vit import small_vit

__all__ = ["LRNCNN", "CaffeNet", "caffenet", "lrn_cnn", "small_vit"]
