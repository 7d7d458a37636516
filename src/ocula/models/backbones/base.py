"""Pieces every backbone shares: torchvision-style initialisation and feature taps on a Sequential."""

from __future__ import annotations

import torch
from torch import nn


def init_weights(model: nn.Module, *, linear_std: float | None = 0.01) -> None:
    """Kaiming (fan-out, ReLU gain) convolutions, unit norms, and N(0, linear_std) linear layers when given."""
    for m in model.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, (nn.BatchNorm2d, nn.GroupNorm)):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)
        elif isinstance(m, nn.Linear) and linear_std is not None:
            nn.init.normal_(m.weight, 0, linear_std)
            nn.init.zeros_(m.bias)


class TappedFeatures:
    """For backbones built as one `self.features` Sequential: `self._taps` maps a layer index to 'c2'..'c5'."""

    def forward_features(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        feats = {}
        for index, layer in enumerate(self.features):
            x = layer(x)
            if index in self._taps:
                feats[self._taps[index]] = x
        return feats
