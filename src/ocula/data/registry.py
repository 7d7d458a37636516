"""Datasets addressed by name: where the local copy lives, the official source and checksums, and the loader.

A local copy is looked for under, in order: the `data_dir` argument (`--data-dir`), $OCULA_DATA_DIR, the
`shared/datasets` folder beside a development checkout, and the user cache (~/.cache/ocula/datasets).
Nothing is downloaded at run time; the URLs and md5s are there for users who fetch the files themselves.
"""

from __future__ import annotations

import hashlib
import importlib
import os
from dataclasses import dataclass, field
from pathlib import Path

from ocula.errors import OculaError


@dataclass(frozen=True)
class DatasetInfo:
    name: str
    task: str  # classify | segment | detect
    folder: str  # sub-folder of a data dir holding the local copy ("" = bundled, needs no files)
    description: str
    loader: str  # "module:function", called as function(root: Path | None, split: str)
    splits: tuple[str, ...] = ("train", "test")
    license: str = ""
    urls: dict[str, str] = field(default_factory=dict)  # file name -> official URL
    md5: dict[str, str] = field(default_factory=dict)  # file name -> md5 of the official file


REGISTRY: dict[str, DatasetInfo] = {}


def register(info: DatasetInfo) -> DatasetInfo:
    REGISTRY[info.name] = info
    return info


def all_datasets() -> list[DatasetInfo]:
    _register_builtin()
    return sorted(REGISTRY.values(), key=lambda i: (i.task, i.name))


def names() -> list[str]:
    _register_builtin()
    return sorted(REGISTRY)


def get_info(name: str) -> DatasetInfo:
    _register_builtin()
    if name not in REGISTRY:
        raise OculaError(f"unknown dataset {name!r}; known: {', '.join(sorted(REGISTRY))}")
    return REGISTRY[name]


def candidate_dirs(data_dir: str | Path | None = None) -> list[Path]:
    dirs = []
    if data_dir:
        dirs.append(Path(data_dir))
    if os.environ.get("OCULA_DATA_DIR"):
        dirs.append(Path(os.environ["OCULA_DATA_DIR"]))
    checkout = Path(__file__).resolve().parents[3]  # src/ocula/data/registry.py -> checkout root
    dirs.append(checkout.parent / "shared" / "datasets")
    dirs.append(Path.home() / ".cache" / "ocula" / "datasets")
    return dirs


def find_root(info: DatasetInfo, data_dir: str | Path | None = None) -> Path | None:
    """The folder holding the dataset's local copy (None for bundled datasets)."""
    if not info.folder:
        return None
    if data_dir and not Path(data_dir).is_dir():
        raise OculaError("data directory not found", data_dir)
    for d in candidate_dirs(data_dir):
        if (d / info.folder).is_dir():
            return d / info.folder
    where = ", ".join(str(d) for d in candidate_dirs(data_dir))
    hint = f"; official files: {', '.join(info.urls.values())}" if info.urls else ""
    raise OculaError(f"dataset {info.name!r} not found: no folder {info.folder!r} under {where}. "
                     f"Pass --data-dir or set OCULA_DATA_DIR{hint}")


def load(name: str, split: str = "train", data_dir: str | Path | None = None):
    """Load split `split` of dataset `name` through its registered loader."""
    info = get_info(name)
    if split not in info.splits:
        raise OculaError(f"dataset {name!r} has splits {', '.join(info.splits)}, not {split!r}")
    module, func = info.loader.split(":")
    return getattr(importlib.import_module(module), func)(find_root(info, data_dir), split)


def md5sum(path: str | Path, chunk: int = 1 << 20) -> str:
    h = hashlib.md5()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def verify(name: str, data_dir: str | Path | None = None) -> dict[str, bool]:
    """Check the local copy's files against the official md5s: {file: ok}."""
    info = get_info(name)
    root = find_root(info, data_dir)
    return {f: (root / f).is_file() and md5sum(root / f) == m for f, m in info.md5.items()}


_BUILTIN_MODULES = ("ocula.data.classification", "ocula.data.segmentation", "ocula.data.detection",
                    "ocula.data.cell_types")


def _register_builtin() -> None:
    for m in _BUILTIN_MODULES:
        importlib.import_module(m)
