"""Segmentation losses, Dice / IoU metrics against hand counts, tiled and candidate-crop whole-image inference."""

import numpy as np
import pytest
import torch
from torch import nn

from ocula.models.unet import UNet
from ocula.tasks import segment as seg

# ------------------------------------------------------------------------------------------------------ metrics


def test_binary_dice_iou_by_hand():
    pred = np.array([[1, 1, 0], [0, 0, 0]])
    target = np.array([[1, 0, 0], [1, 0, 0]])
    s = seg.segmentation_scores(pred, target, num_classes=2)
    # foreground: TP 1, FP 1, FN 1; background: TP 3, FP 1, FN 1
    assert s["dice"] == pytest.approx(2 / 4) and s["iou"] == pytest.approx(1 / 3)
    assert s["dice_per_class"] == pytest.approx([6 / 8, 2 / 4])
    assert s["iou_per_class"] == pytest.approx([3 / 5, 1 / 3])


def test_empty_masks_follow_the_convention():
    empty = np.zeros((4, 4), int)
    one = empty.copy()
    one[1, 1] = 1
    assert seg.segmentation_scores(empty, empty)["dice"] == 1.0  # nothing to find, nothing found
    assert seg.segmentation_scores(empty, empty)["iou"] == 1.0
    assert seg.segmentation_scores(one, empty)["dice"] == 0.0  # a false alarm on an empty image
    assert seg.segmentation_scores(empty, one)["iou"] == 0.0


def test_global_is_micro_and_per_image_is_macro():
    target = np.zeros((2, 4, 4), int)
    target[0, :2, :2] = 1  # image 0: 4 foreground pixels, found exactly
    target[1, 3, 3] = 1  # image 1: 1 foreground pixel, missed
    pred = target.copy()
    pred[1] = 0
    s = seg.segmentation_scores(pred, target)
    assert s["dice"] == pytest.approx(8 / 9)  # TP 4, FN 1 pooled over both images
    assert s["mean_image_dice"] == pytest.approx(0.5)  # (1 + 0) / 2
    assert np.array(s["dice_per_image"])[:, 1] == pytest.approx([1.0, 0.0])
    assert s["images"] == 2


def test_multi_class_by_hand_and_meter_accumulates():
    target = np.array([[0, 1, 1], [2, 2, 0]])
    pred = np.array([[0, 1, 2], [2, 0, 0]])
    s = seg.segmentation_scores(pred, target, num_classes=3)
    assert s["dice_per_class"] == pytest.approx([4 / 5, 2 / 3, 1 / 2])
    assert s["iou_per_class"] == pytest.approx([2 / 3, 1 / 2, 1 / 3])
    assert s["dice"] == pytest.approx((2 / 3 + 1 / 2) / 2)  # foreground classes only
    meter = seg.SegmentationMeter(num_classes=3)
    meter.update(torch.tensor(pred[None]), torch.tensor(target[None])).update(pred, target)
    assert meter.compute()["dice_per_class"] == pytest.approx([4 / 5, 2 / 3, 1 / 2])
    assert meter.compute()["images"] == 2


def test_ignore_index_and_bad_labels():
    target = np.array([[1, 255], [0, 0]])
    pred = np.array([[1, 1], [0, 0]])
    assert seg.segmentation_scores(pred, target, ignore_index=255)["dice"] == 1.0
    with pytest.raises(ValueError):
        seg.segmentation_scores(pred, target)  # 255 is not a class of a binary mask
    with pytest.raises(ValueError):
        seg.segmentation_scores(pred, target[:1])


def test_probs_to_labels():
    assert seg.probs_to_labels(torch.tensor([[[0.2, 0.7]]])).tolist() == [[0, 1]]
    assert seg.probs_to_labels(np.array([[[0.1, 0.6]], [[0.9, 0.4]]])).tolist() == [[1, 0]]


# ------------------------------------------------------------------------------------------------------- losses

LOSS_NAMES = ["dice", "bce_dice", "ce_dice", "focal", "tversky"]


def _perfect_logits(target: torch.Tensor, k: int) -> torch.Tensor:
    if k == 1:
        return (target[:, None].float() * 2 - 1) * 30
    return torch.nn.functional.one_hot(target, k).permute(0, 3, 1, 2).float() * 30


