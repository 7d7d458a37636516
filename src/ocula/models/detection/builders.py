"""Detector builders with plain keyword arguments, so a model file can record how to rebuild its detector."""

from __future__ import annotations

from ocula.models.backbones import BackboneWithFPN, build_backbone
from ocula.models.detection.faster_rcnn import FasterRCNN


def faster_rcnn_fpn(*, num_classes: int, backbone: str = "resnet18", norm_layer: str = "group", fpn_width: int = 128,
                    **kwargs) -> FasterRCNN:
    """Faster R-CNN on a named ocula backbone with an FPN (P2..P5); other arguments go to FasterRCNN."""
    body = build_backbone(backbone, num_classes=0, norm_layer=norm_layer)
    return FasterRCNN(backbone=BackboneWithFPN(body, out_channels=fpn_width), num_classes=num_classes, **kwargs)
