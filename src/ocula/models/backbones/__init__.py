"""Image backbones with torchvision's parameter names, a name registry, FPN and checkpoint loading.

Every backbone shares one face: `forward(x)` -> logits, `forward_features(x)` -> {'c2'..'c5': map at stride
4..32}, and the attributes `out_channels` and `strides` (dicts keyed like the maps). Builders take keyword-only
`num_classes` (0: no classifier), `in_channels`, `small_input` (a stem for 32x32 images), `norm_layer` ('batch',
'group' or a callable; not AlexNet, which has none) and, for the MobileNets, `width_mult`. `freeze_batch_norm`
fixes a BatchNorm backbone's statistics for fine-tuning.
"""

from __future__ import annotations

from typing import Callable

from torch import nn

from ocula.errors import OculaError

from . import alexnet, googlenet, mobilenet, resnet, vgg
from .fpn import FPN, BackboneWithFPN
from .norms import FrozenBatchNorm2d, freeze_batch_norm, group_norm
from .weights import load_weights, read_state_dict

_BUILDERS: dict[str, Callable[..., nn.Module]] = {**alexnet.MODELS, **vgg.MODELS, **googlenet.MODELS, **resnet.MODELS,
                                                   **mobilenet.MODELS}


def list_backbones() -> list[str]:
    return sorted(_BUILDERS)


def build_backbone(name: str, **kwargs) -> nn.Module:
    if name not in _BUILDERS:
        raise OculaError(f"unknown backbone {name!r}; choose one of {', '.join(list_backbones())}")
    return _BUILDERS[name](**kwargs)


__all__ = ["FPN", "BackboneWithFPN", "FrozenBatchNorm2d", "build_backbone", "freeze_batch_norm", "group_norm",
           "list_backbones", "load_weights", "read_state_dict"]
