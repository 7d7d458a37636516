"""Segmentation end to end on synthetic smears: training fills a run folder, the model file round-trips, the CLI
predicts masks / overlays / cell tables, and the ONNX export keeps height and width dynamic."""

import csv
import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image
from torch import nn

import ocula
from ocula.data.paired_transforms import RedCells
from ocula.data.segmentation import index_mask, load_mask_folder
from ocula.data.stain import normalise
from ocula.modelfile import ModelInfo, save_model
from ocula.models import build
from ocula.models.unet import unet_config
from ocula.tasks import segment_train

from conftest import DATASETS, need
from synthetic import smear

TINY = {"widths": [4, 8, 16]}


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    root = tmp_path_factory.mktemp("smears")
    (root / "images").mkdir()
    (root / "masks").mkdir()
    rng = np.random.default_rng(0)
    for i in range(12):  # ten small patches and two larger images, like SigTuple
        image, mask = smear(rng, *((48, 48) if i < 10 else (90, 130)))
        Image.fromarray(image).save(root / "images" / f"s{i}.png")
        Image.fromarray(mask).save(root / "masks" / f"s{i}.png")
    return root


@pytest.fixture(scope="module")
def run(folder, tmp_path_factory):
    model = ocula.train(str(folder), "unet", runs_dir=tmp_path_factory.mktemp("runs"), name="smears-unet", epochs=3,
                        batch_size=4, lr=1e-2, threads=1, crop=32, arch_args=TINY, progress=False)
    return model.run_dir, model.summary


def tiny_model_file(path, classes=("background", "wbc")):
    """An untrained tiny segmentation model file, as training would write it."""
    args = {**TINY, "num_classes": 1 if len(classes) == 2 else len(classes), "mean": [0.8, 0.7, 0.8],
            "std": [0.1, 0.15, 0.1], "norm": "batch", "residual": True}
    torch.manual_seed(0)
    model = build("normalized-unet", **args).eval()
    pre = {"channels": 3, "value_max": 255.0, "input_size": [32, 32], "tile": 64, "overlap": 0.25,
           "threshold": 0.5, "output": "binary" if len(classes) == 2 else "multiclass"}
    save_model(path, model, ModelInfo("segment", "normalized-unet", args, list(classes), pre))
    return path


def test_training_fills_the_run_folder_and_the_loss_falls(run):
    run_dir, summary = run
    for name in ("config.json", "metrics.csv", "best.ocula", "last.ocula", "model.ocula", "val_predictions.png",
                 "summary.json"):
        assert (run_dir / name).is_file(), name
    rows = list(csv.DictReader(open(run_dir / "metrics.csv")))
    assert len(rows) == 3 and {"loss", "val_dice", "val_image_dice"} <= set(rows[0])
    assert float(rows[-1]["loss"]) < float(rows[0]["loss"])
    assert summary["val_dice"] == max(float(r["val_dice"]) for r in rows)  # model.ocula is the best epoch
    assert json.loads((run_dir / "config.json").read_text())["train"]["monitor"] == "val_dice"


def test_model_file_records_the_run(run):
    run_dir, summary = run
    info = ocula.load(run_dir / "model.ocula").info
    assert (info.task, info.arch, info.classes) == ("segment", "normalized-unet", ["background", "foreground"])
    assert info.preprocess["output"] == "binary" and info.preprocess["tile"] == 64
    assert info.metrics["val_dice"] == summary["val_dice"]


def test_saved_model_predicts_like_the_trained_one(folder, tmp_path):
    """Everything prediction depends on (weights, batch-norm statistics, input normalisation) survives the file."""
    config = segment_train.default_config("unet", epochs=1, batch_size=4, lr=1e-2, threads=1)
    model, info, _ = segment_train.fit(load_mask_folder(folder), "unet", config, crop=32, crops_per_epoch=8,
                                       arch_args=TINY, progress=False)
    save_model(tmp_path / "m.ocula", model, info)
    loaded = ocula.load(tmp_path / "m.ocula").module
    x = torch.rand(1, 3, 45, 61) * 255
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), model.eval()(x))


