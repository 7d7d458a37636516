"""Anchors, RPN labelling/sampling/proposals, RoI heads and a tiny Faster R-CNN that must learn two images; both
detectors (Faster R-CNN and FCOS) on the data's device and under bf16 autocast."""

import math
from collections import OrderedDict
from functools import partial

import pytest
import torch
from torch import nn

from ocula.errors import OculaError
from ocula.models.detection.anchors import AnchorGenerator, anchors_inside
from ocula.models.detection.boxes import box_iou
from ocula.models.detection.faster_rcnn import FasterRCNN
from ocula.models.detection.fcos import FCOS, FCOSLoss, decode, postprocess
from ocula.models.detection.roi import MultiScaleRoIAlign
from ocula.models.detection.roi_heads import FastRCNNPredictor, RoIHeads, TwoMLPHead, match_proposals
from ocula.models.detection.rpn import RegionProposalNetwork, RPNHead, label_anchors, sample_labels


class TinyBackbone(nn.Module):
    """Three stride-2 convs: one 16-channel map at stride 8."""

    def __init__(self):
        super().__init__()
        self.body = nn.Sequential(nn.Conv2d(3, 8, 3, 2, 1), nn.ReLU(), nn.Conv2d(8, 16, 3, 2, 1), nn.ReLU(),
                                  nn.Conv2d(16, 16, 3, 2, 1), nn.ReLU())
        self.out_channels = 16
        self.stride = 8

    def forward(self, x):
        return self.body(x)


class TinyPyramid(nn.Module):
    """Two 16-channel levels at strides 4 and 8, returned as an OrderedDict like an FPN; strides not declared."""

    def __init__(self):
        super().__init__()
        self.c1 = nn.Sequential(nn.Conv2d(3, 16, 3, 2, 1), nn.ReLU(), nn.Conv2d(16, 16, 3, 2, 1), nn.ReLU())
        self.c2 = nn.Sequential(nn.Conv2d(16, 16, 3, 2, 1), nn.ReLU())
        self.out_channels = {"p2": 16, "p3": 16}

    def forward(self, x):
        a = self.c1(x)
        return OrderedDict(p2=a, p3=self.c2(a))


def tiny_model(backbone=None, **kwargs):
    args = dict(backbone=backbone or TinyBackbone(), num_classes=2, anchor_sizes=((16, 32),),
                rpn_pre_nms_top_n_train=300, rpn_post_nms_top_n_train=100, rpn_pre_nms_top_n_test=300,
                rpn_post_nms_top_n_test=50, rpn_ignore_cross_boundary=False, box_representation_size=64,
                box_batch_size_per_image=64)
    args.update(kwargs)
    return FasterRCNN(**args)


def synthetic_pair():
    """Two 64x64 images: red squares are class 0, blue rectangles class 1, on a dark noisy background."""
    g = torch.Generator().manual_seed(0)
    images = [0.1 * torch.rand(3, 64, 64, generator=g) for _ in range(2)]
    boxes = [torch.tensor([[8.0, 8.0, 28.0, 28.0], [36.0, 30.0, 60.0, 46.0]]),
             torch.tensor([[30.0, 6.0, 52.0, 28.0]])]
    labels = [torch.tensor([0, 1]), torch.tensor([0])]
    for img, bs, ls in zip(images, boxes, labels):
        for (x1, y1, x2, y2), lab in zip(bs.long().tolist(), ls.tolist()):
            img[0 if lab == 0 else 2, y1:y2, x1:x2] = 0.9
    return images, [{"boxes": b, "labels": lab} for b, lab in zip(boxes, labels)]


# ---------------------------------------------------------------- anchors

def test_default_anchors_are_the_papers_nine():
    gen = AnchorGenerator()
    assert gen.num_anchors_per_location() == [9]
    cell = gen.cell_anchors(0)
    w, h = cell[:, 2] - cell[:, 0], cell[:, 3] - cell[:, 1]
    torch.testing.assert_close(w * h, torch.tensor([128.0, 256, 512] * 3) ** 2)
    torch.testing.assert_close(h / w, torch.tensor([0.5] * 3 + [1.0] * 3 + [2.0] * 3))
    (anchors,) = gen([(38, 50)], [(16, 16)])
    assert anchors.shape == (38 * 50 * 9, 4)
    centres = (anchors[:, :2] + anchors[:, 2:]) / 2
    grid = centres.reshape(38, 50, 9, 2)
    # every anchor of cell (row 2, col 3) is centred on that cell's patch centre
    torch.testing.assert_close(grid[2, 3], torch.tensor([[3.5 * 16, 2.5 * 16]]).expand(9, 2))
    torch.testing.assert_close(grid[0, 1, 0] - grid[0, 0, 0], torch.tensor([16.0, 0.0]))


