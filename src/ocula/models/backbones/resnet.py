"""ResNet-18/34/50 with torchvision's parameter names, so torchvision ImageNet checkpoints load strictly."""

from __future__ import annotations

import torch
from torch import nn

from .base import init_weights
from .norms import Norm, resolve_norm


def conv3x3(cin: int, cout: int, stride: int = 1) -> nn.Conv2d:
    return nn.Conv2d(cin, cout, 3, stride=stride, padding=1, bias=False)


def conv1x1(cin: int, cout: int, stride: int = 1) -> nn.Conv2d:
    return nn.Conv2d(cin, cout, 1, stride=stride, bias=False)


class BasicBlock(nn.Module):
    """Two 3x3 convs plus the shortcut (ResNet-18/34)."""

    expansion = 1

    def __init__(self, *, cin: int, width: int, stride: int, norm: Norm):
        super().__init__()
        cout = width * self.expansion
        self.conv1 = conv3x3(cin, width, stride)
        self.bn1 = norm(width)
        self.relu = nn.ReLU(inplace=True)
        self.conv2 = conv3x3(width, cout)
        self.bn2 = norm(cout)
        self.downsample = shortcut(cin, cout, stride, norm)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        identity = x if self.downsample is None else self.downsample(x)
        return self.relu(out + identity)


class Bottleneck(nn.Module):
    """1x1 reduce, 3x3 (carries the stride, as in torchvision's "v1.5"), 1x1 expand x4 (ResNet-50)."""

    expansion = 4

    def __init__(self, *, cin: int, width: int, stride: int, norm: Norm):
        super().__init__()
        cout = width * self.expansion
        self.conv1 = conv1x1(cin, width)
        self.bn1 = norm(width)
        self.conv2 = conv3x3(width, width, stride)
        self.bn2 = norm(width)
        self.conv3 = conv1x1(width, cout)
        self.bn3 = norm(cout)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = shortcut(cin, cout, stride, norm)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        identity = x if self.downsample is None else self.downsample(x)
        return self.relu(out + identity)


def shortcut(cin: int, cout: int, stride: int, norm: Norm) -> nn.Module | None:
    """Projection shortcut when the shape changes; None keeps the identity (and torchvision's key set)."""
    if stride == 1 and cin == cout:
        return None
    return nn.Sequential(conv1x1(cin, cout, stride), norm(cout))


class ResNet(nn.Module):
    """Stem (7x7 conv, max-pool) then four stages at strides 4, 8, 16, 32, then average pool and `fc`.

    `small_input` (32x32 images such as CIFAR-10) makes the stem one 3x3 stride-1 conv without max-pool: the
    stages then work at strides 1, 2, 4, 8 and the last sees 4x4 maps instead of 1x1.
    `forward(x)` gives logits; `forward_features(x)` gives the stage outputs 'c2'..'c5'.
    `num_classes=0` leaves out `fc`, and `forward` then returns the pooled features.
    """

    head_name = "fc"

    def __init__(self, *, block: type[BasicBlock | Bottleneck], layers: tuple[int, int, int, int],
                 num_classes: int = 1000, in_channels: int = 3, norm_layer: str | Norm | None = None,
                 small_input: bool = False):
        super().__init__()
        norm = resolve_norm(norm_layer, nn.BatchNorm2d)
        if small_input:
            self.conv1 = nn.Conv2d(in_channels, 64, 3, padding=1, bias=False)
            self.maxpool = nn.Identity()
        else:
            self.conv1 = nn.Conv2d(in_channels, 64, 7, stride=2, padding=3, bias=False)
            self.maxpool = nn.MaxPool2d(3, stride=2, padding=1)
        self.bn1 = norm(64)
        self.relu = nn.ReLU(inplace=True)
        stem_stride = 1 if small_input else 4
        cin = 64
        self.out_channels: dict[str, int] = {}
        self.strides: dict[str, int] = {}
        for i, (width, depth) in enumerate(zip((64, 128, 256, 512), layers)):
            stride = 1 if i == 0 else 2
            blocks = []
            for j in range(depth):
                blocks.append(block(cin=cin, width=width, stride=stride if j == 0 else 1, norm=norm))
                cin = width * block.expansion
            self.add_module(f"layer{i + 1}", nn.Sequential(*blocks))
            self.out_channels[f"c{i + 2}"] = cin
            self.strides[f"c{i + 2}"] = stem_stride * 2 ** i
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.num_features = cin
        self.fc = nn.Linear(cin, num_classes) if num_classes else nn.Identity()
        init_weights(self, linear_std=None)  # torchvision keeps torch's default Linear init here

    def forward_features(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        feats = {}
        for name, layer in zip(self.out_channels, (self.layer1, self.layer2, self.layer3, self.layer4)):
            x = feats[name] = layer(x)
        return feats

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.forward_features(x)["c5"]
        return self.fc(torch.flatten(self.avgpool(x), 1))


def resnet18(**kwargs) -> ResNet:
    return ResNet(block=BasicBlock, layers=(2, 2, 2, 2), **kwargs)


def resnet34(**kwargs) -> ResNet:
    return ResNet(block=BasicBlock, layers=(3, 4, 6, 3), **kwargs)


def resnet50(**kwargs) -> ResNet:
    return ResNet(block=Bottleneck, layers=(3, 4, 6, 3), **kwargs)


MODELS = {"resnet18": resnet18, "resnet34": resnet34, "resnet50": resnet50}
