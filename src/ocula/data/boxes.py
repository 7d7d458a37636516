"""Box geometry shared by every floor: areas, IoU and GIoU of xyxy boxes, in torch (any device, differentiable).

Boxes are float tensors [..., 4] in absolute (x1, y1, x2, y2) pixel coordinates, where a pixel i spans [i, i + 1);
width is x2 - x1 (no "+1"). This is the one IoU in ocula: annotation checks, evaluation matching and the
detectors' losses, matchers and NMS all call it, so their numbers agree bit for bit.
"""

import numpy as np
import torch
from torch import Tensor


def box_area(boxes: Tensor) -> Tensor:
    """Area of each box [..., 4]; boxes with x2 < x1 or y2 < y1 count as empty."""
    return (boxes[..., 2] - boxes[..., 0]).clamp(min=0) * (boxes[..., 3] - boxes[..., 1]).clamp(min=0)


def _inter_union(a: Tensor, b: Tensor) -> tuple[Tensor, Tensor]:
    """Intersection and union areas of broadcastable [..., 4] boxes."""
    lt = torch.max(a[..., :2], b[..., :2])
    rb = torch.min(a[..., 2:], b[..., 2:])
    wh = (rb - lt).clamp(min=0)
    inter = wh[..., 0] * wh[..., 1]
    return inter, box_area(a) + box_area(b) - inter


def _ratio(part: Tensor, whole: Tensor) -> Tensor:
    """part / whole, 0 where whole is empty (zero-area boxes); the inner where keeps NaN out of the gradient too."""
    filled = whole > 0
    return torch.where(filled, part / torch.where(filled, whole, torch.ones_like(whole)), torch.zeros_like(part))


def _iou(a: Tensor, b: Tensor) -> Tensor:
    """IoU of broadcastable [..., 4] boxes; every caller goes through here so results agree bit for bit."""
    return _ratio(*_inter_union(a, b))


def generalized_iou(a: Tensor, b: Tensor) -> tuple[Tensor, Tensor]:
    """(GIoU, IoU) of broadcastable [..., 4] boxes (Rezatofighi et al. 2019): IoU minus the share of the smallest
    enclosing box that the union leaves empty, so boxes that do not overlap still pull toward each other."""
    inter, union = _inter_union(a, b)
    hull = box_area(torch.cat([torch.min(a[..., :2], b[..., :2]), torch.max(a[..., 2:], b[..., 2:])], -1))
    iou = _ratio(inter, union)
    return iou - _ratio(hull - union, hull), iou


def box_iou(boxes1: Tensor, boxes2: Tensor) -> Tensor:
    """Pairwise IoU [N, M]. Two boxes whose union is empty (both zero-area) have IoU 0, never NaN."""
    return _iou(boxes1[:, None, :], boxes2[None, :, :])




def box_iou_np(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """`box_iou` for numpy boxes (annotation checks and evaluation)."""
    return box_iou(torch.as_tensor(a, dtype=torch.float64), torch.as_tensor(b, dtype=torch.float64)).numpy()
