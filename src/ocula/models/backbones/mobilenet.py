"""MobileNet v1 (the paper's 28-layer table), v2 and v3 (large, small); v2 and v3 with torchvision's parameter
names, so its ImageNet checkpoints load strictly. Every builder takes `width_mult` and `small_input`."""

from __future__ import annotations

from functools import partial
from typing import Callable

import torch
from torch import nn

from .base import TappedFeatures, init_weights
from .norms import Norm, resolve_norm

def stride_plan(small_input: bool) -> Callable[[int], int]:
    """Strides for the layers in order: for 32x32 images (`small_input`) the first two stride-2 layers (the stem
    and the first downsampling block) keep stride 1, so the last stage works on 4x4 maps instead of 1x1."""
    skips = [2 if small_input else 0]

    def stride(s: int) -> int:
        if s == 2 and skips[0]:
            skips[0] -= 1
            return 1
        return s

    return stride


def make_divisible(v: float, divisor: int = 8) -> int:
    """Round a channel count to a multiple of `divisor`, never losing more than 10% (the MobileNet rule)."""
    rounded = max(divisor, int(v + divisor / 2) // divisor * divisor)
    return rounded + divisor if rounded < 0.9 * v else rounded


class ConvNormAct(nn.Sequential):
    """Conv, norm, optional activation; a Sequential so keys read '.0.weight', '.1.weight' as in torchvision."""

    def __init__(self, cin: int, cout: int, kernel: int = 3, *, stride: int = 1, groups: int = 1,
                 norm: Norm, act: Callable[..., nn.Module] | None):
        layers = [nn.Conv2d(cin, cout, kernel, stride, (kernel - 1) // 2, groups=groups, bias=False), norm(cout)]
        if act is not None:
            layers.append(act(inplace=True))
        super().__init__(*layers)


class InvertedResidualV2(nn.Module):
    """1x1 expand (ReLU6), 3x3 depthwise (ReLU6), linear 1x1 project; residual when the shape is kept."""

    def __init__(self, *, cin: int, cout: int, stride: int, expand: int, norm: Norm):
        super().__init__()
        hidden = int(round(cin * expand))
        layers = [ConvNormAct(cin, hidden, 1, norm=norm, act=nn.ReLU6)] if expand != 1 else []
        layers += [
            ConvNormAct(hidden, hidden, 3, stride=stride, groups=hidden, norm=norm, act=nn.ReLU6),
            nn.Conv2d(hidden, cout, 1, bias=False),  # torchvision keeps this conv and its norm unwrapped
            norm(cout),
        ]
        self.conv = nn.Sequential(*layers)
        self.use_residual = stride == 1 and cin == cout

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.conv(x) if self.use_residual else self.conv(x)


class SqueezeExcite(nn.Module):
    """Channel gate of MobileNetV3: global pool, 1x1 reduce (ReLU), 1x1 expand, hard-sigmoid scale."""

    def __init__(self, channels: int, squeeze: int):
        super().__init__()
        self.fc1 = nn.Conv2d(channels, squeeze, 1)
        self.fc2 = nn.Conv2d(squeeze, channels, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        s = torch.relu(self.fc1(x.mean((2, 3), keepdim=True)))
        return x * nn.functional.hardsigmoid(self.fc2(s))


class InvertedResidualV3(nn.Module):
    """Expand (skipped when it would not widen), depthwise kxk, optional squeeze-excite, linear project."""

    def __init__(self, *, cin: int, kernel: int, hidden: int, cout: int, se: bool, act: Callable[..., nn.Module],
                 stride: int, norm: Norm):
        super().__init__()
        layers = [ConvNormAct(cin, hidden, 1, norm=norm, act=act)] if hidden != cin else []
        layers.append(ConvNormAct(hidden, hidden, kernel, stride=stride, groups=hidden, norm=norm, act=act))
        if se:
            layers.append(SqueezeExcite(hidden, make_divisible(hidden // 4)))
        layers.append(ConvNormAct(hidden, cout, 1, norm=norm, act=None))
        self.block = nn.Sequential(*layers)
        self.use_residual = stride == 1 and cin == cout

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.block(x) if self.use_residual else self.block(x)


class MobileNet(TappedFeatures, nn.Module):
    """`features` (a Sequential of stem, inverted-residual blocks and a last 1x1 conv), then pool and `classifier`.

    The builders below fill it for v1, v2 and v3. `forward_features(x)` returns, for strides 4, 8, 16, 32, the
    output of the last layer working at that stride ('c2'..'c5'; 'c5' is the full `features` output; a
    `small_input` net stops at stride 8, 'c3').
    `num_classes=0` leaves out the classifier, and `forward` then returns the pooled features.
    """

    head_name = "classifier"

    def __init__(self, *, layers: list[tuple[nn.Module, int, int]], classifier: nn.Module):
        super().__init__()
        self.features = nn.Sequential(*(layer for layer, _, _ in layers))
        self.classifier = classifier
        self.set_taps([(stride, cout) for _, stride, cout in layers])
        self.num_features = layers[-1][2]
        init_weights(self)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.features(x).mean((2, 3)))


# MobileNetV1 (Howard et al. 2017, Table 1): after a 3x3 stride-2 conv to 32 channels, depthwise-separable pairs
# (3x3 depthwise with this stride, then 1x1 to these channels). The paper's table gives the last depthwise
# conv stride 2, but its own next row takes a 7x7 input: that stride is 1, as in every implementation.
V1_BLOCKS = [(1, 64), (2, 128), (1, 128), (2, 256), (1, 256), (2, 512),
             (1, 512), (1, 512), (1, 512), (1, 512), (1, 512), (2, 1024), (1, 1024)]


def mobilenet_v1(*, num_classes: int = 1000, in_channels: int = 3, norm_layer: str | Norm | None = None,
                 width_mult: float = 1.0, small_input: bool = False) -> MobileNet:
    """28 layers: the stem, 13 depthwise + 13 pointwise convs (each with BatchNorm and ReLU), pool, fc."""
    norm, stride = resolve_norm(norm_layer, nn.BatchNorm2d), stride_plan(small_input)
    cin, s = make_divisible(32 * width_mult), stride(2)
    layers = [(ConvNormAct(in_channels, cin, 3, stride=s, norm=norm, act=nn.ReLU), s, cin)]
    for s, c in V1_BLOCKS:
        cout, s = make_divisible(c * width_mult), stride(s)
        layers.append((ConvNormAct(cin, cin, 3, stride=s, groups=cin, norm=norm, act=nn.ReLU), s, cin))
        layers.append((ConvNormAct(cin, cout, 1, norm=norm, act=nn.ReLU), 1, cout))
        cin = cout
    return MobileNet(layers=layers, classifier=nn.Linear(cin, num_classes) if num_classes else nn.Identity())


# MobileNetV2 stages: expansion t, output channels c, repeats n, first stride s.
V2_STAGES = [(1, 16, 1, 1), (6, 24, 2, 2), (6, 32, 3, 2), (6, 64, 4, 2), (6, 96, 3, 1), (6, 160, 3, 2), (6, 320, 1, 1)]


def mobilenet_v2(*, num_classes: int = 1000, in_channels: int = 3, norm_layer: str | Norm | None = None,
                 width_mult: float = 1.0, small_input: bool = False) -> MobileNet:
    norm, stride = resolve_norm(norm_layer, nn.BatchNorm2d), stride_plan(small_input)
    cin, s = make_divisible(32 * width_mult), stride(2)
    layers = [(ConvNormAct(in_channels, cin, 3, stride=s, norm=norm, act=nn.ReLU6), s, cin)]
    for t, c, n, first in V2_STAGES:
        cout = make_divisible(c * width_mult)
        for i in range(n):
            s = stride(first if i == 0 else 1)
            layers.append((InvertedResidualV2(cin=cin, cout=cout, stride=s, expand=t, norm=norm), s, cout))
            cin = cout
    last = make_divisible(1280 * max(1.0, width_mult))  # thinner nets keep the full-width head
    layers.append((ConvNormAct(cin, last, 1, norm=norm, act=nn.ReLU6), 1, last))
    head = nn.Sequential(nn.Dropout(0.2), nn.Linear(last, num_classes)) if num_classes else nn.Identity()
    return MobileNet(layers=layers, classifier=head)


# MobileNetV3 blocks: kernel, expanded channels, output channels, squeeze-excite, hard-swish, stride.
V3_LARGE = [
    (3, 16, 16, False, False, 1), (3, 64, 24, False, False, 2), (3, 72, 24, False, False, 1),
    (5, 72, 40, True, False, 2), (5, 120, 40, True, False, 1), (5, 120, 40, True, False, 1),
    (3, 240, 80, False, True, 2), (3, 200, 80, False, True, 1), (3, 184, 80, False, True, 1),
    (3, 184, 80, False, True, 1), (3, 480, 112, True, True, 1), (3, 672, 112, True, True, 1),
    (5, 672, 160, True, True, 2), (5, 960, 160, True, True, 1), (5, 960, 160, True, True, 1),
]
V3_SMALL = [
    (3, 16, 16, True, False, 2), (3, 72, 24, False, False, 2), (3, 88, 24, False, False, 1),
    (5, 96, 40, True, True, 2), (5, 240, 40, True, True, 1), (5, 240, 40, True, True, 1),
    (5, 120, 48, True, True, 1), (5, 144, 48, True, True, 1), (5, 288, 96, True, True, 2),
    (5, 576, 96, True, True, 1), (5, 576, 96, True, True, 1),
]


def _mobilenet_v3(blocks: list[tuple], head_width: int, *, num_classes: int = 1000, in_channels: int = 3,
                  norm_layer: str | Norm | None = None, width_mult: float = 1.0,
                  small_input: bool = False) -> MobileNet:
    # The reference training used these BatchNorm settings; the running statistics depend on them.
    norm = resolve_norm(norm_layer, partial(nn.BatchNorm2d, eps=0.001, momentum=0.01))
    stride = stride_plan(small_input)
    cin, s = make_divisible(16 * width_mult), stride(2)
    layers = [(ConvNormAct(in_channels, cin, 3, stride=s, norm=norm, act=nn.Hardswish), s, cin)]
    for kernel, hidden, cout, se, hs, s in blocks:
        hidden, cout, s = make_divisible(hidden * width_mult), make_divisible(cout * width_mult), stride(s)
        block = InvertedResidualV3(cin=cin, kernel=kernel, hidden=hidden, cout=cout, se=se,
                                   act=nn.Hardswish if hs else nn.ReLU, stride=s, norm=norm)
        layers.append((block, s, cout))
        cin = cout
    layers.append((ConvNormAct(cin, 6 * cin, 1, norm=norm, act=nn.Hardswish), 1, 6 * cin))
    hidden = make_divisible(head_width * width_mult)
    head = nn.Sequential(nn.Linear(6 * cin, hidden), nn.Hardswish(inplace=True), nn.Dropout(0.2, inplace=True),
                         nn.Linear(hidden, num_classes)) if num_classes else nn.Identity()
    return MobileNet(layers=layers, classifier=head)


def mobilenet_v3_large(**kwargs) -> MobileNet:
    return _mobilenet_v3(V3_LARGE, 1280, **kwargs)


def mobilenet_v3_small(**kwargs) -> MobileNet:
    return _mobilenet_v3(V3_SMALL, 1024, **kwargs)


MODELS = {"mobilenet_v1": mobilenet_v1, "mobilenet_v2": mobilenet_v2, "mobilenet_v3_large": mobilenet_v3_large,
          "mobilenet_v3_small": mobilenet_v3_small}
