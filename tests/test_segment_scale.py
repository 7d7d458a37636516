"""Scale and stain handling of white-cell segmentation: datasets resampled to the model's cell size, predictions at
another scale returned at the input's size and in place, the assumed scale said, Reinhard colour matching."""

import numpy as np
import pytest
import torch
from PIL import Image
from torch import nn

import ocula
from ocula.data.segmentation import load_mask_folder
from ocula.data.stain import lab_stats, macenko, macenko_target, normalise, reinhard, reinhard_target, white_balance
from ocula.modelfile import ModelInfo, save_model
from ocula.models import build
from ocula.tasks import segment_train
from ocula.tasks.segment import segmentation_scores

from test_segment_train import _DarkIsForeground


def disc_image(h, w, cy, cx, r):
    yy, xx = np.mgrid[:h, :w]
    inside = (yy - cy) ** 2 + (xx - cx) ** 2 <= r * r
    image = np.full((h, w, 3), 215, np.uint8)
    image[inside] = (125, 45, 150)
    return image, inside.astype(np.uint8)


class _SeesSizes(_DarkIsForeground):
    """Dark is foreground, and every input size the network is given is kept."""

    def __init__(self):
        super().__init__()
        self.sizes = []

    def forward(self, x):
        self.sizes.append(tuple(x.shape[-2:]))
        return super().forward(x)


@pytest.mark.parametrize("scale", [0.5, 1.7])
def test_a_mask_predicted_at_another_scale_comes_back_at_the_input_size_and_in_place(scale):
    image, truth = disc_image(70, 90, 30, 50, 14)
    model = _SeesSizes()
    labels = segment_train.predict_labels(model, image, tile=256, scale=scale)
    assert model.sizes == [(round(70 * scale), round(90 * scale))]  # the network saw the resampled image
    assert labels.shape == (70, 90)
    assert segmentation_scores(labels, truth)["dice"] > 0.95  # and the mask lands where the cell is
    probs = segment_train.predict_probs(model, image, tile=256, scale=scale, flips=True)
    assert probs.shape == (1, 70, 90) and len(model.sizes) == 1 + 4  # four flipped passes, averaged


def test_small_objects_are_dropped_at_the_models_scale():
    image, _ = disc_image(80, 80, 40, 40, 5)  # 81 px here, 324 px once doubled to the model's scale
    assert segment_train.predict_labels(_DarkIsForeground(), image, tile=128, min_area=200, scale=2.0).any()
    assert not segment_train.predict_labels(_DarkIsForeground(), image, tile=128, min_area=200).any()


def write_discs(root, radius, n=4):
    (root / "images").mkdir(parents=True)
    (root / "masks").mkdir()
    for i in range(n):
        image, mask = disc_image(60, 60, 30, 30, radius)
        mask[0, :10] = 1  # a sliver cut by the border: not a whole cell, not measured
        Image.fromarray(image).save(root / "images" / f"{i}.png")
        Image.fromarray(mask * 255).save(root / "masks" / f"{i}.png")
    return load_mask_folder(root)


def test_datasets_are_resampled_from_their_measured_cell_size(tmp_path):
    small, large = write_discs(tmp_path / "small", 8), write_discs(tmp_path / "large", 16)
    d_small, d_large = (segment_train.cell_diameter(segment_train.decode(d)) for d in (small, large))
    assert d_small == pytest.approx(16, abs=0.5) and d_large == pytest.approx(32, abs=0.5)  # the sliver left out
    pairs, native = segment_train.prepare([small, large], cell_diameter_px=24)
    assert native == pytest.approx((d_small + d_large) / 2)
    sides = [round(60 * 24 / d_small)] * 4 + [round(60 * 24 / d_large)] * 4
    assert [p[0].shape[:2] for p in pairs] == [(n, n) for n in sides] and [p[1].shape for p in pairs] == [
        (n, n) for n in sides]
    assert segment_train.cell_diameter(pairs) == pytest.approx(24, abs=1.5)
    unchanged, none = segment_train.prepare(small, cell_diameter_px=None)
    assert none is None and unchanged[0][0].shape == (60, 60, 3)


