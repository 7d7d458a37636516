"""The models a server holds, by name. A model file with an ONNX export beside it (`model.onnx` next to
`model.ocula`) runs in ONNX Runtime, which is 2-3x faster per image on a CPU; the task's own predict code runs
around it either way, so both runtimes give the same answers."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

import ocula
from ocula.errors import OculaError
from ocula.export.onnx import OnnxModule, onnx_session


class OnnxForward(OnnxModule):
    """The ONNX export of a torch module, run in its place: attributes the tasks read (info, num_classes, ...)
    are the wrapped torch module's."""

    def __init__(self, module: torch.nn.Module, onnx_path: Path, threads: int):
        # The server runs one prediction per core at a time; more intra-op threads would fight over the cores.
        super().__init__(onnx_path, module.info, threads)
        self.module = module

    def __getattr__(self, name):
        try:
            return super().__getattr__(name)
        except AttributeError:
            return getattr(super().__getattr__("module"), name)


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
        if path.suffix == ".onnx":  # an int8 model from `ocula compress`: already runs in ONNX Runtime
            model.module.session = onnx_session(path, threads)
        elif onnx.is_file():
            model.module = OnnxForward(model.module, onnx, threads)
        served[name] = Served(name, model, "onnx" if onnx.is_file() else "torch")
    if not served:
        raise OculaError("no model to serve")
    return served
