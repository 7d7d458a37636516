"""AlexNet as torchvision builds it (the "one weird trick" single-tower variant: 64-192-384-256-256 convs), with
its parameter names, so its ImageNet checkpoint loads strictly."""

from __future__ import annotations

import torch
from torch import nn

from .base import TappedFeatures, fc4096_head, init_weights


class AlexNet(TappedFeatures, nn.Module):
    """11x11 stride-4, 5x5 and three 3x3 convs with ReLU and three 3x3 stride-2 max-pools, a 6x6 average pool and
    the dropout, fc-4096, fc-4096, fc-classes `classifier` (61.1M parameters, 58.6M of them in the fc layers).

    `small_input` (32x32 images): the first conv becomes 3x3 stride 1 and the head one linear layer on the 256
    globally pooled features; the three pools then leave a 3x3 map. `forward_features` taps strides 4..32 ('c2'
    is the first conv's output); a small-input net stops at stride 8.
    """

    head_name = "classifier"

    def __init__(self, *, num_classes: int = 1000, in_channels: int = 3, small_input: bool = False):
        super().__init__()
        first = nn.Conv2d(in_channels, 64, 3, padding=1) if small_input else \
            nn.Conv2d(in_channels, 64, 11, stride=4, padding=2)
        self.features = nn.Sequential(
            first, nn.ReLU(inplace=True), nn.MaxPool2d(3, 2),
            nn.Conv2d(64, 192, 5, padding=2), nn.ReLU(inplace=True), nn.MaxPool2d(3, 2),
            nn.Conv2d(192, 384, 3, padding=1), nn.ReLU(inplace=True),
            nn.Conv2d(384, 256, 3, padding=1), nn.ReLU(inplace=True),
            nn.Conv2d(256, 256, 3, padding=1), nn.ReLU(inplace=True), nn.MaxPool2d(3, 2))
        self.set_taps([(first.stride[0], 64), (1, 64), (2, 64), (1, 192), (1, 192), (2, 192), (1, 384), (1, 384),
                       (1, 256), (1, 256), (1, 256), (1, 256), (2, 256)])
        pooled = 1 if small_input else 6
        self.avgpool = nn.AdaptiveAvgPool2d(pooled)
        self.num_features = 256 * pooled * pooled
        self.classifier = fc4096_head(self.num_features, num_classes, small_input=small_input, dropout_first=True)
        init_weights(self)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(torch.flatten(self.avgpool(self.features(x)), 1))


def alexnet(**kwargs) -> AlexNet:
    return AlexNet(**kwargs)


MODELS = {"alexnet": alexnet}
