"""The one index interface: build / add / search / save / load, whatever the backend.

Every backend searches squared Euclidean distance. Cosine is the same search on unit vectors (squared L2 between
unit vectors is 2 - 2 cos), reported as cosine distance 1 - cos. An optional PCA, fitted on the first gallery
passed to `build`, shortens every vector before it reaches the backend. An index file is safetensors (arrays, and
a library's own serialised bytes as a uint8 array) plus JSON metadata: nothing is ever unpickled.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from ocula.errors import OculaError
from ocula.fileio import atomic_path

FORMAT = "ocula-index"
METRICS = ("l2", "cosine")
BLOCK_FLOATS = 16_000_000  # query-by-reference distances held at once (64 MB of float32)


def as_vectors(x, what: str, dim: int | None = None) -> np.ndarray:
    """A C-contiguous float32 [n, d] array, or a one-line OculaError naming what is wrong."""
    a = np.asarray(x.detach().cpu() if hasattr(x, "detach") else x)
    if a.ndim == 1 and dim is not None and a.shape[0] == dim:
        a = a[None]
    if a.ndim != 2:
        raise OculaError(f"{what} must be a 2-D array [n, d], not shape {a.shape}")
    if len(a) == 0:
        raise OculaError(f"{what} is empty: an index needs at least one vector")
    if dim is not None and a.shape[1] != dim:
        raise OculaError(f"{what} have dimension {a.shape[1]}, the index holds dimension {dim}")
    a = np.ascontiguousarray(a, dtype=np.float32)
    if not np.isfinite(a).all():
        bad = int((~np.isfinite(a)).any(1).sum())
        raise OculaError(f"{what} contain NaN or infinite values ({bad} of {len(a)} vectors)")
    return a


def read_arrays(path: str | Path, key: str, what: str) -> tuple[dict, dict]:
    """(numpy arrays, the JSON metadata under `key`) of a safetensors file, or a one-line OculaError."""
    from safetensors import SafetensorError
    from safetensors.numpy import load

    path = Path(path)
    if not path.is_file():
        raise OculaError(f"{what} file not found", path)
    data = path.read_bytes()
    try:
        header = json.loads(data[8:8 + int.from_bytes(data[:8], "little")])
        return load(data), json.loads(header["__metadata__"][key])
    except (SafetensorError, ValueError, KeyError, TypeError) as e:
        raise OculaError(f"not an ocula {what} file ({type(e).__name__}: {e})", path) from None


class PCA:
    """Mean and the leading principal axes of a gallery (eigenvectors of its covariance, float64 for accuracy)."""

    def __init__(self, mean: np.ndarray, components: np.ndarray):
        self.mean, self.components = mean.astype(np.float32), components.astype(np.float32)

    @classmethod
    def fit(cls, x: np.ndarray, n: int) -> "PCA":
        mean = x.mean(0, dtype=np.float64)
        centred = x - mean
        values, vectors = np.linalg.eigh(centred.T.astype(np.float64) @ centred)
        order = np.argsort(values)[::-1][:min(n, x.shape[1])]
        return cls(mean, vectors[:, order].T)

    def __call__(self, x: np.ndarray) -> np.ndarray:
        return np.ascontiguousarray((x - self.mean) @ self.components.T, dtype=np.float32)


class Index:
    """Common face of every backend. Subclasses set `backend`, `BUILD` and `SEARCH` (their parameters with
    defaults) and implement `_build`, `_add`, `_search(q, k, threads, **search)`, `_arrays` and `_restore`."""

    backend = ""
    BUILD: dict = {}
    SEARCH: dict = {}

    def __init__(self, *, metric: str = "l2", pca: int = 0, **params):
        if metric not in METRICS:
            raise OculaError(f"unknown metric {metric!r}; choose one of {', '.join(METRICS)}")
        unknown = set(params) - set(self.BUILD)
        if unknown:
            raise OculaError(f"unknown option(s) for the {self.backend} index: {', '.join(sorted(unknown))}; "
                             f"known: {', '.join(self.BUILD) or 'none'}")
        self.metric, self.n_pca, self.params = metric, int(pca), {**self.BUILD, **params}
        self.dim, self.size, self.pca = None, 0, None

    def _prepare(self, x, what: str) -> np.ndarray:
        x = as_vectors(x, what, self.dim)
        if self.metric == "cosine":
            norms = np.linalg.norm(x, axis=1, keepdims=True)
            if (norms == 0).any():
                raise OculaError(f"{what} contain all-zero vectors, which have no cosine distance")
            x = x / norms
        return self.pca(x) if self.pca is not None else x

    def build(self, vectors) -> "Index":
        """Index `vectors` [n, d] (ids 0..n-1), replacing anything indexed before; fits the PCA on them."""
        self.dim, self.pca = None, None
        x = self._prepare(vectors, "gallery vectors")
        self.dim = x.shape[1]
        if self.n_pca:
            self.pca = PCA.fit(x, self.n_pca)
            x = self.pca(x)
        self.size = len(x)
        self._build(x)
        return self

    def add(self, vectors) -> np.ndarray:
        """Append references (no retraining: the PCA and any trained quantiser stay); returns their ids."""
        if self.dim is None:
            return np.arange(len(self.build(vectors)))
        x = self._prepare(vectors, "added vectors")
        ids = np.arange(self.size, self.size + len(x))
        self._add(x)
        self.size += len(x)
        return ids

    def search(self, queries, k: int = 1, *, threads: int | None = None, **search) -> tuple[np.ndarray, np.ndarray]:
        """(distances [n, k] float32, ids [n, k] int64) of the k nearest references, nearest first. Search knobs
        (ef, nprobe, checks) default to `SEARCH`; `threads` caps the library's threads for this call."""
        if self.dim is None:
            raise OculaError(f"the {self.backend} index is empty: build it on a gallery first")
        unknown = set(search) - set(self.SEARCH)
        if unknown:
            raise OculaError(f"unknown search option(s) for the {self.backend} index: {', '.join(sorted(unknown))}; "
                             f"known: {', '.join(self.SEARCH) or 'none'}")
        if not 1 <= k <= self.size:
            raise OculaError(f"k = {k} neighbours asked of an index of {self.size} references")
        q = self._prepare(queries, "query vectors")
        d, ids = self._search(q, k, threads, **{**self.SEARCH, **search})
        d = np.maximum(d.astype(np.float32), 0)
        return (d / 2 if self.metric == "cosine" else d), ids.astype(np.int64)

    def __len__(self) -> int:
        return self.size

    def __repr__(self) -> str:
        return f"ocula.index.{type(self).__name__}(size={self.size}, dim={self.dim}, metric={self.metric!r})"

    def save(self, path: str | Path) -> Path:
        from safetensors.numpy import save

        arrays = dict(self._arrays())
        if self.pca is not None:
            arrays.update({"pca.mean": self.pca.mean, "pca.components": self.pca.components})
        meta = {"format": FORMAT, "backend": self.backend, "metric": self.metric, "pca": self.n_pca,
                "params": self.params, "dim": self.dim, "size": self.size}
        with atomic_path(path) as tmp:
            tmp.write_bytes(save({k: np.ascontiguousarray(v) for k, v in arrays.items()},
                                 metadata={FORMAT: json.dumps(meta)}))
        return Path(path)

    @classmethod
    def from_file(cls, path: str | Path, backends: dict) -> "Index":
        arrays, meta = read_arrays(path, FORMAT, "index")
        try:
            index = backends[meta["backend"]](metric=meta["metric"], pca=meta["pca"], **meta["params"])
        except (KeyError, TypeError) as e:
            raise OculaError(f"not an ocula index file ({type(e).__name__}: {e})", path) from None
        index.dim, index.size = meta["dim"], meta["size"]
        if "pca.mean" in arrays:
            index.pca = PCA(arrays.pop("pca.mean"), arrays.pop("pca.components"))
        index._restore(arrays)
        return index

    # backends implement these
    def _build(self, x: np.ndarray) -> None:
        raise NotImplementedError

    def _add(self, x: np.ndarray) -> None:
        raise NotImplementedError

    def _search(self, q: np.ndarray, k: int, threads: int | None, **search):
        raise NotImplementedError

    def _arrays(self) -> dict:
        raise NotImplementedError

    def _restore(self, arrays: dict) -> None:
        raise NotImplementedError
