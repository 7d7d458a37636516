"""Box arithmetic for detection: clipping, the (tx, ty, tw, th) coder and greedy NMS (areas and IoU come from
`ocula.data.boxes`, the one IoU that readers, evaluation and detectors share).

Boxes are float tensors [N, 4] in absolute (x1, y1, x2, y2) pixel coordinates, where a pixel i spans [i, i + 1);
width is x2 - x1 (no "+1").
"""

import math

import torch
from torch import Tensor

from ocula.data.boxes import _inter_union, _ratio, box_area, box_iou, generalized_iou  # noqa: F401 (re-exported)

# Faster R-CNN clamps predicted log-scale deltas so exp() cannot overflow on an untrained head.
BBOX_XFORM_CLIP = math.log(1000.0 / 16)


def clip_boxes_to_image(boxes: Tensor, size: tuple[int, int]) -> Tensor:
    """Clip boxes to an image of `size` = (height, width)."""
    height, width = size
    x = boxes[..., 0::2].clamp(min=0, max=width)
    y = boxes[..., 1::2].clamp(min=0, max=height)
    return torch.stack((x[..., 0], y[..., 0], x[..., 1], y[..., 1]), dim=-1)


def remove_small_boxes(boxes: Tensor, min_size: float) -> Tensor:
    """Indices of boxes whose width and height are both >= min_size."""
    ws = boxes[:, 2] - boxes[:, 0]
    hs = boxes[:, 3] - boxes[:, 1]
    return torch.nonzero((ws >= min_size) & (hs >= min_size)).flatten()


class BoxCoder:
    """Encodes a box relative to a reference box as (tx, ty, tw, th) and back.

    tx = wx * (x - xa) / wa, ty = wy * (y - ya) / ha, tw = ww * log(w / wa), th = wh * log(h / ha), with (x, y) the
    box centre. `weights` rescale the targets so both heads' regression losses have a similar magnitude.
    """

    def __init__(self, weights: tuple[float, float, float, float] = (1.0, 1.0, 1.0, 1.0),
                 clamp: float = BBOX_XFORM_CLIP):
        self.weights = tuple(float(w) for w in weights)
        self.clamp = clamp

    def encode(self, boxes: Tensor, reference: Tensor) -> Tensor:
        """Targets [N, 4] that move each `reference` box (anchor / proposal) onto the matching `boxes` row."""
        wx, wy, ww, wh = self.weights
        rw = reference[:, 2] - reference[:, 0]
        rh = reference[:, 3] - reference[:, 1]
        rx = reference[:, 0] + 0.5 * rw
        ry = reference[:, 1] + 0.5 * rh
        bw = boxes[:, 2] - boxes[:, 0]
        bh = boxes[:, 3] - boxes[:, 1]
        bx = boxes[:, 0] + 0.5 * bw
        by = boxes[:, 1] + 0.5 * bh
        return torch.stack((wx * (bx - rx) / rw, wy * (by - ry) / rh,
                            ww * torch.log(bw / rw), wh * torch.log(bh / rh)), dim=1)

    def decode(self, deltas: Tensor, reference: Tensor) -> Tensor:
        """Boxes from deltas [N, 4 * K] applied to reference boxes [N, 4]; returns [N, 4 * K]."""
        wx, wy, ww, wh = self.weights
        reference = reference.to(deltas.dtype)
        rw = (reference[:, 2] - reference[:, 0])[:, None]
        rh = (reference[:, 3] - reference[:, 1])[:, None]
        rx = reference[:, 0, None] + 0.5 * rw
        ry = reference[:, 1, None] + 0.5 * rh
        dx = deltas[:, 0::4] / wx
        dy = deltas[:, 1::4] / wy
        dw = (deltas[:, 2::4] / ww).clamp(max=self.clamp)
        dh = (deltas[:, 3::4] / wh).clamp(max=self.clamp)
        cx = dx * rw + rx
        cy = dy * rh + ry
        w = torch.exp(dw) * rw
        h = torch.exp(dh) * rh
        out = torch.stack((cx - 0.5 * w, cy - 0.5 * h, cx + 0.5 * w, cy + 0.5 * h), dim=2)
        return out.reshape(deltas.shape[0], -1)


