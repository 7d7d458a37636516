"""roi_align / roi_pool against slow pure-python references written straight from torchvision's semantics."""

import math

import pytest
import torch

from ocula.errors import OculaError
from ocula.models.detection.roi import MultiScaleRoIAlign, roi_align, roi_pool


def _bilinear(img, y, x):
    """One bilinear sample of a [H, W] list-of-lists image, torchvision style."""
    h, w = len(img), len(img[0])
    if y < -1.0 or y > h or x < -1.0 or x > w:
        return 0.0
    y, x = max(y, 0.0), max(x, 0.0)
    y0, x0 = int(y), int(x)
    if y0 >= h - 1:
        y0 = y1 = h - 1
        y = float(y0)
    else:
        y1 = y0 + 1
    if x0 >= w - 1:
        x0 = x1 = w - 1
        x = float(x0)
    else:
        x1 = x0 + 1
    ly, lx = y - y0, x - x0
    hy, hx = 1 - ly, 1 - lx
    return hy * hx * img[y0][x0] + hy * lx * img[y0][x1] + ly * hx * img[y1][x0] + ly * lx * img[y1][x1]


def ref_roi_align(feat, rois, out_size, scale, sampling_ratio, aligned):
    n_rois, c = len(rois), feat.shape[1]
    out = torch.zeros(n_rois, c, out_size, out_size, dtype=torch.float64)
    data = feat.double().tolist()
    off = 0.5 if aligned else 0.0
    for r, (b, x1, y1, x2, y2) in enumerate(rois.double().tolist()):
        sx, sy = x1 * scale - off, y1 * scale - off
        rw, rh = x2 * scale - off - sx, y2 * scale - off - sy
        if not aligned:
            rw, rh = max(rw, 1.0), max(rh, 1.0)
        bw, bh = rw / out_size, rh / out_size
        gh = sampling_ratio if sampling_ratio > 0 else math.ceil(rh / out_size)
        gw = sampling_ratio if sampling_ratio > 0 else math.ceil(rw / out_size)
        count = max(gh * gw, 1)
        for ch in range(c):
            img = data[int(b)][ch]
            for py in range(out_size):
                for px in range(out_size):
                    acc = 0.0
                    for iy in range(gh):
                        y = sy + py * bh + (iy + 0.5) * bh / gh
                        for ix in range(gw):
                            x = sx + px * bw + (ix + 0.5) * bw / gw
                            acc += _bilinear(img, y, x)
                    out[r, ch, py, px] = acc / count
    return out


def ref_roi_pool(feat, rois, out_size, scale):
    n_rois, c, h, w = len(rois), *feat.shape[1:]
    out = torch.zeros(n_rois, c, out_size, out_size)
    for r, (b, x1, y1, x2, y2) in enumerate(rois.tolist()):
        rnd = lambda v: int(math.copysign(math.floor(abs(v) + 0.5), v))  # noqa: E731  C round()
        sx, sy, ex, ey = rnd(x1 * scale), rnd(y1 * scale), rnd(x2 * scale), rnd(y2 * scale)
        rw, rh = max(ex - sx + 1, 1), max(ey - sy + 1, 1)
        bh = torch.tensor(rh, dtype=torch.float32) / out_size
        bw = torch.tensor(rw, dtype=torch.float32) / out_size
        for py in range(out_size):
            hs = min(max(int(math.floor(py * bh)) + sy, 0), h)
            he = min(max(int(math.ceil((py + 1) * bh)) + sy, 0), h)
            for px in range(out_size):
                ws = min(max(int(math.floor(px * bw)) + sx, 0), w)
                we = min(max(int(math.ceil((px + 1) * bw)) + sx, 0), w)
                if he > hs and we > ws:
                    out[r, :, py, px] = feat[int(b), :, hs:he, ws:we].amax(dim=(1, 2))
    return out


def _ramp(n=2, c=2, h=9, w=11):
    """Feature map whose value encodes its position: easy to reason about by hand."""
    y = torch.arange(h, dtype=torch.float32)[:, None]
    x = torch.arange(w, dtype=torch.float32)[None, :]
    maps = [[(10 * y + x) * (ch + 1) + 100 * b for ch in range(c)] for b in range(n)]
    return torch.stack([torch.stack(m) for m in maps])


def _rois():
    # inside, sub-pixel, partly outside, fully outside, tiny, huge, and a degenerate (x2 < x1) box
    return torch.tensor([
        [0, 1.0, 1.0, 6.0, 5.0],
        [1, 2.3, 0.7, 4.9, 3.1],
        [0, -3.0, -2.0, 4.0, 3.0],
        [1, 12.0, 10.0, 20.0, 15.0],
        [0, 5.2, 4.1, 5.4, 4.3],
        [1, -5.0, -5.0, 30.0, 25.0],
        [0, 6.0, 6.0, 4.0, 4.0],
        [0, 8.5, 7.5, 10.99, 8.99],
    ])


def test_roi_align_hand_value_on_ramp():
    # On a linear ramp bilinear sampling is exact: an interior bin's mean is the ramp at the bin centre.
    feat = _ramp(n=1, c=1)
    out = roi_align(feat, torch.tensor([[0, 1.0, 2.0, 3.0, 4.0]]), 1, 1.0, 2, aligned=False)
    # bin centre (x, y) = (2, 3) -> 10 * 3 + 2
    assert out.item() == pytest.approx(32.0, abs=1e-4)
    out = roi_align(feat, torch.tensor([[0, 1.0, 2.0, 3.0, 4.0]]), 1, 1.0, 2, aligned=True)
    assert out.item() == pytest.approx(32.0 - 5.5, abs=1e-4)  # half a pixel up-left: 10*2.5 + 1.5