def test_stain_target_is_recorded_and_prediction_normalises_with_it(folder, tmp_path):
    config = segment_train.default_config("unet", epochs=1, batch_size=4, lr=1e-2, threads=1)
    model, info, _ = segment_train.fit(load_mask_folder(folder), "unet", config, crop=32, crops_per_epoch=8,
                                       arch_args=TINY, progress=False, stain="macenko")
    target = info.preprocess["stain"]
    assert target["method"] == "macenko" and np.asarray(target["colours"]).shape == (3, 2)
    image = load_mask_folder(folder)[0][0]
    as_is = segment_train.predict_probs(model, image, tile=64)
    normalised = segment_train.predict_probs(model, image, tile=64, stain=target)
    torch.testing.assert_close(normalised, segment_train.predict_probs(model, normalise(image, target), tile=64))
    assert not torch.allclose(normalised, as_is)
    with pytest.raises(ocula.OculaError, match="unknown stain normalisation 'vahadane'"):
        segment_train.fit(load_mask_folder(folder), "unet", config, crop=32, arch_args=TINY, progress=False,
                          stain="vahadane")


def test_training_starts_from_given_weights_except_those_of_another_shape(folder):
    """`init` (a pretrained U-Net's state dict) starts the model; its 3-output head cannot fit a 1-output one."""
    pretrained = build("normalized-unet", **{**unet_config("unet"), **TINY, "num_classes": 3})
    init = {k: v + 1.0 if v.is_floating_point() else v for k, v in pretrained.state_dict().items()}
    config = segment_train.default_config("unet", epochs=1, batch_size=4, lr=0.0, weight_decay=0.0, threads=1)
    model, _, _ = segment_train.fit(load_mask_folder(folder), "unet", config, crop=32, crops_per_epoch=8,
                                    arch_args=TINY, progress=False, init=init)
    weights = model.state_dict()
    torch.testing.assert_close(weights["unet.down.0.conv1.weight"], init["unet.down.0.conv1.weight"])
    torch.testing.assert_close(weights["unet.up.0.block.conv2.weight"], init["unet.up.0.block.conv2.weight"])
    assert weights["unet.head.weight"].shape == (1, 4, 1, 1) and init["unet.head.weight"].shape == (3, 4, 1, 1)


def test_training_beats_the_untrained_model(run, folder):
    run_dir, _ = run
    trained = ocula.load(run_dir / "model.ocula").module
    torch.manual_seed(0)
    untrained = build(trained.info.arch, **trained.info.args)
    pairs = segment_train.decode(load_mask_folder(folder))
    settings = segment_train.tiling(trained.info)
    before, after = (segment_train.score(m, pairs, **settings)["dice"] for m in (untrained, trained))
    assert after > 0.5 and after > before + 0.3, (before, after)


class _DarkIsForeground(nn.Module):
    """A stand-in segmenter with known output: foreground exactly where the pixel (0..255) is dark."""

    num_classes = 1

    def forward(self, x):
        return 128 - x.mean(1, keepdim=True)


def test_score_matches_known_masks_by_hand():
    image = np.full((60, 90, 3), 220, np.uint8)
    image[10:20, 10:20] = 40  # predicted: a 10 x 10 square ...
    mask = np.zeros((60, 90), np.int64)
    mask[12:22, 10:20] = 1  # ... the truth two rows lower: 80 px shared
    empty = (np.full((40, 40, 3), 220, np.uint8), np.zeros((40, 40), np.int64))  # nothing to find, nothing found
    scores = segment_train.score(_DarkIsForeground(), [(image, mask), empty], tile=32, overlap=0.25)
    assert scores["images"] == 2
    assert scores["dice"] == pytest.approx(2 * 80 / (100 + 100)) and scores["iou"] == pytest.approx(80 / 120)
    assert scores["mean_image_dice"] == pytest.approx((0.8 + 1.0) / 2)