def test_anchor_levels_and_cross_boundary():
    gen = AnchorGenerator(sizes=((32,), (64,)), aspect_ratios=((1.0,), (1.0,)))
    a2, a3 = gen([(4, 4), (2, 2)], [(8, 8), (16, 16)])
    assert a2.shape == (16, 4) and a3.shape == (4, 4)
    assert a2[0].tolist() == [-12.0, -12.0, 20.0, 20.0]
    inside = anchors_inside(a2, (32, 32))
    assert inside.sum().item() == 0  # 32-pixel anchors on a 32-pixel image always stick out
    assert anchors_inside(a2, (32, 32), allowed_border=12).sum().item() == 16
    with pytest.raises(OculaError):
        gen([(4, 4)], [(8, 8)])
    with pytest.raises(OculaError):
        AnchorGenerator(sizes=((32,),), aspect_ratios=((1.0,), (2.0,)))


# ---------------------------------------------------------------- RPN

def test_label_anchors_rules():
    gt = torch.tensor([[0.0, 0.0, 10.0, 10.0], [100.0, 100.0, 140.0, 140.0]])
    anchors = torch.tensor([
        [0.0, 0.0, 10.0, 14.0],  # IoU 0.714 with gt0 -> positive
        [0.0, 0.0, 10.0, 20.0],  # IoU 0.5 -> ignored
        [0.0, 0.0, 10.0, 40.0],  # IoU 0.25 -> negative
        [50.0, 50.0, 60.0, 60.0],  # no overlap -> negative
        [100.0, 100.0, 120.0, 120.0],  # IoU 0.25 but gt1's best -> positive
        [120.0, 120.0, 140.0, 140.0],  # ties with the one above -> positive too
        [0.0, 0.0, 10.0, 10.0],  # IoU 1 -> positive
    ])
    labels, matched = label_anchors(anchors, gt)
    assert labels.tolist() == [1, -1, 0, 0, 1, 1, 1]
    assert matched[[0, 4, 5, 6]].tolist() == [0, 1, 1, 0]
    # the exact anchor is cross-boundary: it is ignored, and gt0's best valid anchor (row 0) stays positive
    valid = torch.tensor([True] * 6 + [False])
    labels, _ = label_anchors(anchors, gt, valid=valid)
    assert labels.tolist() == [1, -1, 0, 0, 1, 1, -1]
    # a zero-area gt overlaps nothing: it must not turn every IoU-0 anchor into its "best" positive
    labels, _ = label_anchors(anchors, torch.tensor([[5.0, 5.0, 5.0, 9.0]]))
    assert labels.tolist() == [0] * 7
    labels, _ = label_anchors(anchors, torch.zeros((0, 4)), valid=valid)
    assert labels.tolist() == [0] * 6 + [-1]


def test_sample_labels_counts():
    g = torch.Generator().manual_seed(0)
    labels = torch.tensor([1] * 1000 + [0] * 5000 + [-1] * 100)
    pos, neg = sample_labels(labels, batch_size=256, positive_fraction=0.5, generator=g)
    assert (pos.numel(), neg.numel()) == (128, 128)
    assert (labels[pos] == 1).all() and (labels[neg] == 0).all() and len(set(pos.tolist())) == 128
    labels = torch.tensor([1] * 10 + [0] * 5000)
    pos, neg = sample_labels(labels, batch_size=256, positive_fraction=0.5, generator=g)
    assert (pos.numel(), neg.numel()) == (10, 246)  # too few positives: negatives fill the minibatch
    labels = torch.tensor([3] * 500 + [0] * 20)  # RoI head: class indices, 25% foreground of 512
    pos, neg = sample_labels(labels, batch_size=512, positive_fraction=0.25, generator=g)
    assert (pos.numel(), neg.numel()) == (128, 20)


