"""RoI pooling and RoIAlign in plain PyTorch, with torchvision's semantics, plus multi-level RoIAlign for FPN.

RoIs are either a Tensor [K, 5] of (batch_index, x1, y1, x2, y2) or a list with one [Ki, 4] tensor per image, in
input-image coordinates; `spatial_scale` maps them onto the feature map (1 / stride).
"""

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ocula.errors import OculaError

# Work is split so no intermediate tensor holds more than this many elements (~64 MB of float32).
_CHUNK_ELEMENTS = 16_000_000


def _coord_dtype(input: Tensor) -> torch.dtype:
    """RoI coordinates are handled in float32 or wider: a bf16 map (autocast) would round a 500-pixel coordinate to
    a multiple of 2."""
    return torch.promote_types(input.dtype, torch.float32)


def _pair(size) -> tuple[int, int]:
    return (int(size), int(size)) if isinstance(size, int) else (int(size[0]), int(size[1]))


def _as_rois(rois) -> Tensor:
    if isinstance(rois, Tensor):
        if rois.dim() != 2 or rois.shape[1] != 5:
            raise OculaError(f"rois must be [K, 5] (batch_index, x1, y1, x2, y2), got shape {tuple(rois.shape)}")
        return rois
    parts = []
    for i, boxes in enumerate(rois):
        if boxes.dim() != 2 or boxes.shape[1] != 4:
            raise OculaError(f"boxes of image {i} must be [K, 4], got shape {tuple(boxes.shape)}")
        parts.append(torch.cat([torch.full_like(boxes[:, :1], i), boxes], dim=1))
    if not parts:
        return torch.zeros((0, 5))
    return torch.cat(parts)


def _check_input(input: Tensor, rois: Tensor) -> None:
    if input.dim() != 4:
        raise OculaError(f"RoI input must be a [N, C, H, W] feature map, got shape {tuple(input.shape)}")
    if rois.numel() and (rois[:, 0].min() < 0 or rois[:, 0].max() >= input.shape[0]):
        raise OculaError(f"RoI batch indices must lie in 0..{input.shape[0] - 1}")


