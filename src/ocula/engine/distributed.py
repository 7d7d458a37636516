"""Several processes, one run: torch.distributed as torchrun launches it (gloo on CPUs, NCCL on GPUs).

    torchrun --nproc-per-node 2 -m ocula train mnist --model cnn

Every rank draws the same global batch from the same seeded generator and trains on its own slice of it, so N
processes with global batch B follow the same path as one process with batch B (up to batch-norm statistics, which
are per rank unless `sync_bn`). Gradients are averaged by DistributedDataParallel; the logged loss, the stop
decisions and the metrics are agreed across ranks; only rank 0 writes the run folder. Outside torchrun every
function here is the single-process identity.
"""

from __future__ import annotations

import os
import pickle
import time
from datetime import timedelta

import torch
import torch.distributed as dist

# A rank that dies leaves the others waiting in a collective: give up after this long instead of hanging forever
# (torchrun also stops the other ranks as soon as one exits with an error).
TIMEOUT = timedelta(minutes=10)


def world_size() -> int:
    return dist.get_world_size() if dist.is_initialized() else int(os.environ.get("WORLD_SIZE", 1))


def rank() -> int:
    return dist.get_rank() if dist.is_initialized() else int(os.environ.get("RANK", 0))


def is_main() -> bool:
    return rank() == 0


def setup(device: torch.device) -> torch.device:
    """Join the process group when launched by torchrun; returns the device."""
    if world_size() == 1:
        return device
    if device.type == "cuda":  # resolve_device already picked cuda:LOCAL_RANK for a bare 'cuda'
        torch.cuda.set_device(device)
    if not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo", timeout=TIMEOUT)
    return device


def cleanup(failed: bool = False) -> None:
    """Leave the process group. Ranks that succeeded leave together: one that tears gloo down while a peer still
    works can abort (SIGABRT) at exit. A failed rank leaves at once; torchrun then stops the others.

    On gloo the rendezvous is monitored_barrier (point-to-point, in this thread), not barrier(): gloo's barrier
    is queued on a worker thread and keeps the previous collectives' tensors until that thread drops it, which
    can happen during interpreter shutdown, and freeing a Python tensor then aborts the process."""
    if dist.is_initialized():
        if not failed:
            dist.monitored_barrier() if dist.get_backend() == "gloo" else dist.barrier()
        dist.destroy_process_group()


def shard(obj, index: int | None = None, count: int | None = None):
    """This rank's contiguous slice of a global batch (a tensor, or a list such as detection targets)."""
    index, count = (rank(), world_size()) if index is None else (index, count)
    if count == 1:
        return obj
    n = len(obj)
    lo, hi = n * index // count, n * (index + 1) // count
    return obj[lo:hi]


def agree(values: list[float], device: torch.device) -> list[float]:
    """Sums of `values` over the ranks (one all-reduce), e.g. [loss x n, n, stop flag]."""
    if world_size() == 1:
        return values
    return _all_reduce(torch.tensor(values, dtype=torch.float64, device=device)).tolist()


def gather(obj) -> list:
    """Every rank's `obj`, in rank order, on every rank (pickled; each rank fills its own row of a sum)."""
    if world_size() == 1:
        return [obj]
    device = torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else None
    data = torch.frombuffer(bytearray(pickle.dumps(obj)), dtype=torch.uint8)
    sizes = torch.zeros(world_size(), dtype=torch.int64, device=device)
    sizes[rank()] = len(data)
    sizes = _all_reduce(sizes).tolist()
    rows = torch.zeros(world_size(), max(sizes), dtype=torch.uint8, device=device)
    rows[rank(), : len(data)] = data.to(rows.device)
    rows = _all_reduce(rows).cpu()
    return [pickle.loads(row[:n].numpy().tobytes()) for row, n in zip(rows, sizes)]


def _all_reduce(t: torch.Tensor) -> torch.Tensor:
    """Sum `t` over the ranks in place. Gloo's worker thread still holds `t` for a moment after all_reduce
    returns; were `t` freed by Python first, that thread would later free its Python object itself, and doing so
    while the interpreter shuts down aborts the process (SIGABRT). So wait, briefly, until the worker lets go."""
    dist.all_reduce(t)
    deadline = time.monotonic() + 5
    while t.device.type == "cpu" and t._use_count() > 1 and time.monotonic() < deadline:
        time.sleep(1e-4)
    return t
