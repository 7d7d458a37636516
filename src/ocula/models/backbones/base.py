"""Pieces every backbone shares: torchvision-style initialisation and feature taps on a Sequential."""

from __future__ import annotations

import math

import torch
from torch import nn


def init_weights(model: nn.Module, *, linear_std: float | None = 0.01) -> None:
    """Kaiming (fan-out, ReLU gain) convolutions, unit norms, and N(0, linear_std) linear layers when given.

    The fan-out of a grouped conv counts only its group (9 for a 3x3 depthwise conv): torch's formula counts all
    channels, which leaves depthwise outputs ~1 / channels in variance, far from the running variance (1) a
    BatchNorm starts with, and a briefly trained MobileNet then predicts one class in eval mode."""
    for m in model.modules():
        if isinstance(m, nn.Conv2d):
            fan_out = m.out_channels // m.groups * m.weight[0, 0].numel()
            with torch.no_grad():  # as kaiming_normal_ draws it (one normal_ call), so ungrouped convs are unchanged
                m.weight.normal_(0, math.sqrt(2.0) / math.sqrt(fan_out))
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, (nn.BatchNorm2d, nn.GroupNorm)):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)
        elif isinstance(m, nn.Linear) and linear_std is not None:
            nn.init.normal_(m.weight, 0, linear_std)
            nn.init.zeros_(m.bias)


LEVELS = ("c2", "c3", "c4", "c5")


def fc4096_head(num_features: int, num_classes: int, *, small_input: bool, dropout_first: bool) -> nn.Module:
    """AlexNet's and VGG's fc-4096, fc-4096, fc-classes head with dropout (before each of the first two linear
    layers in AlexNet, after their ReLU in VGG, as torchvision numbers them); for 32x32 images (`small_input`)
    one linear layer; nothing when `num_classes` is 0."""
    if not num_classes:
        return nn.Identity()
    if small_input:
        return nn.Linear(num_features, num_classes)
    layers = []
    for cin in (num_features, 4096):
        block = [nn.Linear(cin, 4096), nn.ReLU(inplace=True)]
        layers += [nn.Dropout(0.5), *block] if dropout_first else [*block, nn.Dropout(0.5)]
    return nn.Sequential(*layers, nn.Linear(4096, num_classes))


class TappedFeatures:
    """For backbones built as one `self.features` Sequential: `self._taps` maps a layer index to 'c2'..'c5'."""

    def set_taps(self, geometry: list[tuple[int, int]]) -> None:
        """`geometry`: (stride, output channels) of each layer of `features`. Taps the last layer working at each
        of strides 4, 8, 16, 32 and fills `out_channels` and `strides`."""
        self.out_channels: dict[str, int] = {}
        self.strides: dict[str, int] = {}
        last_at: dict[str, int] = {}  # level -> index of the last layer working at its stride
        stride = 1
        for index, (layer_stride, cout) in enumerate(geometry):
            stride *= layer_stride
            level = f"c{stride.bit_length() - 1}"
            if level in LEVELS:
                last_at[level] = index
                self.out_channels[level] = cout
                self.strides[level] = stride
        self._taps = {index: level for level, index in last_at.items()}

    def forward_features(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        feats = {}
        for index, layer in enumerate(self.features):
            x = layer(x)
            if index in self._taps:
                feats[self._taps[index]] = x
        return feats
