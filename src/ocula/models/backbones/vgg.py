"""VGG11 with batch norm, with torchvision's parameter names, so its ImageNet checkpoint loads strictly."""

from __future__ import annotations

import torch
from torch import nn

from .base import TappedFeatures, init_weights
from .norms import Norm, resolve_norm

LEVELS = ("c2", "c3", "c4", "c5")

# Conv widths, "M" a 2x2 max-pool (configuration "A" of the VGG paper).
VGG11 = [64, "M", 128, "M", 256, 256, "M", 512, 512, "M", 512, 512, "M"]


class VGG(TappedFeatures, nn.Module):
    """`features` (3x3 conv, norm, ReLU; max-pools between), 7x7 average pool, three-layer `classifier`.

    `forward_features(x)` returns, for strides 4, 8, 16, 32, the last activation at that stride ('c2'..'c4'
    come just before a pool; 'c5' is after the last pool). `num_classes=0` leaves out the classifier, and
    `forward` then returns the flattened 512x7x7 pooled features.
    """

    head_name = "classifier"

    def __init__(self, *, config: list[int | str], num_classes: int = 1000, in_channels: int = 3,
                 norm_layer: str | Norm | None = None):
        super().__init__()
        norm = resolve_norm(norm_layer, nn.BatchNorm2d)
        layers: list[nn.Module] = []
        self.out_channels: dict[str, int] = {}
        self.strides: dict[str, int] = {}
        last_at: dict[str, int] = {}  # level -> index of the last layer working at its stride
        cin, stride = in_channels, 1
        for item in config:
            if item == "M":
                layers.append(nn.MaxPool2d(2, 2))
                stride *= 2
            else:
                layers += [nn.Conv2d(cin, item, 3, padding=1), norm(item), nn.ReLU(inplace=True)]
                cin = item
            level = f"c{stride.bit_length() - 1}"
            if level in LEVELS:
                last_at[level] = len(layers) - 1
                self.out_channels[level] = cin
                self.strides[level] = stride
        self._taps = {index: level for level, index in last_at.items()}
        self.features = nn.Sequential(*layers)
        self.avgpool = nn.AdaptiveAvgPool2d(7)
        self.num_features = cin * 7 * 7
        self.classifier = nn.Sequential(
            nn.Linear(self.num_features, 4096), nn.ReLU(inplace=True), nn.Dropout(0.5),
            nn.Linear(4096, 4096), nn.ReLU(inplace=True), nn.Dropout(0.5),
            nn.Linear(4096, num_classes),
        ) if num_classes else nn.Identity()
        init_weights(self)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.forward_features(x)["c5"]
        return self.classifier(torch.flatten(self.avgpool(x), 1))


def vgg11_bn(**kwargs) -> VGG:
    return VGG(config=VGG11, **kwargs)


MODELS = {"vgg11_bn": vgg11_bn}
