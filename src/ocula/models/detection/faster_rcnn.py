"""Faster R-CNN (Ren et al. 2015): backbone -> RPN proposals -> RoIAlign/RoIPool -> box head, trained jointly.

Defaults are the paper's where they fit: 9 anchors (128, 256, 512) x (0.5, 1, 2) on one stride-16 map; RPN
IoU > 0.7 / < 0.3, 256 anchors per image at 1:1, NMS 0.7, top 12000 -> 2000 proposals in training and
6000 -> 300 at test time; 512 RoIs per image at 25% foreground (IoU >= 0.5), 7x7 pooling, two FC layers.

Images are float tensors [3, H, W] in [0, 1], any sizes (padded into one batch, never resized). Targets give
"boxes" [G, 4] as (x1, y1, x2, y2) pixels and "labels" [G] in 0..num_classes-1; the background class is internal.
"""

import math
from collections.abc import Mapping, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ocula.errors import OculaError
from ocula.models.detection.anchors import AnchorGenerator
from ocula.models.detection.roi import MultiScaleRoIAlign, RoIPool
from ocula.models.detection.roi_heads import ConvFCHead, FastRCNNPredictor, RoIHeads, TwoMLPHead
from ocula.models.detection.rpn import RegionProposalNetwork, RPNHead

_SINGLE = "0"  # internal name of the one map of a backbone returning a Tensor


