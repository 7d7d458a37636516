"""GoogLeNet (Inception v1) as torchvision builds it: BatchNorm after every conv, no auxiliary classifiers,
torchvision's parameter names, so its ImageNet checkpoint loads strictly (6,624,904 parameters)."""

from __future__ import annotations

from functools import partial

import torch
from torch import nn

from .base import init_weights
from .norms import Norm, resolve_norm


class ConvBN(nn.Sequential):
    """Conv (no bias), BatchNorm, ReLU, named conv / bn as in torchvision's BasicConv2d."""

    def __init__(self, cin: int, cout: int, kernel: int, *, norm: Norm, stride: int = 1):
        super().__init__()
        self.conv = nn.Conv2d(cin, cout, kernel, stride=stride, padding=kernel // 2, bias=False)
        self.bn = norm(cout)
        self.relu = nn.ReLU(inplace=True)


class Inception(nn.Module):
    """Four parallel branches concatenated: 1x1; 1x1 reduce then 3x3; 1x1 reduce then the "5x5"; 3x3 max-pool
    then 1x1. The 1x1 reductions are what keep the block cheap. The "5x5" branch is a 3x3 conv, as in
    torchvision's port of the reference weights (a known deviation from the paper, kept so they load)."""

    def __init__(self, cin: int, c1: int, r3: int, c3: int, r5: int, c5: int, pool: int, *, norm: Norm):
        super().__init__()
        self.branch1 = ConvBN(cin, c1, 1, norm=norm)
        self.branch2 = nn.Sequential(ConvBN(cin, r3, 1, norm=norm), ConvBN(r3, c3, 3, norm=norm))
        self.branch3 = nn.Sequential(ConvBN(cin, r5, 1, norm=norm), ConvBN(r5, c5, 3, norm=norm))
        self.branch4 = nn.Sequential(nn.MaxPool2d(3, 1, 1, ceil_mode=True), ConvBN(cin, pool, 1, norm=norm))
        self.out_channels = c1 + c3 + c5 + pool

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat([self.branch1(x), self.branch2(x), self.branch3(x), self.branch4(x)], 1)


# name: (input channels, 1x1, 3x3 reduce, 3x3, 5x5 reduce, 5x5, pool projection) -- the paper's Table 1.
BLOCKS = {
    "inception3a": (192, 64, 96, 128, 16, 32, 32), "inception3b": (256, 128, 128, 192, 32, 96, 64),
    "inception4a": (480, 192, 96, 208, 16, 48, 64), "inception4b": (512, 160, 112, 224, 24, 64, 64),
    "inception4c": (512, 128, 128, 256, 24, 64, 64), "inception4d": (512, 112, 144, 288, 32, 64, 64),
    "inception4e": (528, 256, 160, 320, 32, 128, 128), "inception5a": (832, 256, 160, 320, 32, 128, 128),
    "inception5b": (832, 384, 192, 384, 48, 128, 128),
}
# The layer that ends each of strides 4, 8, 16, 32.
TAPS = {"conv3": "c2", "inception3b": "c3", "inception4e": "c4", "inception5b": "c5"}


class GoogLeNet(nn.Module):
    """Stem (7x7 stride-2 conv, pool, 1x1 and 3x3 convs, pool), nine Inception blocks with pools after 3b and 4e,
    global average pool, dropout and `fc`.

    `small_input` (32x32 images): a 3x3 stride-1 first conv and no first pool, so the blocks work at strides
    2, 4, 8 instead of 8, 16, 32. `forward_features` gives the outputs ending strides 4..32 ('c2'..'c5').
    """

    head_name = "fc"

    def __init__(self, *, num_classes: int = 1000, in_channels: int = 3, norm_layer: str | Norm | None = None,
                 small_input: bool = False):
        super().__init__()
        norm = resolve_norm(norm_layer, partial(nn.BatchNorm2d, eps=0.001))  # the reference weights' eps
        if small_input:
            self.conv1 = ConvBN(in_channels, 64, 3, norm=norm)
            self.maxpool1 = nn.Identity()
        else:
            self.conv1 = ConvBN(in_channels, 64, 7, stride=2, norm=norm)
            self.maxpool1 = nn.MaxPool2d(3, 2, ceil_mode=True)
        self.conv2 = ConvBN(64, 64, 1, norm=norm)
        self.conv3 = ConvBN(64, 192, 3, norm=norm)
        self.maxpool2 = nn.MaxPool2d(3, 2, ceil_mode=True)
        self.inception3a, self.inception3b = (Inception(*BLOCKS[n], norm=norm) for n in ("inception3a", "inception3b"))
        self.maxpool3 = nn.MaxPool2d(3, 2, ceil_mode=True)
        for name in ("inception4a", "inception4b", "inception4c", "inception4d", "inception4e"):
            setattr(self, name, Inception(*BLOCKS[name], norm=norm))
        self.maxpool4 = nn.MaxPool2d(2, 2, ceil_mode=True)
        self.inception5a, self.inception5b = (Inception(*BLOCKS[n], norm=norm) for n in ("inception5a", "inception5b"))
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.dropout = nn.Dropout(0.2)
        self.num_features = self.inception5b.out_channels
        self.fc = nn.Linear(self.num_features, num_classes) if num_classes else nn.Identity()
        self.out_channels = {level: getattr(self, name).out_channels if name != "conv3" else 192
                             for name, level in TAPS.items()}
        first = 1 if small_input else 4
        self.strides = {level: first * 2 ** i for i, level in enumerate(TAPS.values())}
        init_weights(self, linear_std=0.01)

    def forward_features(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        feats = {}
        for name, layer in self.named_children():
            if name == "avgpool":
                break
            x = layer(x)
            if name in TAPS:
                feats[TAPS[name]] = x
        return feats

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.forward_features(x)["c5"]
        return self.fc(self.dropout(torch.flatten(self.avgpool(x), 1)))


def googlenet(**kwargs) -> GoogLeNet:
    return GoogLeNet(**kwargs)


MODELS = {"googlenet": googlenet}