@pytest.mark.parametrize("name", LOSS_NAMES)
@pytest.mark.parametrize("k", [1, 3])
def test_losses_are_zero_on_perfect_predictions_and_have_finite_gradients(name, k):
    torch.manual_seed(0)
    target = torch.randint(0, max(k, 2), (2, 9, 11))
    loss = seg.build_loss(name)
    assert loss(_perfect_logits(target, k), target).item() == pytest.approx(0, abs=1e-6)
    for t in (target, torch.zeros_like(target)):  # also an all-background batch
        logits = torch.randn(2, k, 9, 11, requires_grad=True)
        value = loss(logits, t)
        value.backward()
        assert torch.isfinite(value) and value.item() > 0
        assert torch.isfinite(logits.grad).all() and logits.grad.abs().sum() > 0


@pytest.mark.parametrize("name", LOSS_NAMES)
@pytest.mark.parametrize("k", [1, 3])
def test_void_pixels_are_left_out_of_every_loss(name, k):
    """Label 255 (VOC's void): the loss equals the loss on the labelled columns alone, and void pixels get no
    gradient."""
    torch.manual_seed(0)
    logits = torch.randn(2, k, 6, 8, requires_grad=True)
    target = torch.randint(0, max(k, 2), (2, 6, 8))
    target[..., 5:] = seg.IGNORE_INDEX
    loss = seg.build_loss(name)
    value = loss(logits, target)
    assert value.item() == pytest.approx(loss(logits[..., :5], target[..., :5]).item(), abs=1e-6)
    value.backward()
    assert logits.grad[..., 5:].abs().max() == 0 and logits.grad[..., :5].abs().sum() > 0


def test_dice_loss_by_hand_and_smoothing_in_both_places():
    logits = torch.zeros(1, 1, 2, 2)  # p = 0.5 everywhere
    target = torch.tensor([[[1, 0], [0, 0]]])
    # TP 0.5, FP 1.5, FN 0.5: (2*0.5 + 1) / (2*0.5 + 1.5 + 0.5 + 1) = 0.5
    assert seg.DiceLoss()(logits, target).item() == pytest.approx(0.5)
    # Empty target, (almost) empty prediction: Dice ~ 1, not the notes' numerator-only s / tiny.
    assert seg.DiceLoss()(torch.full((1, 1, 2, 2), -30.0), target * 0).item() == pytest.approx(0, abs=1e-6)


def test_tversky_half_half_is_dice_and_focal_gamma0_is_bce():
    logits, target = torch.randn(2, 1, 6, 7), torch.randint(0, 2, (2, 6, 7))
    tversky = seg.TverskyLoss(alpha=0.5, beta=0.5, smooth=1.0)(logits, target)
    assert tversky.item() == pytest.approx(seg.DiceLoss(smooth=2.0)(logits, target).item(), abs=1e-6)
    bce = torch.nn.functional.binary_cross_entropy_with_logits(logits, target[:, None].float())
    assert seg.FocalLoss(gamma=0.0)(logits, target).item() == pytest.approx(bce.item(), abs=1e-6)
    ce_only = seg.CrossEntropyDiceLoss(dice_weight=0.0)(logits, target)
    assert ce_only.item() == pytest.approx(bce.item(), abs=1e-6)


@pytest.mark.parametrize("name", LOSS_NAMES)
@pytest.mark.parametrize("k", [1, 3])
def test_losses_are_float32_under_bf16_autocast(name, k):
    """A model under bf16 autocast hands the loss bf16 logits. The loss must count in float32: the same logits
    scored outside autocast in float32 give the same value. (Summed in bf16, Dice is off by ~1e-4 to 1e-3.)"""
    torch.manual_seed(0)
    logits = (3 * torch.randn(4, k, 64, 64)).bfloat16()
    target = torch.randint(0, max(k, 2), (4, 64, 64))
    loss = seg.build_loss(name)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        value = loss(logits, target)
    assert value.dtype == torch.float32
    assert value.item() == pytest.approx(loss(logits.float(), target).item(), abs=1e-6)


def test_loss_shape_errors_are_clear():
    with pytest.raises(ValueError, match="target must be"):
        seg.DiceLoss()(torch.randn(2, 1, 4, 4), torch.zeros(2, 5, 4))
    with pytest.raises(ValueError, match="alpha"):
        seg.FocalLoss(alpha=0.25)(torch.randn(1, 3, 4, 4), torch.zeros(1, 4, 4, dtype=torch.long))
    with pytest.raises(ValueError):
        seg.build_loss("lovasz")


# ------------------------------------------------------------------------------------------- tiled inference


def _pointwise(k: int, bias_only: bool = False) -> nn.Module:
    """A 1x1 conv: translation-equivariant with no context, so tiling must reproduce it exactly."""
    torch.manual_seed(1)
    conv = nn.Conv2d(3, k, 1)
    if bias_only:
        nn.init.zeros_(conv.weight)
    return conv


