"""MNIST-style IDX files (gzip-compressed or raw), validated strictly before any array is built.

Layout: two zero bytes, a type code, the number of dimensions, each dimension as big-endian uint32, then the data.
"""

from __future__ import annotations

import gzip
import zlib
from pathlib import Path

import numpy as np

from ocula.errors import OculaError

_TYPES = {0x08: np.dtype(">u1"), 0x09: np.dtype(">i1"), 0x0B: np.dtype(">i2"), 0x0C: np.dtype(">i4"),
          0x0D: np.dtype(">f4"), 0x0E: np.dtype(">f8")}


def parse_idx(data: bytes, path: str | Path = "<bytes>") -> np.ndarray:
    if len(data) < 4:
        raise OculaError(f"not an IDX file: only {len(data)} bytes", path)
    if data[0] != 0 or data[1] != 0 or data[2] not in _TYPES:
        raise OculaError(f"not an IDX file: bad magic number {data[:4].hex()}", path)
    dtype, ndim = _TYPES[data[2]], data[3]
    if not 1 <= ndim <= 4:
        raise OculaError(f"IDX file declares {ndim} dimensions (expected 1 to 4)", path)
    header = 4 + 4 * ndim
    if len(data) < header:
        raise OculaError("IDX header truncated", path)
    dims = tuple(int(d) for d in np.frombuffer(data, dtype=">u4", count=ndim, offset=4))
    expected = header + int(np.prod(dims, dtype=np.int64)) * dtype.itemsize
    if len(data) != expected:
        raise OculaError(f"IDX size mismatch: dims {dims} need {expected} bytes, file has {len(data)}", path)
    return np.frombuffer(data, dtype=dtype, offset=header).reshape(dims).astype(dtype.newbyteorder("="))


def read_idx(path: str | Path) -> np.ndarray:
    path = Path(path)
    if not path.is_file():
        raise OculaError("file not found", path)
    raw = path.read_bytes()
    if raw[:2] == b"\x1f\x8b":
        try:
            raw = gzip.decompress(raw)
        except (OSError, EOFError, zlib.error) as e:
            raise OculaError(f"corrupt gzip data: {e}", path) from None
    return parse_idx(raw, path)