def test_crops_are_repeatable_and_follow_image_area(folder):
    pairs = segment_train.decode(load_mask_folder(folder))
    batches = segment_train.CropBatches(pairs, crop=32, batch_size=4)
    # 48x48 -> round(2304 / 1024) = 2 visits each; 90x130 -> 11 each.
    assert batches.crops == 10 * 2 + 2 * 11 and len(batches) == 11
    first = [x for x, _ in batches(torch.Generator().manual_seed(3))]
    again = [x for x, _ in batches(torch.Generator().manual_seed(3))]
    assert all(torch.equal(a, b) for a, b in zip(first, again))
    x, y = next(iter(segment_train.CropBatches(pairs, crop=32, batch_size=4, crops=6)(torch.Generator())))
    assert x.shape == (4, 3, 32, 32) and x.dtype == torch.float32 and x.max() > 1
    assert y.shape == (4, 32, 32) and set(y.unique().tolist()) <= {0, 1}


def cli(*args):
    # One thread, like conftest: on a busy 2-core machine two threads per tiny conv cost ten times more.
    return subprocess.run([sys.executable, "-m", "ocula", *map(str, args)], capture_output=True, text=True,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})


def predict(*args):
    return cli("predict", *args)


def test_cli_trains_a_segmentation_folder(folder, tmp_path):
    out = cli("train", folder, "--epochs", 1, "--crop", 32, "--crops-per-epoch", 8, "--batch-size", 4,
              "--runs-dir", tmp_path, "--quiet")
    assert out.returncode == 0, out.stderr
    summary = json.loads(out.stdout)
    assert summary["model"] == "unet" and summary["epochs"] == 1
    assert (tmp_path / "segment" / f"{folder.name}-unet" / "model.ocula").is_file()
    again = cli("train", folder, "--epochs", 1, "--runs-dir", tmp_path)
    assert again.returncode == 1 and "run folder exists" in again.stderr


def test_cli_predict_writes_mask_overlay_and_cells(run, tmp_path):
    run_dir, _ = run
    image, _ = smear(np.random.default_rng(5), 150, 170, cells=3)
    Image.fromarray(image).save(tmp_path / "smear.png")
    out = predict(run_dir / "model.ocula", tmp_path / "smear.png", "--out", tmp_path / "out", "--pixel-size", 0.5,
                  "--json")
    assert out.returncode == 0, out.stderr
    result = json.loads(out.stdout)
    mask = np.asarray(Image.open(tmp_path / "out" / "smear-mask.png"))
    assert mask.shape == (150, 170) and set(np.unique(mask)) <= {0, 255}
    assert Image.open(tmp_path / "out" / "smear-overlay.png").size == (170, 150)
    rows = list(csv.DictReader(open(tmp_path / "out" / "smear-cells.csv")))
    # The smear holds three separate cells like the training ones, and the trained model finds each.
    saved = json.loads((tmp_path / "out" / "smear-cells.json").read_text())
    assert len(rows) == result["count"] == saved["count"] == 3
    for row in rows:  # 0.5 um pixels: a pixel is 0.25 um2
        assert float(row["area_um2"]) == pytest.approx(0.25 * float(row["area_px"]))
    opened = predict(run_dir / "model.ocula", tmp_path / "smear.png", "--out", "", "--opening", "--json")
    assert opened.returncode == 0, opened.stderr
    assert json.loads(opened.stdout)["count"] == 3  # a model at native scale records no opening: nothing changes


