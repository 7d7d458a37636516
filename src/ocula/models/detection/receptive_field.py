"""Receptive field, jump (stride in input pixels) and start offset of every conv / pool layer of a model.

For a layer with kernel k, stride s, padding p and dilation d (effective kernel k' = d (k - 1) + 1):

    j_out = j_in * s,   r_out = r_in + (k' - 1) * j_in,   start_out = start_in + ((k' - 1) / 2 - p) * j_in

starting from the image: r = 1, j = 1, start = 0.5 (the centre of pixel 0, which spans [0, 1)). Cell (i, j) of a
layer's output then sees the image box centred on (start + j * jump, start + i * jump), r pixels wide.

Layers are found by running a dummy image through the model with forward hooks, so the order is the real
execution order. A layer continues from the layer that produced its input tensor; when the input came from
an unhooked operation (ReLU, BatchNorm, a residual sum) it continues from the widest receptive field seen at the
input's spatial size -- right for chains and for residual nets, where a shortcut conv starts from the block input.
"""

from dataclasses import dataclass

import torch
from torch import Tensor, nn

from ocula.errors import OculaError

_LAYERS = (nn.Conv2d, nn.MaxPool2d, nn.AvgPool2d)


@dataclass(frozen=True)
class RFRow:
    """One layer. Each number is an int/float, or a (height, width) pair when the two axes differ."""

    name: str
    kernel: int | tuple
    stride: int | tuple
    padding: int | tuple
    r: float | tuple
    j: float | tuple
    start: float | tuple


@dataclass(frozen=True)
class _State:
    r: tuple[float, float]
    j: tuple[float, float]
    start: tuple[float, float]


def _pair(v) -> tuple[int, int]:
    return (v, v) if isinstance(v, int) else (int(v[0]), int(v[1]))


def _one(pair):
    return pair[0] if pair[0] == pair[1] else tuple(pair)


def _geometry(module: nn.Module) -> tuple[tuple[int, int], tuple[int, int], tuple[int, int], tuple[int, int]]:
    """(kernel, stride, padding, dilation) per axis (height, width)."""
    kernel = _pair(module.kernel_size)
    stride = _pair(module.stride if module.stride is not None else module.kernel_size)
    dilation = _pair(getattr(module, "dilation", 1))
    padding = module.padding
    if isinstance(padding, str):  # Conv2d's "same" / "valid"
        padding = tuple((d * (k - 1)) // 2 for k, d in zip(kernel, dilation)) if padding == "same" else (0, 0)
    return kernel, stride, _pair(padding), dilation


def receptive_field(model: nn.Module, input_size: tuple[int, int] = (224, 224), in_channels: int = 3) -> list[RFRow]:
    """Rows (layer name, kernel, stride, padding, r, j, start) for each Conv2d / MaxPool2d / AvgPool2d, in
    execution order, from one forward pass of a zero image of `input_size` = (height, width)."""
    names = {m: n for n, m in model.named_modules()}
    rows: list[RFRow] = []
    by_tensor: dict[int, _State] = {}
    by_size: list[tuple[tuple[int, int], _State]] = []
    alive: list[Tensor] = []  # keeps hooked tensors alive so their ids cannot be reused during the pass

    def state_of(x: Tensor) -> _State:
        if id(x) in by_tensor:
            return by_tensor[id(x)]
        size = tuple(x.shape[-2:])
        same = [s for sz, s in by_size if sz == size]
        pool = same or [s for _, s in by_size]
        return max(pool, key=lambda s: s.r[0] * s.r[1]) if same else pool[-1]

    def remember(x: Tensor, state: _State) -> None:
        alive.append(x)
        by_tensor[id(x)] = state
        by_size.append((tuple(x.shape[-2:]), state))

    def hook(module, inputs, output):
        kernel, stride, padding, dilation = _geometry(module)
        s = state_of(inputs[0])
        k_eff = [d * (k - 1) + 1 for k, d in zip(kernel, dilation)]
        new = _State(r=tuple(r + (k - 1) * j for r, k, j in zip(s.r, k_eff, s.j)),
                     j=tuple(j * st for j, st in zip(s.j, stride)),
                     start=tuple(a + ((k - 1) / 2 - p) * j for a, k, p, j in zip(s.start, k_eff, padding, s.j)))
        rows.append(RFRow(names.get(module, type(module).__name__), _one(kernel), _one(stride), _one(padding),
                          _one(new.r), _one(new.j), _one(new.start)))
        remember(output, new)

    handles = [m.register_forward_hook(hook) for m in model.modules() if isinstance(m, _LAYERS)]
    if not handles:
        raise OculaError(f"{type(model).__name__} has no Conv2d / MaxPool2d / AvgPool2d layer")
    was_training = model.training
    try:
        param = next(model.parameters(), None)
        x = torch.zeros(1, in_channels, *input_size,
                        dtype=param.dtype if param is not None else torch.float32,
                        device=param.device if param is not None else None)
        remember(x, _State(r=(1.0, 1.0), j=(1.0, 1.0), start=(0.5, 0.5)))
        model.eval()
        with torch.no_grad():
            model(x)
    finally:
        model.train(was_training)
        for h in handles:
            h.remove()
    return rows


def feature_cell_box(row: RFRow, i: int, j: int) -> tuple[float, float, float, float]:
    """Image box (x1, y1, x2, y2) seen by cell (row i, column j) of the layer described by `row`."""
    rh, rw = _pair_f(row.r)
    jh, jw = _pair_f(row.j)
    sh, sw = _pair_f(row.start)
    cx, cy = sw + j * jw, sh + i * jh
    return (cx - rw / 2, cy - rh / 2, cx + rw / 2, cy + rh / 2)


def _pair_f(v) -> tuple[float, float]:
    return (float(v), float(v)) if not isinstance(v, tuple) else (float(v[0]), float(v[1]))
