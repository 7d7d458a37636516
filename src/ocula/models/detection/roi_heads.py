"""Fast R-CNN stage: pool each proposal to a fixed grid, classify it and refine its box per class.

Training matches proposals (plus the gt boxes themselves) to the ground truth -- IoU >= 0.5 foreground,
[bg_iou_thresh_low, 0.5) background -- samples 512 RoIs per image with up to 25% foreground, and returns
cross-entropy + smooth-L1 losses. Inference turns scores and class-specific deltas into detections: softmax,
decode, clip, score threshold, per-class NMS, top detections_per_img.

Class indices: 0 is background, object class c (0-based, as users give it) is index c + 1 inside this module.
"""

from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ocula.models.detection.boxes import BoxCoder, batched_nms, box_iou, clip_boxes_to_image, remove_small_boxes
from ocula.models.detection.rpn import sample_labels


class TwoMLPHead(nn.Module):
    """Flatten the pooled RoI and apply two fully connected layers with ReLU (fc6, fc7 of VGG)."""

    def __init__(self, *, in_channels: int, pool_size: int = 7, representation_size: int = 1024):
        super().__init__()
        self.fc6 = nn.Linear(in_channels * pool_size * pool_size, representation_size)
        self.fc7 = nn.Linear(representation_size, representation_size)
        self.out_features = representation_size

    def forward(self, x: Tensor) -> Tensor:
        return F.relu(self.fc7(F.relu(self.fc6(x.flatten(1)))))


class ConvFCHead(nn.Module):
    """A few 3x3 conv + ReLU layers on the pooled RoI, then one fully connected layer: fewer parameters than
    TwoMLPHead for wide feature maps."""

    def __init__(self, *, in_channels: int, pool_size: int = 7, conv_channels: int = 256, num_convs: int = 4,
                 representation_size: int = 1024):
        super().__init__()
        layers, c = [], in_channels
        for _ in range(num_convs):
            layers += [nn.Conv2d(c, conv_channels, 3, padding=1), nn.ReLU(inplace=True)]
            c = conv_channels
        self.convs = nn.Sequential(*layers)
        self.fc = nn.Linear(c * pool_size * pool_size, representation_size)
        self.out_features = representation_size

    def forward(self, x: Tensor) -> Tensor:
        return F.relu(self.fc(self.convs(x).flatten(1)))


class FastRCNNPredictor(nn.Module):
    """Class logits (num_classes + 1, background first) and class-specific box deltas ((num_classes + 1) * 4)."""

    def __init__(self, *, in_features: int, num_classes: int):
        super().__init__()
        self.cls_score = nn.Linear(in_features, num_classes + 1)
        self.bbox_pred = nn.Linear(in_features, (num_classes + 1) * 4)
        nn.init.normal_(self.cls_score.weight, std=0.01)
        nn.init.normal_(self.bbox_pred.weight, std=0.001)  # small: early box refinements stay near the proposal
        nn.init.zeros_(self.cls_score.bias)
        nn.init.zeros_(self.bbox_pred.bias)

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        return self.cls_score(x), self.bbox_pred(x)


def match_proposals(proposals: Tensor, gt_boxes: Tensor, gt_labels: Tensor, *, fg_iou_thresh: float = 0.5,
                    bg_iou_thresh: float = 0.5, bg_iou_thresh_low: float = 0.0) -> tuple[Tensor, Tensor]:
    """Class index per proposal (c + 1 foreground, 0 background, -1 ignored) and its best gt box index."""
    n = proposals.shape[0]
    if gt_boxes.numel() == 0:
        return (torch.zeros(n, dtype=torch.int64, device=proposals.device),
                torch.zeros(n, dtype=torch.int64, device=proposals.device))
    best_iou, matched = box_iou(gt_boxes, proposals).max(dim=0)
    labels = torch.full_like(matched, -1)
    labels[(best_iou >= bg_iou_thresh_low) & (best_iou < bg_iou_thresh)] = 0
    fg = best_iou >= fg_iou_thresh
    labels[fg] = gt_labels[matched[fg]] + 1
    return labels, matched


