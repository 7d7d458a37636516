"""ONNX export, one exporter for every task: one input 'image' [N, C, H, W] in the model's native value range.

The batch is dynamic; `dynamic_hw` makes height and width dynamic too (dense and detection models). Output axes
follow the output's rank: [N, K] scores, [N, P, D] per-cell outputs (P dynamic), [N, K, H, W] maps.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from ocula.errors import OculaError
from ocula.fileio import atomic_path


def example_input(model, batch: int = 2) -> torch.Tensor:
    pre = model.info.preprocess
    h, w = pre.get("input_size", [128, 128])
    return torch.rand(batch, pre.get("channels", 3), h, w) * pre.get("value_max", 1.0)


def _output_axes(out: torch.Tensor, dynamic_hw: bool) -> dict:
    if out.dim() == 3:
        return {0: "batch", 1: "cells"}
    if out.dim() == 4 and dynamic_hw:
        return {0: "batch", 2: "height", 3: "width"}
    return {0: "batch"}


def export_onnx(model, path: str | Path, *, outputs: tuple[str, ...] = ("scores",), dynamic_hw: bool = False,
                opset: int = 17, example: torch.Tensor | None = None, input_name: str | None = None,
                axes: dict | None = None) -> Path:
    """Export a CPU model in eval mode with the named outputs and input 'image', or with an `example` input of
    another kind (a decoder's codes [N, d]) input 'code'. `axes` replaces the dynamic axes read from the outputs."""
    model.eval()
    x = example_input(model) if example is None else example
    name = input_name or ("image" if example is None else "code")
    if axes is None:
        with torch.no_grad():
            result = model(x)
        result = result if isinstance(result, (tuple, list)) else (result,)
        axes = {name: {0: "batch", **({2: "height", 3: "width"} if dynamic_hw else {})}}
        axes.update({name: _output_axes(out, dynamic_hw) for name, out in zip(outputs, result)})
    with atomic_path(path) as tmp:
        try:
            torch.onnx.export(model, (x,), str(tmp), input_names=[name], output_names=list(outputs),
                              dynamic_axes=axes, opset_version=opset, dynamo=False)
        except Exception as e:  # the exporter's errors are long; keep the first line
            raise OculaError(f"ONNX export failed: {str(e).strip().splitlines()[0]}", path) from None
    return Path(path)


def onnx_session(path: str | Path, threads: int = 0):
    """A CPU session; `threads` intra-op threads (0: ONNX Runtime's default, one per core)."""
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.log_severity_level = 3
    opts.intra_op_num_threads = threads
    return ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])


def run_onnx(session, x: torch.Tensor) -> list[np.ndarray]:
    return session.run(None, {session.get_inputs()[0].name: x.detach().cpu().numpy()})


def check_parity(model, path: str | Path, x: torch.Tensor | None = None) -> float:
    """Max abs difference between torch and ONNX Runtime over every output; raises if a [N, K] output's argmax
    (the predicted class) differs."""
    x = example_input(model) if x is None else x
    with torch.no_grad():
        ref = model(x)
    ref = [r.numpy() for r in (ref if isinstance(ref, (tuple, list)) else (ref,))]
    got = run_onnx(onnx_session(path), x)
    for r, o in zip(ref, got):
        if r.shape != o.shape:
            raise OculaError(f"ONNX Runtime output shape {o.shape} differs from torch's {r.shape}", path)
        if r.ndim == 2 and not np.array_equal(r.argmax(1), o.argmax(1)):
            raise OculaError("ONNX Runtime predictions differ from torch", path)
    return max(float(np.abs(r - o).max()) for r, o in zip(ref, got))


class OnnxModule(torch.nn.Module):
    """An ONNX file run by ONNX Runtime behind a torch module's face: the tasks call `model(x)` and read
    `model.info`, so predict and evaluate run it unchanged (on the CPU, whatever device was asked for)."""

    def __init__(self, path: str | Path, info, threads: int = 0):
        super().__init__()
        self.info = info
        self.session = onnx_session(path, threads)
        self.register_buffer("on_cpu", torch.zeros(0), persistent=False)  # where device_of finds the module

    def forward(self, x: torch.Tensor):
        out = [torch.from_numpy(a) for a in run_onnx(self.session, x.float())]
        return out[0] if len(out) == 1 else tuple(out)


def write_info(path: str | Path, info) -> Path:
    """Record the model's ModelInfo in an ONNX file's metadata, so `ocula.load` can use the file on its own."""
    import onnx

    model = onnx.load(str(path))
    del model.metadata_props[:]
    model.metadata_props.add(key="ocula", value=info.to_json())
    with atomic_path(path) as tmp:
        onnx.save(model, str(tmp))
    return Path(path)


def load_onnx_model(path: str | Path, device="cpu") -> OnnxModule:
    """An ONNX file written with `write_info` (e.g. by `ocula compress --method int8`), ready to predict."""
    import onnx

    from ocula.modelfile import ModelInfo

    path = Path(path)
    if not path.is_file():
        raise OculaError("model file not found", path)
    try:
        props = {p.key: p.value for p in onnx.load(str(path), load_external_data=False).metadata_props}
    except Exception as e:  # onnx raises its own DecodeError for a damaged file
        raise OculaError(f"not an ONNX file ({str(e).strip().splitlines()[0] if str(e).strip() else e})",
                         path) from None
    if "ocula" not in props:
        raise OculaError("an ONNX file without ocula metadata: use the .ocula file it was exported from", path)
    import json

    meta = json.loads(props["ocula"])
    info = ModelInfo(**{k: meta[k] for k in ("task", "arch", "args", "classes", "preprocess", "metrics", "extra")})
    return OnnxModule(path, info).eval()
