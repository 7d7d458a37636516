"""Region Proposal Network: a small conv head scores k anchors per cell and regresses them into proposals.

Training labels anchors against the ground truth (IoU > 0.7 positive, < 0.3 negative, each box's best anchor
positive), samples 256 anchors per image at up to 1:1 positive:negative and returns BCE + smooth-L1 losses. The
proposal layer keeps the best pre-NMS top-N per level, decodes, clips, drops tiny boxes, runs NMS 0.7 and keeps
the post-NMS top-M; proposals are detached (approximate joint training).
"""

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ocula.models.detection.anchors import AnchorGenerator, anchors_inside
from ocula.models.detection.boxes import BoxCoder, batched_nms, box_iou, clip_boxes_to_image, remove_small_boxes


class RPNHead(nn.Module):
    """3x3 conv + ReLU (the "sliding window"), then 1x1 convs: k objectness logits and 4k box deltas per cell."""

    def __init__(self, *, in_channels: int, num_anchors: int, conv_channels: int | None = None,
                 init_std: float = 0.01):
        super().__init__()
        mid = conv_channels or in_channels
        self.conv = nn.Conv2d(in_channels, mid, 3, padding=1)
        self.cls_logits = nn.Conv2d(mid, num_anchors, 1)
        self.bbox_pred = nn.Conv2d(mid, 4 * num_anchors, 1)
        for layer in (self.conv, self.cls_logits, self.bbox_pred):
            nn.init.normal_(layer.weight, std=init_std)  # the paper: new layers start from Gaussian(0, 0.01)
            nn.init.zeros_(layer.bias)

    def forward(self, features: Sequence[Tensor]) -> tuple[list[Tensor], list[Tensor]]:
        logits, deltas = [], []
        for f in features:
            t = F.relu(self.conv(f))
            logits.append(self.cls_logits(t))
            deltas.append(self.bbox_pred(t))
        return logits, deltas


def flatten_predictions(logits: Sequence[Tensor], deltas: Sequence[Tensor]) -> tuple[Tensor, Tensor]:
    """Per-level [N, k, H, W] / [N, 4k, H, W] maps -> [N, sum(H*W*k)] logits and [N, sum(H*W*k), 4] deltas, in the
    anchor generator's (row, column, anchor) order; float32 even under bf16 autocast, where scores would keep 3
    digits and decoded boxes would be off by pixels."""
    flat_logits, flat_deltas = [], []
    for lg, dl in zip(logits, deltas):
        n, k, h, w = lg.shape
        flat_logits.append(lg.permute(0, 2, 3, 1).reshape(n, -1))
        flat_deltas.append(dl.reshape(n, k, 4, h, w).permute(0, 3, 4, 1, 2).reshape(n, -1, 4))
    return torch.cat(flat_logits, dim=1).float(), torch.cat(flat_deltas, dim=1).float()


