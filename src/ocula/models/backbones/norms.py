"""Normalisation choices for the backbones, by name so configs and saved-model metadata can record them."""

from __future__ import annotations

import math
from typing import Callable

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
