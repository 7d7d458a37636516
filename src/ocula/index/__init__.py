"""Nearest-neighbour search behind one interface, and classifiers over it.

    from ocula.index import build_index, load_index
    index = build_index(gallery, "hnswlib", metric="cosine", pca=64)   # any backend in BACKENDS
    distances, ids = index.search(queries, k=10, ef=100)
    index.add(more)                                                     # new references, no retraining
    index.save("gallery.index"); load_index("gallery.index")            # safetensors + JSON, never pickle

Backends: brute (exact, torch, any device), kdtree and balltree (scikit-learn, exact), kdforest (FLANN's
randomized kd-trees), hnswlib, faiss-hnsw, faiss-ivf, faiss-ivfpq. `ocula.index.twd` holds the sequential
three-way decisions over PCA granules.
"""

from __future__ import annotations

from pathlib import Path

from ocula.errors import OculaError
from ocula.index.base import Index, as_vectors
from ocula.index.brute import BruteForce
from ocula.index.forest import RandomizedKDForest
from ocula.index.libraries import FaissHNSW, FaissIVF, FaissIVFPQ, HNSWLib
from ocula.index.trees import BallTree, KDTree

BACKENDS = {c.backend: c for c in (BruteForce, KDTree, BallTree, RandomizedKDForest, HNSWLib, FaissHNSW, FaissIVF,
                                   FaissIVFPQ)}


def make_index(backend: str, **params) -> Index:
    """An empty index of `backend` with build parameters (metric, pca and the backend's own)."""
    if backend not in BACKENDS:
        raise OculaError(f"unknown index backend {backend!r}; choose one of {', '.join(BACKENDS)}")
    return BACKENDS[backend](**params)


def build_index(vectors, backend: str = "brute", **params) -> Index:
    return make_index(backend, **params).build(vectors)


def load_index(path: str | Path) -> Index:
    return Index.from_file(path, BACKENDS)


__all__ = ["BACKENDS", "Index", "as_vectors", "build_index", "load_index", "make_index"]
