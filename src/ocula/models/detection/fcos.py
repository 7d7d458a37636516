"""A small anchor-free one-stage detector in the FCOS style (Tian et al. 2019), sized for a CPU.

CSP backbone (strides 2..32) -> PAN neck (top-down then bottom-up) -> one decoupled head per level (strides 8, 16,
32): class logits, (l, t, r, b) distances and a centerness logit at every map cell. BatchNorm throughout: the
recipes train at batch 8 or more, and BN folds into the convolutions at inference.

`forward(x)` takes float RGB [N, 3, H, W] in 0..255 (normalisation is inside, so an exported graph needs none)
with H and W multiples of 32. Training mode returns the raw per-level outputs for `FCOSLoss`; eval mode returns
decoded `boxes` [N, P, 4] (xyxy, input pixels) and `scores` [N, P, C] (sqrt(class prob * centerness)) over all P
cells, which `postprocess` reduces to detections. Decoding stays in the module so ONNX graphs include it.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ocula.models.detection.boxes import batched_nms, generalized_iou

STRIDES = (8, 16, 32)


class ConvBN(nn.Sequential):
    def __init__(self, cin: int, cout: int, k: int = 3, s: int = 1):
        super().__init__(nn.Conv2d(cin, cout, k, s, k // 2, bias=False), nn.BatchNorm2d(cout), nn.SiLU(inplace=True))


class Bottleneck(nn.Module):
    def __init__(self, c: int):
        super().__init__()
        self.conv = nn.Sequential(ConvBN(c, c, 3), ConvBN(c, c, 3))

    def forward(self, x):
        return x + self.conv(x)


class CSPBlock(nn.Module):
    """Half the channels go through `n` residual bottlenecks, half bypass them; a 1x1 conv merges both."""

    def __init__(self, cin: int, cout: int, n: int):
        super().__init__()
        mid = cout // 2
        self.main = nn.Sequential(ConvBN(cin, mid, 1), *(Bottleneck(mid) for _ in range(n)))
        self.skip = ConvBN(cin, mid, 1)
        self.merge = ConvBN(2 * mid, cout, 1)

    def forward(self, x):
        return self.merge(torch.cat([self.main(x), self.skip(x)], 1))


class CSPBackbone(nn.Module):
    """Stem at stride 2, then four stages (3x3 stride-2 conv + CSP block) at strides 4, 8, 16, 32."""

    def __init__(self, *, widths=(16, 32, 64, 128, 256), depths=(1, 2, 2, 1)):
        super().__init__()
        self.stem = ConvBN(3, widths[0], 3, 2)
        self.stages = nn.ModuleList(
            nn.Sequential(ConvBN(widths[i], widths[i + 1], 3, 2), CSPBlock(widths[i + 1], widths[i + 1], depths[i]))
            for i in range(4))
        self.out_channels = tuple(widths[2:])

    def forward(self, x) -> list[Tensor]:
        x = self.stem(x)
        outs = []
        for stage in self.stages:
            x = stage(x)
            outs.append(x)
        return outs[1:]  # strides 8, 16, 32


class PAN(nn.Module):
    """Top-down fusion (coarse context into fine maps) then bottom-up (fine localisation into coarse maps)."""

    def __init__(self, *, in_channels, width: int, depth: int = 1):
        super().__init__()
        c3, c4, c5 = in_channels
        self.reduce5 = ConvBN(c5, width, 1)
        self.td4 = CSPBlock(c4 + width, width, depth)
        self.td3 = CSPBlock(c3 + width, width, depth)
        self.down3 = ConvBN(width, width, 3, 2)
        self.bu4 = CSPBlock(2 * width, width, depth)
        self.down4 = ConvBN(width, width, 3, 2)
        self.bu5 = CSPBlock(2 * width, width, depth)

    def forward(self, feats):
        c3, c4, c5 = feats
        t5 = self.reduce5(c5)
        t4 = self.td4(torch.cat([c4, F.interpolate(t5, scale_factor=2.0, mode="nearest")], 1))
        p3 = self.td3(torch.cat([c3, F.interpolate(t4, scale_factor=2.0, mode="nearest")], 1))
        p4 = self.bu4(torch.cat([self.down3(p3), t4], 1))
        p5 = self.bu5(torch.cat([self.down4(p4), t5], 1))
        return [p3, p4, p5]


class Head(nn.Module):
    """Decoupled branches: two convs then class logits; two convs then 4 distances and a centerness logit."""

    def __init__(self, *, width: int, num_classes: int, prior: float = 0.01):
        super().__init__()
        self.cls = nn.Sequential(ConvBN(width, width), ConvBN(width, width), nn.Conv2d(width, num_classes, 1))
        self.reg = nn.Sequential(ConvBN(width, width), ConvBN(width, width), nn.Conv2d(width, 5, 1))
        # Focal-loss prior: start every cell at probability `prior` so the many easy negatives do not swamp the loss.
        nn.init.constant_(self.cls[-1].bias, -math.log((1 - prior) / prior))
        nn.init.normal_(self.reg[-1].weight, std=0.01)
        nn.init.zeros_(self.reg[-1].bias)

    def forward(self, x):
        return self.cls(x), self.reg(x)


class FCOS(nn.Module):
    def __init__(self, *, num_classes: int, widths=(16, 32, 64, 128, 256), depths=(1, 2, 2, 1), neck_width: int = 64,
                 neck_depth: int = 1, mean=(0.485, 0.456, 0.406), std=(0.229, 0.224, 0.225)):
        super().__init__()
        self.num_classes = num_classes
        self.strides = STRIDES
        self.register_buffer("mean", torch.tensor(mean).view(1, 3, 1, 1) * 255, persistent=False)
        self.register_buffer("std", torch.tensor(std).view(1, 3, 1, 1) * 255, persistent=False)
        self.backbone = CSPBackbone(widths=tuple(widths), depths=tuple(depths))
        self.neck = PAN(in_channels=self.backbone.out_channels, width=neck_width, depth=neck_depth)
        self.heads = nn.ModuleList(Head(width=neck_width, num_classes=num_classes) for _ in STRIDES)

    def raw(self, x: Tensor) -> list[tuple[Tensor, Tensor]]:
        """Per level: (class logits [N, C, h, w], regression [N, 5, h, w])."""
        x = (x - self.mean) / self.std
        return [head(p) for head, p in zip(self.heads, self.neck(self.backbone(x)))]

    def forward(self, x: Tensor):
        out = self.raw(x)
        if self.training:
            return out
        return decode(out, self.strides)


def grid_points(h: int, w: int, stride: int, device=None) -> Tensor:
    """Centres (x, y) of the cells of an h x w map, in input pixels: [h * w, 2], row-major."""
    ys = (torch.arange(h, device=device, dtype=torch.float32) + 0.5) * stride
    xs = (torch.arange(w, device=device, dtype=torch.float32) + 0.5) * stride
    return torch.stack(torch.meshgrid(xs, ys, indexing="xy"), -1).reshape(-1, 2)


def distances(reg: Tensor, stride: int) -> Tensor:
    """Regression logits -> (l, t, r, b) in pixels; exp keeps them positive, the clamp keeps it finite."""
    return torch.exp(reg.clamp(max=8.0)) * stride


def flatten(out, strides):
    """Per-level maps -> (logits [N, P, C], ltrb [N, P, 4], centerness logits [N, P], points [P, 2], stride [P]),
    all float32: under bf16 autocast the heads give bf16, whose 8-bit mantissa puts a 500-pixel box edge on a
    2-pixel grid and blurs the scores the losses sum."""
    logits, ltrb, ctr, points, per_point = [], [], [], [], []
    for (cls, reg), s in zip(out, strides):
        n, c, h, w = cls.shape
        logits.append(cls.permute(0, 2, 3, 1).reshape(n, h * w, c).float())
        reg = reg.permute(0, 2, 3, 1).reshape(n, h * w, 5).float()
        ltrb.append(distances(reg[..., :4], s))
        ctr.append(reg[..., 4])
        points.append(grid_points(h, w, s, cls.device))
        per_point.append(torch.full((h * w,), float(s), device=cls.device))
    return torch.cat(logits, 1), torch.cat(ltrb, 1), torch.cat(ctr, 1), torch.cat(points), torch.cat(per_point)


def decode(out, strides) -> tuple[Tensor, Tensor]:
    logits, ltrb, ctr, points, _ = flatten(out, strides)
    boxes = torch.cat([points - ltrb[..., :2], points + ltrb[..., 2:]], -1)
    scores = torch.sqrt(torch.sigmoid(logits) * torch.sigmoid(ctr)[..., None])
    return boxes, scores


def postprocess(boxes: Tensor, scores: Tensor, *, score_thresh: float = 0.05, nms_thresh: float = 0.6,
                pre_nms: int = 1000, max_dets: int = 300) -> list[dict[str, Tensor]]:
    """Decoded [N, P, 4] boxes and [N, P, C] scores -> per image {boxes, scores, labels} after class-wise NMS."""
    results = []
    c = scores.shape[-1]
    for b, s in zip(boxes, scores):
        flat = s.reshape(-1)
        keep = torch.nonzero(flat > score_thresh).squeeze(1)
        if keep.numel() > pre_nms:
            keep = keep[flat[keep].topk(pre_nms).indices]
        cand_scores, labels = flat[keep], keep % c
        cand_boxes = b[keep // c]
        kept = batched_nms(cand_boxes, cand_scores, labels, nms_thresh)[:max_dets]
        results.append({"boxes": cand_boxes[kept], "scores": cand_scores[kept], "labels": labels[kept]})
    return results


def _focal(logits: Tensor, targets: Tensor, alpha: float = 0.25, gamma: float = 2.0) -> Tensor:
    p = torch.sigmoid(logits)
    ce = F.binary_cross_entropy_with_logits(logits, targets, reduction="none")
    pt = p * targets + (1 - p) * (1 - targets)
    return ce * (1 - pt) ** gamma * (alpha * targets + (1 - alpha) * (1 - targets))


def _quality_focal(logits: Tensor, targets: Tensor, gamma: float = 2.0) -> Tensor:
    """Quality focal loss (Li et al. 2020, GFL): soft targets (the IoU for the true class), scaled by |q - p|^gamma."""
    p = torch.sigmoid(logits)
    return F.binary_cross_entropy_with_logits(logits, targets, reduction="none") * (targets - p).abs() ** gamma


class FCOSLoss:
    """(Quality) focal class loss + GIoU box loss (weighted by centerness) + centerness BCE, over `FCOS.raw` outputs.

    Assignment: each box belongs to the level whose `ranges` band holds half its longer side (so every box has
    exactly one level, which per-cell distance bands do not guarantee); a cell of that level is positive when its
    centre lies inside the box and within `radius` strides of the box centre; a cell claimed by several boxes
    takes the smallest. `ignore` [N, C] bool marks classes whose unlabelled instances an image may
    hold (e.g. a smear with no RBC boxes): their negatives are not penalised in that image. `quality` swaps the
    focal loss for the quality focal loss, whose target at a positive cell is the IoU its box reaches, so class
    scores rank detections by how well they are placed.
    """

    def __init__(self, *, num_classes: int, strides=STRIDES, ranges=((0, 28), (28, 64), (64, 1e8)),
                 radius: float = 1.5, quality: bool = False):
        self.num_classes, self.strides, self.ranges, self.radius = num_classes, strides, ranges, radius
        self.quality = quality

    def assign(self, points: Tensor, stride: Tensor, lo: Tensor, hi: Tensor, boxes: Tensor):
        """Index of the assigned box per point (-1 = background)."""
        if boxes.numel() == 0:
            return torch.full((len(points),), -1, dtype=torch.long, device=points.device)
        x, y = points[:, 0:1], points[:, 1:2]
        ltrb = torch.stack([x - boxes[:, 0], y - boxes[:, 1], boxes[:, 2] - x, boxes[:, 3] - y], -1)  # [P, G, 4]
        cx, cy = (boxes[:, 0] + boxes[:, 2]) / 2, (boxes[:, 1] + boxes[:, 3]) / 2
        r = stride[:, None] * self.radius
        near = ((x - cx).abs() < r) & ((y - cy).abs() < r)
        reach = torch.max(boxes[:, 2] - boxes[:, 0], boxes[:, 3] - boxes[:, 1])[None] / 2
        ok = (ltrb.min(-1).values > 0) & near & (reach >= lo[:, None]) & (reach < hi[:, None])
        area = ((boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1]))[None].expand_as(ok)
        area = torch.where(ok, area, torch.full_like(area, math.inf))
        best, idx = area.min(1)
        return torch.where(torch.isfinite(best), idx, torch.full_like(idx, -1))

    def __call__(self, out, targets, ignore: Tensor | None = None) -> dict[str, Tensor]:
        logits, ltrb, ctr, points, stride = flatten(out, self.strides)
        # Every cell's (lo, hi) size band: its level's row of `ranges`.
        cells = torch.tensor([cls.shape[2] * cls.shape[3] for cls, _ in out], device=points.device)
        bands = torch.tensor(self.ranges, dtype=torch.float32, device=points.device)
        lo, hi = bands.repeat_interleave(cells, dim=0).unbind(1)
        cls_t = torch.zeros_like(logits)
        weight = torch.ones_like(logits)
        pos_pred, pos_box, pos_ctr, pos_points, pos_index = [], [], [], [], []
        for i, t in enumerate(targets):
            boxes, labels = t["boxes"], t["labels"]
            idx = self.assign(points, stride, lo, hi, boxes)
            pos = idx >= 0
            if ignore is not None:
                weight[i][:, ignore[i]] = 0.0
            if pos.any():
                cls_t[i, pos, labels[idx[pos]]] = 1.0
                weight[i, pos] = 1.0
                pos_pred.append(ltrb[i, pos])
                pos_box.append(boxes[idx[pos]])
                pos_ctr.append(ctr[i, pos])
                pos_points.append(points[pos])
                pos_index.append((i, pos.nonzero().squeeze(1), labels[idx[pos]]))
        n_pos = max(1.0, float(sum(len(p) for p in pos_pred)))
        class_loss = _quality_focal if self.quality else _focal
        if not pos_pred:
            zero = ltrb.sum() * 0 + ctr.sum() * 0
            return {"cls": (class_loss(logits, cls_t) * weight).sum() / n_pos, "box": zero, "ctr": zero}
        pred, box, c, p = torch.cat(pos_pred), torch.cat(pos_box), torch.cat(pos_ctr), torch.cat(pos_points)
        target = torch.stack([p[:, 0] - box[:, 0], p[:, 1] - box[:, 1], box[:, 2] - p[:, 0], box[:, 3] - p[:, 1]], 1)
        ctr_t = torch.sqrt((torch.min(target[:, 0], target[:, 2]) / torch.max(target[:, 0], target[:, 2]))
                           * (torch.min(target[:, 1], target[:, 3]) / torch.max(target[:, 1], target[:, 3])))
        pred_box = torch.cat([p - pred[:, :2], p + pred[:, 2:]], 1)
        giou, iou = generalized_iou(pred_box, box)
        box_loss = ((1 - giou) * ctr_t).sum() / ctr_t.sum().clamp(min=1e-6)
        if self.quality:
            iou, start = iou.detach().clamp(min=0.01), 0
            for i, cells, labels in pos_index:
                cls_t[i, cells, labels] = iou[start:start + len(cells)]
                start += len(cells)
        cls_loss = (class_loss(logits, cls_t) * weight).sum() / n_pos
        ctr_loss = F.binary_cross_entropy_with_logits(c, ctr_t, reduction="mean")
        return {"cls": cls_loss, "box": 2.0 * box_loss, "ctr": ctr_loss}
