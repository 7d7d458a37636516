"""What segmentation means: losses on logits, Dice / IoU on hard masks, and whole-image inference.

Shapes. A model returns logits [N, K, H, W]. K = 1 is binary (sigmoid; target [N, H, W] or [N, 1, H, W] of 0/1);
K > 1 is multi-class (softmax; target [N, H, W] of class indices 0..K-1, class 0 = background). Metrics work on hard
label masks (integers, background 0), so a binary model is scored with num_classes=2.

Whole images: `predict_tiled` slides overlapping tiles and blends them with a cosine window (no seams, any size);
`predict_candidates` is the notes' large-image method (threshold, connected components of >= 500 px, a 128x128
crop around each, paste back), kept as a baseline to compare against.
"""

from __future__ import annotations

import math
from contextlib import contextmanager

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from ocula.data.segmentation import IGNORE_INDEX  # VOC's "void": pixels that no loss and no training metric counts

# ----------------------------------------------------------------------------------------------------- losses


def _target(logits: torch.Tensor, target: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(target as [N, H, W] with ignored pixels set to 0, their 0/1 weight [N, 1, H, W]), checked against
    logits [N, K, H, W]."""
    if logits.dim() != 4:
        raise ValueError(f"logits must be [N, K, H, W], got {tuple(logits.shape)}")
    n, _, h, w = logits.shape
    if target.dim() == 4 and target.shape[1] == 1:
        target = target[:, 0]
    if tuple(target.shape) != (n, h, w):
        raise ValueError(f"target must be [N, H, W] (or [N, 1, H, W]) = {(n, h, w)}, got {tuple(target.shape)}")
    ignored = target == IGNORE_INDEX
    return target.masked_fill(ignored, 0), (~ignored)[:, None].to(logits.dtype)


def _onehot(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """A float target shaped like the logits: the 0/1 mask for one channel, one-hot classes for several."""
    if logits.shape[1] == 1:
        return target[:, None].to(logits.dtype)
    return F.one_hot(target.long(), logits.shape[1]).permute(0, 3, 1, 2).to(logits.dtype)


def _soft_counts(logits: torch.Tensor, target: torch.Tensor, per_image: bool):
    """Soft TP, FP, FN per class ([K], or [N, K] per image) from sigmoid / softmax probabilities, over the
    pixels that are not ignored. Always float32: under bf16 autocast the logits arrive in bf16, and bf16 sums over
    a batch of pixels lose most of their digits (autocast leaves elementwise ops and sums in the input dtype)."""
    logits = logits.float()
    target, valid = _target(logits, target)
    probs = (torch.sigmoid(logits) if logits.shape[1] == 1 else logits.softmax(1)) * valid
    onehot = _onehot(logits, target) * valid
    dims = (2, 3) if per_image else (0, 2, 3)
    tp = (probs * onehot).sum(dims)
    return tp, probs.sum(dims) - tp, onehot.sum(dims) - tp


def _dice_loss(logits, target, smooth: float, per_image: bool) -> torch.Tensor:
    tp, fp, fn = _soft_counts(logits, target, per_image)
    return 1 - ((2 * tp + smooth) / (2 * tp + fp + fn + smooth)).mean()


def _valid_mean(loss: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """Mean of a per-pixel loss [N, 1, H, W] over the pixels that are not ignored."""
    return (loss * valid).sum() / valid.sum().clamp(min=1)


class DiceLoss(nn.Module):
    """1 - soft Dice, averaged over the K channels (and over images when `per_image`).

    Dice = (2 TP + s) / (2 TP + FP + FN + s), i.e. (2|P.T| + s) / (|P| + |T| + s). The smoothing s sits in the
    numerator AND the denominator, so an empty target with an empty prediction scores 1 (loss 0) and the loss never
    divides by zero. The WBC notes add it to the numerator only, which lets Dice exceed 1 and rewards predicting
    nothing on empty crops ((0 + s) / small -> large). Batch-level counts (per_image=False, as in the notes) are
    steadier when many crops hold little foreground."""

    def __init__(self, *, smooth: float = 1.0, per_image: bool = False):
        super().__init__()
        self.smooth, self.per_image = smooth, per_image

    def forward(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        return _dice_loss(logits, target, self.smooth, self.per_image)


class TverskyLoss(nn.Module):
    """1 - Tversky index TP / (TP + alpha FP + beta FN) (smoothed like Dice). beta > alpha penalises missed
    foreground more than false alarms, useful for small objects; alpha = beta = 0.5 is Dice (with smooth 2s)."""

    def __init__(self, *, alpha: float = 0.3, beta: float = 0.7, smooth: float = 1.0, per_image: bool = False):
        super().__init__()
        self.alpha, self.beta, self.smooth, self.per_image = alpha, beta, smooth, per_image

    def forward(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        tp, fp, fn = _soft_counts(logits, target, self.per_image)
        return 1 - ((tp + self.smooth) / (tp + self.alpha * fp + self.beta * fn + self.smooth)).mean()


def _cross_entropy(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Per-pixel cross-entropy [N, 1, H, W]: BCE for one channel, softmax CE for several."""
    if logits.shape[1] == 1:
        return F.binary_cross_entropy_with_logits(logits, _onehot(logits, target), reduction="none")
    return F.cross_entropy(logits, target.long(), reduction="none")[:, None]


class CrossEntropyDiceLoss(nn.Module):
    """ce_weight * cross-entropy + dice_weight * Dice loss: BCE for one channel, softmax CE for several.
    Cross-entropy gives well-scaled per-pixel gradients from the first step; Dice counters class imbalance."""

    def __init__(self, *, ce_weight: float = 1.0, dice_weight: float = 1.0, smooth: float = 1.0,
                 per_image: bool = False):
        super().__init__()
        self.ce_weight, self.dice_weight, self.smooth, self.per_image = ce_weight, dice_weight, smooth, per_image

    def forward(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        labels, valid = _target(logits, target)
        ce = _valid_mean(_cross_entropy(logits, labels), valid)
        dice = _dice_loss(logits, target, self.smooth, self.per_image)
        return self.ce_weight * ce + self.dice_weight * dice


class FocalLoss(nn.Module):
    """Focal loss (Lin et al. 2017): cross-entropy scaled by (1 - p_true)**gamma, so easy pixels (most of the
    background) stop dominating. `alpha` weights the foreground in the binary case (0.25 in the paper)."""

    def __init__(self, *, gamma: float = 2.0, alpha: float | None = None):
        super().__init__()
        self.gamma, self.alpha = gamma, alpha

    def forward(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        target, valid = _target(logits, target)
        ce = _cross_entropy(logits, target)
        loss = (1 - torch.exp(-ce)) ** self.gamma * ce  # exp(-ce) is the probability of the true class
        if self.alpha is not None:
            if logits.shape[1] > 1:
                raise ValueError("FocalLoss alpha is the binary foreground weight; multi-class takes none")
            fg = _onehot(logits, target)
            loss = loss * (self.alpha * fg + (1 - self.alpha) * (1 - fg))
        return _valid_mean(loss, valid)


LOSSES = {"dice": DiceLoss, "bce_dice": CrossEntropyDiceLoss, "ce_dice": CrossEntropyDiceLoss,
          "focal": FocalLoss, "tversky": TverskyLoss}


def build_loss(name: str, **kw) -> nn.Module:
    """A loss by name ('dice', 'bce_dice', 'ce_dice', 'focal', 'tversky'); binary or multi-class follows K."""
    if name not in LOSSES:
        raise ValueError(f"unknown segmentation loss {name!r}; choose one of {sorted(LOSSES)}")
    return LOSSES[name](**kw)


# ---------------------------------------------------------------------------------------------------- metrics


def _numpy(x) -> np.ndarray:
    return x.detach().cpu().numpy() if isinstance(x, torch.Tensor) else np.asarray(x)


def probs_to_labels(probs, *, threshold: float = 0.5) -> np.ndarray:
    """Hard labels from probabilities [..., K, H, W]: foreground above `threshold` for K = 1, argmax otherwise."""
    probs = _numpy(probs)
    if probs.shape[-3] == 1:
        return (probs[..., 0, :, :] > threshold).astype(np.int64)
    return probs.argmax(-3)


def confusion_counts(pred, target, *, num_classes: int, ignore_index: int | None = None) -> np.ndarray:
    """Per image and class pixel counts [N, K, 3] = (TP, FP, FN) from label masks [N, H, W] or [H, W].
    Pixels whose target is `ignore_index` (e.g. 255 for 'unlabelled') are left out."""
    pred, target = _numpy(pred), _numpy(target)
    if pred.shape != target.shape or pred.ndim not in (2, 3):
        raise ValueError(f"pred and target must both be [N, H, W] or [H, W]; got {pred.shape} and {target.shape}")
    if pred.ndim == 2:
        pred, target = pred[None], target[None]
    pred, target = pred.astype(np.int64), target.astype(np.int64)
    keep = np.ones(target.shape, bool) if ignore_index is None else target != ignore_index
    k = num_classes
    for name, a in (("pred", pred), ("target", target)):
        if a[keep].size and (a[keep].min() < 0 or a[keep].max() >= k):
            raise ValueError(f"{name} has labels outside 0..{k - 1} (num_classes={k})")
    n = pred.shape[0]
    image = np.broadcast_to(np.arange(n)[:, None, None], pred.shape)
    # One bincount builds every image's K x K confusion matrix (rows: truth, columns: prediction).
    flat = (image * k * k + target * k + pred)[keep]
    cm = np.bincount(flat, minlength=n * k * k).reshape(n, k, k)
    tp = np.diagonal(cm, axis1=1, axis2=2)
    return np.stack([tp, cm.sum(1) - tp, cm.sum(2) - tp], axis=-1)


def dice_iou_from_counts(counts: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Dice = 2TP / (2TP + FP + FN) and IoU = TP / (TP + FP + FN) from [..., 3] counts.
    Convention: a class absent from both prediction and truth scores 1.0 (nothing to find, nothing found)."""
    tp, fp, fn = (counts[..., i].astype(np.float64) for i in range(3))
    union = tp + fp + fn
    with np.errstate(invalid="ignore", divide="ignore"):
        dice = np.where(union == 0, 1.0, 2 * tp / (2 * tp + fp + fn))
        iou = np.where(union == 0, 1.0, tp / union)
    return dice, iou


class SegmentationMeter:
    """Accumulates counts batch by batch; `compute()` gives Dice and IoU per class, per image and global.

    Global ('micro') scores pool every pixel of every image before dividing, so large objects weigh more;
    per-image scores are averaged afterwards, so every image weighs the same. The headline 'dice' / 'iou' are
    the global scores averaged over the foreground classes 1..K-1 (for a binary mask: class 1)."""

    def __init__(self, *, num_classes: int = 2, ignore_index: int | None = None):
        if num_classes < 2:
            raise ValueError("num_classes counts the background too: 2 for a binary mask")
        self.num_classes, self.ignore_index = num_classes, ignore_index
        self.counts_: list[np.ndarray] = []

    def update(self, pred, target) -> SegmentationMeter:
        self.counts_.append(confusion_counts(pred, target, num_classes=self.num_classes,
                                             ignore_index=self.ignore_index))
        return self

    def compute(self) -> dict:
        counts = np.concatenate(self.counts_) if self.counts_ else np.zeros((0, self.num_classes, 3), np.int64)
        dice_c, iou_c = dice_iou_from_counts(counts.sum(0))
        dice_i, iou_i = dice_iou_from_counts(counts)
        fg = slice(1, None)
        return {
            "dice": float(dice_c[fg].mean()),
            "iou": float(iou_c[fg].mean()),
            "mean_image_dice": float(dice_i[:, fg].mean()) if len(counts) else float("nan"),
            "mean_image_iou": float(iou_i[:, fg].mean()) if len(counts) else float("nan"),
            "dice_per_class": dice_c.tolist(),
            "iou_per_class": iou_c.tolist(),
            "dice_per_image": dice_i.tolist(),
            "iou_per_image": iou_i.tolist(),
            "images": int(len(counts)),
        }


def segmentation_scores(pred, target, *, num_classes: int = 2, ignore_index: int | None = None) -> dict:
    """One-shot `SegmentationMeter` over label masks [N, H, W] or [H, W]."""
    return SegmentationMeter(num_classes=num_classes, ignore_index=ignore_index).update(pred, target).compute()


# ------------------------------------------------------------------------------------------ whole-image inference


@contextmanager
def _evaluating(model: nn.Module):
    """Eval mode (no dropout, running BN statistics) and no autograd, restoring the caller's mode afterwards."""
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            yield
    finally:
        model.train(was_training)


def _device(model: nn.Module) -> torch.device:
    return next(model.parameters(), torch.empty(0)).device


def _activate(logits: torch.Tensor) -> torch.Tensor:
    return torch.sigmoid(logits) if logits.shape[1] == 1 else logits.softmax(1)


def _check_image(image: torch.Tensor) -> torch.Tensor:
    if not isinstance(image, torch.Tensor) or image.dim() != 3:
        raise ValueError(f"image must be a tensor [C, H, W], got {getattr(image, 'shape', type(image))}")
    return image.float()


def _reflect_index(n: int, before: int, after: int) -> torch.Tensor:
    """Indices into range(n) that reflect-pad it (edge not repeated, as np.pad 'reflect') by any amount, even
    more than n - 1 (F.pad's reflect refuses that, which small images would hit)."""
    i = torch.arange(-before, n + after)
    if n == 1:
        return torch.zeros_like(i)
    period = 2 * (n - 1)
    i = i.remainder(period)
    return torch.where(i < n, i, period - i)


def _ramp(n: int, width: int) -> torch.Tensor:
    """1-D blending weights: a raised-cosine rise over `width` px at both ends, 1 between. Sampled at pixel
    centres so no weight is exactly 0 (every pixel stays covered)."""
    if width <= 0:
        return torch.ones(n)
    centre = torch.arange(n, dtype=torch.float64) + 0.5
    edge = torch.minimum(centre, n - centre) / width
    return (0.5 - 0.5 * torch.cos(math.pi * edge.clamp(max=1.0))).float()


def _starts(n: int, size: int, stride: int) -> list[int]:
    """Window starts covering 0..n: every `stride`, the last one flush with the end."""
    return list(range(0, n - size, stride)) + [n - size]


def _overlap_pixels(overlap: float, tile: int) -> int:
    px = round(overlap * tile) if 0 <= overlap < 1 else int(overlap)
    if not 0 <= px < tile:
        raise ValueError(f"overlap must be a fraction in [0, 1) or a pixel count below tile={tile}, got {overlap}")
    return px


def predict_tiled(model: nn.Module, image: torch.Tensor, *, tile: int = 256, overlap: float = 0.25,
                  batch_size: int = 8) -> torch.Tensor:
    """Probabilities [K, H, W] for an image [C, H, W] of any size, from overlapping `tile` x `tile` windows.

    `overlap` is a fraction of the tile (< 1) or pixels (>= 1). The image is reflect-padded by half the overlap
    so its own border is seen with context, and each window's output is weighted by a cosine ramp over the
    overlap: predictions near a window's edge (little context) count less and the blend has no seams. An
    image that fits one tile is a single forward pass."""
    image = _check_image(image)
    if tile < 1 or batch_size < 1:
        raise ValueError("tile and batch_size must be positive")
    ov = _overlap_pixels(overlap, tile)
    _, h, w = image.shape
    device = _device(model)
    with _evaluating(model):
        if h <= tile and w <= tile:
            return _activate(model(image[None].to(device)))[0].to(image.device)
        m = ov // 2
        padded = image[:, _reflect_index(h, m, m)][:, :, _reflect_index(w, m, m)]
        hp, wp = padded.shape[1:]
        th, tw = min(tile, hp), min(tile, wp)
        window = _ramp(th, ov)[:, None] * _ramp(tw, ov)[None, :]
        places = [(y, x) for y in _starts(hp, th, tile - ov) for x in _starts(wp, tw, tile - ov)]
        total, weight = None, torch.zeros(hp, wp)
        for i in range(0, len(places), batch_size):
            chunk = places[i:i + batch_size]
            batch = torch.stack([padded[:, y:y + th, x:x + tw] for y, x in chunk]).to(device)
            probs = _activate(model(batch)).float().cpu()
            if total is None:
                total = torch.zeros(probs.shape[1], hp, wp)
            for p, (y, x) in zip(probs, chunk):
                total[:, y:y + th, x:x + tw] += p * window
                weight[y:y + th, x:x + tw] += window
        return (total / weight)[:, m:m + h, m:m + w].to(image.device)


def candidate_boxes(image: torch.Tensor, *, crop: int = 128, min_area: int = 500,
                    threshold: float | None = None) -> list[tuple[int, int, int, int]]:
    """The notes' candidate search: (top, left, height, width) crops centred on each dark blob of >= `min_area`
    px, shifted to stay inside the image (a crop is at most the image size).

    Dark = channel mean <= `threshold` (stained nuclei are darker than the background and the red cells; the
    notes' THRESH_BINARY_INV on grayscale); Otsu's threshold when None. Components are 8-connected, as in
    skimage.measure.label, which the notes use."""
    from skimage.filters import threshold_otsu
    from skimage.measure import label, regionprops

    gray = _check_image(image).mean(0).cpu().numpy()
    if threshold is None:
        if gray.min() == gray.max():
            return []
        threshold = float(threshold_otsu(gray))
    h, w = gray.shape
    ch, cw = min(crop, h), min(crop, w)
    boxes = []
    for region in regionprops(label(gray <= threshold)):
        if region.area < min_area:
            continue
        r0, c0, r1, c1 = region.bbox
        top = min(max((r0 + r1 - ch) // 2, 0), h - ch)
        left = min(max((c0 + c1 - cw) // 2, 0), w - cw)
        if (top, left, ch, cw) not in boxes:
            boxes.append((top, left, ch, cw))
    return boxes


def predict_candidates(model: nn.Module, image: torch.Tensor, *, crop: int = 128, min_area: int = 500,
                       threshold: float | None = None, batch_size: int = 8) -> torch.Tensor:
    """The notes' large-image inference, as a baseline for `predict_tiled`: predict a crop around each candidate
    (`candidate_boxes`) and paste the probabilities [K, H, W] back; pixels outside every crop are background.

    Where crops overlap their probabilities are averaged (the notes overwrite, so a later crop's edge could
    erase an earlier cell). Anything the threshold misses is never segmented, the method's main weakness."""
    image = _check_image(image)
    _, h, w = image.shape
    boxes = candidate_boxes(image, crop=crop, min_area=min_area, threshold=threshold)
    device = _device(model)
    total, count = None, torch.zeros(h, w)
    with _evaluating(model):
        for i in range(0, len(boxes), batch_size):
            chunk = boxes[i:i + batch_size]
            batch = torch.stack([image[:, t:t + ch, l:l + cw] for t, l, ch, cw in chunk]).to(device)
            probs = _activate(model(batch)).float().cpu()
            if total is None:
                total = torch.zeros(probs.shape[1], h, w)
            for p, (t, l, ch, cw) in zip(probs, chunk):
                total[:, t:t + ch, l:l + cw] += p
                count[t:t + ch, l:l + cw] += 1
    if total is None:  # no candidates: all background
        total = torch.zeros(getattr(model, "num_classes", 1), h, w)
    out = total / count.clamp(min=1)
    if out.shape[0] > 1:
        out[0][count == 0] = 1.0
    return out.to(image.device)
