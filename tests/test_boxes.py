"""Box arithmetic and NMS: hand-computed values and slow reference loops."""

import math

import pytest
import torch

from ocula.models.detection import boxes as B
from ocula.models.detection.boxes import (BoxCoder, batched_nms, box_area, box_iou, clip_boxes_to_image,
                                          generalized_iou, nms, remove_small_boxes)


def ref_nms(boxes, scores, thr):
    """The textbook greedy loop, one box at a time."""
    order = sorted(range(len(scores)), key=lambda i: (-float(scores[i]), i))
    keep, removed = [], set()
    for pos, i in enumerate(order):
        if i in removed:
            continue
        keep.append(i)
        rest = [j for j in order[pos + 1:] if j not in removed]
        if rest:
            iou = box_iou(boxes[i:i + 1], boxes[rest])[0]
            removed.update(j for j, v in zip(rest, iou.tolist()) if v > thr)
    return keep


def rand_boxes(n, size=100.0, max_wh=30.0, seed=0):
    g = torch.Generator().manual_seed(seed)
    xy = torch.rand(n, 2, generator=g) * size
    wh = torch.rand(n, 2, generator=g) * max_wh
    return torch.cat([xy, xy + wh], dim=1)


def test_area_and_iou_hand_values():
    a = torch.tensor([[0.0, 0.0, 10.0, 10.0], [5.0, 5.0, 15.0, 15.0], [20.0, 20.0, 20.0, 30.0]])
    assert box_area(a).tolist() == [100.0, 100.0, 0.0]
    iou = box_iou(a, a)
    assert iou[0, 1].item() == pytest.approx(25 / 175)
    assert iou[0, 0].item() == 1.0
    assert iou[2, 2].item() == 0.0  # zero-area box: IoU 0, not NaN
    assert not torch.isnan(iou).any()
    b = torch.tensor([[0.0, 0.0, 10.0, 5.0], [10.0, 0.0, 20.0, 10.0]])
    assert box_iou(a[:1], b).tolist() == [[0.5, 0.0]]  # half-covered box; boxes touching at an edge


def test_generalized_iou_hand_values_and_gradients():
    a = torch.tensor([[0.0, 0.0, 10.0, 10.0], [0.0, 0.0, 10.0, 10.0], [0.0, 0.0, 10.0, 10.0], [3.0, 3.0, 3.0, 3.0]],
                     requires_grad=True)
    b = torch.tensor([[5.0, 5.0, 15.0, 15.0], [20.0, 0.0, 30.0, 10.0], [0.0, 0.0, 10.0, 10.0], [3.0, 3.0, 3.0, 3.0]])
    giou, iou = generalized_iou(a, b)
    # overlap: IoU 25/175, hull 15x15 = 225; apart: IoU 0, hull 30x10 = 300 of which the union covers 200;
    # identical: 1; two zero-area boxes: 0
    torch.testing.assert_close(iou, torch.tensor([25 / 175, 0.0, 1.0, 0.0]))
    torch.testing.assert_close(giou, torch.tensor([25 / 175 - 50 / 225, -100 / 300, 1.0, 0.0]))
    torch.testing.assert_close(iou, box_iou(a, b).diagonal())  # one IoU for every caller
    (giou.sum() + iou.sum()).backward()
    assert torch.isfinite(a.grad).all()  # no NaN from the empty union and hull of the zero-area pair
    assert a.grad[1].abs().sum() > 0  # boxes apart still pull toward each other


def test_clip_and_remove_small():
    boxes = torch.tensor([[-5.0, -3.0, 50.0, 20.0], [10.0, 10.0, 10.5, 30.0], [1.0, 2.0, 3.0, 4.0]])
    clipped = clip_boxes_to_image(boxes, (16, 40))  # (height, width)
    assert clipped.tolist() == [[0.0, 0.0, 40.0, 16.0], [10.0, 10.0, 10.5, 16.0], [1.0, 2.0, 3.0, 4.0]]
    assert remove_small_boxes(clipped, 1.0).tolist() == [0, 2]


def test_box_coder_hand_values_and_round_trip():
    anchor = torch.tensor([[0.0, 0.0, 10.0, 20.0]])
    gt = torch.tensor([[5.0, 10.0, 25.0, 30.0]])  # centre (15, 20) vs (5, 10); size (20, 20) vs (10, 20)
    t = BoxCoder().encode(gt, anchor)
    torch.testing.assert_close(t, torch.tensor([[1.0, 0.5, math.log(2.0), 0.0]]))
    coder = BoxCoder(weights=(10.0, 10.0, 5.0, 5.0))
    torch.testing.assert_close(coder.encode(gt, anchor), torch.tensor([[10.0, 5.0, 5 * math.log(2.0), 0.0]]))
    ref = rand_boxes(50, seed=1) + torch.tensor([0.0, 0.0, 1.0, 1.0])
    tgt = rand_boxes(50, seed=2) + torch.tensor([0.0, 0.0, 1.0, 1.0])
    torch.testing.assert_close(coder.decode(coder.encode(tgt, ref), ref), tgt, atol=1e-4, rtol=1e-5)
    # class-specific deltas [N, 4K] decode to [N, 4K]
    deltas = torch.cat([coder.encode(tgt, ref), torch.zeros(50, 4)], dim=1)
    out = coder.decode(deltas, ref)
    assert out.shape == (50, 8)
    torch.testing.assert_close(out[:, 4:], ref)


