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
    works can abort (SIGABRT) at exit. A failed rank leaves at once; torchrun then stops the others."""
    if dist.is_initialized():
        if not failed:
            dist.barrier()
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
    t = torch.tensor(values, dtype=torch.float64, device=device)
    dist.all_reduce(t)
    return t.tolist()


def gather(obj) -> list:
    """Every rank's `obj`, in rank order, on every rank."""
    if world_size() == 1:
        return [obj]
    out = [None] * world_size()
    dist.all_gather_object(out, obj)
    return out
