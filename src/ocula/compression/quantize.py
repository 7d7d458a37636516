"""int8 post-training static quantization with ONNX Runtime: QDQ format, per-channel weights, activation ranges
calibrated on training images. The result is an ONNX file carrying the model's ModelInfo, which `ocula.load`
runs in ONNX Runtime."""

from __future__ import annotations

import tempfile
from pathlib import Path

import numpy as np
import torch

from ocula.export.onnx import export_onnx, write_info
from ocula.fileio import atomic_path


def quantize_int8(model, calibration: np.ndarray, out: Path, batch_size: int = 32) -> Path:
    """`calibration`: float32 images [N, C, H, W] in the model's native value range."""
    from onnxruntime.quantization import CalibrationDataReader, QuantFormat, QuantType, quantize_static
    from onnxruntime.quantization.shape_inference import quant_pre_process

    class Images(CalibrationDataReader):
        def __init__(self):
            self.batches = iter(calibration[i:i + batch_size] for i in range(0, len(calibration), batch_size))

        def get_next(self):
            batch = next(self.batches, None)
            return None if batch is None else {"image": batch}

    with tempfile.TemporaryDirectory(prefix="ocula-int8-") as tmp:
        fp32, prepared = Path(tmp) / "fp32.onnx", Path(tmp) / "prepared.onnx"
        export_onnx(model.cpu().eval(), fp32)
        quant_pre_process(str(fp32), str(prepared))  # folds and infers shapes so every conv gets quantized
        with atomic_path(out) as target:
            # uint8 activations with int8 weights: the combination x86 int8 kernels (VNNI) run fastest.
            quantize_static(str(prepared), str(target), Images(), quant_format=QuantFormat.QDQ, per_channel=True,
                            activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8)
    return write_info(out, model.info)


def calibration_images(images: torch.Tensor, n: int, seed: int) -> np.ndarray:
    """A seeded random sample of `n` training images."""
    g = torch.Generator().manual_seed(seed)
    idx = torch.randperm(len(images), generator=g)[:n]
    return images[idx].numpy()
