"""Augmentations that move the boxes with the image: flips, scale jitter with a random crop, colour.

Images are uint8 or float tensors [3, H, W]; boxes are float xyxy [N, 4] in pixels (ocula's convention: a pixel
i spans [i, i + 1), so flipping maps x to W - x). Every draw comes from the passed torch.Generator, so a seeded
epoch replays exactly.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor


def _coin(g: torch.Generator) -> bool:
    return bool(torch.rand((), generator=g) < 0.5)


def _uniform(lo: float, hi: float, g: torch.Generator) -> float:
    return lo + (hi - lo) * float(torch.rand((), generator=g))


def hflip(image: Tensor, boxes: Tensor) -> tuple[Tensor, Tensor]:
    w = image.shape[-1]
    return image.flip(-1), torch.stack([w - boxes[:, 2], boxes[:, 1], w - boxes[:, 0], boxes[:, 3]], 1)


def vflip(image: Tensor, boxes: Tensor) -> tuple[Tensor, Tensor]:
    h = image.shape[-2]
    return image.flip(-2), torch.stack([boxes[:, 0], h - boxes[:, 3], boxes[:, 2], h - boxes[:, 1]], 1)


def scale_crop(image: Tensor, boxes: Tensor, labels: Tensor, size: tuple[int, int], scale: float,
               g: torch.Generator, *, min_visible: float = 0.3, fill: float = 114.0):
    """Resize by `scale`, then take a random `size` (h, w) window (padded with `fill` where the image is smaller).

    A box keeps its clipped part when at least `min_visible` of its area stays in the window and it is over 2 px
    wide and high; otherwise it is dropped. Returns (float image [3, h, w], boxes, labels).
    """
    h0, w0 = image.shape[-2:]
    nh, nw = max(1, round(h0 * scale)), max(1, round(w0 * scale))
    img = F.interpolate(image[None].float(), size=(nh, nw), mode="bilinear", align_corners=False)[0]
    sy, sx = nh / h0, nw / w0
    boxes = boxes * torch.tensor([sx, sy, sx, sy])
    th, tw = size
    # Window origin in the resized image; negative when the image is smaller (it then sits at a random offset).
    y0 = int(torch.randint(min(0, nh - th), max(0, nh - th) + 1, (), generator=g))
    x0 = int(torch.randint(min(0, nw - tw), max(0, nw - tw) + 1, (), generator=g))
    out = torch.full((3, th, tw), fill)
    ys, xs = max(y0, 0), max(x0, 0)
    ye, xe = min(y0 + th, nh), min(x0 + tw, nw)
    out[:, ys - y0:ye - y0, xs - x0:xe - x0] = img[:, ys:ye, xs:xe]
    moved = boxes - torch.tensor([x0, y0, x0, y0], dtype=boxes.dtype)
    clipped = torch.stack([moved[:, 0].clamp(0, tw), moved[:, 1].clamp(0, th), moved[:, 2].clamp(0, tw),
                           moved[:, 3].clamp(0, th)], 1)
    keep = (_area(clipped) >= min_visible * _area(moved).clamp(min=1e-6)) & \
           (clipped[:, 2] - clipped[:, 0] > 2) & (clipped[:, 3] - clipped[:, 1] > 2)
    return out, clipped[keep], labels[keep]


def _area(b: Tensor) -> Tensor:
    return (b[:, 2] - b[:, 0]).clamp(min=0) * (b[:, 3] - b[:, 1]).clamp(min=0)


def colour_jitter(batch: Tensor, g: torch.Generator, *, brightness: float = 0.2, contrast: float = 0.2,
                  saturation: float = 0.3, gain: float = 0.08) -> Tensor:
    """Per image: channel gains (stain colour), brightness, contrast and saturation; float 0..255 [N, 3, H, W]."""
    n = batch.shape[0]
    u = torch.rand(n, 6, 1, 1, generator=g) * 2 - 1  # 3 channel gains, brightness, contrast, saturation
    x = batch * (1 + gain * u[:, :3])
    x = x * (1 + brightness * u[:, 3:4])
    mean = x.mean((1, 2, 3), keepdim=True)
    x = (x - mean) * (1 + contrast * u[:, 4:5]) + mean
    gray = x.mean(1, keepdim=True)
    x = (x - gray) * (1 + saturation * u[:, 5:6]) + gray
    return x.clamp(0, 255)


def augment(image: Tensor, boxes: Tensor, labels: Tensor, size: tuple[int, int], g: torch.Generator, *,
            scale: tuple[float, float] = (0.6, 1.0), flips: bool = True):
    """One training view: random horizontal and vertical flips (smears have no up or left), then scale jitter
    and a random `size` crop."""
    if flips and _coin(g):
        image, boxes = hflip(image, boxes)
    if flips and _coin(g):
        image, boxes = vflip(image, boxes)
    return scale_crop(image, boxes, labels, size, _uniform(*scale, g), g)
