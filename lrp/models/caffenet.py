"""CaffeNet: the BVLC reference network (AlexNet variant with pooling before normalisation).

Layout from BVLC Caffe ``models/bvlc_reference_caffenet/deploy.prototxt`` (Jia et al. 2014), the
network Binder et al. 2016 explain with the LRN rule. Unlike torchvision's AlexNet it keeps the
two cross-channel LRN layers (``LocalResponseNorm(5, 1e-4, 0.75, 1)``, after max-pooling as in
CaffeNet, where the original AlexNet normalises before pooling) and the grouped conv2/conv4/conv5
(``group: 2``).

No weights are bundled or downloaded: BVLC's Caffe weights are not distributed with torchvision.
"""

from __future__ import annotations

from collections import OrderedDict

from torch import nn


class CaffeNet(nn.Sequential):
    """``features -> avgpool -> flatten -> classifier``, every child a plain module or Sequential.

    The model is an ``nn.Sequential`` of named children so the LRP engine can follow it without
    tracing a custom ``forward``. ``avgpool`` (adaptive, 6x6) is the identity at Caffe's 227x227
    input and lets smaller inputs (>= 67 px) through for tests.
    """

    def __init__(self, num_classes: int = 1000, in_channels: int = 3, dropout: float = 0.5) -> None:
        lrn = (5, 1e-4, 0.75, 1.0)  # local_size, alpha, beta, k of CaffeNet's norm1/norm2
        features = nn.Sequential(
            OrderedDict(
                conv1=nn.Conv2d(in_channels, 96, kernel_size=11, stride=4),
                relu1=nn.ReLU(),
                pool1=nn.MaxPool2d(kernel_size=3, stride=2),
                norm1=nn.LocalResponseNorm(*lrn),
                conv2=nn.Conv2d(96, 256, kernel_size=5, padding=2, groups=2),
                relu2=nn.ReLU(),
                pool2=nn.MaxPool2d(kernel_size=3, stride=2),
                norm2=nn.LocalResponseNorm(*lrn),
                conv3=nn.Conv2d(256, 384, kernel_size=3, padding=1),
                relu3=nn.ReLU(),
                conv4=nn.Conv2d(384, 384, kernel_size=3, padding=1, groups=2),
                relu4=nn.ReLU(),
                conv5=nn.Conv2d(384, 256, kernel_size=3, padding=1, groups=2),
                relu5=nn.ReLU(),
                pool5=nn.MaxPool2d(kernel_size=3, stride=2),
            )
        )
        classifier = nn.Sequential(
            OrderedDict(
                fc6=nn.Linear(256 * 6 * 6, 4096),
                relu6=nn.ReLU(),
                drop6=nn.Dropout(dropout),
                fc7=nn.Linear(4096, 4096),
                relu7=nn.ReLU(),
                drop7=nn.Dropout(dropout),
                fc8=nn.Linear(4096, num_classes),
            )
        )
        super().__init__(
            OrderedDict(
                features=features,
                avgpool=nn.AdaptiveAvgPool2d((6, 6)),
                flatten=nn.Flatten(),
                classifier=classifier,
            )
        )


def caffenet(num_classes: int = 1000, in_channels: int = 3, dropout: float = 0.5) -> CaffeNet:
    """BVLC CaffeNet layout with freshly initialised weights (input 227x227 in Caffe)."""
    return CaffeNet(num_classes=num_classes, in_channels=in_channels, dropout=dropout)
