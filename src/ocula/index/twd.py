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
import torch

from ocula.errors import OculaError
from ocula.index.base import BLOCK_FLOATS, PCA, as_vectors

# The first granule's distances are computed for this many (query, reference) pairs at once: small enough to stay
# in the CPU's cache while they are thresholded (on 60k references, 32 queries at a time were 1.7x faster than 266).
CACHED_FLOATS = 2_000_000
# The first granule measures every reference, so it is the search's cost. Where the CPU has bfloat16 dot products
# (5x faster than float32 here) it runs in bfloat16 as a filter whose error is bounded, then re-measures the few
# pairs it keeps exactly in float32, so the decisions are those of float32. SLACK covers the rounding: bfloat16
# keeps 8 bits of inputs and output, an error below 1.5 * 2^-8 |q||g| + 2^-9 |g|^2 (SLACK leaves room to spare).
FAST_DTYPE = torch.bfloat16 if torch.cpu._is_avx512_bf16_supported() else torch.float32
SLACK = {torch.bfloat16: 2.0 ** -6, torch.float32: 2.0 ** -18}[FAST_DTYPE]


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
        first = torch.from_numpy(np.ascontiguousarray(self.gallery_[:, :self.bounds_[1]]))
        norms = (first * first).sum(1)[:, None]
        self.first_ = torch.cat([first, norms.sqrt(), (1 - SLACK) * norms], 1).to(FAST_DTYPE)
        return self

    @property
    def brute_terms(self) -> int:
        return self.gallery_.shape[0] * self.dim_

    def predict(self, queries) -> Decisions:
        q = self.pca_(as_vectors(queries, "query vectors", self.dim_))
        decide = self._twd if self.rule == "twd" else self._ratio
        block = max(1, CACHED_FLOATS // len(self.gallery_))
        parts = [decide(q[i:i + block]) for i in range(0, len(q), block)]
        return Decisions(*(np.concatenate(v) for v in zip(*parts)))

    def _upper_scores(self, q: np.ndarray) -> np.ndarray:
        """[queries, references] upper bounds of q.g - |g|^2 / 2 over the first granule (so that |q|^2 - 2 * score
        is a lower bound of the squared distance), from one matmul in FAST_DTYPE: the extra columns add
        SLACK * (|q| |g| + |g|^2 / 2), which covers that dtype's rounding."""
        qm = torch.from_numpy(np.ascontiguousarray(q[:, :self.bounds_[1]]))
        qm = torch.cat([qm, SLACK * qm.norm(dim=1, keepdim=True), torch.full((len(qm), 1), -0.5)], 1)
        return torch.mm(qm.to(FAST_DTYPE), self.first_.T).float().numpy()

    def _twd(self, q: np.ndarray):
        """Every query of the block at once. After the first granule the survivors are a flat list of (query,
        reference) pairs sorted by query; each further level adds its m distance terms to the surviving pairs only,
        then drops pruned pairs and the pairs of decided queries."""
        g, labels, b = self.gallery_, self.labels_, self.bounds_
        n = len(q)
        out, terms, levels = np.empty(n, labels.dtype), np.full(n, len(g) * b[1], np.int64), np.zeros(n, np.int64)
        # First granule: a reference can survive only if its lower bound is within delta of an upper bound of the
        # best distance (the exact distance of the reference with the lowest bound). Those candidates are measured
        # exactly and pruned with the exact rule. flatnonzero + divmod is 10x faster than a 2-D np.nonzero.
        scores, qq = self._upper_scores(q), np.einsum("ij,ij->i", q[:, :b[1]], q[:, :b[1]])
        upper = _partial_distances(g, q, np.arange(n), scores.argmax(1), 0, b[1])
        # qq - 2 * score <= delta * upper, solved for the score so that the [queries, references] block is read once
        rows, refs = np.divmod(np.flatnonzero(scores >= ((qq - self.delta * upper) / 2)[:, None]), scores.shape[1])
        dist = _partial_distances(g, q, rows, refs, 0, b[1])
        keep = dist <= self.delta * _query_min(dist, _starts(rows))
        rows, refs, dist = rows[keep], refs[keep], dist[keep]
        for level in range(1, len(b)):
            if level > 1:
                dist = dist + _partial_distances(g, q, rows, refs, b[level - 1], b[level])
                terms += np.bincount(rows, minlength=n) * (b[level] - b[level - 1])
                keep = dist <= self.delta * _query_min(dist, _starts(rows))
                rows, refs, dist = rows[keep], refs[keep], dist[keep]
            start = _starts(rows)  # each open query's first pair
            lab = labels[refs]
            done = np.minimum.reduceat(lab, start) == np.maximum.reduceat(lab, start)  # one class left
            if level == len(b) - 1:
                done[:] = True
            nearest = np.flatnonzero(dist == _query_min(dist, start))  # first nearest pair of each query, on ties
            nearest = nearest[np.unique(rows[nearest], return_index=True)[1]]
            decided = rows[start[done]]
            out[decided], levels[decided] = lab[nearest][done], level
            still = ~np.isin(rows, decided)
            rows, refs, dist = rows[still], refs[still], dist[still]
            if not len(rows):
                break
        return out, terms, levels

    def _ratio(self, q: np.ndarray):
        """The baseline keeps every reference, so its running distances stay a dense [queries, references] matrix
        and each level is one matmul for the queries still open."""
        g, labels, b = self.gallery_, self.labels_, self.bounds_
        n = len(q)
        out, terms, levels = np.empty(n, labels.dtype), np.zeros(n, np.int64), np.zeros(n, np.int64)
        open_, dist = np.arange(n), 0
        for level in range(1, len(b)):
            lo, hi = b[level - 1], b[level]
            gl, ql = g[:, lo:hi], q[open_, lo:hi]
            dist = dist + np.maximum((gl * gl).sum(1) - 2 * ql @ gl.T + (ql * ql).sum(1)[:, None], 0)
            terms[open_] += len(g) * (hi - lo)
            nearest = dist.argmin(1)
            winner = labels[nearest]
            other = np.where(labels[None] != winner[:, None], dist, np.inf).min(1)
            done = dist[np.arange(len(dist)), nearest] <= self.ratio * other
            if level == len(b) - 1:
                done[:] = True
            out[open_[done]], levels[open_[done]] = winner[done], level
            open_, dist = open_[~done], dist[~done]
            if not len(open_):
                break
        return out, terms, levels


def _partial_distances(g, q, rows, refs, lo, hi) -> np.ndarray:
    """Squared distance over components lo:hi for each (query, reference) pair, in blocks to bound memory."""
    step = max(1, BLOCK_FLOATS // max(hi - lo, 1))
    out = np.empty(len(rows), np.float32)
    for i in range(0, len(rows), step):
        diff = g[refs[i:i + step], lo:hi] - q[rows[i:i + step], lo:hi]
        out[i:i + step] = np.einsum("ij,ij->i", diff, diff)
    return out


def _starts(rows: np.ndarray) -> np.ndarray:
    """Where each query's run of pairs begins (rows are sorted by query)."""
    return np.flatnonzero(np.r_[True, rows[1:] != rows[:-1]])


def _query_min(dist: np.ndarray, start: np.ndarray) -> np.ndarray:
    """Each pair's query's smallest distance, the queries' runs beginning at `start`."""
    return np.repeat(np.minimum.reduceat(dist, start), np.diff(np.r_[start, len(dist)]))
