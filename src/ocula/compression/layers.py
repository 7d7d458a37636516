"""The `compressed` architecture: a base model rebuilt from its recorded arguments, then the layers a compression
method changed swapped in by name, so a pruned or factorised network loads from its model file like any other.

A layer spec is one small dict, recorded in the model file's arguments:
    {"conv": [in, out]}, {"bn": n}, {"linear": [in, out]}   pruned to fewer channels
    {"tucker": [r_in, r_out]}, {"cp": r}, {"svd": r}         factorised
    {"binary": {"inputs": bool, "bias": bool}}              binary weights (BWN), and binary inputs (XNOR-Net)
    {"identity": true}                                      a batch norm folded into the layer before it
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


def build_compressed(*, base: str, base_args: dict, layers: dict[str, dict]) -> nn.Module:
    from ocula.models import build

    model = build(base, **base_args)
    for name, spec in layers.items():
        replace(model, name, make_layer(model.get_submodule(name), spec))
    return model


def replace(model: nn.Module, name: str, layer: nn.Module) -> None:
    parent, _, leaf = name.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, leaf, layer)


def make_layer(old: nn.Module, spec: dict) -> nn.Module:
    """The module a spec describes, with the hyper-parameters (kernel, stride, ...) of the layer it replaces."""
    (kind, value), = spec.items()
    if kind == "conv":
        return conv_like(old, *value)
    if kind == "bn":
        return nn.BatchNorm2d(value, eps=old.eps, momentum=old.momentum)
    if kind == "linear":
        return nn.Linear(*value, bias=old.bias is not None)
    if kind == "tucker":
        return tucker_conv(old, *value)
    if kind == "cp":
        return cp_conv(old, value)
    if kind == "svd":
        return nn.Sequential(nn.Linear(old.in_features, value, bias=False),
                             nn.Linear(value, old.out_features, bias=old.bias is not None))
    if kind == "binary":
        return BinaryConv2d.like(old, binary_inputs=value["inputs"], bias=value.get("bias", old.bias is not None))
    if kind == "identity":
        return nn.Identity()
    raise ValueError(f"unknown layer spec {spec}")


def conv_like(old: nn.Conv2d, cin: int, cout: int, kernel=None, *, bias=None, groups: int = 1, stride=None,
              padding=None) -> nn.Conv2d:
    return nn.Conv2d(cin, cout, kernel or old.kernel_size, stride=stride or old.stride,
                     padding=old.padding if padding is None else padding, dilation=old.dilation, groups=groups,
                     bias=(old.bias is not None) if bias is None else bias)


def tucker_conv(old: nn.Conv2d, r_in: int, r_out: int) -> nn.Sequential:
    """Tucker-2 (Kim et al. 2016): 1x1 down to r_in channels, the KxK core to r_out, 1x1 up; the stride and
    padding stay on the core."""
    return nn.Sequential(conv_like(old, old.in_channels, r_in, 1, bias=False, stride=1, padding=0),
                         conv_like(old, r_in, r_out, bias=False),
                         conv_like(old, r_out, old.out_channels, 1, stride=1, padding=0))


def cp_conv(old: nn.Conv2d, rank: int) -> nn.Sequential:
    """CP (Lebedev et al. 2015): 1x1 to `rank`, a vertical then a horizontal depthwise filter, 1x1 back."""
    (kh, kw), (sh, sw), (ph, pw) = old.kernel_size, old.stride, old.padding
    return nn.Sequential(conv_like(old, old.in_channels, rank, 1, bias=False, stride=1, padding=0),
                         conv_like(old, rank, rank, (kh, 1), bias=False, groups=rank, stride=(sh, 1),
                                   padding=(ph, 0)),
                         conv_like(old, rank, rank, (1, kw), bias=False, groups=rank, stride=(1, sw),
                                   padding=(0, pw)),
                         conv_like(old, rank, old.out_channels, 1, stride=1, padding=0))


def binarize(w: torch.Tensor) -> torch.Tensor:
    """Binary weights alpha * sign(w), alpha = mean |w| of each output filter (Rastegari et al. 2016); gradients
    pass straight through to the real-valued weights being trained."""
    alpha = w.abs().mean(dim=tuple(range(1, w.dim())), keepdim=True)
    return w + (alpha * torch.sign(w) - w).detach()


class BinaryConv2d(nn.Conv2d):
    """A convolution with binary weights (BWN); with `binary_inputs` also binary inputs (XNOR-Net): sign(x)
    scaled by K, the mean |x| over channels averaged over each kernel window. Inputs that follow a ReLU binarize
    to {0, 1}, the batch norm before it setting the threshold."""

    def __init__(self, *args, binary_inputs: bool = False, **kwargs):
        super().__init__(*args, **kwargs)
        self.binary_inputs = binary_inputs

    @classmethod
    def like(cls, old: nn.Conv2d, binary_inputs: bool, bias: bool) -> "BinaryConv2d":
        return cls(old.in_channels, old.out_channels, old.kernel_size, stride=old.stride, padding=old.padding,
                   dilation=old.dilation, groups=old.groups, bias=bias, binary_inputs=binary_inputs)

    @torch.no_grad()
    def fold(self, bn: nn.BatchNorm2d) -> "BinaryConv2d":
        """This layer followed by `bn` (in eval mode) as one binary layer with a bias: bn(z) = s * z + t is
        linear, and s * alpha * sign(w) is again binary (alpha |s|, signs flipped where s < 0)."""
        s = bn.weight / torch.sqrt(bn.running_var + bn.eps)
        folded = BinaryConv2d.like(self, self.binary_inputs, bias=True).to(self.weight.device)
        folded.weight.copy_(s.reshape(-1, 1, 1, 1) * binarize(self.weight))
        bias = self.bias if self.bias is not None else torch.zeros_like(s)
        folded.bias.copy_(s * (bias - bn.running_mean) + bn.bias)
        return folded

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w = binarize(self.weight)
        if not self.binary_inputs:
            return self._conv_forward(x, w, self.bias)
        k = F.avg_pool2d(x.abs().mean(1, keepdim=True), self.kernel_size, self.stride, self.padding)
        clipped = x.clamp(-1, 1)  # the straight-through gradient of sign, cancelled where |x| > 1
        out = self._conv_forward(clipped + (torch.sign(x) - clipped).detach(), w, None) * k
        return out if self.bias is None else out + self.bias.reshape(1, -1, 1, 1)
