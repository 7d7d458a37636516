"""The models a server holds, by name. A model file with an ONNX export beside it (`model.onnx` next to
`model.ocula`) runs in ONNX Runtime, which is 2-3x faster per image on a CPU; the task's own predict code runs
around it either way, so both runtimes give the same answers."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

import ocula
from ocula.errors import OculaError


class OnnxForward(torch.nn.Module):
    """A torch module whose forward runs the ONNX export instead: the tasks call `model(x)` and read the module's
    attributes (info, num_classes, ...), which are the wrapped torch module's."""

    def __init__(self, module: torch.nn.Module, onnx_path: Path, threads: int):
        import onnxruntime as ort

        super().__init__()
        self.module = module
        self.info = module.info
        options = ort.SessionOptions()
        options.log_severity_level = 3
        # The server runs one prediction per core at a time; more intra-op threads would fight over the cores.
        options.intra_op_num_threads = threads
        self.session = ort.InferenceSession(str(onnx_path), options, providers=["CPUExecutionProvider"])
        self.outputs = [o.name for o in self.session.get_outputs()]

    def __getattr__(self, name):
        try:
            return super().__getattr__(name)
        except AttributeError:
            return getattr(super().__getattr__("module"), name)

    def forward(self, x: torch.Tensor):
        out = [torch.from_numpy(a) for a in self.session.run(None, {"image": x.detach().cpu().float().numpy()})]
        return out[0] if len(out) == 1 else tuple(out)


@dataclass
class Served:
    name: str
    model: ocula.Model
    runtime: str  # "onnx" or "torch"

    def describe(self) -> dict:
        info = self.model.info
        return {"name": self.name, "task": info.task, "arch": info.arch, "runtime": self.runtime,
                "classes": list(info.classes), "preprocess": info.preprocess,
                "metrics": {k: v for k, v in info.metrics.items() if isinstance(v, (int, float, str))},
                "file": self.model.path.name if self.model.path else None}


def load_served(paths: list[str | Path], *, threads: int = 1) -> dict[str, Served]:
    """Load each model file on the CPU, named by its file name without the suffix (unique names required)."""
    served = {}
    for path in map(Path, paths):
        name = path.stem
        if name in served:
            raise OculaError(f"two models are named {name!r}; rename one file", path)
        model = ocula.load(path, device="cpu")
        onnx = path.with_suffix(".onnx")
        if onnx.is_file():
            model.module = OnnxForward(model.module, onnx, threads)
        served[name] = Served(name, model, "onnx" if onnx.is_file() else "torch")
    if not served:
        raise OculaError("no model to serve")
    return served
