"""Pruning: unstructured magnitude pruning (Han et al. 2016), stored sparse, and structured filter pruning by
filter L1 norm (Li et al. 2017), which removes whole channels so the network itself gets smaller and faster."""

from __future__ import annotations

import copy

import torch
import torch.fx
from torch import nn
from torch.nn.utils import parametrize

from ocula.compression.layers import make_layer, replace
from ocula.engine.device import device_of
from ocula.errors import OculaError

# ONNX Runtime's convolutions work on blocks of 8 channels: on 32x32 images a cnn of 11-22-45 channels ran only
# 1.2x faster than 16-32-64 there, one of 8-24-48 2x (1 thread, batch 64), at about the same FLOPs.
CHANNEL_BLOCK = 8
# Layers a channel passes through unchanged on its way from one convolution to the next.
PASS_THROUGH = (nn.ReLU, nn.ReLU6, nn.MaxPool2d, nn.AvgPool2d, nn.Dropout, nn.Identity, nn.AdaptiveAvgPool2d,
                nn.Flatten)


def weights(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """The convolution and linear layers whose weights pruning and binarization work on."""
    return [(name, m) for name, m in model.named_modules() if isinstance(m, (nn.Conv2d, nn.Linear))]


class Mask(nn.Module):
    """A parametrization that keeps pruned weights at zero while the others train."""

    def __init__(self, keep: torch.Tensor):
        super().__init__()
        self.register_buffer("keep", keep)

    def forward(self, w: torch.Tensor) -> torch.Tensor:
        return w * self.keep


def mask_smallest(model: nn.Module, amount: float) -> list[str]:
    """Zero the `amount` share of all conv and linear weights with the smallest magnitude (one global threshold)
    and keep them zero while fine-tuning; returns the pruned parameters' names. `unmask` makes it permanent."""
    layers = weights(model)
    magnitudes = torch.cat([m.weight.detach().abs().flatten() for _, m in layers])
    threshold = magnitudes.kthvalue(max(1, int(amount * len(magnitudes)))).values
    for _, m in layers:
        parametrize.register_parametrization(m, "weight", Mask((m.weight.detach().abs() > threshold).float()))
    return [f"{name}.weight" for name, _ in layers]


def unmask(model: nn.Module) -> None:
    for _, m in weights(model):
        parametrize.remove_parametrizations(m, "weight", leave_parametrized=True)


def channel_chains(model: nn.Module) -> list[tuple[str, str, str]]:
    """(conv, batch norm, consumer) triples where the conv's output channels can be removed: a conv followed by a
    batch norm whose output reaches exactly one conv or linear layer through per-channel layers only (ReLU,
    pooling, dropout; a linear layer only after global pooling). Residual additions and depthwise convolutions
    stop a chain, so their channels are left alone."""
    modules = dict(model.named_modules())
    chains = []
    for node, bn in _conv_batch_norms(model):
        if modules[node.target].groups != 1:
            continue
        n, pooled = _single_user(bn), False
        while n is not None and n.op == "call_module" and isinstance(modules[n.target], PASS_THROUGH):
            m = modules[n.target]
            pooled = pooled or (isinstance(m, nn.AdaptiveAvgPool2d) and m.output_size in (1, (1, 1)))
            n = _single_user(n)
        consumer = modules.get(n.target) if n is not None and n.op == "call_module" else None
        if (isinstance(consumer, nn.Conv2d) and consumer.groups == 1) or (isinstance(consumer, nn.Linear) and pooled):
            chains.append((node.target, bn.target, n.target))
    return chains


def batch_norm_after(model: nn.Module) -> dict[str, str]:
    """{conv name: name of the batch norm that alone takes its output}."""
    return {conv.target: bn.target for conv, bn in _conv_batch_norms(model)}


def _conv_batch_norms(model: nn.Module) -> list:
    """(conv node, batch-norm node) pairs of the model's fx graph where the batch norm alone reads the conv."""
    try:
        graph = _LayerTracer().trace(model)
    except Exception as e:  # fx raises many kinds for data-dependent control flow
        raise OculaError(f"cannot trace this model's layers ({type(e).__name__}: {e})") from None
    modules = dict(model.named_modules())
    pairs = []
    for node in graph.nodes:
        if node.op == "call_module" and isinstance(modules[node.target], nn.Conv2d):
            bn = _single_user(node)
            if bn is not None and bn.op == "call_module" and isinstance(modules.get(bn.target), nn.BatchNorm2d):
                pairs.append((node, bn))
    return pairs


class _LayerTracer(torch.fx.Tracer):
    """Keeps every convolution one node, ocula's own (binary) ones included."""

    def is_leaf_module(self, m: nn.Module, name: str) -> bool:
        return isinstance(m, nn.Conv2d) or super().is_leaf_module(m, name)


def _single_user(node):
    return next(iter(node.users)) if len(node.users) == 1 else None


def prune_filters(model: nn.Module, widths: dict[str, int]) -> dict[str, dict]:
    """Keep `widths[conv]` output channels (largest filter L1 norms) of each named prunable conv (see
    channel_chains), in place; returns the layer specs that rebuild the smaller network (see
    ocula.compression.layers)."""
    modules = dict(model.named_modules())
    outs, ins = {}, {}  # layer name -> kept output / input channel indices
    for conv, bn, consumer in channel_chains(model):
        if conv in widths:
            w = modules[conv].weight.detach()
            kept = w.abs().flatten(1).sum(1).topk(widths[conv]).indices.sort().values
            outs[conv] = outs[bn] = ins[consumer] = kept
    specs = {}
    for name in sorted(set(outs) | set(ins)):
        old = modules[name]
        spec = _spec(old, outs.get(name), ins.get(name))
        new = make_layer(old, spec)
        new.load_state_dict(_sliced(old.state_dict(), outs.get(name), ins.get(name)))
        replace(model, name, new)
        specs[name] = spec
    return specs


def allocate_widths(model: nn.Module, x: torch.Tensor, remove: float, loss) -> dict[str, int]:
    """Per-layer widths that remove the `remove` share of the conv and linear FLOPs at the least loss, after
    Li et al. 2017's sensitivity analysis: `loss(m)` (a validation loss) is measured with each prunable conv alone
    narrowed to each candidate width, then the conv whose next narrowing costs the least loss per FLOP saved is
    narrowed, until enough FLOPs are gone. Uniform pruning ran slower for its FLOPs: the wide early layers at full
    resolution hold most of the time, and the loss says how much of them the network can spare."""
    chains = channel_chains(model)
    if not chains:
        raise OculaError("no prunable convolution (conv -> batch norm -> ... -> conv) in this model")
    unit = _flops_per_channel_pair(model, x)
    outs = {name: m.weight.shape[0] for name, m in weights(model)}
    ins = {name: m.weight.shape[1] for name, m in weights(model)}
    total = sum(unit[name] * ins[name] * outs[name] for name in unit)
    base = loss(model)
    curve = {}  # conv -> {width: loss with that conv alone at that width}
    for conv, _, _ in chains:
        curve[conv] = {outs[conv]: base}
        for width in _widths(outs[conv]):
            trial = copy.deepcopy(model)
            prune_filters(trial, {conv: width})
            curve[conv][width] = loss(trial)
    left = total
    while left > (1 - remove) * total:
        steps = []
        for conv, _, consumer in chains:
            narrower = [w for w in curve[conv] if w < outs[conv]]
            if narrower:
                w = max(narrower)
                saved = (outs[conv] - w) * (unit[conv] * ins[conv] + unit[consumer] * outs[consumer])
                steps.append(((curve[conv][w] - curve[conv][outs[conv]]) / saved, conv, consumer, w, saved))
        if not steps:
            raise OculaError(f"cannot remove {remove:.0%} of the FLOPs by pruning filters")
        _, conv, consumer, w, saved = min(steps)
        outs[conv] = ins[consumer] = w
        left -= saved
    return {conv: outs[conv] for conv, _, _ in chains}


def _widths(total: int, most: int = 16) -> list[int]:
    """The narrower widths a conv may get: whole blocks of CHANNEL_BLOCK where it has several blocks, and at most
    `most` of them, so the sensitivity analysis costs a bounded number of evaluations per layer."""
    block = CHANNEL_BLOCK if total >= 2 * CHANNEL_BLOCK else 1
    step = block * -(-total // (block * most))  # ceil: the fewest whole blocks that keep within `most` widths
    return list(range(step, total, step))


def _flops_per_channel_pair(model: nn.Module, x: torch.Tensor) -> dict[str, int]:
    """{conv or linear name: its FLOPs per (input channel, output channel) pair} for one forward pass of `x`."""
    units, hooks = {}, []
    for name, m in weights(model):
        def hook(m, args, out, name=name):
            area = out.shape[-2] * out.shape[-1] if isinstance(m, nn.Conv2d) else 1
            kernel = m.weight[0, 0].numel() if isinstance(m, nn.Conv2d) else 1
            units[name] = 2 * kernel * area * x.shape[0]  # weight.shape[1] already counts a group's inputs
        hooks.append(m.register_forward_hook(hook))
    try:
        with torch.no_grad():
            model.eval()(x.to(device_of(model)))
    finally:
        for h in hooks:
            h.remove()
    return units


def _spec(old: nn.Module, out_idx, in_idx) -> dict:
    n_out = old.weight.shape[0] if out_idx is None else len(out_idx)
    if isinstance(old, nn.BatchNorm2d):
        return {"bn": n_out}
    n_in = old.weight.shape[1] if in_idx is None else len(in_idx)
    return {"conv" if isinstance(old, nn.Conv2d) else "linear": [n_in, n_out]}


def _sliced(state: dict, out_idx, in_idx) -> dict:
    """Each tensor of a layer's state with only the kept output (dim 0) and input (dim 1 of a weight) channels."""
    sliced = {}
    for k, t in state.items():
        if t.dim() >= 1 and out_idx is not None:
            t = t[out_idx]
        if t.dim() >= 2 and in_idx is not None:
            t = t[:, in_idx]
        sliced[k] = t.clone()
    return sliced