def test_box_coder_clamps_huge_deltas():
    anchor = torch.tensor([[0.0, 0.0, 16.0, 16.0]])
    out = BoxCoder().decode(torch.tensor([[0.0, 0.0, 100.0, 100.0]]), anchor)
    assert torch.isfinite(out).all()
    assert (out[0, 2] - out[0, 0]).item() == pytest.approx(1000.0, rel=1e-4)  # 16 * exp(log(1000 / 16))


@pytest.mark.parametrize("thr", [0.0, 0.3, 0.5, 0.7, 0.9])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_nms_matches_greedy_loop(thr, seed):
    boxes = rand_boxes(300, seed=seed)
    g = torch.Generator().manual_seed(seed)
    scores = torch.randint(0, 20, (300,), generator=g).float()  # many ties
    boxes[::7] = boxes[3]  # exact duplicates
    boxes[5::11, 2] = boxes[5::11, 0]  # zero-width boxes
    keep = nms(boxes, scores, thr)
    assert keep.tolist() == ref_nms(boxes, scores, thr)
    # scores come back in decreasing order
    assert (scores[keep][1:] <= scores[keep][:-1]).all()


def test_nms_both_strategies_agree_on_dense_and_sparse(monkeypatch):
    dense = rand_boxes(600, size=20.0, max_wh=40.0, seed=3)  # heavy overlap: many suppressed
    sparse = rand_boxes(600, size=500.0, max_wh=30.0, seed=4)
    scores = torch.rand(600, generator=torch.Generator().manual_seed(5))
    for boxes in (dense, sparse):
        want = ref_nms(boxes, scores, 0.5)
        assert nms(boxes, scores, 0.5).tolist() == want
        order = torch.sort(scores, descending=True, stable=True).indices
        assert order[B._nms_blocks(boxes[order], 0.5, block_size=64)].tolist() == want
        assert order[B._nms_sweep(boxes[order], 0.5)].tolist() == want
    monkeypatch.setattr(B, "_SWEEP_MAX_PAIRS", 10)  # too many candidate pairs: falls back to blocks
    assert B._nms_sweep(dense, 0.5) is None
    assert nms(dense, scores, 0.5).tolist() == ref_nms(dense, scores, 0.5)


def test_nms_small_cases():
    assert nms(torch.zeros(0, 4), torch.zeros(0), 0.5).numel() == 0
    boxes = torch.tensor([[0.0, 0.0, 10.0, 10.0], [1.0, 1.0, 11.0, 11.0], [50.0, 50.0, 60.0, 60.0]])
    assert nms(boxes, torch.tensor([0.9, 0.8, 0.7]), 0.5).tolist() == [0, 2]
    assert nms(boxes, torch.tensor([0.8, 0.9, 0.7]), 0.5).tolist() == [1, 2]
    assert nms(boxes, torch.tensor([0.8, 0.9, 0.7]), 0.9).tolist() == [1, 0, 2]  # IoU 0.68 < 0.9
    # a chain: 0 suppresses 1, so 2 (only overlapping 1) survives
    chain = torch.tensor([[0.0, 0.0, 10.0, 10.0], [4.0, 0.0, 14.0, 10.0], [8.0, 0.0, 18.0, 10.0]])
    assert nms(chain, torch.tensor([3.0, 2.0, 1.0]), 0.4).tolist() == [0, 2]


def test_batched_nms_is_per_label():
    boxes = torch.tensor([[0.0, 0.0, 10.0, 10.0], [1.0, 1.0, 11.0, 11.0], [1.0, 1.0, 11.0, 11.0]])
    scores = torch.tensor([0.9, 0.8, 0.7])
    assert batched_nms(boxes, scores, torch.tensor([0, 1, 1]), 0.5).tolist() == [0, 1]
    boxes, labels = rand_boxes(200, seed=6), torch.randint(0, 4, (200,), generator=torch.Generator().manual_seed(6))
    scores = torch.rand(200, generator=torch.Generator().manual_seed(7))
    want = []
    for c in range(4):
        idx = torch.nonzero(labels == c).flatten()
        want += idx[nms(boxes[idx], scores[idx], 0.5)].tolist()
    assert sorted(batched_nms(boxes, scores, labels, 0.5).tolist()) == sorted(want)


@pytest.mark.filterwarnings("ignore::DeprecationWarning")  # the TorchScript exporter, as ocula.export uses
def test_box_ops_export_to_onnx(tmp_path):
    ort = pytest.importorskip("onnxruntime")

    class Decode(torch.nn.Module):
        def forward(self, deltas, anchors, gt):
            boxes = clip_boxes_to_image(BoxCoder((10.0, 10.0, 5.0, 5.0)).decode(deltas, anchors), (100, 120))
            return boxes, box_iou(boxes, gt), box_area(boxes)

    g = torch.Generator().manual_seed(0)
    anchors = rand_boxes(50, seed=8) + torch.tensor([0.0, 0.0, 1.0, 1.0])
    deltas, gt = torch.randn(50, 4, generator=g), anchors[:5].clone()
    path = tmp_path / "boxes.onnx"
    torch.onnx.export(Decode(), (deltas, anchors, gt), str(path), dynamo=False, input_names=["d", "a", "g"],
                      dynamic_axes={"d": {0: "n"}, "a": {0: "n"}, "g": {0: "m"}})
    session = ort.InferenceSession(str(path))
    deltas, anchors = deltas[:30], anchors[:30]  # another box count than at export
    got = session.run(None, {"d": deltas.numpy(), "a": anchors.numpy(), "g": gt.numpy()})
    for g_out, want in zip(got, Decode()(deltas, anchors, gt)):
        torch.testing.assert_close(torch.from_numpy(g_out), want)
