"""A classifier over a gallery of embeddings: an embedding network, the references' vectors and labels, and a
decision rule, as one nn.Module that a model file rebuilds like any other architecture.

Rules (distances are squared L2 between embeddings):
  1nn  the class of the nearest reference; probabilities softmax(-rho_c / T), rho_c = class's nearest distance
  knn  the majority of the k nearest references; probabilities = vote shares
  map  the maximum posterior of a Parzen (probabilistic neural network) estimate, the lecture's MAP rule:
       P(c | x) proportional to sum over the class's references of exp(-rho / T)
T (temperature) is the median distance of a reference to its nearest other reference, set when the gallery is.
The output is non-negative and sums to 1, so the classification task reads it as it reads SVC vote shares.
"""

from __future__ import annotations

import torch
from torch import nn

RULES = ("1nn", "knn", "map")


class GalleryRecognizer(nn.Module):
    def __init__(self, *, embedder: dict, size: int, dim: int, num_classes: int, rule: str = "1nn", k: int = 5,
                 normalize: bool = True, temperature: float = 1.0):
        from ocula.models import build

        super().__init__()
        if rule not in RULES:
            raise ValueError(f"unknown rule {rule!r}; choose one of {', '.join(RULES)}")
        self.embedder = build(embedder["arch"], **embedder["args"])
        self.rule, self.k, self.normalize, self.temperature = rule, k, normalize, temperature
        self.num_classes = num_classes
        self.register_buffer("gallery", torch.zeros(size, dim))
        self.register_buffer("labels", torch.zeros(size, dtype=torch.long))

    def penultimate(self, x: torch.Tensor) -> torch.Tensor:
        f = self.embedder.penultimate(x).float()
        return nn.functional.normalize(f, dim=1) if self.normalize else f

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        q = self.penultimate(x)
        g = self.gallery
        d = ((q * q).sum(1, keepdim=True) - 2 * q @ g.T + (g * g).sum(1)).clamp_min(0)
        labels = self.labels.expand_as(d)
        per_class = lambda value: d.new_full((1, self.num_classes), value).repeat(d.shape[0], 1)  # [n, classes]
        if self.rule == "knn":
            nearest = d.topk(min(self.k, len(g)), dim=1, largest=False).indices
            votes = per_class(0.0)
            ones = torch.ones_like(nearest, dtype=votes.dtype)
            return votes.scatter_add(1, self.labels[nearest], ones) / nearest.shape[1]
        if self.rule == "1nn":
            return (-per_class(float("inf")).scatter_reduce(1, labels, d, "amin") / self.temperature).softmax(1)
        # a log-sum-exp per class: scatter the max, then the shifted sum
        top = per_class(float("-inf")).scatter_reduce(1, labels, -d / self.temperature, "amax")
        shifted = torch.zeros_like(top).scatter_add(1, labels, (-d / self.temperature - top.gather(1, labels)).exp())
        return (top + shifted.log()).softmax(1)