def test_rpn_proposals_and_losses():
    torch.manual_seed(0)
    rpn = RegionProposalNetwork(anchor_generator=AnchorGenerator(sizes=((16, 32),)),
                                head=RPNHead(in_channels=8, num_anchors=6), pre_nms_top_n_train=100,
                                post_nms_top_n_train=20, pre_nms_top_n_test=50, post_nms_top_n_test=7,
                                ignore_cross_boundary=False)
    feats = [torch.randn(2, 8, 8, 8)]
    sizes = [(64, 64), (40, 50)]
    targets = [{"boxes": torch.tensor([[8.0, 8.0, 30.0, 30.0]])}, {"boxes": torch.zeros((0, 4))}]
    proposals, losses = rpn(feats, [(8, 8)], sizes, targets)
    assert [p.shape[0] for p in proposals] == [20, 20]
    for p, (h, w) in zip(proposals, sizes):
        assert (p[:, 0] >= 0).all() and (p[:, 2] <= w).all() and (p[:, 3] <= h).all()
        assert ((p[:, 2] - p[:, 0]) > 0).all()
    assert set(losses) == {"loss_objectness", "loss_rpn_box_reg"}
    # an untrained head predicts ~0.5 everywhere: BCE ~ log 2; regression of the positives is non-zero
    assert losses["loss_objectness"].item() == pytest.approx(math.log(2), abs=0.05)
    assert losses["loss_rpn_box_reg"].item() > 0
    sum(losses.values()).backward()
    assert rpn.head.conv.weight.grad.abs().sum() > 0
    rpn.eval()
    proposals, losses = rpn(feats, [(8, 8)], sizes)
    assert [p.shape[0] for p in proposals] == [7, 7] and losses == {}


def test_rpn_head_shapes_and_init():
    head = RPNHead(in_channels=32, num_anchors=9)
    logits, deltas = head([torch.zeros(1, 32, 5, 7)])
    assert logits[0].shape == (1, 9, 5, 7) and deltas[0].shape == (1, 36, 5, 7)
    assert head.cls_logits.weight.std().item() == pytest.approx(0.01, rel=0.3)


# ---------------------------------------------------------------- RoI heads

def test_match_proposals_thresholds():
    gt = torch.tensor([[0.0, 0.0, 10.0, 10.0]])
    props = torch.tensor([[0.0, 0.0, 10.0, 20.0],  # IoU 0.5 -> foreground
                          [0.0, 0.0, 10.0, 20.5],  # IoU 0.488 -> background
                          [50.0, 50.0, 60.0, 60.0]])  # IoU 0 -> background (low threshold 0)
    labels, _ = match_proposals(props, gt, torch.tensor([4]))
    assert labels.tolist() == [5, 0, 0]  # user class 4 is index 5: 0 is background
    labels, _ = match_proposals(props, gt, torch.tensor([4]), bg_iou_thresh_low=0.1)
    assert labels.tolist() == [5, 0, -1]  # Fast R-CNN's [0.1, 0.5) background leaves IoU-0 RoIs unused
    labels, _ = match_proposals(props, torch.zeros((0, 4)), torch.zeros(0, dtype=torch.int64))
    assert labels.tolist() == [0, 0, 0]


def _roi_heads(num_classes=2, **kwargs):
    pooler = MultiScaleRoIAlign(featmap_names=["0"], output_size=2, sampling_ratio=2, strides=[8])
    head = TwoMLPHead(in_channels=4, pool_size=2, representation_size=8)
    return RoIHeads(box_roi_pool=pooler, box_head=head,
                    box_predictor=FastRCNNPredictor(in_features=8, num_classes=num_classes), **kwargs)


