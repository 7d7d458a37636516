"""Image classifiers taking [N, C, H, W] in the data's native value range (0-16 digits, 0-255 images).

Normalisation lives inside the model so that predict, export and serve can never feed it the wrong scaling.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import nn


class RBFSVC(nn.Module):
    """scikit-learn's one-vs-one RBF SVC as a torch module, with libsvm's exact voting.

    Output: per-class vote counts (float). argmax picks the first class with the most votes, as libsvm does,
    so predictions equal sklearn's `SVC.predict`. Buffers are filled by `from_sklearn`; they are float64 like
    libsvm (so decision values near zero take the same sign), and `.float()` gives a float32 copy for CoreML.
    """

    def __init__(self, *, n_features: int, n_support: list[int], gamma: float):
        super().__init__()
        self.n_features, self.n_support, self.gamma = n_features, list(n_support), gamma
        n_classes, total = len(n_support), sum(n_support)
        pairs = [(i, j) for i in range(n_classes) for j in range(i + 1, n_classes)]
        self.register_buffer("support_vectors", torch.zeros(total, n_features, dtype=torch.float64))
        # pair_coef[s, p]: the dual coefficient of support vector s in the duel p (zero if s is in neither class)
        self.register_buffer("pair_coef", torch.zeros(total, len(pairs), dtype=torch.float64))
        self.register_buffer("intercept", torch.zeros(len(pairs), dtype=torch.float64))
        eye = torch.eye(n_classes, dtype=torch.float64)
        # A duel won (decision > 0) votes for its first class, lost for its second.
        self.register_buffer("vote_i", eye[[i for i, _ in pairs]], persistent=False)
        self.register_buffer("vote_j", eye[[j for _, j in pairs]], persistent=False)

    @classmethod
    def from_sklearn(cls, svc) -> "RBFSVC":
        if svc.kernel != "rbf":
            raise ValueError("only RBF kernels are supported")
        m = cls(n_features=svc.support_vectors_.shape[1], n_support=svc.n_support_.tolist(), gamma=float(svc._gamma))
        starts = np.concatenate([[0], np.cumsum(svc.n_support_)])
        coef = np.zeros(m.pair_coef.shape)
        n_classes = len(svc.n_support_)
        p = 0
        for i in range(n_classes):
            for j in range(i + 1, n_classes):
                # libsvm stores class i's coefficients against j in row j-1, class j's against i in row i.
                coef[starts[i]:starts[i + 1], p] = svc.dual_coef_[j - 1, starts[i]:starts[i + 1]]
                coef[starts[j]:starts[j + 1], p] = svc.dual_coef_[i, starts[j]:starts[j + 1]]
                p += 1
        m.support_vectors.copy_(torch.from_numpy(svc.support_vectors_))
        m.pair_coef.copy_(torch.from_numpy(coef))
        m.intercept.copy_(torch.from_numpy(svc.intercept_))
        return m

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        sv = self.support_vectors
        x = x.reshape(x.shape[0], -1).to(sv.dtype)
        d2 = (x * x).sum(1, keepdim=True) - 2 * x @ sv.T + (sv * sv).sum(1)
        kernel = torch.exp(-self.gamma * torch.relu(d2))
        wins = (kernel @ self.pair_coef + self.intercept > 0).to(sv.dtype)
        return (wins @ self.vote_i + (1 - wins) @ self.vote_j).to(torch.float32)


class Normalize(nn.Module):
    """Native value range -> zero-mean unit-variance, with the dataset statistics (one value, or one per channel)
    stored in the model's arguments (the buffers are not saved: the model file's arguments rebuild them)."""

    def __init__(self, value_max: float, mean: float | list[float], std: float | list[float]):
        super().__init__()
        mean, std = torch.tensor(mean, dtype=torch.float32), torch.tensor(std, dtype=torch.float32)
        self.register_buffer("scale", (1.0 / (value_max * std)).reshape(1, -1, 1, 1), persistent=False)
        self.register_buffer("shift", (mean / std).reshape(1, -1, 1, 1), persistent=False)

    def forward(self, x):
        return x * self.scale - self.shift


def conv_bn(cin: int, cout: int, k: int = 3) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(cin, cout, k, padding=k // 2, bias=False), nn.BatchNorm2d(cout),
                         nn.ReLU(inplace=True))


class SmallCNN(nn.Module):
    """A VGG-style CNN for small grayscale images (8x8 digits, 28x28 MNIST).

    Stages of two 3x3 conv-BN-ReLU blocks; max-pool between stages; global average pool; dropout; linear.
    `widths` sets the channels of each stage, so one class covers the whole family.
    """

    def __init__(self, *, num_classes: int = 10, in_channels: int = 1, widths: list[int] = (32, 64, 128),
                 value_max: float = 255.0, mean: float = 0.0, std: float = 1.0, dropout: float = 0.2):
        super().__init__()
        self.normalize = Normalize(value_max, mean, std)
        layers, cin = [], in_channels
        for s, w in enumerate(widths):
            if s:
                layers.append(nn.MaxPool2d(2))
            layers += [conv_bn(cin, w), conv_bn(w, w)]
            cin = w
        self.features = nn.Sequential(*layers)
        self.head = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Dropout(dropout),
                                  nn.Linear(cin, num_classes))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(self.normalize(x)))

    def penultimate(self, x: torch.Tensor) -> torch.Tensor:
        """The pooled features the final linear layer sees: the image's embedding [N, widths[-1]]."""
        return self.head[:2](self.features(self.normalize(x)))


class BackboneClassifier(nn.Module):
    """A named backbone (alexnet, vgg16_bn, googlenet, resnet18, mobilenet_v1, ...) as a classifier of images in
    their native value range.

    `small_input` gives the backbone its 32x32 stem (e.g. CIFAR-10): no stride 4 before the first stage, so the
    last stage sees 4x4 maps instead of 1x1 (each backbone's docstring says how). `width_mult` thins or widens
    a MobileNet."""

    def __init__(self, *, backbone: str, num_classes: int, in_channels: int = 3, value_max: float = 255.0,
                 mean: float | list[float] = 0.5, std: float | list[float] = 0.25, small_input: bool = False,
                 width_mult: float | None = None):
        super().__init__()
        from ocula.models.backbones import build_backbone

        self.normalize = Normalize(value_max, mean, std)
        width = {} if width_mult is None else {"width_mult": width_mult}
        self.net = build_backbone(backbone, num_classes=num_classes, in_channels=in_channels,
                                  small_input=small_input, **width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(self.normalize(x))

    def penultimate(self, x: torch.Tensor) -> torch.Tensor:
        """What the backbone's final linear layer sees (its heads differ: fc, classifier[-1]): the embedding."""
        last = [m for m in self.net.modules() if isinstance(m, nn.Linear)][-1]
        seen = []
        hook = last.register_forward_pre_hook(lambda module, args: seen.append(args[0]))
        try:
            self.net(self.normalize(x))
        finally:
            hook.remove()
        return seen[0]