@pytest.mark.parametrize("aligned", [False, True])
@pytest.mark.parametrize("sampling_ratio", [2, 0, -1, 3])
@pytest.mark.parametrize("scale", [1.0, 0.5])
def test_roi_align_matches_reference(aligned, sampling_ratio, scale):
    torch.manual_seed(0)
    feat = _ramp() + torch.randn(2, 2, 9, 11)
    rois = _rois()
    got = roi_align(feat, rois, 3, scale, sampling_ratio, aligned)
    want = ref_roi_align(feat, rois, 3, scale, sampling_ratio, aligned)
    torch.testing.assert_close(got.double(), want, atol=1e-4, rtol=1e-5)


def test_roi_align_list_of_boxes_and_gradient():
    torch.manual_seed(1)
    feat = torch.randn(2, 3, 8, 8, requires_grad=True)
    boxes = [torch.tensor([[0.0, 0.0, 4.0, 4.0]]), torch.tensor([[1.0, 1.0, 7.0, 5.0], [2.0, 2.0, 3.0, 3.0]])]
    out = roi_align(feat, boxes, (2, 3), 1.0, 2, True)
    assert out.shape == (3, 3, 2, 3)
    torch.testing.assert_close(out[0], roi_align(feat, torch.tensor([[0, 0.0, 0.0, 4.0, 4.0]]), (2, 3), 1.0, 2,
                                                 True)[0])
    # gradient of the sum: each inside sample hands weight 1/count to the map, so each bin adds exactly 1
    out.sum().backward()
    assert feat.grad.sum().item() == pytest.approx(3 * 3 * 6, rel=1e-5)  # RoIs x channels x bins
    assert feat.grad[0].sum().item() == pytest.approx(3 * 6, rel=1e-5)


def test_roi_align_empty_and_bad_input():
    feat = torch.randn(1, 2, 5, 5)
    assert roi_align(feat, torch.zeros(0, 5), 7).shape == (0, 2, 7, 7)
    with pytest.raises(OculaError):
        roi_align(feat, torch.zeros(3, 4), 7)
    with pytest.raises(OculaError):
        roi_align(feat[0], torch.zeros(3, 5), 7)
    with pytest.raises(OculaError, match="batch indices"):
        roi_align(feat, torch.tensor([[1.0, 0, 0, 2, 2]]), 7)
    with pytest.raises(OculaError, match="batch indices"):
        roi_pool(feat, [torch.zeros(1, 4), torch.zeros(1, 4)], 7)


@pytest.mark.parametrize("scale", [1.0, 0.5, 1 / 3])
def test_roi_pool_matches_reference(scale):
    torch.manual_seed(0)
    feat = torch.randn(2, 3, 9, 11)
    rois = _rois()
    got = roi_pool(feat, rois, 3, scale)
    torch.testing.assert_close(got, ref_roi_pool(feat, rois, 3, scale))
    # 10 cells pooled into 7 bins: bin edges must be computed in float32 like torchvision, not float64
    rois = torch.tensor([[0, 0.0, 0.0, 9.0, 9.0], [1, 1.0, 0.0, 10.0, 6.0]])
    torch.testing.assert_close(roi_pool(feat, rois, 7, 1.0), ref_roi_pool(feat, rois, 7, 1.0))


def test_roi_pool_hand_value_and_gradient():
    feat = _ramp(n=1, c=1).requires_grad_(True)
    out = roi_pool(feat, torch.tensor([[0, 1.0, 2.0, 4.0, 5.0]]), 2, 1.0)
    # cells x 1..4, y 2..5, two bins each way: maxima at the bottom-right cell of each bin
    assert out[0, 0].tolist() == [[32.0, 34.0], [52.0, 54.0]]
    out.sum().backward()
    assert feat.grad.sum().item() == 4 and feat.grad[0, 0, 5, 4].item() == 1


def test_multiscale_level_mapping_and_pooling():
    pooler = MultiScaleRoIAlign(featmap_names=["p2", "p3", "p4", "p5"], output_size=2, sampling_ratio=2)
    boxes = torch.tensor([[0, 0, 20, 20], [0, 0, 112, 112], [0, 0, 224, 224], [0, 0, 448, 448], [0, 0, 2000, 2000.]])
    assert pooler.map_levels(boxes, [2, 3, 4, 5]).tolist() == [0, 1, 2, 3, 3]
    torch.manual_seed(0)
    feats = {f"p{k}": torch.randn(1, 4, 256 // 2 ** k, 256 // 2 ** k) for k in range(2, 6)}
    rois = [torch.tensor([[10.0, 10.0, 30.0, 30.0], [0.0, 0.0, 250.0, 250.0]])]
    out = pooler(feats, rois, (256, 256))
    torch.testing.assert_close(out[0:1], roi_align(feats["p2"], [rois[0][:1]], 2, 1 / 4, 2))
    torch.testing.assert_close(out[1:2], roi_align(feats["p4"], [rois[0][1:]], 2, 1 / 16, 2))
    with pytest.raises(OculaError):
        pooler({"p2": feats["p2"]}, rois, (256, 256))