class FasterRCNN(nn.Module):
    """Two-stage detector. `model(images, targets)` in training mode returns the four losses;
    `model(images)` in eval mode returns one {"boxes", "scores", "labels"} dict per image.

    The backbone is any module whose forward(x) returns a Tensor (then it needs `out_channels: int` and
    `stride: int`) or a dict of maps with equal channels (FPN; `out_channels` int or dict, `strides` dict if
    known, else strides are read from the map sizes). A module with `forward_features` (an ocula classification
    backbone) is used through it; pick its level(s) with `featmap_names`, e.g. ["c4"].
    """

    def __init__(self, *, backbone: nn.Module, num_classes: int, featmap_names: Sequence[str] | None = None,
                 image_mean: Sequence[float] = (0.485, 0.456, 0.406),
                 image_std: Sequence[float] = (0.229, 0.224, 0.225), size_divisible: int = 32,
                 anchor_sizes: Sequence[Sequence[float]] | None = None,
                 aspect_ratios: Sequence[float] | Sequence[Sequence[float]] = (0.5, 1.0, 2.0),
                 anchor_offset: float = 0.5,
                 rpn_conv_channels: int | None = None, rpn_init_std: float = 0.01, rpn_fg_iou_thresh: float = 0.7,
                 rpn_bg_iou_thresh: float = 0.3, rpn_batch_size_per_image: int = 256,
                 rpn_positive_fraction: float = 0.5, rpn_pre_nms_top_n_train: int = 12000,
                 rpn_post_nms_top_n_train: int = 2000, rpn_pre_nms_top_n_test: int = 6000,
                 rpn_post_nms_top_n_test: int = 300, rpn_nms_thresh: float = 0.7, rpn_min_size: float = 1e-3,
                 rpn_score_thresh: float = 0.0, rpn_ignore_cross_boundary: bool = True,
                 rpn_allowed_border: float = 0.0, rpn_smooth_l1_beta: float = 1.0 / 9,
                 rpn_box_loss_weight: float = 1.0,
                 roi_op: str = "align", roi_featmap_names: Sequence[str] | None = None, roi_output_size: int = 7,
                 roi_sampling_ratio: int = 2, roi_aligned: bool = False,
                 box_head: str | nn.Module = "mlp", box_representation_size: int = 1024,
                 box_fg_iou_thresh: float = 0.5, box_bg_iou_thresh: float = 0.5, box_bg_iou_thresh_low: float = 0.0,
                 box_batch_size_per_image: int = 512, box_positive_fraction: float = 0.25,
                 bbox_reg_weights: Sequence[float] = (10.0, 10.0, 5.0, 5.0), box_score_thresh: float = 0.05,
                 box_nms_thresh: float = 0.5, box_detections_per_img: int = 100, box_min_size: float = 1e-2,
                 box_smooth_l1_beta: float = 1.0 / 9):
        super().__init__()
        if num_classes < 1:
            raise OculaError(f"num_classes must be at least 1 (object classes, background excluded), got {num_classes}")
        if len(image_mean) != len(image_std):
            raise OculaError("image_mean and image_std must have one value per input channel")
        self.backbone = backbone
        self.num_classes = num_classes
        self.size_divisible = size_divisible
        # Constructor arguments, not learned state: kept out of the state_dict.
        mean = torch.tensor(image_mean, dtype=torch.float32)[:, None, None]
        std = torch.tensor(image_std, dtype=torch.float32)[:, None, None]
        self.register_buffer("image_mean", mean, persistent=False)
        self.register_buffer("image_std", std, persistent=False)

        self.featmap_names, channels, self.known_strides = _inspect_backbone(backbone, featmap_names)
        levels = len(self.featmap_names)
        if anchor_sizes is None:
            # One map: the paper's 3 scales. Pyramid: one scale per level, 8x its stride (32 on stride 4 ...).
            if levels == 1:
                anchor_sizes = ((128, 256, 512),)
            elif self.known_strides is not None:
                anchor_sizes = tuple((8 * s,) for s in self.known_strides)
            else:
                anchor_sizes = tuple((32 * 2 ** i,) for i in range(levels))
        if aspect_ratios and not isinstance(aspect_ratios[0], Sequence):
            aspect_ratios = (tuple(aspect_ratios),) * levels
        anchor_generator = AnchorGenerator(sizes=anchor_sizes, aspect_ratios=aspect_ratios, offset=anchor_offset)
        if anchor_generator.num_levels != levels:
            raise OculaError(f"anchor_sizes describe {anchor_generator.num_levels} levels, the backbone gives {levels}")
        per_location = set(anchor_generator.num_anchors_per_location())
        if len(per_location) != 1:
            raise OculaError("every level needs the same number of anchors per location (the RPN head is shared)")
        self.rpn = RegionProposalNetwork(
            anchor_generator=anchor_generator,
            head=RPNHead(in_channels=channels, num_anchors=per_location.pop(), conv_channels=rpn_conv_channels,
                         init_std=rpn_init_std),
            fg_iou_thresh=rpn_fg_iou_thresh, bg_iou_thresh=rpn_bg_iou_thresh,
            batch_size_per_image=rpn_batch_size_per_image, positive_fraction=rpn_positive_fraction,
            pre_nms_top_n_train=rpn_pre_nms_top_n_train, post_nms_top_n_train=rpn_post_nms_top_n_train,
            pre_nms_top_n_test=rpn_pre_nms_top_n_test, post_nms_top_n_test=rpn_post_nms_top_n_test,
            nms_thresh=rpn_nms_thresh, min_size=rpn_min_size, score_thresh=rpn_score_thresh,
            ignore_cross_boundary=rpn_ignore_cross_boundary, allowed_border=rpn_allowed_border,
            smooth_l1_beta=rpn_smooth_l1_beta, box_loss_weight=rpn_box_loss_weight)

        roi_names = list(roi_featmap_names) if roi_featmap_names is not None else self._default_roi_names()
        unknown = set(roi_names) - set(self.featmap_names)
        if unknown:
            raise OculaError(f"roi_featmap_names {sorted(unknown)} are not among the feature maps {self.featmap_names}")
        roi_strides = None
        if self.known_strides is not None:
            roi_strides = [self.known_strides[self.featmap_names.index(n)] for n in roi_names]
        if roi_op == "align":
            pooler = MultiScaleRoIAlign(featmap_names=roi_names, output_size=roi_output_size,
                                        sampling_ratio=roi_sampling_ratio, aligned=roi_aligned, strides=roi_strides)
        elif roi_op == "pool":
            if len(roi_names) != 1 or roi_strides is None:
                raise OculaError("roi_op='pool' needs exactly one RoI feature map of known stride")
            pooler = RoIPool(featmap_name=roi_names[0], output_size=roi_output_size, stride=roi_strides[0])
        else:
            raise OculaError(f"roi_op must be 'align' or 'pool', got {roi_op!r}")
        if box_head == "mlp":
            head = TwoMLPHead(in_channels=channels, pool_size=roi_output_size,
                              representation_size=box_representation_size)
        elif box_head == "conv":
            head = ConvFCHead(in_channels=channels, pool_size=roi_output_size,
                              representation_size=box_representation_size)
        elif isinstance(box_head, nn.Module):
            head = box_head
            if not isinstance(getattr(head, "out_features", None), int):
                raise OculaError("a custom box_head needs an int attribute out_features (its output width)")
        else:
            raise OculaError(f"box_head must be 'mlp', 'conv' or an nn.Module, got {box_head!r}")
        self.roi_heads = RoIHeads(
            box_roi_pool=pooler, box_head=head,
            box_predictor=FastRCNNPredictor(in_features=head.out_features, num_classes=num_classes),
            fg_iou_thresh=box_fg_iou_thresh, bg_iou_thresh=box_bg_iou_thresh,
            bg_iou_thresh_low=box_bg_iou_thresh_low, batch_size_per_image=box_batch_size_per_image,
            positive_fraction=box_positive_fraction, bbox_reg_weights=tuple(bbox_reg_weights),
            score_thresh=box_score_thresh, nms_thresh=box_nms_thresh, detections_per_img=box_detections_per_img,
            min_size=box_min_size, smooth_l1_beta=box_smooth_l1_beta)

    def _default_roi_names(self) -> list[str]:
        """All maps, except that a pyramid pools RoIs from strides <= 32 only: as in the FPN paper, the extra
        coarser level (P6, torchvision's "pool") serves the RPN alone."""
        names = self.featmap_names
        if len(names) == 1:
            return list(names)
        if self.known_strides is not None:
            kept = [n for n, s in zip(names, self.known_strides) if s <= 32]
        else:
            kept = [n for n in names if n not in ("pool", "p6")]
        return kept or list(names)

    def forward(self, images: Tensor | Sequence[Tensor], targets: Sequence[dict[str, Tensor]] | None = None):
        if self.training and targets is None:
            raise OculaError("training mode needs targets: model(images, targets), or call model.eval() to detect")
        batch, image_sizes = self.preprocess(images)
        if targets is not None:
            targets = self._check_targets(targets, len(image_sizes), batch.dtype, batch.device)
        features = self.features(batch)
        maps = [features[n] for n in self.featmap_names]
        strides = self.known_strides or [2 ** round(math.log2(batch.shape[-2] / m.shape[-2])) for m in maps]
        proposals, rpn_losses = self.rpn(maps, [(s, s) for s in strides], image_sizes,
                                         targets if self.training else None)
        padded = tuple(batch.shape[-2:])
        if self.training:
            _, roi_losses = self.roi_heads(features, proposals, image_sizes, padded, targets)
            return {**rpn_losses, **roi_losses}
        detections, _ = self.roi_heads(features, proposals, image_sizes, padded)
        return detections

    def features(self, batch: Tensor) -> dict[str, Tensor]:
        out = self.backbone.forward_features(batch) if hasattr(self.backbone, "forward_features") \
            else self.backbone(batch)
        if isinstance(out, Tensor):
            return {_SINGLE: out}
        missing = [n for n in self.featmap_names if n not in out]
        if missing:
            raise OculaError(f"backbone output lacks feature maps {missing}; it gave {list(out)}")
        return out

    def preprocess(self, images: Tensor | Sequence[Tensor]) -> tuple[Tensor, list[tuple[int, int]]]:
        """Normalise each image with the model's mean/std and zero-pad them into one batch whose sides are
        multiples of size_divisible (so every FPN level halves exactly)."""
        if isinstance(images, Tensor) and images.dim() == 4:
            images = list(images.unbind(0))
        if isinstance(images, Tensor) or not images:
            raise OculaError("images must be a non-empty list of [C, H, W] tensors or an [N, C, H, W] tensor")
        channels = self.image_mean.shape[0]
        for i, img in enumerate(images):
            if img.dim() != 3 or img.shape[0] != channels:
                raise OculaError(f"image {i} has shape {tuple(img.shape)}; expected [{channels}, H, W]")
            if not img.is_floating_point():
                raise OculaError(f"image {i} has dtype {img.dtype}; expected float values in [0, 1]")
        sizes = [(int(img.shape[1]), int(img.shape[2])) for img in images]
        d = self.size_divisible
        height = int(math.ceil(max(h for h, _ in sizes) / d) * d)
        width = int(math.ceil(max(w for _, w in sizes) / d) * d)
        batch = torch.stack([F.pad((img - self.image_mean) / self.image_std, (0, width - w, 0, height - h))
                             for img, (h, w) in zip(images, sizes)])
        return batch, sizes

    def _check_targets(self, targets, n: int, dtype, device) -> list[dict[str, Tensor]]:
        """Validated copies of the targets with zero-area boxes dropped: they overlap nothing, so they could only
        produce log(0) regression targets."""
        if len(targets) != n:
            raise OculaError(f"got {len(targets)} targets for {n} images")
        out = []
        for i, t in enumerate(targets):
            if "boxes" not in t or "labels" not in t:
                raise OculaError(f"target {i} needs 'boxes' and 'labels'")
            boxes = torch.as_tensor(t["boxes"], dtype=dtype, device=device).reshape(-1, 4) \
                if len(t["boxes"]) else torch.zeros((0, 4), dtype=dtype, device=device)
            labels = torch.as_tensor(t["labels"], dtype=torch.int64, device=device).reshape(-1)
            if labels.shape[0] != boxes.shape[0]:
                raise OculaError(f"target {i} has {boxes.shape[0]} boxes but {labels.shape[0]} labels")
            if not torch.isfinite(boxes).all():
                raise OculaError(f"target {i} has non-finite box coordinates")
            if labels.numel() and (labels.min() < 0 or labels.max() >= self.num_classes):
                raise OculaError(f"target {i} has labels outside 0..{self.num_classes - 1}")
            ok = (boxes[:, 2] > boxes[:, 0]) & (boxes[:, 3] > boxes[:, 1])
            out.append({"boxes": boxes[ok], "labels": labels[ok]})
        return out


