"""CoreML export through coremltools' torch converter: one image tensor input instead of 64 separate doubles.

CoreML prediction needs macOS; on Linux the saved spec is what can be checked.
"""

from __future__ import annotations

import copy
import shutil
from pathlib import Path

import torch

from ocula.errors import OculaError
from ocula.export.onnx import example_input


def export_coreml(model, path: str | Path) -> Path:
    try:
        import coremltools as ct
    except ImportError:
        raise OculaError("CoreML export needs coremltools: pip install 'ocula[coreml]'") from None
    path = Path(path)
    if path.suffix != ".mlpackage":
        raise OculaError("CoreML models are saved as .mlpackage folders", path)
    model = copy.deepcopy(model).float().eval()  # CoreML computes in float32 at most
    x = example_input(model)[:1]
    traced = torch.jit.trace(model, x)
    batch = ct.RangeDim(lower_bound=1, upper_bound=1024, default=1)
    mlmodel = ct.convert(traced, inputs=[ct.TensorType(name="image", shape=(batch, *x.shape[1:]))],
                         outputs=[ct.TensorType(name="scores")], convert_to="mlprogram",
                         minimum_deployment_target=ct.target.iOS15)
    mlmodel.short_description = f"ocula {model.info.task} model ({model.info.arch})"
    mlmodel.user_defined_metadata["classes"] = ",".join(model.info.classes)
    tmp = path.with_name(f".tmp-{path.name}")  # coremltools insists on the .mlpackage suffix
    shutil.rmtree(tmp, ignore_errors=True)
    mlmodel.save(str(tmp))
    shutil.rmtree(path, ignore_errors=True)
    tmp.rename(path)
    return path
