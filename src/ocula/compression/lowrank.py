"""Low-rank factorisation: Tucker-2 (Kim et al. 2016) or CP (Lebedev et al. 2015) of convolutions with tensorly,
truncated SVD of linear layers; each factorised layer starts from the decomposition of the trained weights."""

from __future__ import annotations

import math

import numpy as np
import torch
from torch import nn

from ocula.compression.layers import make_layer, replace
from ocula.errors import OculaError


def factorise(model: nn.Module, decomposition: str, rank: float, seed: int = 0) -> dict[str, dict]:
    """Replace, in place, each convolution (KxK, K > 1, not the stem) and linear layer whose factorised form at
    `rank` (a share of its channels) costs under half its multiply-adds; returns the layer specs."""
    specs = {}
    for name, old in list(model.named_modules()):
        spec = _spec(old, decomposition, rank)
        if spec is None:
            continue
        new = make_layer(old, spec)
        _initialise(new, old, spec, seed)
        replace(model, name, new)
        specs[name] = spec
    if not specs:
        raise OculaError(f"no layer of this model gets cheaper by a rank-{rank} {decomposition} factorisation")
    return specs


def _spec(m: nn.Module, decomposition: str, rank: float) -> dict | None:
    """The factorised layer's spec when it costs under half the multiply-adds per output position."""
    if isinstance(m, nn.Linear):
        r = math.ceil(rank * min(m.in_features, m.out_features))
        return {"svd": r} if r * (m.in_features + m.out_features) < m.in_features * m.out_features / 2 else None
    if not isinstance(m, nn.Conv2d) or m.groups != 1 or max(m.kernel_size) == 1 or m.in_channels < 8:
        return None
    (kh, kw), cin, cout = m.kernel_size, m.in_channels, m.out_channels
    if decomposition == "tucker":
        r_in, r_out = math.ceil(rank * cin), math.ceil(rank * cout)
        spec, cost = {"tucker": [r_in, r_out]}, cin * r_in + r_in * r_out * kh * kw + r_out * cout
    else:
        r = math.ceil(rank * cout)
        spec, cost = {"cp": r}, cin * r + r * (kh + kw) + r * cout
    return spec if cost < cin * cout * kh * kw / 2 else None


def _initialise(new: nn.Sequential, old: nn.Module, spec: dict, seed: int) -> None:
    import tensorly as tl
    from tensorly.decomposition import parafac, partial_tucker

    w = old.weight.detach().cpu().double().numpy()
    bias = old.bias
    (kind, value), = spec.items()
    if kind == "svd":
        u, s, vt = np.linalg.svd(w, full_matrices=False)
        factors = [vt[:value] * np.sqrt(s[:value])[:, None], u[:, :value] * np.sqrt(s[:value])]
    elif kind == "tucker":
        r_in, r_out = value
        tl.set_backend("numpy")
        (core, (u_out, u_in)), _ = partial_tucker(w, rank=[r_out, r_in], modes=[0, 1], init="svd",
                                                  random_state=seed)
        factors = [u_in.T[:, :, None, None], core, u_out[:, :, None, None]]
    else:
        tl.set_backend("numpy")
        weights, (f_out, f_in, f_h, f_w) = parafac(w, rank=value, init="random", random_state=seed, n_iter_max=300)
        factors = [f_in.T[:, :, None, None], f_h.T[:, None, :, None], f_w.T[:, None, None, :],
                   (f_out * weights)[:, :, None, None]]
    with torch.no_grad():
        for layer, f in zip(new, factors):
            layer.weight.copy_(torch.from_numpy(np.ascontiguousarray(f)).reshape(layer.weight.shape))
        if bias is not None:
            new[-1].bias.copy_(bias.detach())
