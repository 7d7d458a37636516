"""Detector builders with plain keyword arguments, so a model file can record how to rebuild its detector."""

from __future__ import annotations

from torch import Tensor, nn

from ocula.models.backbones import BackboneWithFPN, build_backbone
from ocula.models.detection.faster_rcnn import FasterRCNN
from ocula.models.detection.fcos import PAN, STRIDES, CSPBackbone


class CSPPAN(nn.Module):
    """FCOS's CSP backbone and PAN neck as a Faster R-CNN backbone: maps 'p3'..'p5' (strides 8, 16, 32), `width`
    channels each. BatchNorm: it trains at batch 8 and folds into the convolutions at inference."""

    def __init__(self, *, widths, depths, width: int):
        super().__init__()
        self.body = CSPBackbone(widths=tuple(widths), depths=tuple(depths))
        self.neck = PAN(in_channels=self.body.out_channels, width=width)
        self.out_channels = width
        self.strides = {f"p{s.bit_length() - 1}": s for s in STRIDES}

    def forward(self, x: Tensor) -> dict[str, Tensor]:
        return dict(zip(self.strides, self.neck(self.body(x))))


def faster_rcnn_fpn(*, num_classes: int, backbone: str = "resnet18", norm_layer: str = "group", fpn_width: int = 128,
                    widths=(16, 32, 64, 128, 256), depths=(1, 2, 2, 1), **kwargs) -> FasterRCNN:
    """Faster R-CNN on a named ocula backbone with an FPN (P2..P5), or with backbone="csp-pan" on FCOS's CSP
    backbone (`widths`, `depths`) and a PAN neck of `fpn_width` (P3..P5); other arguments go to FasterRCNN."""
    if backbone == "csp-pan":
        features = CSPPAN(widths=widths, depths=depths, width=fpn_width)
    else:
        features = BackboneWithFPN(build_backbone(backbone, num_classes=0, norm_layer=norm_layer),
                                   out_channels=fpn_width)
    return FasterRCNN(backbone=features, num_classes=num_classes, **kwargs)
