"""VGG-11 and VGG-16, with or without batch norm, with torchvision's parameter names, so its ImageNet
checkpoints load strictly."""

from __future__ import annotations

from functools import partial

import torch
from torch import nn

from .base import TappedFeatures, fc4096_head, init_weights
from .norms import Norm, resolve_norm

# Conv widths, "M" a 2x2 max-pool: configurations "A" (VGG-11) and "D" (VGG-16, the lecture's) of the VGG paper.
VGG11 = [64, "M", 128, "M", 256, 256, "M", 512, 512, "M", 512, 512, "M"]
VGG16 = [64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M", 512, 512, 512, "M"]


class VGG(TappedFeatures, nn.Module):
    """`features` (3x3 conv, norm unless `batch_norm=False`, ReLU; max-pools between), 7x7 average pool,
    three-layer `classifier` (fc-4096, fc-4096, fc-classes).

    `small_input` (32x32 images): the five pools leave a 1x1 map, so the head is one linear layer on the 512
    pooled features instead of fc-4096 layers over a 7x7 copy of that one pixel.

    `forward_features(x)` returns, for strides 4, 8, 16, 32, the last activation at that stride ('c2'..'c4'
    come just before a pool; 'c5' is after the last pool). `num_classes=0` leaves out the classifier, and
    `forward` then returns the flattened 512x7x7 pooled features.
    """

    head_name = "classifier"

    def __init__(self, *, config: list[int | str], num_classes: int = 1000, in_channels: int = 3,
                 norm_layer: str | Norm | None = None, batch_norm: bool = True, small_input: bool = False):
        super().__init__()
        norm = resolve_norm(norm_layer, nn.BatchNorm2d)
        layers: list[nn.Module] = []
        geometry: list[tuple[int, int]] = []  # (stride, channels) per layer
        cin = in_channels
        for item in config:
            if item == "M":
                layers.append(nn.MaxPool2d(2, 2))
                geometry.append((2, cin))
            else:
                block = [nn.Conv2d(cin, item, 3, padding=1), *([norm(item)] if batch_norm else []),
                         nn.ReLU(inplace=True)]
                layers += block
                geometry += [(1, item)] * len(block)
                cin = item
        self.set_taps(geometry)
        self.features = nn.Sequential(*layers)
        pooled = 1 if small_input else 7
        self.avgpool = nn.AdaptiveAvgPool2d(pooled)
        self.num_features = cin * pooled * pooled
        self.classifier = fc4096_head(self.num_features, num_classes, small_input=small_input, dropout_first=False)
        init_weights(self)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(torch.flatten(self.avgpool(self.features(x)), 1))


MODELS = {f"vgg{depth}{suffix}": partial(VGG, config=config, batch_norm=bool(suffix))
          for depth, config in ((11, VGG11), (16, VGG16)) for suffix in ("", "_bn")}