def label_anchors(anchors: Tensor, gt_boxes: Tensor, *, fg_iou_thresh: float = 0.7, bg_iou_thresh: float = 0.3,
                  valid: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """Label each anchor 1 (object), 0 (background) or -1 (ignored) and give the index of its best gt box.

    Positive: IoU > fg_iou_thresh with some box, or the best anchor (ties included) of a box it overlaps at all --
    so every box gets a positive even when no anchor reaches the threshold. Negative: IoU < bg_iou_thresh with
    every box. Anchors outside `valid` (e.g. cross-boundary ones) are ignored and never anyone's best anchor.
    """
    n = anchors.shape[0]
    matched = torch.zeros(n, dtype=torch.int64, device=anchors.device)
    labels = torch.zeros(n, dtype=torch.int64, device=anchors.device)
    if gt_boxes.numel():
        iou = box_iou(gt_boxes, anchors)  # [G, A]
        if valid is not None:
            iou = iou.masked_fill(~valid[None], -1.0)
        best_iou, matched = iou.max(dim=0)
        labels = torch.full_like(matched, -1)
        labels[best_iou < bg_iou_thresh] = 0
        labels[best_iou > fg_iou_thresh] = 1
        gt_best = iou.max(dim=1, keepdim=True).values
        is_best = (iou == gt_best) & (gt_best > 0)
        labels[is_best.any(dim=0)] = 1
    if valid is not None:
        labels[~valid] = -1
    return labels, matched


def sample_labels(labels: Tensor, *, batch_size: int, positive_fraction: float,
                  generator: torch.Generator | None = None) -> tuple[Tensor, Tensor]:
    """Random positive / negative indices: up to batch_size * positive_fraction positives, negatives fill the
    rest (so a shortage of positives is made up with negatives). The permutation is drawn on the generator's
    device when one is given (a generator only draws there), else on the labels' own device."""
    pos = torch.nonzero(labels >= 1).flatten()
    neg = torch.nonzero(labels == 0).flatten()
    num_pos = min(pos.numel(), int(batch_size * positive_fraction))
    num_neg = min(neg.numel(), batch_size - num_pos)
    device = labels.device if generator is None else generator.device
    pos = pos[torch.randperm(pos.numel(), generator=generator, device=device)[:num_pos].to(labels.device)]
    neg = neg[torch.randperm(neg.numel(), generator=generator, device=device)[:num_neg].to(labels.device)]
    return pos, neg


class RegionProposalNetwork(nn.Module):
    """Anchors + head + labelling/sampling/losses + proposal layer, with separate train and test top-N."""

    def __init__(self, *, anchor_generator: AnchorGenerator, head: RPNHead, fg_iou_thresh: float = 0.7,
                 bg_iou_thresh: float = 0.3, batch_size_per_image: int = 256, positive_fraction: float = 0.5,
                 pre_nms_top_n_train: int = 12000, post_nms_top_n_train: int = 2000,
                 pre_nms_top_n_test: int = 6000, post_nms_top_n_test: int = 300, nms_thresh: float = 0.7,
                 min_size: float = 1e-3, score_thresh: float = 0.0, ignore_cross_boundary: bool = True,
                 allowed_border: float = 0.0, smooth_l1_beta: float = 1.0 / 9, box_loss_weight: float = 1.0):
        super().__init__()
        self.anchor_generator = anchor_generator
        self.head = head
        self.box_coder = BoxCoder(weights=(1.0, 1.0, 1.0, 1.0))
        self.fg_iou_thresh = fg_iou_thresh
        self.bg_iou_thresh = bg_iou_thresh
        self.batch_size_per_image = batch_size_per_image
        self.positive_fraction = positive_fraction
        self.pre_nms_top_n = {"train": pre_nms_top_n_train, "test": pre_nms_top_n_test}
        self.post_nms_top_n = {"train": post_nms_top_n_train, "test": post_nms_top_n_test}
        self.nms_thresh = nms_thresh
        self.min_size = min_size
        self.score_thresh = score_thresh
        self.ignore_cross_boundary = ignore_cross_boundary
        self.allowed_border = allowed_border
        self.smooth_l1_beta = smooth_l1_beta
        # The paper's lambda. Both terms are divided by the sampled count (256), so lambda = 1 balances them.
        self.box_loss_weight = box_loss_weight

    def forward(self, features: Sequence[Tensor], strides: Sequence[tuple[float, float]],
                image_sizes: Sequence[tuple[int, int]],
                targets: Sequence[dict[str, Tensor]] | None = None) -> tuple[list[Tensor], dict[str, Tensor]]:
        """Proposals per image ([P, 4], best first) and, given targets, the RPN losses."""
        logits, deltas = self.head(features)
        level_sizes = [tuple(f.shape[-2:]) for f in features]
        # float32 anchors whatever the feature dtype: in bf16 (autocast) a 500-pixel coordinate rounds to 2 pixels.
        anchors_per_level = self.anchor_generator(level_sizes, strides, device=features[0].device)
        anchors = torch.cat(anchors_per_level)
        num_per_level = [a.shape[0] for a in anchors_per_level]
        flat_logits, flat_deltas = flatten_predictions(logits, deltas)
        proposals = self.propose(anchors, flat_logits.detach(), flat_deltas.detach(), num_per_level, image_sizes)
        losses = {}
        if targets is not None:
            losses = self.loss(anchors, flat_logits, flat_deltas, image_sizes, targets)
        return proposals, losses

    def propose(self, anchors: Tensor, logits: Tensor, deltas: Tensor, num_per_level: Sequence[int],
                image_sizes: Sequence[tuple[int, int]]) -> list[Tensor]:
        mode = "train" if self.training else "test"
        pre_n, post_n = self.pre_nms_top_n[mode], self.post_nms_top_n[mode]
        level_of = torch.cat([torch.full((n,), i, device=anchors.device) for i, n in enumerate(num_per_level)])
        # Top pre-NMS candidates of each level, chosen once for the whole batch.
        picks = []
        start = 0
        for n in num_per_level:
            k = min(pre_n, n)
            picks.append(logits[:, start:start + n].topk(k, dim=1).indices + start)
            start += n
        picks = torch.cat(picks, dim=1)  # [N, P]
        proposals = []
        for i, size in enumerate(image_sizes):
            idx = picks[i]
            scores = torch.sigmoid(logits[i, idx])
            boxes = clip_boxes_to_image(self.box_coder.decode(deltas[i, idx], anchors[idx]), size)
            keep = remove_small_boxes(boxes, self.min_size)
            keep = keep[scores[keep] >= self.score_thresh]
            boxes, scores, levels = boxes[keep], scores[keep], level_of[idx[keep]]
            keep = batched_nms(boxes, scores, levels, self.nms_thresh)[:post_n]
            proposals.append(boxes[keep])
        return proposals

    def loss(self, anchors: Tensor, logits: Tensor, deltas: Tensor, image_sizes: Sequence[tuple[int, int]],
             targets: Sequence[dict[str, Tensor]]) -> dict[str, Tensor]:
        sampled_logits, sampled_labels, pos_deltas, pos_targets = [], [], [], []
        for i, (size, target) in enumerate(zip(image_sizes, targets)):
            gt = target["boxes"]
            valid = anchors_inside(anchors, size, self.allowed_border) if self.ignore_cross_boundary else None
            labels, matched = label_anchors(anchors, gt, fg_iou_thresh=self.fg_iou_thresh,
                                            bg_iou_thresh=self.bg_iou_thresh, valid=valid)
            pos, neg = sample_labels(labels, batch_size=self.batch_size_per_image,
                                     positive_fraction=self.positive_fraction)
            idx = torch.cat([pos, neg])
            sampled_logits.append(logits[i, idx])
            sampled_labels.append((labels[idx] == 1).to(logits.dtype))
            pos_deltas.append(deltas[i, pos])
            pos_targets.append(self.box_coder.encode(gt[matched[pos]], anchors[pos]) if pos.numel()
                               else deltas.new_zeros((0, 4)))
        sampled_logits = torch.cat(sampled_logits)
        num_sampled = max(sampled_logits.numel(), 1)
        # Sums over an empty selection are 0 but keep the graph, so a batch with nothing to learn still backprops.
        loss_obj = F.binary_cross_entropy_with_logits(sampled_logits, torch.cat(sampled_labels),
                                                      reduction="sum") / num_sampled
        loss_box = F.smooth_l1_loss(torch.cat(pos_deltas), torch.cat(pos_targets), beta=self.smooth_l1_beta,
                                    reduction="sum") * (self.box_loss_weight / num_sampled)
        return {"loss_objectness": loss_obj, "loss_rpn_box_reg": loss_box}
