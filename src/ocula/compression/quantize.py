"""int8 post-training static quantization with ONNX Runtime: QDQ format, per-channel weights, activation ranges
calibrated on training inputs. The result is an ONNX file carrying the model's ModelInfo, which `ocula.load`
runs in ONNX Runtime."""

from __future__ import annotations

import tempfile
from pathlib import Path

import numpy as np

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
