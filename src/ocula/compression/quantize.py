"""int8 post-training static quantization with ONNX Runtime: QDQ format, per-channel weights, activation ranges
calibrated on training inputs. The result is an ONNX file carrying the model's ModelInfo, which `ocula.load`
runs in ONNX Runtime."""

from __future__ import annotations

import tempfile
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from ocula.export.onnx import write_info
from ocula.fileio import atomic_path

LAYERS = ("Conv", "Gemm", "MatMul")  # the layers int8 pays for


def quantize_int8(model, inputs: list[np.ndarray], out: Path) -> Path:
    """`inputs`: float32 arrays [N, C, H, W] as the model's task feeds them (sizes may differ if the export takes
    any size). The graph is the task's own ONNX export; the nodes that feed no convolution or matrix product stay
    float, because there the network decodes (FCOS turns distances into pixel boxes, which 8 bits would round to
    whole strides)."""
    import onnx
    from onnxruntime.quantization import CalibrationDataReader, QuantFormat, QuantType, quantize_static
    from onnxruntime.quantization.shape_inference import quant_pre_process

    from ocula.tasks import get_task

    class Inputs(CalibrationDataReader):
        def __init__(self):
            self.batches = iter(inputs)

        def get_next(self):
            batch = next(self.batches, None)
            return None if batch is None else {"image": batch}

    with tempfile.TemporaryDirectory(prefix="ocula-int8-") as tmp:
        fp32, prepared = Path(tmp) / "fp32.onnx", Path(tmp) / "prepared.onnx"
        get_task(model.info.task).export(model.eval(), "onnx", fp32)
        # Folds and infers shapes so every conv gets quantized; ONNX shape inference suffices for convolutional
        # graphs, and the symbolic one cannot follow FCOS's size-dependent grid.
        quant_pre_process(str(fp32), str(prepared), skip_symbolic_shape=True)
        tail = decoding_nodes(onnx.load(str(prepared)).graph)
        with atomic_path(out) as target:
            # uint8 activations with int8 weights: the combination x86 int8 kernels (VNNI) run fastest.
            quantize_static(str(prepared), str(target), Inputs(), quant_format=QuantFormat.QDQ, per_channel=True,
                            activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8,
                            nodes_to_exclude=tail)
    return write_info(out, model.info)


def decoding_nodes(graph) -> list[str]:
    """Names of the nodes that are neither a convolution / matrix product nor upstream of one."""
    producer = {out: node for node in graph.node for out in node.output}
    feeds = set()
    todo = [n for n in graph.node if n.op_type in LAYERS]
    while todo:
        for name in todo.pop().input:
            node = producer.get(name)
            if node is not None and node.name not in feeds:
                feeds.add(node.name)
                todo.append(node)
    return [n.name for n in graph.node if n.op_type not in LAYERS and n.name not in feeds]


def sample(n_items: int, n: int, seed: int) -> np.ndarray:
    """Indices of a seeded random sample of `n` of `n_items` training items, for calibration."""
    return np.random.default_rng(seed).permutation(n_items)[:n]


# ------------------------------------------------------------------------------------ quantization-aware training


def simulate_int8(model):
    """Prepare `model` (in place) for quantization-aware training: each batch norm folds into the convolution
    before it, as the int8 graph will have it, and each convolution and linear layer computes through FakeInt8
    (`model`: a classifier, whose last layer gives the output)."""
    from torch.nn.utils.fusion import fuse_conv_bn_eval

    from ocula.compression.layers import replace
    from ocula.compression.pruning import batch_norm_after

    model.eval()  # folding takes the batch norms' running statistics
    for conv, bn in batch_norm_after(model).items():
        replace(model, conv, fuse_conv_bn_eval(model.get_submodule(conv), model.get_submodule(bn)))
        replace(model, bn, nn.Identity())
    layers = [name for name, layer in model.named_modules() if isinstance(layer, (nn.Conv2d, nn.Linear))]
    for name in layers:  # the last layer's output is the graph's: int8 rounds it too
        replace(model, name, FakeInt8(model.get_submodule(name), output=name == layers[-1]))
    return model


def strip_simulation(model):
    """The trained float layers back in place of their FakeInt8 wrappers (in place), for quantize_int8."""
    from ocula.compression.layers import replace

    for name, layer in list(model.named_modules()):
        if isinstance(layer, FakeInt8):
            replace(model, name, layer.layer)
    return model


class FakeInt8(nn.Module):
    """A convolution or linear layer computing what its int8 version will: the input (and with `output`, the
    result) rounded to uint8 over the range seen in training (a moving average of each batch's min and max), the
    weights rounded to int8 per output channel to -127..127 (ONNX Runtime's symmetric scheme for QInt8 weights).
    Rounding passes gradients straight through, so training learns weights that survive it (Jacob et al. 2018)."""

    def __init__(self, layer: nn.Module, output: bool = False, momentum: float = 0.1):
        super().__init__()
        self.layer, self.output, self.momentum = layer, output, momentum
        self.register_buffer("ranges", torch.full((2, 2), float("nan")))  # (input, output) x (low, high)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w = self.layer.weight.float()
        w_scale = (w.detach().abs().amax(dim=tuple(range(1, w.dim()))) / 127).clamp(min=1e-8)
        w = torch.fake_quantize_per_channel_affine(w, w_scale, torch.zeros_like(w_scale, dtype=torch.int32), 0,
                                                   -127, 127)
        x = self._round(x, 0)
        if isinstance(self.layer, nn.Conv2d):
            y = self.layer._conv_forward(x, w, self.layer.bias)
        else:
            y = F.linear(x, w, self.layer.bias)
        return self._round(y, 1) if self.output else y

    def _round(self, x: torch.Tensor, which: int) -> torch.Tensor:
        """`x` rounded to uint8 over range `which`, which a training batch first updates."""
        x = x.float()  # under bf16 autocast too: the rounding grid needs float32's precision
        if self.training:
            with torch.no_grad():
                batch = torch.stack([x.min().clamp(max=0), x.max().clamp(min=0)])
                first = self.ranges[which].isnan().any()
                self.ranges[which] = batch if first else torch.lerp(self.ranges[which], batch, self.momentum)
        low, high = self.ranges[which]
        scale = ((high - low) / 255).clamp(min=1e-8)
        return torch.fake_quantize_per_tensor_affine(x, scale, torch.round(-low / scale).to(torch.int32), 0, 255)
