"""The fast CIFAR-10 network of Keller Jordan's airbench94, written for ocula (no code taken from it).

A small VGG-like net: a fixed 2x2 whitening convolution whose filters come from the training data's patch
statistics, then three groups of conv - max-pool - BN - GELU - conv - BN - GELU (64, 256, 256 channels), a global
max-pool and a linear layer whose logits are scaled down by 9. Convolutions start as identities (Dirac) on their
first channels, BatchNorm keeps its scale fixed at 1 and follows the batch statistics quickly (momentum 0.6).
In eval mode the model averages its logits over test-time views (`tta`: 0 none, 1 mirror, 2 mirror and one-pixel
shifts), so evaluate, predict, serve and export all see the same model.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from ocula.models.classifiers import Normalize


def whitening_filters(x: torch.Tensor, kernel: int, eps: float = 5e-4) -> tuple[torch.Tensor, torch.Tensor]:
    """Weights [C*k*k, C, k, k] and bias [C*k*k] of a k x k convolution that maps the k x k patches of the images
    `x` [N, C, H, W] to zero mean and (up to `eps`) identity covariance: the patches projected on the eigenvectors
    of their covariance, each divided by the square root of its eigenvalue."""
    c = x.shape[1]
    patches = F.unfold(x.double(), kernel).transpose(1, 2).reshape(-1, c * kernel * kernel)  # rows: patches
    mean = patches.mean(0)
    centred = patches - mean
    eigenvalues, eigenvectors = torch.linalg.eigh(centred.T @ centred / len(centred))
    w = eigenvectors.T.flip(0) / (eigenvalues.flip(0).clamp(min=0) + eps).sqrt()[:, None]  # largest first
    return w.reshape(-1, c, kernel, kernel).float(), (-w @ mean).float()


class ConvGroup(nn.Sequential):
    """conv - max-pool - BN - GELU - conv - BN - GELU: the pool before the first BN halves the work of the rest."""

    def __init__(self, cin: int, cout: int, bn_momentum: float):
        super().__init__(_conv(cin, cout), nn.MaxPool2d(2), _norm(cout, bn_momentum), nn.GELU(),
                         _conv(cout, cout), _norm(cout, bn_momentum), nn.GELU())


def _conv(cin: int, cout: int) -> nn.Conv2d:
    """A 3x3 convolution that starts as the identity on its first min(cin, cout) channels (Dirac) plus the usual
    random init on the rest: the signal passes through the fresh network unchanged, which trains faster."""
    conv = nn.Conv2d(cin, cout, 3, padding=1, bias=False)
    with torch.no_grad():
        n = min(cin, cout)
        nn.init.dirac_(conv.weight[:n, :n])
    return conv


def _norm(channels: int, momentum: float) -> nn.BatchNorm2d:
    """BatchNorm without a learned scale (a following conv can scale), running statistics that follow the batches
    fast (airbench's momentum 0.6 is torch's 0.4): the lookahead pulls the weights back, and the statistics must
    keep up with them."""
    norm = nn.BatchNorm2d(channels, eps=1e-12, momentum=1 - momentum)
    norm.weight.requires_grad_(False)
    return norm


class AirbenchNet(nn.Module):
    """airbench94's network for images in their native value range; `widths` are the three groups' channels."""

    def __init__(self, *, num_classes: int = 10, in_channels: int = 3, widths: list[int] = (64, 256, 256),
                 value_max: float = 255.0, mean: float | list[float] = 0.5, std: float | list[float] = 0.25,
                 whiten_kernel: int = 2, bn_momentum: float = 0.6, logit_scale: float = 1 / 9, tta: int = 2):
        super().__init__()
        self.normalize = Normalize(value_max, mean, std)
        patch = in_channels * whiten_kernel**2
        # Filters and their negatives: GELU after the whitening then keeps both signs of every component.
        self.whiten = nn.Conv2d(in_channels, 2 * patch, whiten_kernel)
        self.whiten.weight.requires_grad_(False)  # set from the data (init_from_data), never trained
        groups, cin = [], 2 * patch
        for w in widths:
            groups.append(ConvGroup(cin, w, bn_momentum))
            cin = w
        self.features = nn.Sequential(*groups)
        self.head = nn.Linear(cin, num_classes, bias=False)
        self.logit_scale, self.tta = logit_scale, tta

    @torch.no_grad()
    def init_from_data(self, images: torch.Tensor, n: int = 5000, eps: float = 5e-4) -> None:
        """Whitening filters from the patches of `n` training images [N, C, H, W] spread over the set."""
        idx = torch.from_numpy(np.unique(np.linspace(0, len(images) - 1, min(n, len(images))).round().astype(int)))
        x = self.normalize(images[idx].float().to(self.whiten.weight.device))
        w, b = whitening_filters(x, self.whiten.kernel_size[0], eps)
        self.whiten.weight.copy_(torch.cat([w, -w]))
        self.whiten.bias.copy_(torch.cat([b, -b]))

    def penultimate(self, x: torch.Tensor) -> torch.Tensor:
        """The pooled features the linear layer sees [N, widths[-1]] (one view, no test-time augmentation)."""
        x = F.gelu(self.whiten(self.normalize(x)))
        # adaptive_max_pool2d, not amax over (2, 3): a compiled bf16 step on the CPU got NaN gradients from amax
        return F.adaptive_max_pool2d(self.features(x), 1).flatten(1)

    def logits(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.penultimate(x)) * self.logit_scale

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.training or not self.tta:
            return self.logits(x)
        mirrored = self._mirrored(x)
        if self.tta == 1:
            return mirrored
        padded = F.pad(x, (1, 1, 1, 1), mode="reflect")  # the image moved one pixel up-left and down-right
        h, w = x.shape[2:]
        shifted = self._mirrored(padded[:, :, :h, :w]) + self._mirrored(padded[:, :, 2:, 2:])
        return 0.5 * mirrored + 0.25 * shifted

    def _mirrored(self, x: torch.Tensor) -> torch.Tensor:
        return 0.5 * (self.logits(x) + self.logits(x.flip(3)))