def test_multiclass_and_binary_data_train_together_as_whole_cells(tmp_path):
    binary = write_discs(tmp_path / "b", 8)
    three = write_discs(tmp_path / "t", 8)
    three.classes = ("background", "cytoplasm", "nucleus")
    with pytest.raises(ocula.OculaError, match="need the same classes"):
        segment_train.prepare([binary, three], cell_diameter_px=None)
    pairs, _ = segment_train.prepare([binary, three], cell_diameter_px=None, binary=True)
    assert pairs.classes == ("background", "foreground") and len(pairs) == 8  # the first dataset's names


def scaled_model_file(path):
    """An untrained tiny model that works at 64 px cells and was trained on images with 32 px cells."""
    args = {"widths": [4, 8], "num_classes": 1, "mean": [0.8, 0.7, 0.8], "std": [0.1, 0.15, 0.1], "norm": "batch",
            "residual": True}
    torch.manual_seed(0)
    model = build("normalized-unet", **args).eval()
    pre = {"channels": 3, "value_max": 255.0, "input_size": [32, 32], "tile": 64, "overlap": 0.25,
           "threshold": 0.5, "output": "binary", "cell_diameter": 64, "training_cell_diameter": 32.0,
           "stain": None, "flips": False}
    save_model(path, model, ModelInfo("segment", "normalized-unet", args, ["background", "wbc"], pre))
    return path


def test_predict_says_which_scale_it_assumed(tmp_path):
    model = ocula.load(scaled_model_file(tmp_path / "m.ocula"), device="cpu")
    image, _ = disc_image(50, 70, 25, 35, 10)
    assumed = model.predict(image)[0]
    assert assumed.mask.shape == (50, 70)
    assert "scale unknown, assumed white cells 32 px across" in assumed.describe()
    assert assumed.to_json()["cell_diameter_px"] == 32 and assumed.to_json()["scale_assumed"] is True
    given = model.predict(image, cell_diameter=20)[0]
    assert given.mask.shape == (50, 70) and "assumed" not in given.describe()
    assert given.to_json()["cell_diameter_px"] == 20 and given.to_json()["scale_assumed"] is False
    with pytest.raises(ocula.OculaError, match="cell diameter must be positive"):
        model.predict(image, cell_diameter=0)


def test_reinhard_moves_colour_statistics_to_the_target():
    rng = np.random.default_rng(0)
    purple = (rng.normal((150, 90, 170), 20, (40, 40, 3))).clip(0, 255).astype(np.uint8)
    yellow = (rng.normal((230, 215, 140), 15, (40, 40, 3))).clip(0, 255).astype(np.uint8)
    target = reinhard_target([purple])
    moved = reinhard(yellow, target)
    assert moved.dtype == np.uint8 and moved.shape == yellow.shape
    np.testing.assert_allclose(lab_stats(moved), lab_stats(purple), atol=2.5)


