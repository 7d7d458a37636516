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

import synthetic

CLASSES, SIZE, COLOURS = synthetic.BOX_CLASSES, synthetic.BOX_SIZE, synthetic.COLOURS
synthetic = synthetic.box_image


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
    model.info = detect.model_info("fcos", CLASSES, args, "synthetic", SIZE)
    return model, pairs


def test_tiny_detector_overfits_two_images(trained):
    model, pairs = trained
    images, targets = [im for im, _ in pairs], [t for _, t in pairs]
    dets = detect.detect_images(model, images, score_thresh=0.3)
    for d, t in zip(dets, targets):
        from ocula.data.boxes import box_iou_np as box_iou

        iou = box_iou(t["boxes"], d["boxes"])
        for i, label in enumerate(t["labels"]):  # every object found, with its class
            assert any(iou[i, j] > 0.5 and d["labels"][j] == label for j in range(len(d["boxes"])))
    assert detect.coco_evaluate(targets, dets, CLASSES)["map50"] > 0.9


def test_onnx_detections_match_torch(trained, tmp_path):
    from ocula.export.onnx import check_parity, onnx_session, run_onnx
    from ocula.models.detection.fcos import postprocess

    model, pairs = trained
    assert "same detections" in detect.export(model, "onnx", tmp_path / "tiny.onnx")
    x = torch.stack([torch.from_numpy(im).permute(2, 0, 1).float() for im, _ in pairs])
    bigger = torch.nn.functional.interpolate(x, size=(192, 256), mode="bilinear")  # dynamic height and width
    for batch in (x, bigger):
        assert check_parity(model, tmp_path / "tiny.onnx", batch) < 1.0
        with torch.no_grad():
            want = postprocess(*model(batch), score_thresh=0.3)
        got = postprocess(*map(torch.from_numpy, run_onnx(onnx_session(tmp_path / "tiny.onnx"), batch)),
                          score_thresh=0.3)
        assert [d["labels"].tolist() for d in got] == [d["labels"].tolist() for d in want]


def test_int8_detector_finds_what_the_float_one_finds(trained, tmp_path):
    """The decoding after the heads stays float: 8-bit pixel boxes would be off by whole strides."""
    import onnx

    import ocula
    from ocula.compression.quantize import quantize_int8

    model, pairs = trained
    images = [im for im, _ in pairs]
    inputs = [detect.letterbox(im, SIZE)[0][None].numpy() for im in images * 4]
    path = quantize_int8(model, inputs, tmp_path / "tiny-int8.onnx")
    graph = onnx.load(str(path)).graph
    producer = {out: n.op_type for n in graph.node for out in n.output}
    exps = [n for n in graph.node if n.op_type == "Exp"]
    assert "QLinearConv" in producer.values() or "QuantizeLinear" in producer.values()
    assert exps and all(producer[n.input[0]] != "QuantizeLinear" for n in exps)  # box decoding runs in float
    quantized = ocula.load(path)
    want = detect.detect_images(model, images, score_thresh=0.3)
    got = detect.detect_images(quantized.module, images, score_thresh=0.3)
    for a, b in zip(want, got):
        from ocula.data.boxes import box_iou_np as box_iou

        assert sorted(a["labels"].tolist()) == sorted(b["labels"].tolist())
        assert box_iou(a["boxes"], b["boxes"]).max(1).min() > 0.8
    rcnn, args = detect.build_detector("faster-rcnn", 3)
    save_model(tmp_path / "rcnn.ocula", rcnn, detect.model_info("faster-rcnn", CLASSES, args, "bccd", SIZE))
    with pytest.raises(OculaError, match="int8 quantizes fcos among detectors"):
        ocula.compress(tmp_path / "rcnn.ocula", "int8", tmp_path / "rcnn.onnx")


def test_batch_mates_do_not_change_an_images_detections(trained):
    model, pairs = trained
    wide = np.ascontiguousarray(pairs[0][0][:64])  # another aspect: padded below, unlike its batch mate
    alone = detect.detect_images(model, [wide])[0]
    together = detect.detect_images(model, [wide, pairs[1][0]])[0]
    assert len(alone["labels"]) and np.array_equal(alone["labels"], together["labels"])
    np.testing.assert_allclose(alone["boxes"], together["boxes"], atol=1e-3)


def test_nms_tuning_runs_the_network_once(trained, monkeypatch):
    model, pairs = trained
    calls = []
    forward = type(model).forward
    monkeypatch.setattr(type(model), "forward", lambda self, x: calls.append(1) or forward(self, x))
    data = type("Pairs", (), {"__len__": lambda s: 2, "__getitem__": lambda s, i: pairs[i], "classes": CLASSES})()
    scores = detect.tune_nms(model, data)
    assert len(calls) == 1 and model.info.preprocess["nms_thresh"] == max(scores, key=scores.get)


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


