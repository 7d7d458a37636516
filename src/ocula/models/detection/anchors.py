"""Anchors: k reference boxes (scales x aspect ratios) centred on every cell of every feature map.

The default is Faster R-CNN's: 3 scales (128, 256, 512) x 3 ratios (0.5, 1, 2) = 9 anchors per cell of a
stride-16 map. An aspect ratio is height / width, and every anchor of one scale has area scale**2.
"""

import math
from collections.abc import Sequence

import torch
from torch import Tensor, nn

from ocula.errors import OculaError


class AnchorGenerator(nn.Module):
    """Anchors for each feature level, in the order the RPN head predicts them: (row, column, anchor).

    `sizes[l]` and `aspect_ratios[l]` describe level l; `offset` places a cell's anchors at
    ((col + offset) * stride, (row + offset) * stride): 0.5 is the centre of the image patch the cell covers.
    """

    def __init__(self, *, sizes: Sequence[Sequence[float]] = ((128, 256, 512),),
                 aspect_ratios: Sequence[Sequence[float]] = ((0.5, 1.0, 2.0),), offset: float = 0.5):
        super().__init__()
        if len(sizes) != len(aspect_ratios):
            raise OculaError(f"anchor sizes give {len(sizes)} levels but aspect_ratios give {len(aspect_ratios)}")
        if any(s <= 0 for level in sizes for s in level) or any(r <= 0 for level in aspect_ratios for r in level):
            raise OculaError("anchor sizes and aspect ratios must be positive")
        self.sizes = [tuple(float(s) for s in level) for level in sizes]
        self.aspect_ratios = [tuple(float(r) for r in level) for level in aspect_ratios]
        self.offset = offset

    @property
    def num_levels(self) -> int:
        return len(self.sizes)

    def num_anchors_per_location(self) -> list[int]:
        return [len(s) * len(r) for s, r in zip(self.sizes, self.aspect_ratios)]

    def cell_anchors(self, level: int, dtype=torch.float32, device=None) -> Tensor:
        """The level's k anchors [k, 4] centred on (0, 0), ratio-major: all scales of ratio 0, then ratio 1..."""
        rows = []
        for ratio in self.aspect_ratios[level]:
            for size in self.sizes[level]:
                h, w = size * math.sqrt(ratio), size / math.sqrt(ratio)
                rows.append([-w / 2, -h / 2, w / 2, h / 2])
        return torch.tensor(rows, dtype=dtype, device=device)

    def grid_anchors(self, level: int, feature_size: tuple[int, int], stride: tuple[float, float],
                     dtype=torch.float32, device=None) -> Tensor:
        """All anchors [H * W * k, 4] of one level with feature map size (H, W) and stride (sy, sx)."""
        h, w = feature_size
        sy, sx = stride
        ys = (torch.arange(h, dtype=dtype, device=device) + self.offset) * sy
        xs = (torch.arange(w, dtype=dtype, device=device) + self.offset) * sx
        cy, cx = torch.meshgrid(ys, xs, indexing="ij")
        centres = torch.stack([cx, cy, cx, cy], dim=-1).reshape(-1, 1, 4)
        return (centres + self.cell_anchors(level, dtype, device)[None]).reshape(-1, 4)

    def forward(self, feature_sizes: Sequence[tuple[int, int]],
                strides: Sequence[tuple[float, float]], dtype=torch.float32, device=None) -> list[Tensor]:
        """Anchors per level, for feature maps of the given sizes and strides (image pixels per cell)."""
        if len(feature_sizes) != self.num_levels:
            raise OculaError(f"anchor generator has {self.num_levels} levels but got {len(feature_sizes)} feature maps")
        return [self.grid_anchors(i, tuple(size), tuple(stride), dtype, device)
                for i, (size, stride) in enumerate(zip(feature_sizes, strides))]


def anchors_inside(anchors: Tensor, image_size: tuple[int, int], allowed_border: float = 0.0) -> Tensor:
    """Mask of anchors lying inside the (height, width) image, up to `allowed_border` pixels beyond its edges.

    Faster R-CNN ignores cross-boundary anchors when training the RPN: they give large, hard-to-fit targets.
    """
    height, width = image_size
    return ((anchors[:, 0] >= -allowed_border) & (anchors[:, 1] >= -allowed_border)
            & (anchors[:, 2] <= width + allowed_border) & (anchors[:, 3] <= height + allowed_border))
