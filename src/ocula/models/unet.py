"""U-Net (Ronneberger et al. 2015) for any input size, binary or multi-class.

Two named configurations (`build_unet`):
  * 'unet-seed': the Keras model of the white-blood-cell notes, layer for layer: 32-64-128-256-512 filters, two
    3x3 'same' convs + ReLU per level, dropout after every pooling and after every decoder level (none at the
    bottleneck), nearest-neighbour UpSampling2D + concatenation, a 1x1 output conv. 7,846,081 parameters with one
    input channel as in the notes (7,846,657 with RGB input: 2 more channels x 9 x 32 weights in the first conv).
  * 'unet': the default. Half the widths (16-32-64-128-256), batch norm and residual blocks, bilinear upsampling:
    about a quarter of the seed's parameters and FLOPs, and norm + residuals let it train with a larger learning
    rate and without dropout. The benchmark is what settles the choice.

Inputs of any height and width work: the network pads (zeros, bottom/right) up to a multiple of 2**depth and crops
the logits back. Zeros because they are what every 'same' conv already sees beyond the border, and because reflect
padding fails once the pad exceeds the image (tiny inputs). The pad is computed from the traced shape, so an ONNX
export keeps H and W dynamic.

The model returns logits; the sigmoid (one class) or softmax (several) lives in the loss and in prediction.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

NORMS = (None, "batch", "group")
UPSAMPLES = ("nearest", "bilinear", "transpose")


def _norm(kind: str | None, channels: int) -> nn.Module:
    if kind == "batch":
        return nn.BatchNorm2d(channels)
    if kind == "group":
        # 8 groups (or fewer for narrow layers): group norm does not depend on the batch size.
        groups = next(g for g in (8, 4, 2, 1) if channels % g == 0)
        return nn.GroupNorm(groups, channels)
    return nn.Identity()


class ConvBlock(nn.Module):
    """Two 3x3 convs, each followed by an optional norm and ReLU; with `residual`, x + F(x) (1x1 projection when
    the width changes) before the last ReLU, as in ResNet's basic block."""

    def __init__(self, *, in_channels: int, out_channels: int, norm: str | None = None, residual: bool = False):
        super().__init__()
        bias = norm is None  # a norm layer's shift makes the conv bias redundant
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, padding=1, bias=bias)
        self.norm1 = _norm(norm, out_channels)
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, padding=1, bias=bias)
        self.norm2 = _norm(norm, out_channels)
        self.shortcut = None
        if residual:
            self.shortcut = (
                nn.Identity()
                if in_channels == out_channels
                else nn.Sequential(nn.Conv2d(in_channels, out_channels, 1, bias=bias), _norm(norm, out_channels))
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = F.relu(self.norm1(self.conv1(x)))
        y = self.norm2(self.conv2(y))
        if self.shortcut is not None:
            y = y + self.shortcut(x)
        return F.relu(y)


class Up(nn.Module):
    """Double the resolution of the deeper features, concatenate the skip connection, then a ConvBlock.

    'nearest' is Keras' UpSampling2D default (the seed); 'bilinear' is smoother at the same cost; 'transpose' is
    the paper's learned 2x2 up-convolution, which also halves the channels before the concatenation."""

    def __init__(self, *, deep: int, skip: int, out_channels: int, norm, residual, upsample: str):
        super().__init__()
        self.mode = upsample
        self.up = nn.ConvTranspose2d(deep, skip, 2, stride=2) if upsample == "transpose" else None
        merged = skip + (skip if upsample == "transpose" else deep)
        self.block = ConvBlock(in_channels=merged, out_channels=out_channels, norm=norm, residual=residual)

    def forward(self, x: torch.Tensor, skip: torch.Tensor) -> torch.Tensor:
        if self.up is not None:
            x = self.up(x)
        elif self.mode == "bilinear":
            x = F.interpolate(x, scale_factor=2.0, mode="bilinear", align_corners=False)
        else:
            x = F.interpolate(x, scale_factor=2.0, mode="nearest")
        return self.block(torch.cat([x, skip], dim=1))


class UNet(nn.Module):
    """U-Net returning logits [N, num_classes, H, W] for input [N, in_channels, H, W] of any H and W.

    `widths` lists the channels per level, top to bottom; len(widths) - 1 poolings. `dropout` (the seed's
    placement) applies after each pooling and after each decoder level."""

    def __init__(
        self,
        *,
        in_channels: int = 3,
        num_classes: int = 1,
        widths: tuple[int, ...] = (32, 64, 128, 256, 512),
        norm: str | None = None,
        dropout: float = 0.0,
        residual: bool = False,
        upsample: str = "bilinear",
    ):
        super().__init__()
        if norm not in NORMS:
            raise ValueError(f"norm must be one of {NORMS}, got {norm!r}")
        if upsample not in UPSAMPLES:
            raise ValueError(f"upsample must be one of {UPSAMPLES}, got {upsample!r}")
        if len(widths) < 2 or num_classes < 1 or in_channels < 1:
            raise ValueError("UNet needs at least two widths, in_channels >= 1 and num_classes >= 1")
        widths = tuple(int(w) for w in widths)
        self.in_channels, self.num_classes, self.widths = in_channels, num_classes, widths
        self.multiple = 2 ** (len(widths) - 1)

        self.down = nn.ModuleList()
        c = in_channels
        for w in widths:
            self.down.append(ConvBlock(in_channels=c, out_channels=w, norm=norm, residual=residual))
            c = w
        self.up = nn.ModuleList(
            Up(deep=widths[i + 1], skip=widths[i], out_channels=widths[i], norm=norm, residual=residual,
               upsample=upsample)
            for i in reversed(range(len(widths) - 1))
        )
        self.drop = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.head = nn.Conv2d(widths[0], num_classes, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h, w = x.shape[-2], x.shape[-1]
        # Pad bottom/right to a multiple of 2**depth; (-h) % m stays symbolic under tracing and torch.export.
        x = F.pad(x, (0, (-w) % self.multiple, 0, (-h) % self.multiple))
        skips = []
        for i, block in enumerate(self.down):
            if i > 0:
                x = self.drop(F.max_pool2d(x, 2))
            x = block(x)
            skips.append(x)
        skips.pop()  # the bottleneck output is x itself
        for up in self.up:
            x = self.drop(up(x, skips.pop()))
        return self.head(x)[..., :h, :w]


class NormalizedUNet(nn.Module):
    """A U-Net fed images in their native value range (RGB 0..255 as floats): the per-channel normalisation is
    part of the model, so prediction, ONNX export and serving cannot feed it the wrong scaling. The remaining
    keyword arguments are the UNet's."""

    def __init__(self, *, value_max: float = 255.0, mean: tuple[float, ...] = (0.5,), std: tuple[float, ...] = (0.25,),
                 **unet):
        super().__init__()
        self.unet = UNet(**unet)
        shape = (1, -1, 1, 1)
        # Not persistent: the statistics are constructor arguments, recorded once in the model file's metadata.
        self.register_buffer("scale", 1.0 / (value_max * torch.tensor(std, dtype=torch.float32).view(shape)),
                             persistent=False)
        self.register_buffer("shift", (torch.tensor(mean, dtype=torch.float32) / torch.tensor(std)).view(shape),
                             persistent=False)

    @property
    def num_classes(self) -> int:
        return self.unet.num_classes

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.unet(x * self.scale - self.shift)


def unet_config(name: str) -> dict:
    """The keyword arguments of a named U-Net configuration."""
    configs = {
        # Dropout rate: the notes keep it in an unpublished params file; 0.2 is a usual choice for conv layers.
        "unet-seed": dict(widths=(32, 64, 128, 256, 512), norm=None, dropout=0.2, residual=False, upsample="nearest"),
        "unet": dict(widths=(16, 32, 64, 128, 256), norm="batch", dropout=0.0, residual=True, upsample="bilinear"),
    }
    if name not in configs:
        raise ValueError(f"unknown U-Net {name!r}; choose one of {sorted(configs)}")
    return dict(configs[name])


def build_unet(name: str = "unet", **kw) -> UNet:
    """A named U-Net; keyword arguments override the configuration (e.g. in_channels=1, num_classes=3)."""
    return UNet(**{**unet_config(name), **kw})


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())
