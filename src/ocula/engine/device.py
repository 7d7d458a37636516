"""Devices, mixed precision, threads and seeds: chosen once, applied in one place, restored afterwards.

Library calls never leave global state changed behind them: `runtime` sets torch's thread count and seeds its
RNGs for the length of a call (a fork of the RNG state), then puts both back as they were.
"""

from __future__ import annotations

import os
from contextlib import contextmanager, nullcontext

import torch

from ocula.errors import OculaError


def resolve_device(device: str | torch.device | None = "auto") -> torch.device:
    """'auto' picks CUDA when present, else CPU; 'cpu', 'cuda', 'cuda:N' and 'mps' are checked to exist."""
    if isinstance(device, torch.device):
        return device
    name = (device or "auto").lower()
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    try:
        dev = torch.device(name)
    except RuntimeError:
        raise OculaError(f"unknown device {device!r}; use auto, cpu, cuda, cuda:N or mps") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise OculaError(f"device {device!r} asked for, but this machine has no CUDA GPU (torch "
                         f"{torch.__version__}); use --device cpu")
    if dev.type == "cuda" and dev.index is None and "LOCAL_RANK" in os.environ:
        dev = torch.device("cuda", int(os.environ["LOCAL_RANK"]))  # under torchrun: this rank's GPU
    if dev.type == "cuda" and dev.index is not None and dev.index >= torch.cuda.device_count():
        raise OculaError(f"device {device!r} asked for, but there are {torch.cuda.device_count()} CUDA devices")
    if dev.type == "mps" and not torch.backends.mps.is_available():
        raise OculaError(f"device {device!r} asked for, but MPS is not available here; use --device cpu")
    return dev


def device_of(module: torch.nn.Module) -> torch.device:
    """Where a module's weights live (the exact SVC has buffers only)."""
    tensor = next(module.parameters(), None)
    return (tensor if tensor is not None else next(module.buffers())).device


def amp_dtype(device: torch.device) -> torch.dtype:
    """The mixed-precision type of a device: bfloat16 on CPUs and on GPUs that have it, float16 elsewhere."""
    if device.type == "cuda" and not torch.cuda.is_bf16_supported():
        return torch.float16
    return torch.bfloat16


def autocast(device: torch.device, enabled: bool):
    """Mixed-precision autocast for `device` (a no-op when not enabled)."""
    return torch.autocast(device.type, dtype=amp_dtype(device)) if enabled else nullcontext()


def grad_scaler(device: torch.device, enabled: bool):
    """float16 gradients underflow without loss scaling; bfloat16 and float32 need none."""
    needed = enabled and amp_dtype(device) == torch.float16
    return torch.amp.GradScaler(device.type, enabled=needed)


def map_tensors(obj, fn):
    """`fn` applied to every tensor in `obj`, also inside dicts, lists and tuples (detection targets)."""
    if isinstance(obj, torch.Tensor):
        return fn(obj)
    if isinstance(obj, dict):
        return {k: map_tensors(v, fn) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(map_tensors(v, fn) for v in obj)
    return obj


def to_device(obj, device: torch.device):
    return map_tensors(obj, lambda t: t.to(device, non_blocking=True))


def fork_rng(device: torch.device | None = None, enabled: bool = True):
    """torch's RNG state (the CPU's and this device's GPU's) restored when the block ends."""
    devices = [device.index or 0] if device is not None and device.type == "cuda" else []
    return torch.random.fork_rng(devices=devices, enabled=enabled)


@contextmanager
def runtime(*, seed: int | None = None, threads: int = 0, device: torch.device | None = None):
    """Seed torch's RNGs and set its thread count inside the block; restore both afterwards."""
    old_threads = torch.get_num_threads()
    with fork_rng(device, enabled=seed is not None):
        if seed is not None:
            torch.manual_seed(seed)
        if threads:
            torch.set_num_threads(threads)
        try:
            yield
        finally:
            torch.set_num_threads(old_threads)