class RoIHeads(nn.Module):
    """Box branch of Faster R-CNN. `box_roi_pool(features, proposals, image_size)` returns [R, C, P, P]."""

    def __init__(self, *, box_roi_pool: Callable, box_head: nn.Module, box_predictor: FastRCNNPredictor,
                 fg_iou_thresh: float = 0.5, bg_iou_thresh: float = 0.5, bg_iou_thresh_low: float = 0.0,
                 batch_size_per_image: int = 512, positive_fraction: float = 0.25,
                 bbox_reg_weights: tuple[float, float, float, float] = (10.0, 10.0, 5.0, 5.0),
                 score_thresh: float = 0.05, nms_thresh: float = 0.5, detections_per_img: int = 100,
                 min_size: float = 1e-2, smooth_l1_beta: float = 1.0 / 9):
        super().__init__()
        self.box_roi_pool = box_roi_pool
        self.box_head = box_head
        self.box_predictor = box_predictor
        self.box_coder = BoxCoder(weights=bbox_reg_weights)
        self.fg_iou_thresh = fg_iou_thresh
        self.bg_iou_thresh = bg_iou_thresh
        self.bg_iou_thresh_low = bg_iou_thresh_low
        self.batch_size_per_image = batch_size_per_image
        self.positive_fraction = positive_fraction
        self.score_thresh = score_thresh
        self.nms_thresh = nms_thresh
        self.detections_per_img = detections_per_img
        self.min_size = min_size
        self.smooth_l1_beta = smooth_l1_beta

    def select_training_samples(self, proposals: Sequence[Tensor], targets: Sequence[dict[str, Tensor]]):
        """Per image: sampled RoIs, their class indices and their regression targets (zeros for background)."""
        rois, labels, reg_targets = [], [], []
        for props, target in zip(proposals, targets):
            gt, gt_labels = target["boxes"], target["labels"]
            # The gt boxes are perfect proposals: they guarantee foreground samples early in training.
            props = torch.cat([props, gt])
            cls, matched = match_proposals(props, gt, gt_labels, fg_iou_thresh=self.fg_iou_thresh,
                                           bg_iou_thresh=self.bg_iou_thresh, bg_iou_thresh_low=self.bg_iou_thresh_low)
            pos, neg = sample_labels(cls, batch_size=self.batch_size_per_image,
                                     positive_fraction=self.positive_fraction)
            idx = torch.cat([pos, neg])
            targets_i = torch.zeros((idx.numel(), 4), dtype=props.dtype, device=props.device)
            if pos.numel():
                targets_i[:pos.numel()] = self.box_coder.encode(gt[matched[pos]], props[pos])
            rois.append(props[idx])
            labels.append(cls[idx])
            reg_targets.append(targets_i)
        return rois, labels, reg_targets

    def forward(self, features: dict[str, Tensor], proposals: Sequence[Tensor],
                image_sizes: Sequence[tuple[int, int]], padded_size: tuple[int, int],
                targets: Sequence[dict[str, Tensor]] | None = None):
        """Training (targets given): (rois, losses). Inference: (detections per image, {})."""
        if targets is not None:
            proposals, labels, reg_targets = self.select_training_samples(proposals, targets)
        x = self.box_head(self.box_roi_pool(features, list(proposals), padded_size))
        # float32 under bf16 autocast too, like the RPN's outputs: bf16 scores keep 3 digits, boxes lose pixels.
        class_logits, box_deltas = (t.float() for t in self.box_predictor(x))
        if targets is not None:
            return proposals, self.loss(class_logits, box_deltas, torch.cat(labels), torch.cat(reg_targets))
        return self.postprocess(class_logits, box_deltas, proposals, image_sizes), {}

    def loss(self, class_logits: Tensor, box_deltas: Tensor, labels: Tensor, reg_targets: Tensor) -> dict:
        num = max(labels.numel(), 1)
        loss_cls = F.cross_entropy(class_logits, labels, reduction="sum") / num
        fg = torch.nonzero(labels > 0).flatten()
        pred = box_deltas.reshape(box_deltas.shape[0], -1, 4)[fg, labels[fg]]
        loss_box = F.smooth_l1_loss(pred, reg_targets[fg], beta=self.smooth_l1_beta, reduction="sum") / num
        return {"loss_classifier": loss_cls, "loss_box_reg": loss_box}

    def postprocess(self, class_logits: Tensor, box_deltas: Tensor, proposals: Sequence[Tensor],
                    image_sizes: Sequence[tuple[int, int]]) -> list[dict[str, Tensor]]:
        scores_all = F.softmax(class_logits, dim=-1)
        boxes_all = self.box_coder.decode(box_deltas, torch.cat(list(proposals)))
        num_classes = class_logits.shape[1]
        detections, start = [], 0
        for props, size in zip(proposals, image_sizes):
            n = props.shape[0]
            boxes = clip_boxes_to_image(boxes_all[start:start + n].reshape(n, num_classes, 4), size)
            scores = scores_all[start:start + n]
            start += n
            labels = torch.arange(num_classes, device=scores.device).expand(n, num_classes)
            # Drop the background column, then treat every (RoI, class) pair as one candidate detection.
            boxes, scores, labels = boxes[:, 1:].reshape(-1, 4), scores[:, 1:].reshape(-1), labels[:, 1:].reshape(-1)
            keep = torch.nonzero(scores > self.score_thresh).flatten()
            keep = keep[remove_small_boxes(boxes[keep], self.min_size)]
            boxes, scores, labels = boxes[keep], scores[keep], labels[keep]
            keep = batched_nms(boxes, scores, labels, self.nms_thresh)[:self.detections_per_img]
            detections.append({"boxes": boxes[keep], "scores": scores[keep], "labels": labels[keep] - 1})
        return detections
