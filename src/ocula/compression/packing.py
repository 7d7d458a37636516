"""Compact storage of weights in a model file, decoded to ordinary dense tensors when the file is loaded.

The model's ModelInfo.extra["packed"] names each packed tensor with its codec and shape:
    sparse  a pruned tensor: a 1-bit mask of the non-zeros plus their float32 values
    sign    a binary tensor alpha * sign(w): 1 bit per weight plus one float32 alpha per output channel
"""

from __future__ import annotations

import numpy as np
import torch


def packed_spec(model, codec: str, names: list[str]) -> dict:
    """The ModelInfo.extra["packed"] entry for these parameters of `model`."""
    state = model.state_dict()
    return {name: {"codec": codec, "shape": list(state[name].shape)} for name in names}


def pack(tensors: dict[str, torch.Tensor], packed: dict) -> dict[str, torch.Tensor]:
    out = dict(tensors)
    for name, spec in packed.items():
        w = out.pop(name).float()
        if spec["codec"] == "sparse":
            keep = w != 0
            out[f"{name}:mask"], out[f"{name}:values"] = _bits(keep), w[keep]
        elif spec["codec"] == "sign":
            out[f"{name}:signs"] = _bits(w >= 0)
            out[f"{name}:alpha"] = w.abs().flatten(1).mean(1)
        else:
            raise ValueError(f"unknown weight codec {spec['codec']!r}")
    return out


def unpack(tensors: dict[str, torch.Tensor], packed: dict) -> dict[str, torch.Tensor]:
    out = dict(tensors)
    for name, spec in packed.items():
        shape = spec["shape"]
        if spec["codec"] == "sparse":
            keep = _unbits(out.pop(f"{name}:mask"), shape)
            w = torch.zeros(shape)
            w[keep] = out.pop(f"{name}:values")
        else:
            signs = _unbits(out.pop(f"{name}:signs"), shape).float() * 2 - 1
            w = signs * out.pop(f"{name}:alpha").reshape(-1, *[1] * (len(shape) - 1))
        out[name] = w
    return out


def _bits(mask: torch.Tensor) -> torch.Tensor:
    return torch.from_numpy(np.packbits(mask.cpu().numpy().ravel()))


def _unbits(packed: torch.Tensor, shape) -> torch.Tensor:
    n = int(np.prod(shape))
    return torch.from_numpy(np.unpackbits(packed.numpy(), count=n).astype(bool).reshape(shape))
