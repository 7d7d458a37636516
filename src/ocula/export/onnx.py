"""ONNX export: one named tensor input with a dynamic batch (and, for dense tasks, dynamic height and width)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from ocula.errors import OculaError
from ocula.fileio import atomic_path


def example_input(model) -> torch.Tensor:
    pre = model.info.preprocess
    h, w = pre.get("input_size", [128, 128])
    return torch.rand(2, pre.get("channels", 3), h, w) * pre.get("value_max", 1.0)


def export_onnx(model, path: str | Path, *, dynamic_hw: bool = False, opset: int = 17) -> Path:
    """Export with input 'image' [N, C, H, W] (the model's native value range) and output 'scores'."""
    model.eval()
    x = example_input(model)
    axes = {0: "batch"}
    if dynamic_hw:
        axes.update({2: "height", 3: "width"})
    with atomic_path(path) as tmp:
        try:
            torch.onnx.export(model, (x,), str(tmp), input_names=["image"], output_names=["scores"],
                              dynamic_axes={"image": axes, "scores": axes}, opset_version=opset,
                              dynamo=False)
        except Exception as e:  # the exporter's errors are long; keep the first line
            raise OculaError(f"ONNX export failed: {str(e).strip().splitlines()[0]}", path) from None
    return Path(path)


def onnx_session(path: str | Path):
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.log_severity_level = 3
    return ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])


def check_parity(model, path: str | Path, x: torch.Tensor | None = None) -> float:
    """Max abs difference between torch and ONNX Runtime outputs; raises if argmax differs."""
    x = example_input(model) if x is None else x
    with torch.no_grad():
        ref = model(x).numpy()
    out = onnx_session(path).run(None, {"image": x.numpy()})[0]
    if ref.ndim == 2 and not np.array_equal(ref.argmax(1), out.argmax(1)):
        raise OculaError("ONNX Runtime predictions differ from torch", path)
    return float(np.abs(ref - out).max())