def test_cli_evaluate_scores_every_image_by_name(run, folder, tmp_path):
    run_dir, _ = run
    out = cli("evaluate", run_dir / "model.ocula", "--split", "all", "--out", tmp_path / "ev")
    assert out.returncode == 0, out.stderr
    assert (tmp_path / "ev" / "predictions.png").is_file()
    result = json.loads((tmp_path / "ev" / "eval.json").read_text())
    assert json.loads(out.stdout.splitlines()[0])["dice"] == pytest.approx(result["dice"], abs=1e-4)  # rounded
    per_image = {r["file"]: r["dice"] for r in result["per_image"]}
    assert result["images"] == 12 and sorted(per_image) == sorted(f"s{i}.png" for i in range(12))
    model = ocula.load(run_dir / "model.ocula").module
    image = np.asarray(Image.open(folder / "images" / "s3.png"))
    truth = np.asarray(Image.open(folder / "masks" / "s3.png")) > 0
    pred = segment_train.predict_labels(model, image, **segment_train.tiling(model.info)) > 0
    by_hand = 2 * (pred & truth).sum() / (pred.sum() + truth.sum()) if pred.any() or truth.any() else 1.0
    assert per_image["s3.png"] == pytest.approx(by_hand)
    missing = cli("evaluate", run_dir / "model.ocula", "--data", tmp_path / "nowhere")
    assert missing.returncode == 1 and len(missing.stderr.strip().splitlines()) == 1


def test_multiclass_mask_is_a_palette_of_class_indices(tmp_path):
    classes = ("background", "cytoplasm", "nucleus")
    model = ocula.load(tiny_model_file(tmp_path / "m.ocula", classes))
    image, _ = smear(np.random.default_rng(1), 70, 90)
    Image.fromarray(image).save(tmp_path / "cell.png")
    (result,) = model.predict(tmp_path / "cell.png")
    assert Image.open(result.save(tmp_path / "out", "cell")["mask"]).mode == "P"
    assert set(np.unique(index_mask(tmp_path / "out" / "cell-mask.png"))) <= {0, 1, 2}


def test_bad_image_is_one_line_naming_the_file(tmp_path):
    model = tiny_model_file(tmp_path / "m.ocula")
    (tmp_path / "broken.jpg").write_bytes(b"not a jpeg")
    out = predict(model, tmp_path / "broken.jpg", "--out", tmp_path / "out")
    assert out.returncode == 1 and "broken.jpg" in out.stderr and "Traceback" not in out.stderr


@pytest.mark.filterwarnings("ignore")
def test_onnx_parity_at_two_sizes_through_the_model_file(run, tmp_path):
    from ocula.export.onnx import check_parity, export_onnx

    run_dir, _ = run
    model = ocula.load(run_dir / "model.ocula").module
    path = export_onnx(model, tmp_path / "m.onnx", dynamic_hw=True)
    for size in [(128, 128), (500, 700)]:
        assert check_parity(model, path, torch.rand(1, 3, *size) * 255) < 1e-4


def test_int8_segmenter_masks_agree_with_float(run, folder, tmp_path):
    """int8 calibrates on tiles of the training folder; the quantized file predicts through the same task code."""
    import onnx

    from ocula.errors import OculaError

    run_dir, _ = run
    quantized = ocula.compress(run_dir / "model.ocula", "int8", tmp_path / "m.onnx", calibration=8)
    graph = onnx.load(str(quantized.path)).graph
    int8_weights = [t for t in graph.initializer if t.data_type == onnx.TensorProto.INT8 and len(t.dims) == 4]
    assert len(int8_weights) == sum(n.op_type == "Conv" for n in graph.node)  # every conv's weights in 8 bits
    float_model = ocula.load(run_dir / "model.ocula", device="cpu")
    pairs = segment_train.decode(load_mask_folder(folder))
    images = [image for image, _ in pairs]
    agree = np.mean([np.mean(a.mask == b.mask)
                     for a, b in zip(quantized.predict(images), float_model.predict(images))])
    assert agree > 0.97
    dice = [segment_train.score(m.module, pairs, **segment_train.tiling(m.info))["dice"]
            for m in (float_model, quantized)]
    assert dice[1] > dice[0] - 0.03, dice
    with pytest.raises(OculaError, match="bwn compresses classifiers"):
        ocula.compress(run_dir / "model.ocula", "bwn", tmp_path / "b.ocula")