def test_one_tile_equals_a_single_forward_pass():
    model = UNet(widths=(4, 8, 16), num_classes=2, norm="batch").eval()
    image = torch.randn(3, 100, 120)
    with torch.no_grad():
        direct = model(image[None]).softmax(1)[0]
    assert torch.equal(seg.predict_tiled(model, image, tile=128), direct)


def test_constant_output_has_no_seams():
    out = seg.predict_tiled(_pointwise(1, bias_only=True), torch.randn(3, 300, 450), tile=64, overlap=0.25)
    assert out.shape == (1, 300, 450)
    assert torch.allclose(out, out[0, 0, 0].expand_as(out), atol=1e-6)


@pytest.mark.parametrize("size,overlap", [((200, 333), 16), ((200, 333), 0.25), ((40, 300), 0.5), ((129, 70), 0)])
def test_tiles_are_placed_and_blended_exactly(size, overlap):
    model, image = _pointwise(3), torch.randn(3, *size)
    with torch.no_grad():
        direct = model(image[None]).softmax(1)[0]
    tiled = seg.predict_tiled(model, image, tile=64, overlap=overlap, batch_size=3)
    assert tiled.shape == (3, *size)
    assert torch.allclose(tiled, direct, atol=1e-5)


def test_tiled_unet_on_a_large_image_keeps_the_callers_mode():
    model = UNet(widths=(4, 8, 16), num_classes=3).train()
    probs = seg.predict_tiled(model, torch.randn(3, 150, 97), tile=64, overlap=16)
    assert probs.shape == (3, 150, 97)
    assert torch.allclose(probs.sum(0), torch.ones(150, 97), atol=1e-5)
    assert model.training


def test_reflect_padding_beyond_the_image_size():
    for n, before, after in [(3, 7, 5), (5, 2, 9), (1, 3, 3)]:
        want = np.pad(np.arange(n), (before, after), mode="reflect") if n > 1 else np.zeros(n + before + after)
        assert seg._reflect_index(n, before, after).tolist() == want.tolist()


def test_bad_tiling_arguments():
    with pytest.raises(ValueError):
        seg.predict_tiled(_pointwise(1), torch.randn(3, 300, 300), tile=64, overlap=64)
    with pytest.raises(ValueError):
        seg.predict_tiled(_pointwise(1), torch.randn(300, 300))


# ------------------------------------------------------------------------------------- candidate-crop baseline


def _blood_smear() -> tuple[torch.Tensor, np.ndarray]:
    """Bright background, two dark 'white cells' (r = 20 px, one at a corner) and a small dark speck."""
    yy, xx = np.mgrid[:300, :400]
    cells = ((yy - 150) ** 2 + (xx - 200) ** 2 <= 20**2) | ((yy - 15) ** 2 + (xx - 385) ** 2 <= 20**2)
    speck = (yy - 250) ** 2 + (xx - 50) ** 2 <= 5**2
    gray = np.where(cells | speck, 0.1, 0.9).astype(np.float32)
    return torch.from_numpy(gray)[None].repeat(3, 1, 1), cells


class _Darkness(nn.Module):
    """A stand-in segmenter: foreground probability high where the image is dark."""

    num_classes = 1

    def forward(self, x):
        return 10 * (0.5 - x.mean(1, keepdim=True))


def test_candidate_boxes_find_big_dark_blobs_and_stay_inside():
    image, _ = _blood_smear()
    boxes = seg.candidate_boxes(image, crop=128, min_area=500)
    assert len(boxes) == 2  # the 78-px speck is below min_area
    for top, left, h, w in boxes:
        assert (h, w) == (128, 128) and 0 <= top <= 300 - 128 and 0 <= left <= 400 - 128
    assert (150 - 64, 200 - 64, 128, 128) in boxes
    assert seg.candidate_boxes(torch.ones(3, 50, 50)) == []


def test_predict_candidates_pastes_crops_back():
    image, cells = _blood_smear()
    probs = seg.predict_candidates(_Darkness(), image, crop=128, min_area=500)
    assert probs.shape == (1, 300, 400)
    scores = seg.segmentation_scores(seg.probs_to_labels(probs), cells.astype(int))
    assert scores["dice"] > 0.99  # both cells found; the speck, outside every crop, stays background
    empty = seg.predict_candidates(_Darkness(), torch.ones(3, 64, 64))
    assert empty.shape == (1, 64, 64) and empty.max() == 0
