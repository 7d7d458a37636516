"""Feature pyramid (Lin et al. 2017): every backbone level becomes a map with the same width for the detector heads."""

from __future__ import annotations

from collections import OrderedDict

import torch
from torch import nn
from torch.nn import functional as F


class FPN(nn.Module):
    """Lateral 1x1 convs, top-down nearest upsampling with addition, then a 3x3 conv per level.

    `in_channels` maps backbone levels ('c2'..'c5') to widths; `forward` takes the backbone's
    `forward_features` dict and returns 'p2'..'p5' (plus 'p6', a stride-2 subsample of the top, if asked).
    """

    def __init__(self, *, in_channels: dict[str, int], out_channels: int = 256, extra_p6: bool = False):
        super().__init__()
        self.levels = sorted(in_channels, key=lambda name: int(name[1:]))  # fine to coarse
        self.lateral = nn.ModuleList(nn.Conv2d(in_channels[name], out_channels, 1) for name in self.levels)
        self.output = nn.ModuleList(nn.Conv2d(out_channels, out_channels, 3, padding=1) for _ in self.levels)
        self.extra_p6 = extra_p6
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_uniform_(m.weight, a=1)
                nn.init.zeros_(m.bias)

    def forward(self, feats: dict[str, torch.Tensor]) -> OrderedDict[str, torch.Tensor]:
        maps = [None] * len(self.levels)
        top = None
        for i in reversed(range(len(self.levels))):
            lateral = self.lateral[i](feats[self.levels[i]])
            # Upsample to the lateral's exact size: odd input sizes make strides round unevenly.
            top = lateral if top is None else lateral + F.interpolate(top, size=lateral.shape[-2:], mode="nearest")
            maps[i] = self.output[i](top)
        out = OrderedDict((f"p{name[1:]}", m) for name, m in zip(self.levels, maps))
        if self.extra_p6:
            out[f"p{int(self.levels[-1][1:]) + 1}"] = F.max_pool2d(maps[-1], 1, stride=2)
        return out


class BackboneWithFPN(nn.Module):
    """A backbone's 'c2'..'c5' through an FPN: `forward(x)` -> OrderedDict 'p2'..'p5' (and 'p6').

    Build the backbone with `num_classes=0` (and load ImageNet weights with `skip_head=True`): an unused
    classifier would only cost memory and trip DistributedDataParallel's unused-parameter check.
    """

    def __init__(self, backbone: nn.Module, *, out_channels: int = 256, extra_p6: bool = False):
        super().__init__()
        self.body = backbone
        self.fpn = FPN(in_channels=backbone.out_channels, out_channels=out_channels, extra_p6=extra_p6)
        self.out_channels = out_channels
        self.strides = {f"p{name[1:]}": stride for name, stride in backbone.strides.items()}
        if extra_p6:
            self.strides["p6"] = 2 * self.strides["p5"]

    def forward(self, x: torch.Tensor) -> OrderedDict[str, torch.Tensor]:
        return self.fpn(self.body.forward_features(x))