def test_predict_sigtuple_test_images_with_an_untrained_model(tmp_path):
    test_data = need(DATASETS / "wbc_sigtuple" / "SigTuple_data" / "Test_Data")
    images = sorted(test_data.iterdir())[:2]
    model = tiny_model_file(tmp_path / "m.ocula")
    out = predict(model, *images, "--out", tmp_path / "out")
    assert out.returncode == 0, out.stderr
    for image in images:
        assert (tmp_path / "out" / f"{image.stem}-cells.csv").is_file()


def test_small_objects_are_dropped_whatever_their_class():
    labels = np.zeros((40, 40), np.int64)
    labels[5:25, 5:25] = 1  # a 400 px cell ...
    labels[10:15, 10:15] = 2  # ... with a nucleus: one object of two classes
    labels[30:33, 30:33] = 2  # a 9 px speck
    kept = segment_train.drop_objects(labels, min_area=50)
    assert (kept[:25, :25] == labels[:25, :25]).all() and not kept[30:, 30:].any()
    assert segment_train.drop_objects(labels, min_area=0) is labels
    assert not segment_train.drop_objects(labels, min_area=401).any()


def test_objects_without_a_nucleus_are_dropped():
    labels = np.zeros((40, 40), np.int64)
    labels[2:18, 2:18] = 1  # a white cell: cytoplasm ...
    labels[6:12, 6:12] = 2  # ... around a nucleus
    labels[24:38, 24:38] = 1  # 'cytoplasm' alone: a red cell
    kept = segment_train.drop_objects(labels, min_area=0, anchor=2)
    assert (kept[:20, :20] == labels[:20, :20]).all() and not kept[20:, 20:].any()
    assert (segment_train.drop_objects(labels, min_area=0, anchor=None) == labels).all()


def test_red_cells_touching_a_white_cell_are_cut_beyond_the_cytoplasms_reach():
    labels = np.zeros((40, 60), np.int64)
    labels[2:18, 2:18] = 1  # a white cell: cytoplasm 6 px wide (8.5 px at the corners) around ...
    labels[8:12, 8:12] = 2  # ... its nucleus
    labels[4:16, 18:40] = 1  # a red cell painted as cytoplasm, touching it: one component
    reach = segment_train.nucleus_reach([(None, labels[:, :18])], nucleus=2)
    assert reach == pytest.approx(np.hypot(6, 6), abs=0.05)  # the white cell's corner
    kept = segment_train.drop_objects(labels, min_area=0, anchor=2, reach=reach)
    assert (kept[:, :18] == labels[:, :18]).all()  # the white cell whole
    assert kept[:, 18:].sum() < 0.1 * labels[:, 18:].sum()  # most of the red cell gone
    assert (segment_train.drop_objects(labels, min_area=0, anchor=2) == labels).all()  # no reach: one object
    assert segment_train.nucleus_reach([(None, labels[:, 18:])], nucleus=2) is None  # masks without a nucleus


def test_a_speck_of_nucleus_anchors_no_white_cell():
    labels = np.zeros((40, 60), np.int64)
    labels[2:18, 2:18] = 1  # a white cell: cytoplasm around ...
    labels[6:12, 6:12] = 2  # ... a 36 px nucleus
    labels[22:38, 30:58] = 1  # a red cell painted as cytoplasm ...
    labels[29:31, 40:42] = 2  # ... with a 4 px nucleus speck on its rim
    piece = segment_train.nucleus_piece([(None, labels[:20, :20])], nucleus=2)
    assert piece == 18  # half the training masks' nuclei
    kept = segment_train.drop_objects(labels, min_area=0, anchor=2, reach=30, anchor_area=piece)
    assert (kept[:20, :20] == labels[:20, :20]).all() and not kept[20:].any()
    assert (segment_train.drop_objects(labels, min_area=0, anchor=2, reach=30) == labels).all()  # any speck anchors
    assert segment_train.nucleus_piece([(None, labels[:20, 20:])], nucleus=2) == 0  # masks without a nucleus


