"""Detection task: box-aware augmentation, a tiny FCOS overfitting two synthetic smears, COCO evaluation on a
hand-made case, ONNX parity and `ocula predict` on a detection model."""

import json

import numpy as np
import pytest
import torch

from ocula.cli import main
from ocula.errors import OculaError
from ocula.data.box_transforms import augment, colour_jitter, hflip, vflip
from ocula.modelfile import save_model
from ocula.models import build
from ocula.models.detection.fcos import FCOSLoss
from ocula.tasks import detect

CLASSES = ["WBC", "RBC", "Platelets"]
SIZE = (128, 160)
COLOURS = np.array([[40, 40, 220], [220, 40, 40], [40, 200, 40]], np.uint8)


def synthetic(seed: int):
    """A dark image with a few solid squares: one big (class 0), some middle (1) and small (2) ones."""
    rng = np.random.default_rng(seed)
    image = np.full((*SIZE, 3), 20, np.uint8)
    boxes, labels = [], []
    for label, side, n in ((0, 48, 1), (1, 28, 3), (2, 10, 2)):
        for _ in range(n):
            for _ in range(100):  # rejection-sample a spot that overlaps nothing placed so far
                x, y = rng.integers(2, SIZE[1] - side - 2), rng.integers(2, SIZE[0] - side - 2)
                box = [x, y, x + side, y + side]
                if all(box[2] + 2 < b[0] or b[2] + 2 < box[0] or box[3] + 2 < b[1] or b[3] + 2 < box[1]
                       for b in boxes):
                    break
            boxes.append(box)
            labels.append(label)
            image[y:y + side, x:x + side] = COLOURS[label]
    return image, {"boxes": np.array(boxes, np.float32), "labels": np.array(labels, np.int64)}


def box_colours(image: torch.Tensor, boxes: torch.Tensor) -> np.ndarray:
    """Mean colour inside each box, 1 px in from its edges (where resampling blurs)."""
    out = []
    for x1, y1, x2, y2 in boxes.round().int().tolist():
        out.append(image[:, y1 + 1:y2 - 1, x1 + 1:x2 - 1].float().mean((1, 2)).numpy())
    return np.array(out)


def test_flips_move_boxes_with_the_image():
    image, t = synthetic(0)
    x, boxes = torch.from_numpy(image).permute(2, 0, 1), torch.from_numpy(t["boxes"])
    for flip in (hflip, vflip):
        fx, fb = flip(x, boxes)
        assert np.allclose(box_colours(fx, fb), COLOURS[t["labels"]], atol=1)
        assert torch.equal(flip(*flip(x, boxes))[1], boxes)


def test_augmentation_keeps_boxes_on_their_objects():
    image, t = synthetic(1)
    x, boxes, labels = torch.from_numpy(image).permute(2, 0, 1), torch.from_numpy(t["boxes"]), torch.from_numpy(
        t["labels"])
    g = torch.Generator().manual_seed(0)
    kept = 0
    for _ in range(20):
        out, b, lab = augment(x, boxes, labels, (96, 128), g, scale=(0.6, 1.4))
        assert out.shape == (3, 96, 128)
        assert (b[:, 0] >= 0).all() and (b[:, 2] <= 128).all() and (b[:, 1] >= 0).all() and (b[:, 3] <= 96).all()
        big = ((b[:, 2] - b[:, 0]) > 6) & ((b[:, 3] - b[:, 1]) > 6)  # room to look inside after the 1 px margin
        assert np.allclose(box_colours(out, b[big]), COLOURS[lab[big]], atol=12)
        kept += len(b)
    assert kept > 20  # the crops keep objects, not only background
    jittered = colour_jitter(torch.rand(2, 3, 8, 8) * 255, g)
    assert jittered.shape == (2, 3, 8, 8) and jittered.min() >= 0 and jittered.max() <= 255


def test_coco_evaluation_on_a_hand_made_case():
    gt = [{"boxes": np.array([[0, 0, 10, 10], [20, 20, 40, 40]], float), "labels": np.array([0, 1])},
          {"boxes": np.array([[5, 5, 15, 15], [50, 50, 70, 70]], float), "labels": np.array([0, 1])}]
    # Class 0: both found exactly. Class 1: a false alarm scored above the one hit, the other box missed, so
    # precision is 1/2 up to recall 1/2 and recall never passes 1/2: 51 of COCO's 101 recall points at 0.5.
    dets = [{"boxes": np.array([[0, 0, 10, 10], [20, 20, 40, 40], [80, 80, 90, 90]], float),
             "scores": np.array([0.9, 0.8, 0.95]), "labels": np.array([0, 1, 1])},
            {"boxes": np.array([[5, 5, 15, 15]], float), "scores": np.array([0.7]), "labels": np.array([0])}]
    r = detect.coco_evaluate(gt, dets, ["a", "b"])
    assert r["ap50"]["a"] == pytest.approx(1.0)
    assert r["ap50"]["b"] == pytest.approx(51 * 0.5 / 101)
    assert r["map50"] == pytest.approx((1 + 51 * 0.5 / 101) / 2)
    assert r["map"] == pytest.approx(r["map50"])  # exact boxes: every IoU threshold agrees


