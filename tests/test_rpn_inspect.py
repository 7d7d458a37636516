"""`ocula inspect rpn`: the anchors are labelled as the notes say (IoU > 0.7 positive, < 0.3 negative, each box's
best anchor positive, cross-boundary anchors ignored), the drawing is written, and proposal recall counts boxes."""

import numpy as np
import pytest
import torch

from ocula.cli import main
from ocula.modelfile import save_model
from ocula.tasks import detect
from ocula.tasks.detect_rpn import anchor_view, cell_anchors, draw_rpn, proposal_recall, rpn_outputs

SIZE = (128, 160)
# In input pixels (the image is the input size, so the letterbox scale is 1): an exact copy of a 32 px anchor of
# the stride-8 cell (5, 5), a square between anchor sizes, and a thin box no anchor covers at IoU 0.3.
BOXES = np.array([[28, 28, 60, 60], [90, 20, 140, 70], [70, 60, 74, 120]], np.float32)


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    m, args = detect.build_detector("faster-rcnn", 2)
    m.info = detect.model_info("faster-rcnn", ["cell", "dot"], args, "synthetic", SIZE)
    return m.eval()


@pytest.fixture(scope="module")
def image():
    g = np.random.default_rng(0)
    im = g.integers(150, 220, (*SIZE, 3), dtype=np.uint8)
    for x1, y1, x2, y2 in BOXES.astype(int):
        im[y1:y2, x1:x2] = (120, 40, 160)
    return im


def iou_np(a, b):
    """IoU [len(a), len(b)], written here again so the test does not grade the code with itself."""
    lt, rb = np.maximum(a[:, None, :2], b[None, :, :2]), np.minimum(a[:, None, 2:], b[None, :, 2:])
    inter = np.prod(np.clip(rb - lt, 0, None), axis=2)
    area = lambda x: (x[:, 2] - x[:, 0]) * (x[:, 3] - x[:, 1])  # noqa: E731
    return inter / (area(a)[:, None] + area(b)[None] - inter)


def test_anchor_labels_follow_the_notes_rules(model, image):
    view = anchor_view(model, image, BOXES)
    assert view.scale == 1.0
    anchors, labels, inside = view.anchors.numpy(), view.labels.numpy(), view.inside.numpy()
    iou = iou_np(anchors, BOXES)  # [A, G]
    best = iou.max(1)
    iou_in = np.where(inside[:, None], iou, -1)
    best_of_box = [np.flatnonzero(np.isclose(iou_in[:, g], iou_in[:, g].max())) for g in range(len(BOXES))]
    is_best = np.zeros(len(anchors), bool)
    is_best[np.concatenate(best_of_box)] = True

    assert (labels[~inside] == -1).all() and (~inside).any()  # cross-boundary anchors are ignored
    assert (labels[inside & (best > 0.7)] == 1).all() and (inside & (best > 0.7)).any()
    # Every box has a positive among its best anchors (equal IoUs in exact arithmetic may differ in float32).
    assert all((labels[b] == 1).any() for b in best_of_box)  # the thin box too
    assert iou_in[:, 2].max() < 0.3  # ... which no threshold would have given it
    assert (labels[inside & (best < 0.3) & ~is_best] == 0).all()
    between = inside & (best >= 0.3) & (best <= 0.7) & ~is_best
    assert between.any() and (labels[between] == -1).all()
    assert ((best > 0.7) | is_best)[labels == 1].all() and inside[labels == 1].all()  # no other positives


def test_one_cell_has_the_notes_three_sizes_by_three_ratios(model, image):
    view = anchor_view(model, image, BOXES)
    cell = cell_anchors(model, view, (44.0, 44.0)).numpy()
    sides = np.sqrt((cell[:, 2] - cell[:, 0]) * (cell[:, 3] - cell[:, 1]))
    ratios = (cell[:, 3] - cell[:, 1]) / (cell[:, 2] - cell[:, 0])
    assert len(cell) == 9
    assert sorted(np.round(sides).astype(int).tolist()) == [32] * 3 + [64] * 3 + [128] * 3
    assert sorted(np.round(ratios, 3).tolist()) == [0.5] * 3 + [1.0] * 3 + [2.0] * 3


def test_proposal_recall_counts_the_boxes_a_proposal_covers(model, image):
    proposals = rpn_outputs(model, image, 1000)[0].numpy()
    far = np.array([[-500, -500, -400, -400]], np.float32)  # no proposal (clipped to the image) reaches it
    recall = proposal_recall(model, [image], [{"boxes": np.concatenate([proposals[[0, 5]], far])}])
    assert recall["recall@300/0.7"] == pytest.approx(2 / 3) and recall["recall@1000/0.5"] == pytest.approx(2 / 3)
    deep = proposal_recall(model, [image], [{"boxes": proposals[[500]]}], tops=(1000,))
    assert deep == {"recall@1000/0.5": 1.0, "recall@1000/0.7": 1.0}  # the 501st proposal is in the top 1000


def test_inspect_rpn_draws_and_reports(model, image, tmp_path, capsys):
    from PIL import Image

    save_model(tmp_path / "rcnn.ocula", model, model.info)
    Image.fromarray(image).save(tmp_path / "smear.png")
    objects = "".join(f"<object><name>cell</name><bndbox><xmin>{x1 + 1:g}</xmin><ymin>{y1 + 1:g}</ymin>"
                      f"<xmax>{x2:g}</xmax><ymax>{y2:g}</ymax></bndbox></object>" for x1, y1, x2, y2 in BOXES)
    (tmp_path / "smear.xml").write_text(f"<annotation>{objects}</annotation>")
    counts = draw_rpn(model, image, BOXES, tmp_path / "direct.png")
    assert counts["per_cell"] == 9 and counts["positive"] >= len(BOXES)
    with pytest.raises(SystemExit) as done:
        main(["inspect", "rpn", str(tmp_path / "rcnn.ocula"), str(tmp_path / "smear.png"), "--boxes",
              str(tmp_path / "smear.xml"), "--out", str(tmp_path / "rpn.png")])
    out = capsys.readouterr().out
    assert done.value.code == 0 and (tmp_path / "rpn.png").stat().st_size > 10_000
    assert f"{counts['positive']} positive" in out and "recall@300/0.5" in out
    with pytest.raises(SystemExit) as done:
        main(["inspect", "rpn", str(tmp_path / "rcnn.ocula")])
    assert done.value.code == 1 and "MODEL IMAGE" in capsys.readouterr().err
    detect.export(model, "onnx", tmp_path / "rcnn.onnx")
    with pytest.raises(SystemExit) as done:
        main(["inspect", "rpn", str(tmp_path / "rcnn.onnx"), str(tmp_path / "smear.png")])
    err = capsys.readouterr().err
    assert done.value.code == 1 and err.count("\n") == 1 and "rcnn.onnx: not a Faster R-CNN in torch" in err
