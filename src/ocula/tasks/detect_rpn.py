"""Looking inside Faster R-CNN's region proposal network: the anchors of one feature cell, how the anchors are
labelled against an image's boxes (IoU > 0.7 positive, < 0.3 negative, each box's best anchor positive, the
rest ignored), the top proposals, and how many of the true boxes the proposals recall.

Everything runs at the model's input size on the letterboxed image, exactly as training and prediction see it;
boxes are drawn back in the image's own pixels.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from ocula.errors import OculaError
from ocula.tasks.detect import letterbox


@dataclass
class AnchorView:
    """One image through the RPN, in input pixels: every anchor with its level, label (1 positive, 0 negative,
    -1 ignored) and whether it lies inside the image, the true boxes, the proposals best first, and the letterbox
    scale."""

    anchors: torch.Tensor
    levels: torch.Tensor
    labels: torch.Tensor
    inside: torch.Tensor
    boxes: torch.Tensor
    proposals: torch.Tensor
    scale: float


def _check(model):
    if not hasattr(model, "rpn"):
        raise OculaError(f"{getattr(model.info, 'arch', 'this model')} has no region proposal network; "
                         "inspect rpn takes a faster-rcnn model")


@contextlib.contextmanager
def _post_nms(rpn, top: int | None):
    """The RPN keeping `top` proposals after NMS at test time, for the duration."""
    kept = rpn.post_nms_top_n["test"]
    rpn.post_nms_top_n["test"] = top or kept
    try:
        yield
    finally:
        rpn.post_nms_top_n["test"] = kept


@torch.no_grad()
def rpn_outputs(model, image: np.ndarray, top: int | None = None):
    """(proposals [P, 4] best first, anchors per level, input size, letterbox scale) for an RGB image."""
    _check(model)
    size = tuple(model.info.preprocess["input_size"])
    x, scale = letterbox(image, size)
    model.eval()
    batch, sizes = model.preprocess([x.to(model.image_mean.device) / 255.0])
    features = model.features(batch)
    maps = [features[name] for name in model.featmap_names]
    strides = [(s, s) for s in model.known_strides]
    with _post_nms(model.rpn, top):
        proposals = model.rpn(maps, strides, sizes)[0][0].cpu()
    anchors = [a.cpu() for a in model.rpn.anchor_generator([m.shape[-2:] for m in maps], strides)]
    return proposals, anchors, size, scale


def anchor_view(model, image: np.ndarray, boxes: np.ndarray, top: int | None = None) -> AnchorView:
    """Label every anchor against `boxes` (xyxy, image pixels) with the RPN's own training rule, cross-boundary
    anchors ignored as in training."""
    from ocula.models.detection.anchors import anchors_inside
    from ocula.models.detection.rpn import label_anchors

    proposals, per_level, size, scale = rpn_outputs(model, image, top)
    rpn = model.rpn
    anchors = torch.cat(per_level)
    levels = torch.cat([torch.full((len(a),), i) for i, a in enumerate(per_level)])
    gt = torch.as_tensor(np.asarray(boxes, np.float32).reshape(-1, 4) * scale)
    inside = anchors_inside(anchors, size, rpn.allowed_border)
    labels, _ = label_anchors(anchors, gt, fg_iou_thresh=rpn.fg_iou_thresh, bg_iou_thresh=rpn.bg_iou_thresh,
                              valid=inside if rpn.ignore_cross_boundary else None)
    return AnchorView(anchors, levels, labels, inside, gt, proposals, scale)


def cell_anchors(model, view: AnchorView, point: tuple[float, float]) -> torch.Tensor:
    """The anchors [k * levels, 4] of the cell holding `point` (x, y in input pixels) on every level: the notes'
    3 sizes x 3 ratios (on a pyramid, one size per level)."""
    out = []
    for level, stride in enumerate(model.known_strides):
        sel = view.levels == level
        centres = (view.anchors[sel, :2] + view.anchors[sel, 2:]) / 2
        here = torch.floor(centres / stride) == torch.floor(torch.tensor(point) / stride)
        out.append(view.anchors[sel][here.all(1)])
    return torch.cat(out)


def proposal_recall(model, images, targets, tops=(300, 1000), ious=(0.5, 0.7)) -> dict[str, float]:
    """Share of the true boxes that one of the RPN's `top` best proposals overlaps at IoU >= iou, for every pair:
    {"recall@300/0.5": ..., ...}, over all boxes of all images."""
    from ocula.data.boxes import box_iou_np

    hits = {(k, t): 0 for k in tops for t in ious}
    total = 0
    for image, target in zip(images, targets):
        proposals, _, _, scale = rpn_outputs(model, image, max(tops))
        gt = np.asarray(target["boxes"], np.float32).reshape(-1, 4) * scale
        total += len(gt)
        for k in tops:
            best = box_iou_np(gt, proposals[:k].numpy()).max(1, initial=0.0)
            for t in ious:
                hits[k, t] += int((best >= t).sum())
    return {f"recall@{k}/{t:g}": hits[k, t] / max(total, 1) for k, t in hits}


def draw_rpn(model, image: np.ndarray, boxes: np.ndarray, out: Path, *, show: int = 20) -> dict:
    """rpn PNG: (1) the anchors of the cell at the first box's centre (the image's centre without boxes), (2) the
    anchor labels for `boxes` (positives; the centres of the ignored anchors inside the image, whose IoU lies
    between the thresholds; as many random negatives as positives, as the RPN samples them), (3) the `show` best
    proposals. Returns the counts drawn."""
    from matplotlib.patches import Rectangle

    from ocula.plots import pyplot, save_figure

    view = anchor_view(model, image, boxes)
    s = view.scale
    h, w = model.info.preprocess["input_size"]
    point = ((view.boxes[0, :2] + view.boxes[0, 2:]) / 2).tolist() if len(view.boxes) else [w / 2, h / 2]
    cell = cell_anchors(model, view, point)
    pos = view.anchors[view.labels == 1]
    between = view.anchors[(view.labels == -1) & view.inside]
    neg = view.anchors[view.labels == 0]
    neg = neg[torch.randperm(len(neg), generator=torch.Generator().manual_seed(0))[:max(len(pos), 1)]]
    counts = {"anchors": len(view.anchors), "per_cell": len(cell), "positive": int((view.labels == 1).sum()),
              "negative": int((view.labels == 0).sum()), "ignored": int((view.labels == -1).sum())}

    plt = pyplot()
    fig, axes = plt.subplots(1, 3, figsize=(18, 5.4))
    panels = [
        (f"{len(cell)} anchors of one cell ({len(model.known_strides)} levels x "
         f"{len(model.rpn.anchor_generator.aspect_ratios[0])} ratios)", [(cell, "cyan", 1.5)]),
        (f"positive {counts['positive']} (green), negative {counts['negative']} (red: {len(neg)} drawn),\n"
         f"ignored {counts['ignored']} (orange: centres of the {len(between)} between the IoU thresholds; the "
         f"others cross the border)", [(neg, "red", 0.8), (pos, "lime", 1.2)]),
        (f"top {min(show, len(view.proposals))} of {len(view.proposals)} proposals",
         [(view.proposals[:show], "yellow", 1.2)]),
    ]
    centres = ((between[:, :2] + between[:, 2:]) / 2 / s).numpy()
    axes[1].scatter(centres[:, 0], centres[:, 1], s=3, c="orange", zorder=3)
    for ax, (title, layers) in zip(axes, panels):
        ax.imshow(image)
        for b in view.boxes / s:
            ax.add_patch(Rectangle(b[:2].tolist(), *(b[2:] - b[:2]).tolist(), fill=False, ec="white", lw=2.5))
        for group, colour, lw in layers:
            for b in group / s:
                ax.add_patch(Rectangle(b[:2].tolist(), *(b[2:] - b[:2]).tolist(), fill=False, ec=colour, lw=lw))
        ax.set_title(title, fontsize=9)
        ax.set_xlim(-0.1 * image.shape[1], 1.1 * image.shape[1])  # a cell's big anchors reach past the image
        ax.set_ylim(1.1 * image.shape[0], -0.1 * image.shape[0])
        ax.axis("off")
    save_figure(fig, out)
    return counts


def boxes_for(image_path: Path, boxes_path: Path | None = None) -> np.ndarray | None:
    """The true boxes of an image: a Pascal VOC annotation given, or found beside a VOC image
    (JPEGImages/X.jpg -> Annotations/X.xml); None when there is none."""
    from ocula.data.voc import parse

    path = boxes_path or image_path.parent.parent / "Annotations" / f"{image_path.stem}.xml"
    if boxes_path is None and not path.is_file():
        return None
    return np.array([box for _, box, _, _ in parse(Path(path))["objects"]], np.float32).reshape(-1, 4)