def test_roi_heads_sampling_adds_gt_and_caps_foreground():
    heads = _roi_heads(batch_size_per_image=16, positive_fraction=0.25)
    gt = torch.tensor([[10.0, 10.0, 30.0, 30.0]])
    near = gt + torch.randn(40, 4) * 0.5  # 40 foreground proposals
    far = torch.tensor([[40.0, 40.0, 60.0, 60.0]]).repeat(40, 1)
    rois, labels, targets = heads.select_training_samples([torch.cat([near, far])],
                                                          [{"boxes": gt, "labels": torch.tensor([1])}])
    assert rois[0].shape[0] == 16 and (labels[0] == 2).sum() == 4 and (labels[0] == 0).sum() == 12
    assert (targets[0][labels[0] == 0] == 0).all()
    # no proposals at all: the gt box itself is the one foreground RoI, with a zero regression target
    rois, labels, targets = heads.select_training_samples([torch.zeros((0, 4))],
                                                          [{"boxes": gt, "labels": torch.tensor([0])}])
    assert labels[0].tolist() == [1] and rois[0].tolist() == gt.tolist() and targets[0].abs().sum() == 0


def test_roi_heads_postprocess():
    heads = _roi_heads(score_thresh=0.3, nms_thresh=0.5, detections_per_img=10)
    props = torch.tensor([[10.0, 10.0, 30.0, 30.0], [11.0, 11.0, 31.0, 31.0], [40.0, 40.0, 50.0, 50.0]])
    logits = torch.tensor([[0.0, 5.0, 0.0], [0.0, 4.0, 0.0], [5.0, 0.0, 0.0]])  # bg first
    deltas = torch.zeros(3, 12)
    (det,) = heads.postprocess(logits, deltas, [props], [(45, 64)])
    # two overlapping class-0 boxes -> NMS keeps the better one; the third RoI is background
    assert det["labels"].tolist() == [0]
    torch.testing.assert_close(det["boxes"], props[:1])
    assert det["scores"].item() == pytest.approx(math.exp(5) / (math.exp(5) + 2), rel=1e-5)
    # boxes are clipped to the image: (45 high)
    deltas[0, 4:8] = torch.tensor([0.0, 0.0, 10.0, 10.0])  # class 0 deltas: grow a lot
    (det,) = heads.postprocess(logits, deltas, [props], [(45, 64)])
    assert det["boxes"][0].tolist() == [0.0, 0.0, 64.0, 45.0]


# ---------------------------------------------------------------- the whole detector

def test_training_returns_finite_losses_and_eval_returns_detections():
    torch.manual_seed(0)
    model = tiny_model()
    images, targets = synthetic_pair()
    losses = model(images, targets)
    assert set(losses) == {"loss_objectness", "loss_rpn_box_reg", "loss_classifier", "loss_box_reg"}
    assert all(torch.isfinite(v) for v in losses.values())
    model.eval()
    with torch.no_grad():
        out = model([images[0], images[1][:, :50, :40]])
    assert len(out) == 2 and set(out[1]) == {"boxes", "scores", "labels"}
    assert (out[1]["boxes"][:, 2] <= 40).all() and (out[1]["boxes"][:, 3] <= 50).all()
    for det in out:
        assert det["boxes"].shape[0] == det["scores"].shape[0] == det["labels"].shape[0] <= 100
        assert ((det["labels"] >= 0) & (det["labels"] < 2)).all()


def test_overfits_two_images():
    torch.manual_seed(0)
    model = tiny_model()
    images, targets = synthetic_pair()
    opt = torch.optim.Adam(model.parameters(), lr=5e-3)
    history = []
    for _ in range(30):
        losses = model(images, targets)
        total = sum(losses.values())
        assert torch.isfinite(total)
        opt.zero_grad()
        total.backward()
        opt.step()
        history.append(total.item())
    assert sum(history[-5:]) / 5 < 0.5 * sum(history[:5]) / 5, history
    model.eval()
    with torch.no_grad():
        detections = model(images)
    for det, target in zip(detections, targets):  # every object is found, with its class
        for box, label in zip(target["boxes"], target["labels"]):
            same = det["labels"] == label
            assert box_iou(box[None], det["boxes"][same]).max() > 0.5, (box, det)