def nms(boxes: Tensor, scores: Tensor, iou_threshold: float) -> Tensor:
    """Greedy non-maximum suppression; returns kept indices sorted by decreasing score.

    Keeps exactly what the textbook loop keeps (take the best remaining box, drop every box with IoU >
    iou_threshold to it, repeat), ties in score broken by lower index. Two exact strategies, chosen by how many
    box pairs could overlap enough: a sparse sweep when few can (typical for spread-out boxes), else score-ordered
    blocks (cheap when a few boxes suppress many). Traced for ONNX export, it becomes NonMaxSuppression.
    """
    if torch.onnx.is_in_onnx_export():
        return _NMSOp.apply(boxes, scores, float(iou_threshold))
    return _greedy_nms(boxes, scores, iou_threshold)


class _NMSOp(torch.autograd.Function):
    """ocula's NMS when run, ONNX NonMaxSuppression (one batch, one class) in an exported graph."""

    @staticmethod
    def forward(ctx, boxes: Tensor, scores: Tensor, iou_threshold: float) -> Tensor:
        return _greedy_nms(boxes, scores, iou_threshold)

    @staticmethod
    def symbolic(g, boxes, scores, iou_threshold: float):
        def const(value, dtype):
            return g.op("Constant", value_t=torch.tensor(value, dtype=dtype))

        zero = const([0], torch.int64)
        selected = g.op("NonMaxSuppression", g.op("Unsqueeze", boxes, zero),  # [1, N, 4]
                        g.op("Unsqueeze", g.op("Unsqueeze", scores, zero), zero),  # [1, 1, N]
                        const([2 ** 62], torch.int64), const([iou_threshold], torch.float32))
        return g.op("Gather", selected, const(2, torch.int64), axis_i=1)  # rows are (batch, class, box index)


def _greedy_nms(boxes: Tensor, scores: Tensor, iou_threshold: float) -> Tensor:
    if boxes.numel() == 0:
        return torch.empty(0, dtype=torch.int64, device=boxes.device)
    order = torch.sort(scores, descending=True, stable=True).indices
    ranked = boxes[order]
    if iou_threshold >= 0:
        keep = _nms_sweep(ranked, float(iou_threshold))
        if keep is not None:
            return order[keep]
    return order[_nms_blocks(ranked, float(iou_threshold))]


def _resolve_greedy(src: Tensor, dst: Tensor, n: int) -> Tensor:
    """Greedy keep mask from "src suppresses dst" edges (src ranks before dst).

    keep[i] = no kept src has an edge to i. Each entry depends only on earlier ones, so the equation has exactly one
    solution -- the greedy answer -- and iterating it from all-True reaches it within (longest edge chain + 1)
    rounds, each one vectorised over all edges.
    """
    keep = torch.ones(n, dtype=torch.bool, device=src.device)
    while True:
        suppressed = torch.zeros_like(keep)
        suppressed[dst[keep[src]]] = True
        if torch.equal(suppressed, ~keep):
            return keep
        keep = ~suppressed


# Candidate-pair budget of the sweep: beyond it (dense clusters) the block strategy is cheaper and bounded in memory.
_SWEEP_MAX_PAIRS = 8_000_000
_SWEEP_CHUNK = 1_000_000


