"""The machine's matmul peak per precision, measured once and cached: the yardstick for a run's FLOP/s.

A large square matmul is as close to the hardware's peak as PyTorch gets; convolutions reach a fraction of it.
The cache (~/.cache/ocula/peak.json) is keyed by device, precision and thread count.
"""

from __future__ import annotations

import json
import os
import platform
import time
from pathlib import Path

import torch

from ocula.engine.device import fork_rng
from ocula.fileio import write_json


def _cache() -> Path:
    return Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "ocula" / "peak.json"


def _device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"{platform.processor() or platform.machine()} x{torch.get_num_threads()} threads"


def measure(device: torch.device, dtype: torch.dtype, n: int = 2048, seconds: float = 0.5) -> float:
    """FLOP/s of an n x n matmul in `dtype` on `device`, best of repeated runs over about `seconds`."""
    a = torch.randn(n, n, device=device).to(dtype)
    b = torch.randn(n, n, device=device).to(dtype)
    best, spent = 0.0, 0.0
    while spent < seconds:
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        start = time.perf_counter()
        a @ b
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        took = time.perf_counter() - start
        best, spent = max(best, 2 * n**3 / took), spent + took
    return best


def matmul_peak(device: torch.device, dtype: torch.dtype) -> float:
    """The cached peak FLOP/s for this device, precision and thread count (measured on first use)."""
    key = f"{_device_name(device)} {dtype}".replace("torch.", "")
    path = _cache()
    try:
        table = json.loads(path.read_text())
    except (OSError, ValueError):
        table = {}
    if key not in table:
        with fork_rng(device):
            table[key] = measure(device, dtype)
        write_json(path, table)
    return table[key]