def test_images_without_boxes_and_zero_area_boxes_train_without_nan():
    torch.manual_seed(0)
    model = tiny_model(rpn_ignore_cross_boundary=True, anchor_sizes=((8, 16),))
    images, _ = synthetic_pair()
    targets = [{"boxes": torch.zeros((0, 4)), "labels": torch.zeros(0, dtype=torch.int64)},
               {"boxes": torch.tensor([[10.0, 10.0, 10.0, 30.0], [5.0, 5.0, 20.0, 5.0], [30.0, 30.0, 50.0, 50.0]]),
                "labels": torch.tensor([0, 1, 1])}]
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    for batch in (targets, [targets[0], targets[0]], [targets[1], {"boxes": [], "labels": []}]):
        losses = model(images, batch)
        assert all(torch.isfinite(v) for v in losses.values()), losses
        opt.zero_grad()
        sum(losses.values()).backward()
        assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)
        opt.step()
    no_boxes = model(images, [targets[0], targets[0]])
    assert no_boxes["loss_rpn_box_reg"].item() == 0 and no_boxes["loss_box_reg"].item() == 0


def test_pyramid_backbone_and_roi_pool():
    torch.manual_seed(0)
    images, targets = synthetic_pair()
    model = tiny_model(TinyPyramid(), anchor_sizes=None)
    assert model.rpn.anchor_generator.sizes == [(32.0,), (64.0,)]
    losses = model(images, targets)
    assert all(torch.isfinite(v) for v in losses.values())
    model.eval()
    assert len(model(images)) == 2
    model = tiny_model(roi_op="pool")
    assert all(torch.isfinite(v) for v in model(images, targets).values())


def test_pyramid_defaults_from_declared_strides():
    class Declared(nn.Module):  # only the attributes FasterRCNN reads at construction
        out_channels = 8
        strides = {"p4": 16, "p5": 32, "p6": 64}

    model = FasterRCNN(backbone=Declared(), num_classes=1)
    assert model.rpn.anchor_generator.sizes == [(128.0,), (256.0,), (512.0,)]  # 8 x stride, 3 ratios each
    assert model.rpn.anchor_generator.num_anchors_per_location() == [3, 3, 3]
    assert model.roi_heads.box_roi_pool.featmap_names == ["p4", "p5"]  # P6 feeds the RPN only


def test_bad_input_raises_one_line_errors():
    model = tiny_model()
    images, targets = synthetic_pair()
    with pytest.raises(OculaError, match="needs targets"):
        model(images)
    with pytest.raises(OculaError, match="labels outside"):
        model(images, [targets[0], {"boxes": torch.tensor([[0.0, 0, 5, 5]]), "labels": torch.tensor([2])}])
    with pytest.raises(OculaError, match="2 targets for 1"):
        model(images[:1], targets)
    with pytest.raises(OculaError, match="expected"):
        model([torch.rand(1, 32, 32)], targets[:1])
    uneven = TinyPyramid()
    uneven.out_channels = {"p2": 16, "p3": 32}
    with pytest.raises(OculaError, match="different widths"):
        FasterRCNN(backbone=uneven, num_classes=1)
    with pytest.raises(OculaError):
        tiny_model(roi_op="warp")
    with pytest.raises(OculaError):
        FasterRCNN(backbone=nn.Conv2d(3, 4, 3), num_classes=1)



def test_document_defaults_train_and_detect():
    class Stride16(TinyBackbone):
        def __init__(self):
            super().__init__()
            self.body.append(nn.Conv2d(16, 16, 3, 2, 1))
            self.stride = 16

    torch.manual_seed(0)
    model = FasterRCNN(backbone=Stride16(), num_classes=3)
    rpn, heads = model.rpn, model.roi_heads
    assert rpn.anchor_generator.num_anchors_per_location() == [9]
    assert (rpn.pre_nms_top_n, rpn.post_nms_top_n) == ({"train": 12000, "test": 6000}, {"train": 2000, "test": 300})
    assert (rpn.fg_iou_thresh, rpn.bg_iou_thresh, rpn.nms_thresh, rpn.batch_size_per_image) == (0.7, 0.3, 0.7, 256)
    assert rpn.ignore_cross_boundary and heads.batch_size_per_image == 512 and heads.positive_fraction == 0.25
    images = [torch.rand(3, 300, 400), torch.rand(3, 280, 380)]
    targets = [{"boxes": torch.tensor([[50.0, 60.0, 250.0, 220.0]]), "labels": torch.tensor([2])},
               {"boxes": torch.tensor([[10.0, 10.0, 200.0, 260.0]]), "labels": torch.tensor([0])}]
    losses = model(images, targets)
    assert all(torch.isfinite(v) for v in losses.values()) and losses["loss_rpn_box_reg"] > 0
    model.eval()
    with torch.no_grad():
        out = model(images)
    assert all(d["boxes"].shape[0] <= 100 for d in out)


