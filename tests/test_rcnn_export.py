"""Faster R-CNN exported whole to ONNX: NMS becomes NonMaxSuppression, the traced graph computes what the eager
model does, and ONNX Runtime finds what torch finds on real BCCD test images through `ocula.load` / predict."""

import warnings

import numpy as np
import pytest
import torch
from torch import nn

import ocula
from ocula.export.onnx import onnx_session
from ocula.modelfile import save_model
from ocula.models.detection.boxes import batched_nms
from ocula.models.detection.rcnn_graph import RCNNGraph
from ocula.tasks import detect

from conftest import DATASETS, need

SIZE = (192, 256)  # BCCD's 480 x 640 at 0.4x: small enough to train for seconds


class ThresholdThenNMS(nn.Module):
    def forward(self, boxes, scores, labels):
        keep = torch.nonzero(scores > 0.5).flatten()
        return keep[batched_nms(boxes[keep], scores[keep], labels[keep], 0.5)]


def test_batched_nms_exports_as_non_max_suppression_and_keeps_the_same_boxes(tmp_path):
    import onnx

    g = torch.Generator().manual_seed(0)
    corner = torch.rand(200, 2, generator=g) * 100
    boxes = torch.cat([corner, corner + 20 + torch.rand(200, 2, generator=g) * 40], 1)
    scores, labels = torch.rand(200, generator=g), torch.randint(3, (200,), generator=g)
    names = ["boxes", "scores", "labels"]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", torch.jit.TracerWarning)
        torch.onnx.export(ThresholdThenNMS(), (boxes, scores, labels), tmp_path / "nms.onnx", input_names=names,
                          output_names=["keep"], dynamic_axes={n: {0: "n"} for n in [*names, "keep"]},
                          opset_version=17, dynamo=False)
    assert "NonMaxSuppression" in {n.op_type for n in onnx.load(tmp_path / "nms.onnx").graph.node}
    session = onnx_session(tmp_path / "nms.onnx", 1)
    got = session.run(None, {"boxes": boxes.numpy(), "scores": scores.numpy(), "labels": labels.numpy()})[0]
    want = ThresholdThenNMS()(boxes, scores, labels)
    assert 10 < len(want) < (scores > 0.5).sum() - 10 and np.array_equal(got, want.numpy())  # NMS had work
    # Traced with candidates, the graph still runs when none pass the threshold.
    none = session.run(None, {"boxes": boxes.numpy(), "scores": scores.numpy() * 0.4, "labels": labels.numpy()})[0]
    assert none.shape == (0,)


def test_the_graph_computes_what_the_eager_model_detects():
    torch.manual_seed(0)
    model, _ = detect.build_detector("faster-rcnn", 3)
    x = torch.rand(1, 3, *SIZE) * 255
    with torch.no_grad():
        boxes, scores, labels = RCNNGraph(model.eval(), SIZE)(x)
        want = model(list(x / 255))[0]
    assert len(boxes) > 0
    assert torch.equal(boxes, want["boxes"]) and torch.equal(scores, want["scores"])
    assert torch.equal(labels, want["labels"])


@pytest.fixture(scope="module")
def smears():
    """A preset Faster R-CNN trained 30 steps on two BCCD training smears (enough for confident detections on
    the test smears), and five test smears."""
    from ocula.data import registry

    need(DATASETS / "bccd")
    train, test = registry.load("bccd", "train"), registry.load("bccd", "test")
    torch.manual_seed(0)
    model, args = detect.build_detector("faster-rcnn", len(train.classes))
    model.info = detect.model_info("faster-rcnn", train.classes, args, "bccd", SIZE)
    images, targets = [], []
    for i in range(2):
        image, target = train[i]
        x, scale = detect.letterbox(image, SIZE)
        images.append(x / 255)
        targets.append({"boxes": torch.from_numpy(target["boxes"] * scale).float(),
                        "labels": torch.from_numpy(target["labels"])})
    optimizer = torch.optim.AdamW(model.parameters(), 2e-3)
    for _ in range(30):
        loss = sum(model.train()(images, targets).values())
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    return model.eval(), [test[i][0] for i in range(5)]


def test_onnx_runtime_finds_what_torch_finds_on_bccd_test_smears(smears, tmp_path):
    model, images = smears
    save_model(tmp_path / "rcnn.ocula", model, model.info)
    torch_model = ocula.load(tmp_path / "rcnn.ocula", device="cpu")
    message = torch_model.export("onnx", tmp_path / "rcnn.onnx")
    assert "NMS in the graph" in message
    ort_model = ocula.load(tmp_path / "rcnn.onnx")  # the ModelInfo rides in the ONNX metadata
    assert hasattr(ort_model.module, "session")
    found = 0
    for a, b in zip(torch_model.predict(images, score_thresh=0.3), ort_model.predict(images, score_thresh=0.3)):
        gap = detect.detection_gap(vars(a), vars(b), min_score=0.3)
        assert gap is not None and gap <= 1.0, gap  # the same labels, boxes within 1 px
        found += len(a.labels)
    assert found >= 25, found  # the smears hold detections to compare
