"""One model file: safetensors weights plus JSON metadata in the safetensors header.

Metadata (key "ocula"): format version, ocula version, task, architecture and its arguments, class names,
preprocessing, metrics. Loading never unpickles anything. Extra tensors (e.g. optimizer state in a `last`
checkpoint) live under the "train." prefix and are ignored by `load_model`.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

from ocula import __version__
from ocula.errors import OculaError
from ocula.fileio import atomic_path

FORMAT = "ocula-model"
FORMAT_VERSION = 1
TRAIN_PREFIX = "train."


@dataclass
class ModelInfo:
    """Everything needed to rebuild and use a model, apart from its weights."""

    task: str  # classify | segment | detect | represent
    arch: str  # key of ocula.models.ARCHITECTURES
    args: dict  # keyword arguments of the architecture's builder
    classes: list[str] = field(default_factory=list)
    preprocess: dict = field(default_factory=dict)  # e.g. input_size, channels, value_max, photo pipeline style
    metrics: dict = field(default_factory=dict)
    extra: dict = field(default_factory=dict)

    def to_json(self) -> str:
        return json.dumps({"format": FORMAT, "format_version": FORMAT_VERSION, "ocula_version": __version__,
                           **self.__dict__})


def save_model(path: str | Path, model, info: ModelInfo, extra_tensors: dict | None = None,
               extra_metadata: dict | None = None) -> Path:
    from safetensors.torch import save

    from ocula.compression.packing import pack

    tensors = pack({k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()},
                   info.extra.get("packed", {}))
    for k, v in (extra_tensors or {}).items():
        tensors[TRAIN_PREFIX + k] = v.detach().contiguous().cpu()
    metadata = {"ocula": info.to_json(), **{k: json.dumps(v) for k, v in (extra_metadata or {}).items()}}
    with atomic_path(path) as tmp:
        tmp.write_bytes(save(tensors, metadata=metadata))
    return Path(path)


def read_model_file(path: str | Path):
    """Return (ModelInfo, tensors, metadata) after validating the container and its header."""
    from safetensors import SafetensorError
    from safetensors.torch import load

    path = Path(path)
    if not path.is_file():
        raise OculaError("model file not found", path)
    data = path.read_bytes()
    try:
        tensors = load(data)
        header_len = int.from_bytes(data[:8], "little")
        metadata = json.loads(data[8:8 + header_len]).get("__metadata__") or {}
    except (SafetensorError, ValueError, UnicodeDecodeError) as e:
        raise OculaError(f"not an ocula model file (unreadable safetensors container: {e})", path) from None
    if "ocula" not in metadata:
        raise OculaError("not an ocula model file (safetensors file without ocula metadata)", path)
    try:
        meta = json.loads(metadata["ocula"])
        if meta.get("format") != FORMAT:
            raise ValueError(f"format {meta.get('format')!r}")
        if meta.get("format_version") != FORMAT_VERSION:
            raise OculaError(f"model file format version {meta.get('format_version')} (written by ocula "
                             f"{meta.get('ocula_version')}) is not supported by ocula {__version__}, which reads "
                             f"version {FORMAT_VERSION}", path)
        info = ModelInfo(**{k: meta[k] for k in ("task", "arch", "args", "classes", "preprocess", "metrics",
                                                 "extra")})
    except OculaError:
        raise
    except (ValueError, KeyError, TypeError) as e:
        raise OculaError(f"damaged ocula metadata in model file ({e})", path) from None
    return info, tensors, metadata


def load_model(path: str | Path, device="cpu"):
    """Rebuild the model from a file on `device` ('auto', 'cpu', 'cuda', ...); returns the module in eval mode with
    `.info` (ModelInfo) attached. A file saved from a DistributedDataParallel or torch.compile wrapper loads too,
    and so does an ONNX file that ocula wrote with its metadata (an int8 model), run by ONNX Runtime."""
    from ocula.compression.packing import unpack
    from ocula.engine.device import fork_rng, resolve_device
    from ocula.models import build

    if Path(path).suffix == ".onnx":
        from ocula.export.onnx import load_onnx_model

        return load_onnx_model(path, device)
    info, tensors, _ = read_model_file(path)
    weights = {_unwrapped(k): v for k, v in tensors.items() if not k.startswith(TRAIN_PREFIX)}
    try:
        weights = unpack(weights, info.extra.get("packed", {}))
        with fork_rng():  # building initialises weights that the file replaces: leave the RNG alone
            model = build(info.arch, **info.args)
        model.load_state_dict(weights, strict=True)
    except (RuntimeError, TypeError, KeyError, ValueError) as e:
        first = str(e).strip().splitlines()[0]
        raise OculaError(f"weights do not fit architecture {info.arch!r}: {first}", path) from None
    model.to(resolve_device(device)).eval()
    model.info = info
    return model


def _unwrapped(key: str) -> str:
    """A parameter name without the prefix that DDP ('module.') or torch.compile ('_orig_mod.') wrappers add."""
    for prefix in ("module.", "_orig_mod."):
        while key.startswith(prefix):
            key = key[len(prefix):]
    return key