@pytest.fixture(scope="module")
def trained():
    """A tiny FCOS that has overfitted two synthetic images (a few seconds on one thread)."""
    torch.manual_seed(0)
    pairs = [synthetic(s) for s in (2, 3)]
    x = torch.stack([torch.from_numpy(im).permute(2, 0, 1).float() for im, _ in pairs])
    targets = [{k: torch.from_numpy(v) for k, v in t.items()} for _, t in pairs]
    args = dict(num_classes=3, widths=[8, 16, 32, 32, 32], depths=[1, 1, 1, 1], neck_width=32)
    model = build("fcos", **args)
    loss_fn = FCOSLoss(num_classes=3, ranges=((0, 8), (8, 20), (20, 1e8)))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    for _ in range(100):
        loss = sum(loss_fn(model(x), targets).values())
        opt.zero_grad()
        loss.backward()
        opt.step()
    model.eval()
    model.info = detect.model_info("fcos", CLASSES, args, "synthetic")
    model.info.preprocess["input_size"] = list(SIZE)
    return model, pairs


def test_tiny_detector_overfits_two_images(trained):
    model, pairs = trained
    images, targets = [im for im, _ in pairs], [t for _, t in pairs]
    dets = detect.detect_images(model, images, score_thresh=0.3)
    for d, t in zip(dets, targets):
        from ocula.data.detection import box_iou

        iou = box_iou(t["boxes"], d["boxes"])
        for i, label in enumerate(t["labels"]):  # every object found, with its class
            assert any(iou[i, j] > 0.5 and d["labels"][j] == label for j in range(len(d["boxes"])))
    assert detect.coco_evaluate(targets, dets, CLASSES)["map50"] > 0.9


def test_onnx_detections_match_torch(trained, tmp_path):
    pytest.importorskip("onnxruntime")
    model, pairs = trained
    path = detect.export_onnx(model, tmp_path / "tiny.onnx")
    x = torch.stack([torch.from_numpy(im).permute(2, 0, 1).float() for im, _ in pairs])
    assert detect.check_onnx_parity(model, path, x) < 1.0
    bigger = torch.nn.functional.interpolate(x, size=(192, 256), mode="bilinear")  # dynamic height and width
    assert detect.check_onnx_parity(model, path, bigger) < 1.0


def test_cli_predict_draws_writes_json_and_counts(trained, tmp_path, capsys):
    from ocula.data.images import save_png

    model, pairs = trained
    file = save_model(tmp_path / "tiny.ocula", model, model.info)
    image = save_png(pairs[0][0], tmp_path / "smear.png")
    with pytest.raises(SystemExit) as e:
        main(["predict", str(file), str(image), "--out", str(tmp_path / "out")])
    assert e.value.code == 0
    line = capsys.readouterr().out
    assert "WBC 1, RBC 3, Platelets 2" in line
    assert (tmp_path / "out" / "smear-boxes.png").is_file()
    saved = json.loads((tmp_path / "out" / "smear-boxes.json").read_text())
    assert saved["counts"] == {"WBC": 1, "RBC": 3, "Platelets": 2}
    with pytest.raises(SystemExit):
        main(["predict", str(file), str(image), "--out", str(tmp_path / "out"), "--json"])
    assert json.loads(capsys.readouterr().out)["counts"]["RBC"] == 3


def test_usual_classes_missing_from_an_image_are_ignored():
    targets = [{"labels": np.array([0, 1, 1])} for _ in range(9)] + [{"labels": np.array([0, 2])}]
    ignore = detect.ignored_classes(targets, 3)
    assert ignore[9].tolist() == [False, True, False]  # RBC-like class 1 is in 90%: unlabelled there, not absent
    assert not ignore[:9].any()  # the rare class 2 is never ignored


def test_time_budget_schedules_the_rate_and_stops():
    import time
    from types import SimpleNamespace

    param = torch.nn.Parameter(torch.zeros(1))
    stopped = []
    trainer = SimpleNamespace(optimizer=torch.optim.SGD([param], lr=1.0), config=SimpleNamespace(lr=1.0),
                              stop=stopped.append)
    budget = detect.TimeBudget(0.2)
    budget.begin(trainer)
    assert trainer.optimizer.param_groups[0]["lr"] == pytest.approx(0.05)  # warm-up starts low
    time.sleep(0.1)
    budget.on_batch_end(trainer, 1.0)
    assert 0.3 < trainer.optimizer.param_groups[0]["lr"] < 1.0 and not stopped  # past the peak, cosine decay
    time.sleep(0.12)
    budget.on_batch_end(trainer, 1.0)
    assert stopped and trainer.optimizer.param_groups[0]["lr"] == pytest.approx(0.02)


def test_faster_rcnn_takes_a_torchvision_backbone_checkpoint(tmp_path):
    from ocula.models.backbones import build_backbone
    from ocula.tasks.detect import build_detector

    resnet = build_backbone("resnet18")  # same names as torchvision's resnet18, classifier included
    torch.save(resnet.state_dict(), tmp_path / "resnet18.pth")
    model, args = build_detector("faster-rcnn", 3, backbone_weights=tmp_path / "resnet18.pth")
    assert args["norm_layer"] == "batch"
    assert torch.equal(model.backbone.body.layer1[0].conv1.weight, resnet.layer1[0].conv1.weight)
    with pytest.raises(OculaError, match="faster-rcnn"):
        build_detector("fcos", 3, backbone_weights=tmp_path / "resnet18.pth")


def test_greedy_match_takes_each_truth_once_in_score_order():
    overlap = np.array([[0.9, 0.6], [0.8, 0.1], [0.3, 0.55]])  # rows: detections by falling score
    assert detect.greedy_match(overlap).tolist() == [0, -1, 1]  # row 1's best truth is taken, 0.1 is too low
    assert detect.greedy_match(overlap, iou=0.05).tolist() == [0, 1, -1]
    assert detect.greedy_match(np.zeros((2, 0))).tolist() == [-1, -1]
