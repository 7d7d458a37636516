"""Faster R-CNN as one traceable graph, for ONNX export: one image in, its detections out."""

from __future__ import annotations

from torch import Tensor, nn

from ocula.errors import OculaError
from ocula.models.detection.faster_rcnn import FasterRCNN
from ocula.models.detection.roi import MultiScaleRoIAlign


class RCNNGraph(nn.Module):
    """`forward(image)`: float [1, 3, H, W] in 0..255 at the (H, W) it was built for -> boxes [D, 4] (input
    pixels), scores [D], labels [D] (0-based). The steps of `FasterRCNN` in eval mode (normalisation, backbone,
    RPN proposals and their NMS, RoIAlign, box head, decoding, per-class NMS), with RoIAlign written without
    data-dependent branches; traced, the anchors become constants and every NMS a NonMaxSuppression node. Its
    thresholds are the wrapped model's (`roi_heads.score_thresh`, `nms_thresh`) when traced."""

    def __init__(self, model: FasterRCNN, size: tuple[int, int]):
        super().__init__()
        pool = model.roi_heads.box_roi_pool
        if not isinstance(pool, MultiScaleRoIAlign) or model.known_strides is None or pool.strides is None:
            raise OculaError("exporting Faster R-CNN needs RoIAlign and a backbone that declares its strides")
        if any(side % model.size_divisible for side in size):
            raise OculaError(f"the export size must be a multiple of {model.size_divisible}, got {list(size)}")
        self.model = model
        self.size = tuple(size)

    def forward(self, image: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        m = self.model
        features = m.features((image / 255.0 - m.image_mean) / m.image_std)
        maps = [features[name] for name in m.featmap_names]
        proposals = m.rpn(maps, [(s, s) for s in m.known_strides], [self.size])[0][0]
        heads = m.roi_heads
        pooled = heads.box_roi_pool.every_level(features, proposals, heads.box_roi_pool.strides)
        logits, deltas = (t.float() for t in heads.box_predictor(heads.box_head(pooled)))
        found = heads.postprocess(logits, deltas, [proposals], [self.size])[0]
        return found["boxes"], found["scores"], found["labels"]
