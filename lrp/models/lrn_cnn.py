"""A small CIFAR-style CNN with two cross-channel LRN layers, trainable on a CPU in minutes.

Layout after the CIFAR-10 nets of cuda-convnet (Krizhevsky, ``layers-18pct``) and Caffe's
``cifar10_full`` (conv 5x5 -> pool -> LRN, twice), with the CaffeNet ordering ReLU -> max-pool ->
LRN so every LRN input is non-negative, then two 3x3 convs, a global average pool and a two-layer
classifier (CaffeNet's fc6/fc7 pattern, small). No BatchNorm: LRN nets predate it.

Trainability without BatchNorm comes from He (Kaiming) initialisation of the convolutions (the
PyTorch default init leaves the activations of a deep ReLU stack shrinking layer by layer, which
with LRN on top kept the first version of this net at ~63% on the synthetic shapes); the first conv
has stride 2 (as CaffeNet's conv1 has stride 4) so 64 px images cost ~30 M MACs.

The LRN uses the Caffe/PyTorch parametrisation (alpha divided by size); its default ``alpha = 0.3``
is CaffeNet's 1e-4 rescaled to normalised inputs: Caffe nets see mean-subtracted 0-255 pixels (std
about 57), so their squared activations are about 57^2 times larger and 1e-4 * 57^2 ~ 0.3. With
1e-4 on unit-scale inputs the LRN would be an identity and its rule moot.
"""

from __future__ import annotations

from collections import OrderedDict
from typing import Any

from torch import nn


class LRNCNN(nn.Sequential):
    """``features -> avgpool -> flatten -> classifier``; 0.3 M parameters, ~30 M MACs at 64 px."""

    def __init__(
        self,
        num_classes: int = 10,
        in_channels: int = 3,
        width: int = 32,
        lrn_size: int = 5,
        lrn_alpha: float = 0.3,
        lrn_beta: float = 0.75,
        lrn_k: float = 1.0,
        stem_stride: int = 2,
        hidden: int = 128,
        dropout: float = 0.3,
    ) -> None:
        lrn = (lrn_size, lrn_alpha, lrn_beta, lrn_k)
        w1, w2, w3 = width, 2 * width, 4 * width
        features = nn.Sequential(
            OrderedDict(
                conv1=nn.Conv2d(in_channels, w1, kernel_size=5, stride=stem_stride, padding=2),
                relu1=nn.ReLU(),
                pool1=nn.MaxPool2d(kernel_size=3, stride=2, padding=1),
                norm1=nn.LocalResponseNorm(*lrn),
                conv2=nn.Conv2d(w1, w2, kernel_size=5, padding=2),
                relu2=nn.ReLU(),
                pool2=nn.MaxPool2d(kernel_size=3, stride=2, padding=1),
                norm2=nn.LocalResponseNorm(*lrn),
                conv3=nn.Conv2d(w2, w3, kernel_size=3, padding=1),
                relu3=nn.ReLU(),
                conv4=nn.Conv2d(w3, w3, kernel_size=3, padding=1),
                relu4=nn.ReLU(),
            )
        )
        classifier = nn.Sequential(
            OrderedDict(
                fc1=nn.Linear(w3, hidden),
                relu5=nn.ReLU(),
                drop=nn.Dropout(dropout),
                fc2=nn.Linear(hidden, num_classes),
            )
        )
        super().__init__(
            OrderedDict(
                features=features,
                avgpool=nn.AdaptiveAvgPool2d((1, 1)),
                flatten=nn.Flatten(),
                classifier=classifier,
            )
        )
        for m in self.features.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
                nn.init.zeros_(m.bias)


def lrn_cnn(num_classes: int = 10, in_channels: int = 3, **kwargs: Any) -> LRNCNN:
    """Small CNN with two LRN layers for 32-64 px images (CIFAR-10 scale); see :class:`LRNCNN`."""
    return LRNCNN(num_classes=num_classes, in_channels=in_channels, **kwargs)