def _inspect_backbone(backbone: nn.Module, featmap_names) -> tuple[list[str], int, list[int] | None]:
    """Feature map names, their (shared) channel count and strides if the backbone declares them."""
    out_channels = getattr(backbone, "out_channels", None)
    strides = getattr(backbone, "strides", None)
    if featmap_names is None:
        if isinstance(out_channels, int) and isinstance(getattr(backbone, "stride", None), int):
            return [_SINGLE], out_channels, [backbone.stride]
        if isinstance(out_channels, Mapping):
            featmap_names = list(out_channels)
        elif isinstance(strides, Mapping):
            featmap_names = list(strides)
        else:
            raise OculaError("backbone must declare out_channels and stride (one map) or strides/out_channels dicts "
                             "(several maps), or pass featmap_names")
    names = list(featmap_names)
    if not names:
        raise OculaError("featmap_names is empty")
    if isinstance(out_channels, Mapping):
        missing = [n for n in names if n not in out_channels]
        if missing:
            raise OculaError(f"backbone has no feature maps {missing}; it has {list(out_channels)}")
        widths = {out_channels[n] for n in names}
    elif isinstance(out_channels, int):
        widths = {out_channels}
    else:
        raise OculaError("backbone must declare out_channels (int, or dict per feature map)")
    if len(widths) != 1:
        raise OculaError(f"feature maps {names} have different widths {sorted(widths)}: add an FPN or pick one map")
    known = None
    if isinstance(strides, Mapping) and all(n in strides for n in names):
        known = [int(strides[n]) for n in names]
    elif names == [_SINGLE] and isinstance(getattr(backbone, "stride", None), int):
        known = [backbone.stride]
    return names, widths.pop(), known
