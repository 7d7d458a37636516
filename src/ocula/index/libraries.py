"""HNSW from hnswlib, and HNSW / IVF / IVF-PQ from faiss, behind the ocula index interface.

Both libraries serialise to bytes of their own format, stored in the index file as a uint8 array."""

from __future__ import annotations

import tempfile
from pathlib import Path

import numpy as np

from ocula.errors import OculaError
from ocula.index.base import Index


def _library(name: str):
    import importlib

    try:
        return importlib.import_module(name)
    except ImportError:
        raise OculaError(f"this index needs the {name} package: pip install 'ocula[index]'") from None


class HNSWLib(Index):
    """hnswlib's HNSW graph; `ef` (search list size) trades speed for recall."""

    backend = "hnswlib"
    BUILD = {"M": 16, "ef_construction": 200, "seed": 100}
    SEARCH = {"ef": 64}

    def _build(self, x: np.ndarray) -> None:
        hnswlib = _library("hnswlib")
        p = self.params
        self.graph = hnswlib.Index(space="l2", dim=x.shape[1])
        self.graph.init_index(max_elements=len(x), M=p["M"], ef_construction=p["ef_construction"],
                              random_seed=p["seed"])
        self.graph.add_items(x, np.arange(len(x)), num_threads=1)  # one thread: the same graph every time

    def _add(self, x: np.ndarray) -> None:
        self.graph.resize_index(self.size + len(x))
        self.graph.add_items(x, np.arange(self.size, self.size + len(x)), num_threads=1)

    def _search(self, q: np.ndarray, k: int, threads: int | None, ef: int):
        self.graph.set_ef(max(ef, k))
        ids, d = self.graph.knn_query(q, k=k, num_threads=threads or 1)
        return d, ids

    def _arrays(self) -> dict:
        with tempfile.TemporaryDirectory() as tmp:
            path = Path(tmp) / "hnsw.bin"
            self.graph.save_index(str(path))
            return {"hnswlib": np.frombuffer(path.read_bytes(), dtype=np.uint8)}

    def _restore(self, arrays: dict) -> None:
        hnswlib = _library("hnswlib")
        self.graph = hnswlib.Index(space="l2", dim=self._stored_dim())
        with tempfile.TemporaryDirectory() as tmp:
            path = Path(tmp) / "hnsw.bin"
            path.write_bytes(arrays["hnswlib"].tobytes())
            self.graph.load_index(str(path), max_elements=self.size)

    def _stored_dim(self) -> int:
        return self.pca.components.shape[0] if self.pca is not None else self.dim


class _Faiss(Index):
    """A faiss index made by its factory string; trained (IVF centroids, PQ codebooks) on the first gallery."""

    def _build(self, x: np.ndarray) -> None:
        faiss = _library("faiss")
        self.index = faiss.index_factory(x.shape[1], self.factory(), faiss.METRIC_L2)
        if not self.index.is_trained:
            if hasattr(self.index, "cp"):  # IVF: the k-means seed, so a build is reproducible
                self.index.cp.seed = self.params.get("seed", 1234)
            self.index.train(x)
        self.index.add(x)

    def _add(self, x: np.ndarray) -> None:
        self.index.add(x)

    def _search(self, q: np.ndarray, k: int, threads: int | None, **search):
        faiss = _library("faiss")
        old = faiss.omp_get_max_threads()
        if threads:
            faiss.omp_set_num_threads(threads)
        try:
            self._set(**search)
            return self.index.search(q, k)
        finally:
            faiss.omp_set_num_threads(old)

    def _arrays(self) -> dict:
        return {"faiss": _library("faiss").serialize_index(self.index)}

    def _restore(self, arrays: dict) -> None:
        self.index = _library("faiss").deserialize_index(arrays["faiss"])


class FaissHNSW(_Faiss):
    backend = "faiss-hnsw"
    BUILD = {"M": 32, "ef_construction": 40}
    SEARCH = {"ef": 64}

    def _build(self, x: np.ndarray) -> None:
        faiss = _library("faiss")
        self.index = faiss.IndexHNSWFlat(x.shape[1], self.params["M"])
        self.index.hnsw.efConstruction = self.params["ef_construction"]
        self.index.add(x)

    def _set(self, ef: int) -> None:
        self.index.hnsw.efSearch = ef


class FaissIVF(_Faiss):
    backend = "faiss-ivf"
    BUILD = {"nlist": 1024, "seed": 1234}
    SEARCH = {"nprobe": 16}

    def factory(self) -> str:
        return f"IVF{self.params['nlist']},Flat"

    def _set(self, nprobe: int) -> None:
        _library("faiss").extract_index_ivf(self.index).nprobe = nprobe


class FaissIVFPQ(FaissIVF):
    """IVF with product-quantised residuals: `m` sub-vectors of `bits` bits each; distances are approximate, so
    `refine` > 1 re-ranks refine * k candidates by exact distance (faiss's IndexRefineFlat)."""

    backend = "faiss-ivfpq"
    BUILD = {"nlist": 1024, "m": 16, "bits": 8, "refine": 0, "seed": 1234}

    def factory(self) -> str:
        p = self.params
        return f"IVF{p['nlist']},PQ{p['m']}x{p['bits']}" + (",RFlat" if p["refine"] else "")

    def _set(self, nprobe: int) -> None:
        if self.params["refine"]:
            self.index.k_factor = self.params["refine"]
        super()._set(nprobe)