def test_the_opening_allowed_is_what_the_training_masks_survive():
    yy, xx = np.mgrid[:60, :60]
    disc = ((yy - 30) ** 2 + (xx - 30) ** 2 <= 25**2).astype(np.uint8)  # a solid cell
    bars = np.zeros((60, 60), np.uint8)
    bars[10:50, 10:13] = bars[10:50, 30:33] = 1  # 3 px wide: a disk of radius 2 (5 px) fits in none of it
    assert segment_train.opening_radius([(None, disc)]) >= 8
    assert segment_train.opening_radius([(None, bars)]) <= 1
    assert segment_train.opening_radius([(None, disc)], largest=3) == 3
    # recorded by the cell-scale recipe only (membranes or a user's own masks at native scale: none) and applied
    # only when asked for
    cells = segment_train.Pairs([(np.full((60, 60, 3), 200, np.uint8), disc)], ("background", "cell"))
    infos = {d: segment_train.model_info(cells, "unet", crop=32, dataset="discs", cell_diameter_px=d)[1]
             for d in (64, None)}
    assert {d: info.preprocess["opening"] for d, info in infos.items()} == {64: segment_train.opening_radius(cells),
                                                                           None: 0}
    assert segment_train.tiling(infos[64], opening=True)["opening"] == infos[64].preprocess["opening"]
    assert segment_train.tiling(infos[64])["opening"] == 0


def test_a_thin_rim_joined_to_a_white_cell_is_opened_away_and_the_cell_kept():
    image = np.full((80, 100, 3), 215, np.uint8)
    yy, xx = np.mgrid[:80, :100]
    cell = (yy - 40) ** 2 + (xx - 35) ** 2 <= 20**2
    rim = (np.abs(np.hypot(yy - 40, xx - 72) - 16) <= 1.5) & ~cell  # a red cell's 3 px rim touching the cell
    image[cell | rim] = (125, 45, 150)
    plain = segment_train.predict_labels(_DarkIsForeground(), image, tile=128) > 0
    assert plain[rim].all()  # painted, and joined to the cell
    opened = segment_train.predict_labels(_DarkIsForeground(), image, tile=128, opening=4) > 0
    assert opened[cell].mean() > 0.99 and opened[rim].mean() < 0.1  # but where it meets the cell
    # the radius is in the model's px: on an image at a quarter of the model's scale it opens by 1 px, and the rim stays
    quarter = segment_train.predict_labels(_DarkIsForeground(), image, tile=128, opening=4, scale=4.0) > 0
    assert quarter[rim].mean() > 0.5


def test_synthetic_red_cells_only_for_training_images_without_red_cells():
    rng = np.random.default_rng(0)
    pale = segment_train.Pairs([smear(rng, 64, 64) for _ in range(5)], ("background", "cell"))
    draw = RedCells(count=12, density=(0.6, 0.6), p=1)
    crowded = segment_train.Pairs([draw(image, mask, rng) for image, mask in pale], pale.classes)
    assert segment_train.pale_background(pale) and not segment_train.pale_background(crowded)
    def draws_red_cells(aug):
        return any(isinstance(t, RedCells) for t in aug.transforms)

    assert draws_red_cells(segment_train.smear_augment(pale))
    assert not draws_red_cells(segment_train.smear_augment(crowded))
    grey = segment_train.Pairs([(image[..., 0], mask) for image, mask in pale], pale.classes)
    assert not segment_train.pale_background(grey)  # stain densities need colour


@pytest.mark.parametrize("name, folder, pale", [("wbc-zheng", "wbc_zheng2018", True),
                                                ("wbc-sigtuple", "wbc_sigtuple", False)])
def test_zheng_crops_have_a_pale_background_and_sigtuple_smears_red_cells(name, folder, pale):
    need(DATASETS / folder)
    pairs, _ = segment_train.prepare(segment_train.load_data(name), cell_diameter_px=64)
    assert segment_train.pale_background(pairs) is pale
