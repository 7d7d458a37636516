"""What a model does to one image, layer by layer: output shape, parameters, FLOPs and receptive field.

FLOPs are torch's FlopCounterMode counts: 2 per multiply-accumulate of convolutions and matrix products (bias,
normalisation, activations and pooling are not counted, as is usual), so MACs = FLOPs / 2.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from ocula.models.detection.receptive_field import RFRow, receptive_field


@dataclass(frozen=True)
class LayerRow:
    """One call of a leaf module (a layer called twice, like a shared ReLU, has two rows; its parameters and FLOPs
    are counted on the first). `rf`: the receptive-field row of a conv / pool layer, else None."""

    name: str
    kind: str
    shape: tuple
    params: int
    flops: int
    rf: RFRow | None


@dataclass(frozen=True)
class Inspection:
    rows: list[LayerRow]
    params: int  # every parameter of the model
    flops: int  # every counted operation of one forward pass on one image, inside layers or not


def inspect_model(model: nn.Module, input_size: tuple[int, int] = (224, 224), in_channels: int = 3) -> Inspection:
    """Run one zero image of `input_size` = (height, width) through `model` (in eval mode, no gradients) and
    tabulate its leaf modules in execution order."""
    root = type(model).__name__
    names = {m: n for n, m in model.named_modules()}
    calls: list[tuple[nn.Module, tuple]] = []
    hooks = [m.register_forward_hook(lambda m, args, out: calls.append((m, _shape(out))))
             for m in model.modules() if not any(True for _ in m.children()) and m is not model]
    param = next(model.parameters(), None)
    x = torch.zeros(1, in_channels, *input_size, dtype=param.dtype if param is not None else torch.float32,
                    device=param.device if param is not None else None)
    was_training = model.training
    try:
        model.eval()
        with torch.no_grad(), FlopCounterMode(display=False) as counter:
            model(x)
    finally:
        model.train(was_training)
        for h in hooks:
            h.remove()
    flops = {name: sum(ops.values()) for name, ops in counter.get_flop_counts().items()}
    has_rf = any(isinstance(m, (nn.Conv2d, nn.MaxPool2d, nn.AvgPool2d)) for m in model.modules())
    rfs = {}
    for row in receptive_field(model, input_size, in_channels) if has_rf else []:
        rfs.setdefault(row.name, row)
    rows, seen = [], set()
    for module, shape in calls:
        name, first = names[module], module not in seen
        seen.add(module)
        rows.append(LayerRow(name, type(module).__name__, shape,
                             sum(p.numel() for p in module.parameters(recurse=False)) if first else 0,
                             flops.get(f"{root}.{name}", 0) if first else 0, rfs.get(name) if first else None))
    return Inspection(rows, sum(p.numel() for p in model.parameters()), counter.get_total_flops())


def _shape(out) -> tuple:
    """[C, H, W] of a tensor output without the batch; the first tensor of a tuple or dict output."""
    if isinstance(out, dict):
        out = next(iter(out.values()), None)
    if isinstance(out, (tuple, list)):
        out = out[0] if out else None
    return tuple(out.shape[1:]) if isinstance(out, torch.Tensor) else ()
