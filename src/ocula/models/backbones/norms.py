"""Normalisation choices for the backbones, by name so configs and saved-model metadata can record them; and
BatchNorm frozen for fine-tuning."""

from __future__ import annotations

import math
from typing import Callable

import torch
from torch import nn

from ocula.errors import OculaError

Norm = Callable[[int], nn.Module]


def group_norm(channels: int, groups: int = 32) -> nn.GroupNorm:
    """GroupNorm for training from scratch at small batch; thin layers get fewer groups so every group divides."""
    return nn.GroupNorm(math.gcd(groups, channels), channels)


def resolve_norm(norm_layer: str | Norm | None, default: Norm) -> Norm:
    """`None` or 'batch': the architecture's own BatchNorm; 'group': `group_norm`; or any `channels -> module`."""
    if norm_layer is None or norm_layer == "batch":
        return default
    if norm_layer == "group":
        return group_norm
    if callable(norm_layer):
        return norm_layer
    raise OculaError(f"unknown norm_layer {norm_layer!r}; choose 'batch', 'group' or a callable channels -> module")


class FrozenBatchNorm2d(nn.Module):
    """BatchNorm2d with fixed statistics and affine: y = (x - running_mean) / sqrt(running_var + eps) * weight + bias,
    in training mode too, as torchvision's. For fine-tuning at small batch, where batch statistics are noise.

    All five tensors are buffers under BatchNorm2d's names (num_batches_tracked too, kept but never counted), so
    the state-dict keys stay those of the unfrozen model and torchvision checkpoints load either way.
    """

    def __init__(self, num_features: int, eps: float = 1e-5):
        super().__init__()
        self.eps = eps
        self.register_buffer("weight", torch.ones(num_features))
        self.register_buffer("bias", torch.zeros(num_features))
        self.register_buffer("running_mean", torch.zeros(num_features))
        self.register_buffer("running_var", torch.ones(num_features))
        self.register_buffer("num_batches_tracked", torch.tensor(0, dtype=torch.long))

    @classmethod
    def from_batch_norm(cls, bn: nn.BatchNorm2d) -> FrozenBatchNorm2d:
        if not (bn.affine and bn.track_running_stats):
            raise OculaError("only a BatchNorm2d with affine weights and running statistics can be frozen")
        frozen = cls(bn.num_features, bn.eps)
        # Copies, on the BatchNorm's device: an optimizer built earlier may still step the old parameters.
        frozen.load_state_dict({k: v.clone() for k, v in bn.state_dict().items()}, assign=True)
        return frozen

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        scale = self.weight * (self.running_var + self.eps).rsqrt()
        shift = self.bias - self.running_mean * scale
        # In the input's dtype, as BatchNorm under autocast: float32 statistics must not promote a bf16 activation.
        return x * scale.to(x.dtype)[:, None, None] + shift.to(x.dtype)[:, None, None]

    def extra_repr(self) -> str:
        return f"{self.weight.shape[0]}, eps={self.eps}"


def freeze_batch_norm(module: nn.Module) -> nn.Module:
    """`module` with every nn.BatchNorm2d replaced by a FrozenBatchNorm2d holding its statistics (in place; a bare
    BatchNorm2d comes back as a new module)."""
    if isinstance(module, nn.BatchNorm2d):
        return FrozenBatchNorm2d.from_batch_norm(module)
    for name, child in module.named_children():
        frozen = freeze_batch_norm(child)
        if frozen is not child:
            setattr(module, name, frozen)
    return module