# ---------------------------------------------------------------- device and dtype, both detectors

def fcos_case(device):
    """A function running FCOS on `device`: FCOSLoss (an image without boxes, an ignored class), backward, then
    eval decoding and NMS. Returns (losses, detections)."""
    torch.manual_seed(0)
    model = FCOS(num_classes=3, widths=(8, 16, 32, 32, 32), depths=(1, 1, 1, 1), neck_width=32).to(device)
    x = torch.rand(2, 3, 64, 96, device=device) * 255
    targets = [{"boxes": torch.tensor([[4.0, 4.0, 30.0, 30.0], [40.0, 10.0, 60.0, 50.0]], device=device),
                "labels": torch.tensor([0, 2], device=device)},
               {"boxes": torch.zeros((0, 4), device=device),
                "labels": torch.zeros(0, dtype=torch.int64, device=device)}]
    ignore = torch.tensor([[False, True, False], [False, False, False]], device=device)

    def run():
        losses = FCOSLoss(num_classes=3)(model.train()(x), targets, ignore)
        sum(losses.values()).backward()
        with torch.no_grad():
            return losses, postprocess(*model.eval()(x))
    return run


def faster_rcnn_case(device, backbone=TinyBackbone, **kwargs):
    """A function running a tiny Faster R-CNN on `device`: training losses, backward, then eval detections."""
    torch.manual_seed(0)
    model = tiny_model(backbone(), **kwargs).to(device)
    images, targets = synthetic_pair()
    images = [im.to(device) for im in images]
    targets = [{k: v.to(device) for k, v in t.items()} for t in targets]

    def run():
        losses = model.train()(images, targets)
        sum(losses.values()).backward()
        with torch.no_grad():
            return losses, model.eval()(images)
    return run


CASES = {"fcos": fcos_case, "faster_rcnn": faster_rcnn_case,
         "faster_rcnn_fpn": partial(faster_rcnn_case, backbone=TinyPyramid, anchor_sizes=None),
         "faster_rcnn_roi_pool": partial(faster_rcnn_case, roi_op="pool")}


def check_outputs(losses, detections, device):
    """Finite float32 losses and float32 detections, all on `device`."""
    for name, value in losses.items():
        assert value.device.type == device and value.dtype == torch.float32 and torch.isfinite(value), name
    assert detections and all(len(d["boxes"]) for d in detections)
    for det in detections:
        assert {v.device.type for v in det.values()} == {device}
        assert det["boxes"].dtype == det["scores"].dtype == torch.float32


@pytest.mark.parametrize("case", CASES)
def test_every_new_tensor_is_made_on_the_datas_device(case):
    """Model and data on the CPU with "meta" as the default device: a tensor made without device=... lands on
    meta, and meeting the CPU data raises (on a GPU the same slip leaves it on the CPU)."""
    run = CASES[case]("cpu")
    with torch.device("meta"):
        losses, detections = run()
    check_outputs(losses, detections, "cpu")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("case", CASES)
def test_detectors_run_on_cuda(case):
    check_outputs(*CASES[case]("cuda")(), "cuda")


@pytest.mark.parametrize("case", CASES)
def test_bf16_autocast_keeps_losses_and_boxes_float32(case):
    with torch.autocast("cpu", dtype=torch.bfloat16):
        losses, detections = CASES[case]("cpu")()
    check_outputs(losses, detections, "cpu")


def test_fcos_decodes_bf16_head_outputs_in_float32():
    """Under autocast the heads give bf16; distances must be exponentiated and added in float32, or a 500-pixel
    box edge moves by whole pixels."""
    torch.manual_seed(0)
    out = [(torch.randn(1, 2, 64 // s, 64 // s), torch.randn(1, 5, 64 // s, 64 // s) + 3) for s in (8, 16, 32)]
    half = [(c.bfloat16(), r.bfloat16()) for c, r in out]
    boxes, scores = decode(half, (8, 16, 32))
    want_boxes, want_scores = decode([(c.float(), r.float()) for c, r in half], (8, 16, 32))
    assert torch.equal(boxes, want_boxes) and torch.equal(scores, want_scores)