def _chunks(n: int, per_item: int):
    """Ranges of at most _CHUNK_ELEMENTS // per_item items covering range(n)."""
    step = max(1, _CHUNK_ELEMENTS // max(per_item, 1))
    for start in range(0, n, step):
        yield start, min(start + step, n)


def roi_align(input: Tensor, rois, output_size, spatial_scale: float = 1.0, sampling_ratio: int = -1,
              aligned: bool = False) -> Tensor:
    """RoIAlign: average of bilinearly sampled points in each of the output_size bins of each RoI.

    Matches torchvision.ops.roi_align: each bin is sampled on a sampling_ratio x sampling_ratio grid (or
    ceil(roi_size / output_size) per axis when sampling_ratio <= 0); samples more than one pixel outside the map
    are zero, the rest are clamped to the border; `aligned` shifts the RoI by half a pixel so that pixel centres,
    not corners, line up with the box coordinates; without it, RoIs are at least 1x1. Returns [K, C, PH, PW] in
    the input's dtype. A bf16 / fp16 map is sampled in float32 (as torchvision does under autocast): sample
    positions are computed from pixel coordinates, and grid_sample needs the map and the grid in one dtype.
    """
    dtype = input.dtype
    input = input.to(_coord_dtype(input))
    rois = _as_rois(rois).to(device=input.device, dtype=input.dtype)
    _check_input(input, rois)
    ph, pw = _pair(output_size)
    n, c, height, width = input.shape
    out = input.new_zeros((rois.shape[0], c, ph, pw))
    if rois.shape[0] == 0:
        return out.to(dtype)
    x1, y1, roi_w, roi_h = _on_map(rois[:, 1:], spatial_scale, aligned)
    bin_w = roi_w / pw
    bin_h = roi_h / ph
    if sampling_ratio > 0:
        grid_h = torch.full_like(roi_h, sampling_ratio, dtype=torch.int64)
        grid_w = grid_h
    else:
        grid_h = torch.ceil(roi_h / ph).long()
        grid_w = torch.ceil(roi_w / pw).long()
    batch = rois[:, 0].long()
    # Grid sizes differ between RoIs only when adaptive; RoIs sharing one are sampled together.
    keys = torch.stack([batch, grid_h, grid_w], dim=1)
    for b, gh, gw in torch.unique(keys, dim=0).tolist():
        idx = torch.nonzero((keys == torch.tensor([b, gh, gw], device=keys.device)).all(dim=1)).flatten()
        if gh == 0 or gw == 0:
            continue  # an empty RoI (aligned, zero size) averages no samples: output stays 0
        for lo, hi in _chunks(idx.numel(), c * ph * gh * pw * gw):
            sel = idx[lo:hi]
            out[sel] = _align(input[b:b + 1], x1[sel], y1[sel], bin_w[sel], bin_h[sel], (ph, pw), (gh, gw))
    return out.to(dtype)


def _on_map(boxes: Tensor, spatial_scale: float, aligned: bool) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Boxes [K, 4] in image pixels -> (x1, y1, width, height) in map cells."""
    offset = 0.5 if aligned else 0.0
    x1 = boxes[:, 0] * spatial_scale - offset
    y1 = boxes[:, 1] * spatial_scale - offset
    roi_w = boxes[:, 2] * spatial_scale - offset - x1
    roi_h = boxes[:, 3] * spatial_scale - offset - y1
    if not aligned:
        roi_w = roi_w.clamp(min=1.0)
        roi_h = roi_h.clamp(min=1.0)
    return x1, y1, roi_w, roi_h


def roi_align_one_image(input: Tensor, boxes: Tensor, output_size, spatial_scale: float, sampling_ratio: int,
                        aligned: bool) -> Tensor:
    """roi_align of one image's boxes [K, 4] on its map [1, C, H, W] at a fixed sampling_ratio (> 0), written
    without data-dependent branches so that ONNX export traces it; the same values as roi_align."""
    dtype = input.dtype
    input = input.to(_coord_dtype(input))
    ph, pw = _pair(output_size)
    x1, y1, roi_w, roi_h = _on_map(boxes.to(input.dtype), spatial_scale, aligned)
    grid = (sampling_ratio, sampling_ratio)
    return _align(input, x1, y1, roi_w / pw, roi_h / ph, (ph, pw), grid).to(dtype)


def _align(fmap: Tensor, x1: Tensor, y1: Tensor, bin_w: Tensor, bin_h: Tensor, bins: tuple[int, int],
           grid: tuple[int, int]) -> Tensor:
    """RoIAlign of K RoIs on one map [1, C, H, W] with the same gh x gw samples per bin: [K, C, PH, PW].

    One grid_sample call for all of them, samples laid out as (RoI, bin row, bin col, gh, gw) so each bin's samples
    are contiguous and the mean over them (sum / count, as torchvision) is cheap. No data-dependent branch: ONNX
    export traces it as it is."""
    (ph, pw), (gh, gw) = bins, grid
    _, c, height, width = fmap.shape
    k = x1.shape[0]
    ys = _sample_axis(y1, bin_h, ph, gh, height).reshape(k, ph, 1, gh, 1).expand(k, ph, pw, gh, gw)
    xs = _sample_axis(x1, bin_w, pw, gw, width).reshape(k, 1, pw, 1, gw).expand(k, ph, pw, gh, gw)
    grid_xy = torch.stack((xs, ys), dim=-1).reshape(1, k * ph * pw, gh * gw, 2)
    sampled = F.grid_sample(fmap, grid_xy, mode="bilinear", padding_mode="zeros",
                            align_corners=False)  # [1, C, K * PH * PW, gh * gw]
    return sampled.mean(dim=3).reshape(c, k, ph, pw).transpose(0, 1)


def _sample_axis(start: Tensor, bin_size: Tensor, bins: int, grid: int, size: int) -> Tensor:
    """Sample positions [K, bins * grid] along one axis, normalised for grid_sample.

    torchvision's bilinear sampling counts a sample further than one pixel outside the map as 0 and clamps the
    others into [0, size - 1]. Clamping here and sending the far-outside samples well beyond the map (where
    grid_sample's zero padding gives exactly 0) reproduces that.
    """
    step = torch.arange(bins * grid, device=start.device, dtype=start.dtype)
    p, i = step // grid, step % grid
    pos = start[:, None] + p * bin_size[:, None] + (i + 0.5) * bin_size[:, None] / grid
    inside = (pos >= -1.0) & (pos <= size)
    norm = (2 * pos.clamp(min=0, max=size - 1) + 1) / size - 1
    return torch.where(inside, norm, torch.full_like(norm, -4.0))


def _round_half_away(x: Tensor) -> Tensor:
    """C's round(): halves go away from zero (torch.round rounds them to even)."""
    return torch.sign(x) * torch.floor(x.abs() + 0.5)


def roi_pool(input: Tensor, rois, output_size, spatial_scale: float = 1.0) -> Tensor:
    """RoI max pooling (Fast R-CNN), matching torchvision.ops.roi_pool.

    The RoI is rounded to whole feature cells, split into output_size bins of floor/ceil cell ranges, and each
    bin takes the max of its cells; a bin with no cells inside the map is 0. Returns [K, C, PH, PW].

    A bin of h x w cells starting at (y, x) is max_pool2d((h, w), stride=1)[y, x], so each distinct bin size
    costs one pooling pass over the map and one gather, whatever the number of RoIs. RoI coordinates and bin
    edges are float32 or wider even for a bf16 map (autocast), which would move them by whole cells; the max itself
    is exact in any dtype.
    """
    rois = _as_rois(rois).to(device=input.device, dtype=_coord_dtype(input))
    _check_input(input, rois)
    ph, pw = _pair(output_size)
    n, c, height, width = input.shape
    k = rois.shape[0]
    out = input.new_zeros((k * ph * pw, c))
    if k == 0:
        return out.reshape(0, c, ph, pw)
    x1, y1, x2, y2 = _round_half_away(rois[:, 1:] * spatial_scale).long().unbind(1)
    row0, row1 = _pool_ranges(y1, y2, ph, height, rois.dtype)  # [K, PH]
    col0, col1 = _pool_ranges(x1, x2, pw, width, rois.dtype)  # [K, PW]
    shape = (k, ph, pw)
    bin_h = (row1 - row0)[:, :, None].expand(shape).reshape(-1)
    bin_w = (col1 - col0)[:, None, :].expand(shape).reshape(-1)
    ys = row0[:, :, None].expand(shape).reshape(-1)
    xs = col0[:, None, :].expand(shape).reshape(-1)
    batch = rois[:, 0].long()[:, None, None].expand(shape).reshape(-1)
    filled = (bin_h > 0) & (bin_w > 0)
    size_key = bin_h * (width + 1) + bin_w
    feat = input.contiguous(memory_format=torch.channels_last)  # max_pool2d is far faster channels-last on CPU
    for key in torch.unique(size_key[filled]).tolist():
        bh, bw = divmod(key, width + 1)
        idx = torch.nonzero(filled & (size_key == key)).flatten()
        pooled = F.max_pool2d(feat, (bh, bw), stride=1)  # [N, C, H - bh + 1, W - bw + 1], channels-last
        hh, ww = pooled.shape[-2:]
        table = pooled.permute(0, 2, 3, 1).reshape(-1, c)  # one row of C values per window position
        out[idx] = table.index_select(0, (batch[idx] * hh + ys[idx]) * ww + xs[idx])
    return out.reshape(k, ph, pw, c).permute(0, 3, 1, 2).contiguous()


def _pool_ranges(start: Tensor, end: Tensor, bins: int, size: int, dtype) -> tuple[Tensor, Tensor]:
    """First and one-past-last cell [K, bins] of each bin along one axis, clamped into the map.

    Bin edges are computed in the feature dtype (float32 at least), as torchvision does, so floor/ceil land on the
    same cells.
    """
    bin_size = (end - start + 1).clamp(min=1).to(dtype)[:, None] / bins
    p = torch.arange(bins, device=start.device, dtype=dtype)
    lo = torch.floor(p * bin_size).long() + start[:, None]
    hi = torch.ceil((p + 1) * bin_size).long() + start[:, None]
    return lo.clamp(0, size), hi.clamp(0, size)


class MultiScaleRoIAlign(nn.Module):
    """RoIAlign over FPN levels: each RoI is pooled from the level that suits its size.

    Level k = floor(canonical_level + log2(sqrt(area) / canonical_scale)), clamped to the available levels, so a
    224x224 RoI goes to level 4 (stride 16). Level strides are given, or read as the power of two closest to
    image size / feature size.
    """

    def __init__(self, *, featmap_names: Sequence[str], output_size=7, sampling_ratio: int = 2,
                 canonical_scale: float = 224.0, canonical_level: int = 4, aligned: bool = False,
                 strides: Sequence[int] | None = None):
        super().__init__()
        self.featmap_names = list(featmap_names)
        self.strides = list(strides) if strides is not None else None
        self.output_size = _pair(output_size)
        self.sampling_ratio = sampling_ratio
        self.canonical_scale = canonical_scale
        self.canonical_level = canonical_level
        self.aligned = aligned

    def map_levels(self, boxes: Tensor, levels: Sequence[int]) -> Tensor:
        """Index into `levels` (the log2 strides of the used maps, ascending) for each box [K, 4]."""
        scale = torch.sqrt(((boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1])).clamp(min=0))
        k = torch.floor(self.canonical_level + torch.log2(scale / self.canonical_scale + 1e-6))
        return (k.clamp(min=levels[0], max=levels[-1]) - levels[0]).long()

    def forward(self, features: dict[str, Tensor], boxes: list[Tensor], image_size: tuple[int, int]) -> Tensor:
        maps = []
        for name in self.featmap_names:
            if name not in features:
                raise OculaError(f"feature map {name!r} missing: got {sorted(features)}")
            maps.append(features[name])
        strides = self.strides or [2 ** round(math.log2(image_size[0] / f.shape[-2])) for f in maps]
        rois = _as_rois(boxes)
        if len(maps) == 1:
            return roi_align(maps[0], rois, self.output_size, 1.0 / strides[0], self.sampling_ratio, self.aligned)
        levels = [round(math.log2(s)) for s in strides]
        if levels != list(range(levels[0], levels[0] + len(levels))):
            raise OculaError(f"FPN levels must have strides doubling from one to the next, got {strides}")
        which = self.map_levels(rois[:, 1:], levels)
        out = maps[0].new_zeros((rois.shape[0], maps[0].shape[1], *self.output_size))
        for i, (fmap, stride) in enumerate(zip(maps, strides)):
            idx = torch.nonzero(which == i).flatten()
            if idx.numel():
                out[idx] = roi_align(fmap, rois[idx], self.output_size, 1.0 / stride, self.sampling_ratio,
                                     self.aligned)
        return out

    def every_level(self, features: dict[str, Tensor], boxes: Tensor, strides: Sequence[int]) -> Tensor:
        """forward for one image's boxes [K, 4] (ONNX export): every box is pooled on every level and keeps its own
        level's result, so the traced graph has no branch on how many boxes a level gets. Costs one RoIAlign per
        level, small next to the backbone."""
        if self.sampling_ratio <= 0:
            raise OculaError("exporting RoIAlign needs a fixed sampling_ratio (> 0)")
        maps = [features[name] for name in self.featmap_names]
        pooled = [roi_align_one_image(m, boxes, self.output_size, 1.0 / s, self.sampling_ratio, self.aligned)
                  for m, s in zip(maps, strides)]
        if len(maps) == 1:
            return pooled[0]
        which = self.map_levels(boxes, [round(math.log2(s)) for s in strides])
        return torch.stack(pooled).gather(0, which.view(1, -1, 1, 1, 1).expand(1, *pooled[0].shape))[0]


class RoIPool(nn.Module):
    """roi_pool on one named feature map of known stride, with MultiScaleRoIAlign's calling convention."""

    def __init__(self, *, featmap_name: str, output_size=7, stride: int = 16):
        super().__init__()
        self.featmap_name = featmap_name
        self.output_size = _pair(output_size)
        self.stride = stride

    def forward(self, features: dict[str, Tensor], boxes: list[Tensor], image_size: tuple[int, int]) -> Tensor:
        return roi_pool(features[self.featmap_name], boxes, self.output_size, 1.0 / self.stride)
