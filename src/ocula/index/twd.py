"""Sequential three-way decisions over PCA granules (Savchenko), and the distance-ratio baseline.

The gallery is rotated onto all its principal axes once. Level l looks at the first l*m components: a squared
distance is additive over components, so each level only adds the next m terms to the running distances of the
references still in play. A reference survives a level while its distance <= delta * the best distance at that
level (the lecture's rho_c / rho_c1 <= delta, delta >= 1; the issue's `best / delta` with delta <= 1 is the same
rule with 1 / delta). The decision is taken as soon as the survivors belong to one class, else at the last level.

The distance-ratio baseline ('ratio') keeps every reference at every level and stops when the nearest class is
clearly nearer than the second: rho_c1 / rho_c2 <= ratio.

Both count their work as distance terms (one reference times one component); brute-force 1-NN costs
references x dimension per query.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ocula.errors import OculaError
from ocula.index.base import BLOCK_FLOATS, PCA, as_vectors


@dataclass
class Decisions:
    labels: np.ndarray  # [n] predicted class per query
    terms: np.ndarray  # [n] distance terms computed (reference x component)
    levels: np.ndarray  # [n] levels used before deciding

    def speedup(self, brute_terms: int) -> float:
        """How many times fewer distance terms than brute force (references x dimension per query)."""
        return brute_terms / float(self.terms.mean())


class ThreeWayDecisions:
    """fit(gallery, labels) then predict(queries). `rule`: 'twd' (m, delta) or 'ratio' (m, ratio)."""

    def __init__(self, *, m: int = 32, delta: float = 1.5, rule: str = "twd", ratio: float = 0.8):
        if rule not in ("twd", "ratio"):
            raise OculaError(f"unknown sequential rule {rule!r}; choose twd or ratio")
        if m < 1 or delta < 1 or not 0 < ratio <= 1:
            raise OculaError(f"need m >= 1, delta >= 1 and 0 < ratio <= 1, not m={m}, delta={delta}, ratio={ratio}")
        self.m, self.delta, self.rule, self.ratio = int(m), float(delta), rule, float(ratio)

    def fit(self, vectors, labels) -> "ThreeWayDecisions":
        x = as_vectors(vectors, "gallery vectors")
        labels = np.asarray(labels)
        if labels.shape != (len(x),):
            raise OculaError(f"{len(x)} gallery vectors need {len(x)} labels, not shape {labels.shape}")
        self.dim_ = x.shape[1]
        self.pca_ = PCA.fit(x, self.dim_)  # every axis: the rotation keeps distances, the order ranks granules
        self.gallery_ = self.pca_(x)
        self.labels_ = labels
        d = self.gallery_.shape[1]
        self.bounds_ = list(range(0, d, self.m)) + [d]
        return self

    @property
    def brute_terms(self) -> int:
        return self.gallery_.shape[0] * self.dim_

    def predict(self, queries) -> Decisions:
        q = self.pca_(as_vectors(queries, "query vectors", self.dim_))
        g, m = self.gallery_[:, :self.bounds_[1]], self.bounds_[1]
        norms, out = (g * g).sum(1), []
        block = max(1, BLOCK_FLOATS // len(g))
        for i in range(0, len(q), block):  # the first granule for a block of queries: one matmul, not a loop
            qb = q[i:i + block]
            first = np.maximum(norms - 2 * qb[:, :m] @ g.T + (qb[:, :m] ** 2).sum(1)[:, None], 0)
            out += [self._one(qi, fi) for qi, fi in zip(qb, first)]
        return Decisions(*(np.array(v) for v in zip(*out)))

    def _one(self, q: np.ndarray, dist: np.ndarray):
        g, labels, b = self.gallery_, self.labels_, self.bounds_
        alive = np.arange(len(g))
        terms = len(g) * b[1]
        for level in range(1, len(b)):
            if level > 1:
                diff = g[alive, b[level - 1]:b[level]] - q[b[level - 1]:b[level]]
                dist = dist + np.einsum("ij,ij->i", diff, diff)
                terms += len(alive) * (b[level] - b[level - 1])
            best = int(dist.argmin())
            if self.rule == "twd":
                keep = dist <= self.delta * dist[best]
                alive, dist = alive[keep], dist[keep]
                if (labels[alive] == labels[alive[0]]).all():
                    return labels[alive[0]], terms, level
            elif self._confident(dist, labels[alive], labels[alive[best]]):
                return labels[alive[best]], terms, level
        return labels[alive[int(dist.argmin())]], terms, len(b) - 1

    def _confident(self, dist: np.ndarray, labels: np.ndarray, winner) -> bool:
        other = dist[labels != winner]
        return other.size == 0 or dist.min() <= self.ratio * other.min()