@pytest.mark.parametrize("kind", ["seconds", "steps"])
def test_budget_schedules_the_rate_and_stops(kind, monkeypatch):
    from types import SimpleNamespace

    from ocula.engine import callbacks

    clock = [100.0]  # a fake wall clock, advanced by hand
    monkeypatch.setattr(callbacks.time, "perf_counter", lambda: clock[0])
    param = torch.nn.Parameter(torch.zeros(1))
    stopped = []
    trainer = SimpleNamespace(optimizer=torch.optim.SGD([param], lr=1.0), config=SimpleNamespace(lr=1.0),
                              stop=stopped.append)
    budget = callbacks.LearningRateBudget(**{kind: 10})
    budget.on_train_begin(trainer)
    lr = lambda: trainer.optimizer.param_groups[0]["lr"]  # noqa: E731
    assert lr() == pytest.approx(0.05)  # warm-up starts low
    for _ in range(5):
        clock[0] += 1.0
        budget.on_batch_end(trainer, 1.0)
    assert lr() == pytest.approx(0.02 + 0.98 * 0.5 * (1 + np.cos(np.pi * 0.47 / 0.97))) and not stopped  # cosine
    state = budget.state_dict()
    for _ in range(5):
        clock[0] += 1.0
        budget.on_batch_end(trainer, 1.0)
    assert stopped and lr() == pytest.approx(0.02)
    resumed = callbacks.LearningRateBudget(**{kind: 10})  # a resumed run continues where the budget stood
    resumed.load_state_dict(state)
    resumed.on_train_begin(trainer)
    assert 0.3 < lr() < 1.0


def test_faster_rcnn_takes_a_torchvision_backbone_checkpoint(tmp_path):
    from ocula.models.backbones import build_backbone
    from ocula.tasks.detect import build_detector

    resnet = build_backbone("resnet18")  # same names as torchvision's resnet18, classifier included
    torch.save(resnet.state_dict(), tmp_path / "resnet18.pth")
    model, args = build_detector("faster-rcnn", 3, backbone_weights=tmp_path / "resnet18.pth")
    assert args["norm_layer"] == "batch"
    assert torch.equal(model.backbone.body.layer1[0].conv1.weight, resnet.layer1[0].conv1.weight)
    # Fine-tuning at batch size 4 keeps the checkpoint's batch-norm statistics (frozen, as torchvision does).
    bn = model.backbone.body.layer1[0].bn1
    before = bn.running_mean.clone()
    model.backbone.body.train()(torch.rand(2, 3, 64, 64))
    assert torch.equal(bn.running_mean, before) and not any(p.requires_grad for p in bn.parameters())
    with pytest.raises(OculaError, match="faster-rcnn"):
        build_detector("fcos", 3, backbone_weights=tmp_path / "resnet18.pth")


def test_faster_rcnn_preset_trains_in_bf16_channels_last_on_the_csp_pan_features():
    """The preset's recipe: CSP/PAN maps p3..p5, RoIAlign on bf16 maps (sampled in float32), float32 losses."""
    from ocula.tasks.detect import build_detector

    model, args = build_detector("faster-rcnn", 3)
    assert args["backbone"] == "csp-pan" and model.featmap_names == ["p3", "p4", "p5"]
    model = model.to(memory_format=torch.channels_last).train()
    images = [torch.rand(3, 128, 160) for _ in range(2)]
    targets = [{"boxes": torch.tensor([[10.0, 20.0, 60.0, 70.0]]), "labels": torch.tensor([1])}] * 2
    with torch.autocast("cpu", dtype=torch.bfloat16):
        losses = model(images, targets)
    assert all(v.dtype == torch.float32 and torch.isfinite(v) for v in losses.values())
    sum(losses.values()).backward()
    assert all(p.grad is not None for p in model.roi_heads.parameters())


def test_greedy_match_takes_each_truth_once_in_score_order():
    overlap = np.array([[0.9, 0.6], [0.8, 0.1], [0.3, 0.55]])  # rows: detections by falling score
    assert detect.greedy_match(overlap).tolist() == [0, -1, 1]  # row 1's best truth is taken, 0.1 is too low
    assert detect.greedy_match(overlap, iou=0.05).tolist() == [0, 1, -1]
    assert detect.greedy_match(np.zeros((2, 0))).tolist() == [-1, -1]


def test_detection_refuses_a_second_moving_average(tmp_path):
    config = detect.default_config("fcos", ema=0.99)
    with pytest.raises(OculaError, match="always keeps its own moving average"):
        detect.fit("fcos", [], None, config, run_dir=tmp_path, minutes=None)
