"""FLANN's randomized kd-tree forest (Silpa-Anan & Hartley 2008; Muja & Lowe, VISAPP 2009), written here.

Each tree splits a node at the mean of a dimension drawn at random among the `top` of highest variance (estimated
on at most 100 of its points), so the trees differ. A search descends every tree, then keeps popping the closest
unexplored branch of any tree from one shared priority queue (best-bin-first) until `checks` reference vectors
have been collected; those candidates are ranked by exact distance. More checks: higher recall, slower search.
"""

from __future__ import annotations

import heapq

import numpy as np

from ocula.index.base import Index

SAMPLE = 100  # points used to estimate a node's mean and variance, as FLANN does


class RandomizedKDForest(Index):
    backend = "kdforest"
    BUILD = {"trees": 4, "leaf_size": 16, "top": 5, "seed": 0}
    SEARCH = {"checks": 256}

    def _build(self, x: np.ndarray) -> None:
        self.vectors = x
        self._grow(np.random.default_rng(self.params["seed"]))

    def _add(self, x: np.ndarray) -> None:  # the trees are cheap to regrow; FLANN rebuilds on growth as well
        self._build(np.concatenate([self.vectors, x]))

    def _grow(self, rng: np.random.Generator) -> None:
        """Nodes of all trees in flat lists: internal nodes split (dim, value) with children (left, right); a leaf
        has dim -1 and covers order[start:end]. Roots are the first node of each tree."""
        x, p = self.vectors, self.params
        dims, values, left, right, orders, roots = [], [], [], [], [], []
        for t in range(p["trees"]):
            order = np.arange(len(x))
            roots.append(len(dims))
            stack = [(len(dims), 0, len(x))]
            dims.append(-1), values.append(0.0), left.append(0), right.append(0)
            while stack:
                node, start, end = stack.pop()
                if end - start <= p["leaf_size"]:
                    dims[node], left[node], right[node] = -1, start + t * len(x), end + t * len(x)
                    continue
                idx = order[start:end]
                sample = x[idx[rng.choice(len(idx), min(SAMPLE, len(idx)), replace=False)]]
                var = sample.var(0)
                dim = int(rng.choice(np.argsort(var)[::-1][:p["top"]]))
                value = float(sample[:, dim].mean())
                below = x[idx, dim] < value
                if below.all() or not below.any():  # all equal along it: split the node in halves instead
                    below = np.arange(len(idx)) < len(idx) // 2
                order[start:end] = np.concatenate([idx[below], idx[~below]])
                mid = start + int(below.sum())
                dims[node], values[node] = dim, value
                for child, (s, e) in (("l", (start, mid)), ("r", (mid, end))):
                    (left if child == "l" else right)[node] = len(dims)
                    stack.append((len(dims), s, e))
                    dims.append(-1), values.append(0.0), left.append(0), right.append(0)
            orders.append(order)
        self.nodes = np.array([dims, left, right], dtype=np.int64)
        self.values = np.array(values, dtype=np.float64)
        self.order = np.concatenate(orders)
        self.roots = np.array(roots, dtype=np.int64)
        self._lists()

    def _lists(self) -> None:
        """Python lists for the search loop: indexing a list is several times faster than a numpy scalar."""
        self._dims, self._left, self._right = (a.tolist() for a in self.nodes)
        self._values = self.values.tolist()

    def _search(self, q: np.ndarray, k: int, threads: int | None, checks: int):
        n = len(q)
        out_d = np.empty((n, k), dtype=np.float32)
        out_i = np.empty((n, k), dtype=np.int64)
        for i in range(n):
            cand = self._candidates(q[i].tolist(), max(checks, k))
            diff = self.vectors[cand] - q[i]
            d = np.einsum("ij,ij->i", diff, diff)
            top = np.argpartition(d, k - 1)[:k] if len(d) > k else np.arange(len(d))
            top = top[np.argsort(d[top])]
            out_d[i], out_i[i] = d[top], cand[top]
        return out_d, out_i

    def _candidates(self, q: list, checks: int) -> np.ndarray:
        dims, values, left, right = self._dims, self._values, self._left, self._right
        heap = [(0.0, root) for root in self.roots.tolist()]
        ranges, seen = [], 0
        while heap and seen < checks:
            bound, node = heapq.heappop(heap)
            while dims[node] >= 0:  # descend, queueing the far side with its distance to the split plane
                diff = q[dims[node]] - values[node]
                near, far = (left[node], right[node]) if diff < 0 else (right[node], left[node])
                heapq.heappush(heap, (bound + diff * diff, far))
                node = near
            ranges.append((left[node], right[node]))
            seen += right[node] - left[node]
        return np.unique(np.concatenate([self.order[s:e] for s, e in ranges]))

    def _arrays(self) -> dict:
        return {"vectors": self.vectors, "nodes": self.nodes, "values": self.values, "order": self.order,
                "roots": self.roots}

    def _restore(self, arrays: dict) -> None:
        for name in ("vectors", "nodes", "values", "order", "roots"):
            setattr(self, name, arrays[name])
        self._lists()