def stained_smear(colours, light, amounts, seed=1) -> np.ndarray:
    """A 64x64 smear made by Beer-Lambert from two stains' OD colours [3, 2] and amounts: six eosin-stained red
    cells and a white cell whose nucleus takes the nuclear dye, on background `light`."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[:64, :64]
    nuclear, eosin = np.zeros((64, 64)), np.zeros((64, 64))
    for _ in range(6):
        (cy, cx), radius = rng.integers(8, 56, 2), rng.integers(5, 10)
        eosin[(yy - cy) ** 2 + (xx - cx) ** 2 < radius ** 2] += rng.uniform(0.3, 0.8)
    nuclear[(yy - 32) ** 2 + (xx - 32) ** 2 < 100] = 1.2
    eosin[(yy - 32) ** 2 + (xx - 32) ** 2 < 196] += 0.3
    colours = np.asarray(colours) / np.linalg.norm(colours, axis=0)
    od = colours @ (np.stack([nuclear, eosin]).reshape(2, -1) * np.asarray(amounts)[:, None])
    image = np.asarray(light) * np.exp(-od.T) + rng.normal(0, 1, (64 * 64, 3))
    return image.clip(0, 255).astype(np.uint8).reshape(64, 64, 3)


def test_macenko_rebuilds_a_smear_with_the_targets_stains_and_light():
    ours = [[0.65, 0.07], [0.70, 0.99], [0.29, 0.11]]  # nuclear dye, eosin: OD per R, G, B
    theirs = [[0.55, 0.20], [0.60, 0.90], [0.58, 0.38]]
    target_smear = stained_smear(ours, (250, 250, 250), (1.0, 1.0))
    other = stained_smear(theirs, (250, 240, 190), (0.7, 1.3))  # other dyes, a yellow lamp, other amounts
    target = macenko_target([target_smear])
    assert target["method"] == "macenko" and np.asarray(target["colours"])[0, 0] > 0.5  # the nuclear dye first
    before = np.abs(other.astype(int) - target_smear).mean()
    after = np.abs(macenko(other, target).astype(int) - target_smear).mean()
    assert before > 20 and after < 3
    assert np.abs(normalise(target_smear, target).astype(int) - target_smear).mean() < 1.5  # its own look kept
    blank = np.full((16, 16, 3), 245, np.uint8)
    assert normalise(blank, target) is blank and normalise(other, None) is other


def test_white_balance_takes_a_yellow_lamp_out_and_keeps_the_stains():
    stains = [[0.65, 0.07], [0.70, 0.99], [0.29, 0.11]]
    white = stained_smear(stains, (250, 250, 250), (1.0, 1.0))
    yellow = stained_smear(stains, (250, 240, 160), (1.0, 1.0))  # the same smear under Zheng's yellow light
    assert np.abs(yellow.astype(int) - white).mean() > 20
    balanced = normalise(yellow, {"method": "white"})
    assert np.abs(balanced.astype(int) - white_balance(white, {})).mean() < 2.5
    assert (np.percentile(balanced.reshape(-1, 3), 99, axis=0) >= 254).all()  # the background light is white


def test_stain_tint_casts_one_colour_over_the_image_and_leaves_the_mask():
    from ocula.data.paired_transforms import StainJitter

    white = np.full((8, 8, 3), 250, np.uint8)
    mask = np.eye(8, dtype=np.uint8)
    same, _ = StainJitter(sigma=0.0, bias=0.0, tint=0.0, p=1.0)(white, mask, np.random.default_rng(0))
    np.testing.assert_array_equal(same, white)  # no jitter, no change: the round trip is exact
    cast, kept = StainJitter(sigma=0.0, bias=0.0, tint=0.5, p=1.0)(white, mask, np.random.default_rng(0))
    assert kept is mask
    colour = cast.reshape(-1, 3)
    assert (colour == colour[0]).all() and np.ptp(colour[0].astype(int)) > 20  # a uniform, visible cast


def test_neutral_light_takes_the_lamps_colour_out_and_keeps_its_brightness():
    stains = [[0.65, 0.07], [0.70, 0.99], [0.29, 0.11]]
    grey = stained_smear(stains, (215, 215, 215), (1.0, 1.0))  # a dim, neutral field stays as it is
    yellow = stained_smear(stains, (240, 240, 165), (1.0, 1.0))  # the same smear, as bright, under a yellow lamp
    assert np.abs(normalise(grey, {"method": "neutral"}).astype(int) - grey).mean() < 1
    neutral = normalise(yellow, {"method": "neutral"})
    assert np.abs(neutral.astype(int) - grey).mean() < 2.5 < np.abs(yellow.astype(int) - grey).mean()
    light = np.percentile(neutral.reshape(-1, 3), 99, axis=0)
    assert np.ptp(light) <= 2 and abs(light.mean() - 215) < 3  # grey, and as bright as before
