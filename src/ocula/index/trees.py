"""scikit-learn's KDTree and BallTree: exact search. A tree is rebuilt from its vectors on load and after `add`
(building is deterministic and takes well under a second per 100k vectors), so only the vectors are saved."""

from __future__ import annotations

import numpy as np

from ocula.index.base import Index


class _SklearnTree(Index):
    BUILD = {"leaf_size": 40}
    tree_class = ""

    def _build(self, x: np.ndarray) -> None:
        from sklearn import neighbors

        self.vectors = x
        self.tree = getattr(neighbors, self.tree_class)(x, leaf_size=self.params["leaf_size"])

    def _add(self, x: np.ndarray) -> None:
        self._build(np.concatenate([self.vectors, x]))

    def _search(self, q: np.ndarray, k: int, threads: int | None):
        d, ids = self.tree.query(q, k=k)  # Euclidean, sorted; single-threaded
        return d * d, ids

    def _arrays(self) -> dict:
        return {"vectors": self.vectors}

    def _restore(self, arrays: dict) -> None:
        self._build(arrays["vectors"])


class KDTree(_SklearnTree):
    backend, tree_class = "kdtree", "KDTree"


class BallTree(_SklearnTree):
    backend, tree_class = "balltree", "BallTree"
