"""Load a user's weights file (.pth/.pt or .safetensors) into a model, never unpickling arbitrary objects."""

from __future__ import annotations

import re
from pathlib import Path

import torch
from torch import nn

from ocula.errors import OculaError

SHOWN = 3  # keys quoted per kind of problem: enough to recognise it, short enough for one line


def read_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    """The tensors in `path`: a bare state_dict, or one under 'state_dict' / 'model' (training checkpoints)."""
    path = Path(path)
    if not path.is_file():
        raise OculaError("no such weights file", path=path)
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            obj = load_file(path, device="cpu")
        else:
            obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # torch and safetensors raise many types; the user needs one sentence
        found = re.search(r"GLOBAL (\S+)", str(e))
        if found:
            raise OculaError(f"holds Python objects ({found.group(1)}), which ocula does not unpickle; "
                             "save model.state_dict() instead", path=path) from None
        raise OculaError("is not a readable PyTorch or safetensors weights file (damaged or another format)",
                         path=path) from None
    for key in ("state_dict", "model"):
        if isinstance(obj, dict) and isinstance(obj.get(key), dict):
            obj = obj[key]
            break
    if not (isinstance(obj, dict) and obj and all(isinstance(v, torch.Tensor) for v in obj.values())):
        raise OculaError("holds no state_dict (a mapping of names to tensors, bare or under 'state_dict' or 'model')",
                         path=path)
    if all(k.startswith("module.") for k in obj):  # saved from a DataParallel / DistributedDataParallel wrapper
        obj = {k.removeprefix("module."): v for k, v in obj.items()}
    return obj


def load_weights(model: nn.Module, path: str | Path, *, skip_head: bool = False) -> nn.Module:
    """Load `path` into `model`, requiring every name and shape to match; returns the model.

    With `skip_head=True`, checkpoint entries of the model's classifier (`model.head_name`) that do not fit
    (another `num_classes`, or `num_classes=0`) are left out and the model keeps its fresh head: fine-tuning.
    """
    state = read_state_dict(path)
    own = model.state_dict()
    optional = set()
    if skip_head:
        head = getattr(model, "head_name", None)
        if head is None:
            raise OculaError(f"skip_head: {type(model).__name__} has no classifier head", path=path)
        fits = {k for k, v in state.items() if k in own and own[k].shape == v.shape}
        state = {k: v for k, v in state.items() if not k.startswith(f"{head}.") or k in fits}
        optional = {k for k in own if k.startswith(f"{head}.")}
    # A counter, not a weight; checkpoints from older PyTorch lack it.
    optional |= {k for k in own if k.endswith("num_batches_tracked")}
    missing = [k for k in own if k not in state and k not in optional]
    unexpected = [k for k in state if k not in own]
    mismatched = [k for k in state if k in own and state[k].shape != own[k].shape]
    if missing or unexpected or mismatched:
        problems = []
        if missing:
            problems.append(f"{len(missing)} missing ({_first(missing)})")
        if unexpected:
            problems.append(f"{len(unexpected)} unexpected ({_first(unexpected)})")
        if mismatched:
            problems.append(f"{len(mismatched)} with other shapes (" + ", ".join(
                f"{k}: file {list(state[k].shape)} vs model {list(own[k].shape)}" for k in mismatched[:SHOWN]) + ")")
        head = getattr(model, "head_name", None)
        if head and not skip_head and all(k.startswith(f"{head}.") for k in missing + unexpected + mismatched):
            problems.append("only the classifier differs: pass skip_head=True to fine-tune")
        raise OculaError(f"weights do not fit {type(model).__name__}: " + "; ".join(problems), path=path)
    # Names and shapes were checked above; strict=False only lets the optional keys keep the model's values.
    model.load_state_dict(state, strict=False)
    return model


def _first(keys: list[str]) -> str:
    return ", ".join(keys[:SHOWN]) + (", ..." if len(keys) > SHOWN else "")