def _nms_sweep(ranked: Tensor, thr: float) -> Tensor | None:
    """Keep mask for score-ranked boxes via the pairs that can reach IoU > thr, or None if there are too many.

    IoU(a, b) <= overlap_width / width_a, so IoU > thr needs b to start before x2_a - thr * width_a. Boxes are
    swept in x1 order and each one is paired only with the boxes starting inside that window. The window is
    widened to x2_a - 0.9 * thr * width_a (or x2_a for boxes too thin for the margin to beat float rounding), so
    no pair whose computed IoU exceeds thr is ever skipped.
    """
    n = ranked.shape[0]
    xorder = torch.sort(ranked[:, 0], stable=True).indices
    xs = ranked[xorder]
    width = xs[:, 2] - xs[:, 0]
    margin = 0.1 * thr * width
    safe = margin > 1e-4 * (xs[:, 2].abs() + 1)
    bound = torch.where(safe, xs[:, 2] - 0.9 * thr * width, xs[:, 2])
    first = torch.arange(1, n + 1, device=ranked.device)
    end = torch.searchsorted(xs[:, 0].contiguous(), bound.contiguous(), side="left")
    counts = (end - first).clamp(min=0)
    total = int(counts.sum())
    if total > _SWEEP_MAX_PAIRS:
        return None
    x1, y1, x2, y2 = xs.unbind(1)
    area = box_area(xs)
    src, dst = [], []
    cum = torch.cumsum(counts, 0)
    lo = 0
    while lo < n and total:
        # Rows [lo, hi) hold about _SWEEP_CHUNK candidate pairs.
        base = int(cum[lo - 1]) if lo else 0
        hi = min(max(int(torch.searchsorted(cum, base + _SWEEP_CHUNK, side="right")), lo + 1), n)
        row_counts = counts[lo:hi]
        num = int(row_counts.sum())
        if num:
            row_first = torch.cumsum(row_counts, 0) - row_counts  # where each row's pairs start
            a = torch.repeat_interleave(torch.arange(lo, hi, device=ranked.device), row_counts, output_size=num)
            b = torch.arange(num, device=ranked.device) + torch.repeat_interleave(
                first[lo:hi] - row_first, row_counts, output_size=num)
            # Same operations, in the same order, as _iou: computed IoUs match box_iou bit for bit. Pairs that do
            # not overlap vertically are dropped first, since they cannot pass any threshold >= 0.
            h = (torch.min(y2.index_select(0, a), y2.index_select(0, b))
                 - torch.max(y1.index_select(0, a), y1.index_select(0, b))).clamp(min=0)
            overlap = torch.nonzero(h > 0).flatten()
            a, b, h = a.index_select(0, overlap), b.index_select(0, overlap), h.index_select(0, overlap)
            w = (torch.min(x2.index_select(0, a), x2.index_select(0, b))
                 - torch.max(x1.index_select(0, a), x1.index_select(0, b))).clamp(min=0)
            inter = w * h
            union = area.index_select(0, a) + area.index_select(0, b) - inter
            hit = torch.nonzero(_ratio(inter, union) > thr).flatten()
            ra = xorder.index_select(0, a.index_select(0, hit))
            rb = xorder.index_select(0, b.index_select(0, hit))
            src.append(torch.minimum(ra, rb))
            dst.append(torch.maximum(ra, rb))
        lo = hi
    if not src:
        return torch.arange(n, device=ranked.device)
    keep = _resolve_greedy(torch.cat(src), torch.cat(dst), n)
    return torch.nonzero(keep).flatten()


def _nms_blocks(ranked: Tensor, thr: float, block_size: int = 512) -> Tensor:
    """Kept positions of score-ranked boxes, visited in blocks: each block is checked against all boxes kept
    so far with one IoU matrix, then resolved internally. Work is O(N * kept) IoUs."""
    kept = torch.empty_like(ranked)
    kept_idx = []
    num_kept = 0
    for start in range(0, ranked.shape[0], block_size):
        block = ranked[start:start + block_size]
        cand = torch.arange(block.shape[0], device=ranked.device)
        if num_kept:
            cand = torch.nonzero(~(box_iou(kept[:num_kept], block) > thr).any(dim=0)).flatten()
        if cand.numel() == 0:
            continue
        over = torch.nonzero((box_iou(block[cand], block[cand]) > thr).triu(diagonal=1))
        block_kept = cand[_resolve_greedy(over[:, 0], over[:, 1], cand.numel())]
        kept[num_kept:num_kept + block_kept.numel()] = block[block_kept]
        num_kept += block_kept.numel()
        kept_idx.append(block_kept + start)
    return torch.cat(kept_idx)


def batched_nms(boxes: Tensor, scores: Tensor, labels: Tensor, iou_threshold: float) -> Tensor:
    """NMS run independently per label: boxes of different labels are shifted apart so they never overlap."""
    span = boxes
    if torch.onnx.is_in_onnx_export():  # no branch on the count in the graph, and a span that an empty set has too
        span = torch.cat([boxes.reshape(-1), boxes.new_zeros(1)])
    elif boxes.numel() == 0:
        return torch.empty(0, dtype=torch.int64, device=boxes.device)
    offsets = labels.to(boxes.dtype) * (span.max() - span.min() + 1)
    return nms(boxes + offsets[:, None], scores, iou_threshold)
