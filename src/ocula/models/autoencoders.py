"""Representation learners for images of any size and channel count: the autoencoder family, the VAE, PCA, DCGAN.

Every model takes images in the data's native value range (0..255) and works on the 0..1 scale inside, so
predict, export and serving feed them like any ocula model. The shared face (`Autoencoder`):
  encode(x) -> code [N, d]      (a VAE's posterior mean; `posterior` gives mean and log-variance)
  decode(z) -> images           in the native range; `decode_unit` on 0..1, `_decode` the raw output (logits)
  forward(x) = decode(encode(x)), the deterministic reconstruction; `penultimate` = encode (what `ocula embed` and
  recognisers use)
Losses live in `ocula.tasks.represent`; a model only says what the loss needs (its Jacobian, its posterior).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from ocula.models.classifiers import Normalize, conv_bn


def halved(size: int, times: int) -> list[int]:
    """[size, size // 2, ...]: the side after each 2x2 max-pool or stride-2 convolution (floor, as both do)."""
    sizes = [size]
    for _ in range(times):
        sizes.append(sizes[-1] // 2)
    return sizes


def upsample(cin: int, cout: int, size_in: tuple[int, int], size_out: tuple[int, int]) -> nn.ConvTranspose2d:
    """A stride-2 transposed convolution from `size_in` to `size_out` (2n or 2n + 1: any input size works).
    Its output side is o = (n - 1)s - 2p + f + output_padding = 2n + output_padding for f=4, s=2, p=1."""
    pad = tuple(o - 2 * i for i, o in zip(size_in, size_out))
    return nn.ConvTranspose2d(cin, cout, 4, stride=2, padding=1, output_padding=pad)


def unpool(h: torch.Tensor, indices: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """What nn.MaxUnpool2d computes (each value put back where its pooling window's maximum was, zeros elsewhere),
    written as a scatter because torch's ONNX exporter has no MaxUnpool."""
    n, c = h.shape[:2]
    out = h.new_zeros(n, c, size[0] * size[1])
    return out.scatter(2, indices.flatten(2), h.flatten(2)).reshape(n, c, *size)


class Autoencoder(nn.Module):
    """The face shared by every model with a code (see the module docstring). Subclasses define `_encode`
    (0..1 images -> code, or mean and log-variance side by side when variational) and `_decode`."""

    variational = False
    output = "sigmoid"  # what turns the decoder's raw output into 0..1 pixels: sigmoid, or linear (PCA)

    def _setup(self, input_size, in_channels: int, value_max: float, likelihood: str = "bernoulli"):
        if likelihood not in ("bernoulli", "gaussian"):
            raise ValueError(f"likelihood is bernoulli or gaussian, not {likelihood!r}")
        self.shape = (in_channels, *input_size)
        self.value_max, self.likelihood = float(value_max), likelihood
        if likelihood == "gaussian":  # one learned pixel noise scale (log sigma on the 0..1 scale)
            self.log_scale = nn.Parameter(torch.full((1,), math.log(0.1)))

    def posterior(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Mean and log-variance of q(z | x) (variational models)."""
        return self._encode(x * (1.0 / self.value_max)).chunk(2, dim=1)

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        h = self._encode(x * (1.0 / self.value_max))
        return h.chunk(2, dim=1)[0] if self.variational else h

    def decode_unit(self, z: torch.Tensor) -> torch.Tensor:
        raw = self._decode(z)
        return torch.sigmoid(raw) if self.output == "sigmoid" else raw

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        return self.decode_unit(z) * self.value_max

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.decode(self.encode(x))

    def penultimate(self, x: torch.Tensor) -> torch.Tensor:
        return self.encode(x)

    @property
    def code_size(self) -> int:
        return self._code_size


ACTIVATIONS = {"relu": nn.ReLU, "sigmoid": nn.Sigmoid, None: nn.Identity}


class MLPAutoencoder(Autoencoder):
    """Fully connected autoencoder: in -> hidden... -> code -> reversed hidden... -> in.

    hidden=[] is the shallow (under- or overcomplete, by code_size) autoencoder; [128, 64, 12] with code 3 is the
    lecture's deep one; [400] with code 20 and variational=True is Kingma & Welling's VAE. `tied` decodes with the
    encoder's weights transposed (own biases). `code_activation` (sigmoid for sparse-KL and contractive codes)
    bounds the code; `output` linear makes hidden=[] a linear autoencoder (the PCA comparison)."""

    def __init__(self, *, input_size: list[int], in_channels: int = 1, hidden: list[int] = (128, 64, 12),
                 code_size: int = 3, value_max: float = 255.0, code_activation: str | None = None,
                 output: str = "sigmoid", tied: bool = False, variational: bool = False,
                 likelihood: str = "bernoulli"):
        super().__init__()
        self._setup(input_size, in_channels, value_max, likelihood)
        if tied and variational:
            raise ValueError("a variational encoder has two heads; tied weights need one")
        self.output, self.variational, self.tied, self._code_size = output, variational, tied, code_size
        dims = [math.prod(self.shape), *hidden, code_size]
        outs = dims[1:-1] + [code_size * (2 if variational else 1)]
        self.encoder = nn.ModuleList(nn.Linear(a, b) for a, b in zip(dims[:-1], outs))
        self.code_activation = ACTIVATIONS[code_activation]()
        if tied:
            self.decoder_bias = nn.ParameterList(nn.Parameter(torch.zeros(a)) for a in reversed(dims[:-1]))
        else:
            self.decoder = nn.ModuleList(nn.Linear(b, a) for a, b in reversed(list(zip(dims[:-1], dims[1:]))))

    def _encode(self, u: torch.Tensor) -> torch.Tensor:
        h = u.flatten(1)
        for i, layer in enumerate(self.encoder):
            h = layer(h)
            h = F.relu(h) if i < len(self.encoder) - 1 else self.code_activation(h)
        return h

    def _decode(self, z: torch.Tensor) -> torch.Tensor:
        h, n = z, len(self.encoder)
        for i in range(n):
            if self.tied:
                h = F.linear(h, self.encoder[n - 1 - i].weight.t(), self.decoder_bias[i])
            else:
                h = self.decoder[i](h)
            if i < n - 1:
                h = F.relu(h)
        return h.reshape(-1, *self.shape)

    def contractive_penalty(self, x: torch.Tensor) -> torch.Tensor:
        """Exact squared Frobenius norm of the encoder's Jacobian d code / d pixels (0..1 scale), per image.
        For one sigmoid layer h = s(Wu + b): dh_i/du_j = h_i (1 - h_i) W_ij, so ||J||^2 = sum_i (h_i(1-h_i))^2
        ||W_i||^2, with no Jacobian ever formed."""
        if len(self.encoder) != 1 or not isinstance(self.code_activation, nn.Sigmoid):
            raise ValueError("the contractive penalty is computed for a one-layer sigmoid encoder (hidden=[])")
        h = self._encode(x * (1.0 / self.value_max))
        return ((h * (1 - h)) ** 2) @ (self.encoder[0].weight ** 2).sum(1)


class ConvAutoencoder(Autoencoder):
    """Convolutional autoencoder whose encoder is SmallCNN's `features` (same layers, same names), so its weights
    initialise a classifier; a linear bottleneck gives a code of `code_size`.

    decoder 'transpose': stride-2 ConvTranspose2d stages back to the input size. 'unpool': max-unpooling with the
    encoder's pooling indices (SegNet-style, see `unpool`); the indices carry where each maximum was, so that decoder
    only reconstructs (it cannot decode a code alone: no sampling or interpolation). variational=True: a conv VAE."""

    def __init__(self, *, input_size: list[int], in_channels: int = 1, widths: list[int] = (16, 32, 64),
                 code_size: int = 32, value_max: float = 255.0, mean: float | list[float] = 0.0,
                 std: float | list[float] = 1.0, decoder: str = "transpose", variational: bool = False,
                 likelihood: str = "bernoulli"):
        super().__init__()
        if decoder not in ("transpose", "unpool"):
            raise ValueError(f"decoder is transpose or unpool, not {decoder!r}")
        if decoder == "unpool" and variational:
            raise ValueError("an unpooling decoder needs the encoder's indices; a VAE decodes codes alone")
        self._setup(input_size, in_channels, value_max, likelihood)
        self.variational, self.unpool, self._code_size = variational, decoder == "unpool", code_size
        self.normalize = Normalize(1.0, mean, std)  # on the 0..1 scale: the classifier's statistics
        layers, cin = [], in_channels
        for s, w in enumerate(widths):
            if s:
                layers.append(nn.MaxPool2d(2, return_indices=True))
            layers += [conv_bn(cin, w), conv_bn(w, w)]
            cin = w
        self.features = nn.Sequential(*layers)
        self.sizes = list(zip(halved(input_size[0], len(widths) - 1), halved(input_size[1], len(widths) - 1)))
        self.grid = (widths[-1], *self.sizes[-1])
        self.to_code = nn.Linear(math.prod(self.grid), code_size * (2 if variational else 1))
        self.from_code = nn.Sequential(nn.Linear(code_size, math.prod(self.grid)), nn.ReLU(inplace=True))
        self.up = nn.ModuleList()
        for s in range(len(widths) - 1, 0, -1):
            if self.unpool:
                self.up.append(conv_bn(widths[s], widths[s - 1]))
            else:
                self.up.append(nn.Sequential(upsample(widths[s], widths[s - 1], self.sizes[s], self.sizes[s - 1]),
                                             nn.BatchNorm2d(widths[s - 1]), nn.ReLU(inplace=True)))
        self.head = nn.Conv2d(widths[0], in_channels, 3, padding=1)

    def _features(self, u: torch.Tensor):
        h, indices = self.normalize(u), []
        for layer in self.features:
            if isinstance(layer, nn.MaxPool2d):
                h, i = layer(h)
                indices.append(i)
            else:
                h = layer(h)
        return h, indices

    def _encode(self, u: torch.Tensor) -> torch.Tensor:
        return self.to_code(self._features(u)[0].flatten(1))

    def _decode(self, z: torch.Tensor, indices: list | None = None) -> torch.Tensor:
        if self.unpool and indices is None:
            raise ValueError("an unpooling decoder decodes only with the encoder's pooling indices")
        h = self.from_code(z).reshape(-1, *self.grid)
        for k, stage in enumerate(self.up):
            h = stage(h)
            if self.unpool:  # the pooling that made size s from s - 1 saw this stage's output channels
                s = len(self.sizes) - 1 - k
                h = unpool(h, indices[s - 1], self.sizes[s - 1])
        return self.head(h)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.unpool:
            return super().forward(x)
        h, indices = self._features(x * (1.0 / self.value_max))
        return torch.sigmoid(self._decode(self.to_code(h.flatten(1)), indices)) * self.value_max


class PCA(Autoencoder):
    """Principal component analysis as a linear autoencoder: code = (u - mean) V^T, decode = z V + mean, with the
    top `code_size` eigenvectors V of the training pixels' covariance (0..1 scale). `fit` fills the buffers."""

    output = "linear"

    def __init__(self, *, input_size: list[int], in_channels: int = 1, code_size: int = 32,
                 value_max: float = 255.0):
        super().__init__()
        self._setup(input_size, in_channels, value_max)
        self._code_size = code_size
        d = math.prod(self.shape)
        self.register_buffer("mean", torch.zeros(d))
        self.register_buffer("components", torch.zeros(code_size, d))

    @torch.no_grad()
    def fit(self, x: torch.Tensor) -> "PCA":
        """Fit on native-range images [N, C, H, W] (in float64: the covariance of 60k MNIST images)."""
        u = (x.flatten(1) / self.value_max).double()
        mean = u.mean(0)
        cov = torch.cov((u - mean).T)
        _, vectors = torch.linalg.eigh(cov)  # ascending eigenvalues
        self.mean.copy_(mean.float())
        self.components.copy_(vectors[:, -self.code_size:].flip(1).T.float())
        return self

    def _encode(self, u: torch.Tensor) -> torch.Tensor:
        return (u.flatten(1) - self.mean) @ self.components.T

    def _decode(self, z: torch.Tensor) -> torch.Tensor:
        return (z @ self.components + self.mean).reshape(-1, *self.shape)


class DCGAN(nn.Module):
    """Radford et al.'s DCGAN for any input size: generator code -> Linear -> stride-2 transposed convolutions
    (BatchNorm + ReLU) -> sigmoid image; discriminator stride-2 convolutions (LeakyReLU 0.2, BatchNorm after the
    first) -> one logit. `forward(z)` and `decode(z)` generate native-range images."""

    def __init__(self, *, input_size: list[int], in_channels: int = 1, code_size: int = 64,
                 widths: list[int] = (32, 64), value_max: float = 255.0):
        super().__init__()
        self.shape, self.value_max, self.code_size = (in_channels, *input_size), float(value_max), code_size
        sizes = list(zip(halved(input_size[0], len(widths)), halved(input_size[1], len(widths))))
        self.grid = (widths[-1], *sizes[-1])
        channels = [in_channels, *widths]
        g = []
        for s in range(len(widths), 0, -1):
            g.append(upsample(channels[s], channels[s - 1], sizes[s], sizes[s - 1]))
            if s > 1:
                g += [nn.BatchNorm2d(channels[s - 1]), nn.ReLU(inplace=True)]
        self.generator = nn.Sequential(nn.Linear(code_size, math.prod(self.grid)),
                                       nn.BatchNorm1d(math.prod(self.grid)), nn.ReLU(inplace=True),
                                       nn.Unflatten(1, self.grid), *g)
        d = []
        for s in range(len(widths)):
            d.append(nn.Conv2d(channels[s], channels[s + 1], 4, stride=2, padding=1))
            if s:
                d.append(nn.BatchNorm2d(channels[s + 1]))
            d.append(nn.LeakyReLU(0.2, inplace=True))
        self.discriminator = nn.Sequential(*d, nn.Flatten(), nn.Linear(math.prod(self.grid), 1))

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        return torch.sigmoid(self.generator(z)) * self.value_max

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        return self.decode(z)

    def discriminate(self, x: torch.Tensor) -> torch.Tensor:
        """Logit that native-range images are real, [N]."""
        return self.discriminator(x * (2.0 / self.value_max) - 1).squeeze(1)
