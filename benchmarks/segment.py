"""Segmentation: the WBC notes' U-Net ('unet-seed') against ocula's default ('unet'), on three datasets.

Sections (each recorded in RESULTS.md; `--sections` picks some):
  sigtuple  SigTuple 5-fold CV: fold k validates patches train-N with N % 5 == k, the five large images always
            train. Per-image Dice of the thresholded prediction (no clean-up) on the held-out patches,
            training seconds per fold, inference ms per 128x128 patch in torch and ONNX Runtime.
  zheng     Zheng 2018 Dataset 1, shuffled 5-fold CV: per-image Dice of the nucleus and of the whole cell
            (nucleus + cytoplasm) from a 3-class softmax model.
  isbi      ISBI 2012 membranes: train on slices 0-24, test on the 5 left out (25-29): pixel error and
            adapted Rand error.
  large     The notes' candidate-crop inference against tiled inference on the five large SigTuple images,
            with a model trained on the 164 patches only (in the CV the large images are training data).
  cross     Cross-dataset, with the default blood recipe: train on SigTuple, test on Zheng Dataset 1 (whole cell =
            nucleus + cytoplasm); train on Zheng, test on SigTuple (patches and large smears); train on both
            (fold 0 of each held out), test on each. Per-image whole-cell Dice; overlays of the worst images go to
            --out.
  ablation  What makes it generalise: each variant of the recipe (`--variants`) trained on SigTuple and on Zheng
            (`--seeds` models each) and scored across (SigTuple -> Zheng, Zheng -> SigTuple patches), with and
            without the known scale.
  bccd      A third domain to choose recipes on: each variant (`--variants`) trained on SigTuple and on Zheng,
            scored on BCCD's validation smears, which have WBC boxes only: F1 of predicted objects against them.

Every training holds out 10% of its own training images for checkpoint selection and early stopping, so no test
image ever steers training. `--quick` (one fold, 2 epochs of 8 crops, a few test images, nothing recorded)
checks that the script runs; budget the real run with --epochs, --folds, --models, --crops and --sections.

    python benchmarks/segment.py [--epochs 30] [--seed-epochs 20] [--folds 5] [--models unet-seed unet]
                                 [--crops 256] [--quick]
"""

from __future__ import annotations

import argparse
import copy
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).parent))
from common import markdown_table, per_item_us, record  # noqa: E402

import ocula  # noqa: E402
from ocula.api import Model  # noqa: E402
from ocula.compression.quantize import quantize_int8  # noqa: E402
from ocula.data import registry  # noqa: E402
from ocula.data.boxes import box_iou_np  # noqa: E402
from ocula.data.draw import draw_boxes  # noqa: E402
from ocula.data.paired_transforms import Affine, BackgroundShift, RedCells, blood_smear_augment  # noqa: E402
from ocula.data.segmentation import folds, overlay  # noqa: E402
from ocula.plots import image_grid  # noqa: E402
from ocula.export.onnx import onnx_session  # noqa: E402
from ocula.models.unet import count_parameters  # noqa: E402
from ocula.tasks import segment_train  # noqa: E402
from ocula.tasks.detect import greedy_match  # noqa: E402
from ocula.tasks.segment import predict_candidates, segmentation_scores  # noqa: E402

SECTIONS = ("sigtuple", "zheng", "isbi", "large", "cross", "ablation", "bccd")
NOTES_DICE = 0.9427  # the notes' Dice, measured on their own training set
LABEL_GRID = 4  # SigTuple's masks change value only on multiples of 4 px (measured below)
UNET_PAPER_RAND = 0.0382  # U-Net paper, ISBI 2012 hidden test set, scored by the organisers


def log(message: str) -> None:
    print(message, flush=True)


def mean_std(values) -> str:
    return f"{np.mean(values):.4f} ± {np.std(values):.4f}" if len(values) else "-"


def dice(pred: np.ndarray, truth: np.ndarray) -> float:
    """Dice of one binary mask pair (both empty scores 1)."""
    return segmentation_scores(pred.astype(np.int64), truth.astype(np.int64), num_classes=2)["dice"]


def foreground_probs(model: Model, image: np.ndarray) -> np.ndarray:
    """The tiled foreground probabilities that Model.predict thresholds (it returns only the mask)."""
    s = segment_train.tiling(model.info)
    return segment_train.predict_probs(model.module, image, tile=s["tile"], overlap=s["overlap"], scale=s["scale"],
                                       stain=s["stain"], flips=s["flips"])[0].numpy()


def boundaries_on_grid(masks, step: int) -> float:
    """Fraction of the masks' label changes (between neighbouring pixels) that fall on a multiple of `step`."""
    on, total = 0, 0
    for mask in masks:
        for axis in (0, 1):
            idx = np.nonzero(np.diff(mask.astype(np.int8), axis=axis))[axis] + 1
            on, total = on + int((idx % step == 0).sum()), total + len(idx)
    return on / max(total, 1)


def snap(probs: np.ndarray, step: int) -> np.ndarray:
    """Binary mask drawn the way SigTuple's labels are: one decision per step x step block (mean prob > 0.5)."""
    h, w = probs.shape
    blocks = probs.reshape(h // step, step, w // step, step).mean((1, 3)) > 0.5
    return np.kron(blocks, np.ones((step, step), bool))


def fit(model_name: str, train_set, dataset: str, args):
    """Train with an inner 10% hold-out for selection; returns (model, seconds, epochs run). The training sets
    are index subsets (folds, slices, the patches alone), which ocula.train cannot take."""
    fit_set, select_set = segment_train.split(train_set, fold=None, val_fraction=0.1, seed=args.seed)
    setup = segment_train.DATASETS[dataset]
    config = segment_train.default_config(model_name, epochs=epochs_for(model_name, args), seed=args.seed,
                                          threads=args.threads, early_stopping=args.patience)
    with tempfile.TemporaryDirectory() as tmp:
        start = time.perf_counter()
        model, _, history = segment_train.fit(fit_set, model_name, config, val_set=select_set, crop=setup["crop"],
                                              augment=setup["augment"], crops_per_epoch=args.crops,
                                              run_dir=Path(tmp), progress=False, cell_diameter=setup["cell_diameter"],
                                              stain=setup["stain"], flips=setup["flips"])
    return Model(model), time.perf_counter() - start, len(history)


def epochs_for(model_name: str, args) -> int:
    return args.seed_epochs if model_name == "unet-seed" and args.seed_epochs else args.epochs


def test_pairs(data, indices, args):
    pairs = segment_train.decode(data.subset(indices))
    return pairs[:args.limit] if args.limit else pairs


def latency_ms(model: Model, int8: Model, size: int = 128) -> tuple[float, float, float]:
    """Best-of-5 milliseconds for one size x size RGB patch through the network: torch, ONNX Runtime, and ONNX
    Runtime on the int8 model (ONNX Runtime at its default threads, one per core)."""
    x = torch.rand(1, 3, size, size) * 255
    with torch.no_grad():
        torch_ms = per_item_us(lambda: model.module(x), 1) / 1000
    with tempfile.TemporaryDirectory() as tmp:
        model.export("onnx", Path(tmp) / "m.onnx")
        sessions = [onnx_session(Path(tmp) / "m.onnx"), int8.module.session]
        ort_ms, int8_ms = (per_item_us(lambda: s.run(None, {"image": x.numpy()}), 1) / 1000 for s in sessions)
    return torch_ms, ort_ms, int8_ms


def quantized(model: Model, train_set, seed: int) -> Model:
    """`model` in int8 as `ocula compress --method int8` makes it, calibrated on tiles of its training images."""
    inputs = segment_train.calibration_inputs(model.module, train_set, None, 512, seed)
    with tempfile.TemporaryDirectory() as tmp:  # the ONNX Runtime session holds the graph in memory
        return ocula.load(quantize_int8(copy.deepcopy(model.module).cpu(), inputs, Path(tmp) / "int8.onnx"))


def bench_sigtuple(args) -> str:
    data = registry.load("wbc-sigtuple", "train", args.data_dir)
    patches = [mask for _, mask in segment_train.decode(registry.load("wbc-sigtuple", "patches", args.data_dir))]
    on_grid = boundaries_on_grid(patches, LABEL_GRID)
    rows, grid_rows = [], []
    for name in args.models:
        image_dice, fold_dice, seconds, epochs, snapped, ceiling, int8_dice = [], [], [], [], [], [], []
        for k, (train, test) in enumerate(folds(data, 5)[:args.folds]):
            model, s, e = fit(name, data.subset(train), "wbc-sigtuple", args)
            int8 = quantized(model, data.subset(train), args.seed)
            d = []
            for image, mask in test_pairs(data, test, args):
                probs = foreground_probs(model, image)
                on_labels_grid = snap(probs, LABEL_GRID)
                d.append(dice(probs > 0.5, mask))
                snapped.append(dice(on_labels_grid, mask))
                ceiling.append(dice(on_labels_grid, probs > 0.5))
                int8_dice.append(dice(foreground_probs(int8, image) > 0.5, mask))
            image_dice += d
            fold_dice.append(np.mean(d))
            seconds.append(s)
            epochs.append(e)
            log(f"sigtuple {name} fold {k}: per-image Dice {np.mean(d):.4f} on {len(d)} patches, {s:.0f} s, "
                f"{e} epochs")
        torch_ms, ort_ms, int8_ms = latency_ms(model, int8)
        grid_rows.append([name, mean_std(image_dice), mean_std(snapped), mean_std(ceiling)])
        rows.append([name, f"{count_parameters(model.module):,}", f"{mean_std(image_dice)} (n={len(image_dice)})",
                     " / ".join(f"{v:.3f}" for v in fold_dice), f"{np.mean(seconds):.0f}",
                     " / ".join(map(str, epochs)), f"{torch_ms:.1f}", f"{ort_ms:.1f}", mean_std(int8_dice),
                     f"{int8_ms:.1f}"])
    table = markdown_table(["model", "params", "held-out per-image Dice", "fold means", "train s / fold",
                            "epochs", "torch ms / patch", "ORT ms / patch", "int8: Dice", "int8: ORT ms / patch"],
                           [["notes' U-Net, as reported (training set)", "7,846,081", f"{NOTES_DICE}", "", "", "",
                             "", "", "", ""]] + rows)
    grid = markdown_table(["model", "Dice (as above)", f"Dice, prediction drawn on the {LABEL_GRID}-px grid",
                           f"Dice of the prediction with itself drawn on the {LABEL_GRID}-px grid"], grid_rows)
    return table + (f"\n\nFolds run: {args.folds} of 5 (fold k validates patches train-N with N % 5 == k; the five "
                    f"large images always train). Up to {args.epochs} epochs ({epochs_for('unet-seed', args)} for "
                    f"unet-seed) of {args.crops or 'all'} random crops, bf16 autocast, early stopping on a 10% inner "
                    "hold-out. Dice of the thresholded prediction, no clean-up. Latency: one 128x128 patch, best of 5 "
                    f"(torch at {args.threads} threads, ONNX Runtime at one per core). int8: each fold's model "
                    "quantized (ONNX Runtime QDQ, per-channel weights, activations calibrated on one tile of each of "
                    "the fold's training images) and scored on the same held-out patches."
                    f"\n\nThe labels are coarse: {on_grid:.1%} of the label boundaries of the 164 patches lie on a "
                    f"{LABEL_GRID}-px grid, as if drawn at 32x32 and enlarged. The third column below is the Dice "
                    "between a smooth mask and the same mask drawn on that grid: an estimate of the ceiling such "
                    "labels put on any model. The second is the Dice when the model's prediction is drawn on the same "
                    "grid (an analysis of the labels, not a way to segment):\n\n" + grid)


def bench_zheng(args) -> str:
    data = registry.load("wbc-zheng", "all", args.data_dir)
    rows = []
    for name in args.models:
        nucleus, cell, seconds = [], [], []
        for k, (train, test) in enumerate(folds(data, 5)[:args.folds]):
            model, s, _ = fit(name, data.subset(train), "wbc-zheng", args)
            for image, mask in test_pairs(data, test, args):
                pred = model.predict(image)[0].mask
                nucleus.append(dice(pred == 2, mask == 2))
                cell.append(dice(pred > 0, mask > 0))
            seconds.append(s)
            log(f"zheng {name} fold {k}: nucleus {np.mean(nucleus):.4f}, cell {np.mean(cell):.4f}, {s:.0f} s")
        rows.append([name, mean_std(nucleus), mean_std(cell), f"{np.mean(seconds):.0f}"])
    table = markdown_table(["model", "nucleus Dice", "whole-cell Dice", "train s / fold"], rows)
    return table + (f"\n\nPer-image Dice (mean ± std) over the held-out images of {args.folds} of 5 shuffled folds "
                    "(seed 0); whole cell = nucleus + cytoplasm.")


def bench_isbi(args) -> str:
    from skimage.measure import label
    from skimage.metrics import adapted_rand_error

    data = registry.load("isbi2012", "train", args.data_dir)
    train, test = np.arange(25), np.arange(25, 30)
    rows = []
    for name in args.models:
        model, s, _ = fit(name, data.subset(train), "isbi2012", args)
        pixel, rand, cell = [], [], []
        for image, mask in test_pairs(data, test, args):
            pred = model.predict(image)[0].mask
            pixel.append(float((pred != mask).mean()))
            # Segments are the 4-connected cell regions; membrane (0) pixels of the truth are ignored.
            rand.append(adapted_rand_error(label(mask == 1, connectivity=1), label(pred == 1, connectivity=1))[0])
            cell.append(dice(pred == 1, mask == 1))
            log(f"isbi {name}: pixel error {pixel[-1]:.4f}, adapted Rand error {rand[-1]:.4f}")
        rows.append([name, mean_std(pixel), mean_std(rand), mean_std(cell), f"{s:.0f}"])
    table = markdown_table(["model", "pixel error", "adapted Rand error", "cell Dice", "train s"], rows)
    return table + ("\n\nTrained on slices 0-24 (2 of them held out for selection), scored on slices 25-29 with "
                    "skimage.metrics.adapted_rand_error on the thresholded prediction, no post-processing. NOT "
                    f"comparable with the U-Net paper's Rand error {UNET_PAPER_RAND}: that is on the hidden 30-slice "
                    "test set, scored by the challenge organisers with their own procedure.")


def bench_large(args) -> str:
    patches = registry.load("wbc-sigtuple", "patches", args.data_dir)
    large = segment_train.decode(registry.load("wbc-sigtuple", "large", args.data_dir))
    large = large[:2] if args.quick else large
    rows = []
    for name in args.models:
        model, _, _ = fit(name, patches, "wbc-sigtuple", args)
        tile = segment_train.tiling(model.info)
        min_area = tile["min_area"]
        methods = {
            "tiled": lambda image: model.predict(image, min_area=0)[0].mask > 0,
            f"tiled, objects >= {min_area} px (default)": lambda image: model.predict(image)[0].mask > 0,
            "candidate crops (notes)": lambda image: predict_candidates(
                model.module, torch.tensor(image).permute(2, 0, 1).float(), crop=128, min_area=500)[0].numpy() > 0.5}
        for method, run in methods.items():
            scores, seconds = [], []
            for image, mask in large:
                start = time.perf_counter()
                pred = run(image)
                seconds.append(time.perf_counter() - start)
                scores.append(dice(pred, mask))
            log(f"large {name} {method}: Dice {np.mean(scores):.4f}, {np.mean(seconds):.2f} s / image")
            rows.append([name, method, mean_std(scores), " / ".join(f"{v:.3f}" for v in scores),
                         f"{np.mean(seconds):.2f}"])
    table = markdown_table(["model", "inference", "Dice (mean ± std)", "per image", "s / image"], rows)
    sizes = ", ".join(f"{img.shape[1]}x{img.shape[0]}" for img, _ in large)
    return table + (f"\n\nLarge images: {sizes}. The model is trained on the 164 patches only. Tiled: "
                    f"{tile['tile']} px windows, {tile['overlap']:.0%} overlap, cosine blending; the default then "
                    "drops predicted objects under the model file's min_area (the notes' 500 px). Candidate crops: "
                    "128x128 around each dark blob of >= 500 px (Otsu threshold), as in the notes.")


# ------------------------------------------------------------------------------------------------ cross-dataset

# The recipe before issue 14: native scale, mild zoom and stain jitter, half the crops centred on a cell.
MILD_STAIN = dict(stain_sigma=0.05, stain_bias=0.03, tint=0.0, hue=0.02)
BEFORE = dict(augment=lambda _: blood_smear_augment(scale=(0.9, 1.1), **MILD_STAIN), cell_diameter=None, stain=None,
              flips=False, foreground=0.5, binary=False, anchor=False)
# Each variant changes BEFORE in one respect (on top of the 64 px scale once that is measured to help).
VARIANTS = {
    "before": {},
    "scale": dict(cell_diameter=64),
    "scale-aug": dict(cell_diameter=64, augment=lambda _: blood_smear_augment(scale=(0.7, 1.4), **MILD_STAIN)),
    "stain-jitter": dict(cell_diameter=64, augment=lambda _: blood_smear_augment(stain_sigma=0.25, stain_bias=0.08,
                                                                                 tint=0.3, hue=0.05)),
    "reinhard": dict(cell_diameter=64, stain="reinhard"),
    "macenko": dict(cell_diameter=64, stain="macenko"),
    "negatives": dict(cell_diameter=64, foreground=0.25),
    "binary": dict(cell_diameter=64, binary=True),
    # Synthetic red cells (blood_smear_augment's are the shifted ones) on both training sets, whatever their
    # background: the benchmark draws them where the recipe's pale_background rule would not.
    "red-cells": dict(cell_diameter=64, anchor=True, augment=lambda _: with_red_cells(RedCells())),
    "no-red-cells": dict(cell_diameter=64, anchor=True, augment=lambda _: blood_smear_augment()),
    "crowded-red-cells": dict(cell_diameter=64, anchor=True, augment=lambda _: with_red_cells(RedCells(count=12))),
    "pink-red-cells": dict(cell_diameter=64, anchor=True, augment=lambda _: with_red_cells(RedCells(lilac=0.0))),
    "shifted-red-cells": dict(cell_diameter=64, anchor=True, augment=lambda _: blood_smear_augment(red_cells=0.5)),
    "shifted-6-red-cells": dict(cell_diameter=64, anchor=True,
                                augment=lambda _: with_red_cells(RedCells(), shift=True)),
    "shifted-pink-red-cells": dict(cell_diameter=64, anchor=True,
                                   augment=lambda _: with_red_cells(RedCells(count=12, lilac=0.0), shift=True)),
    "white-balance": dict(cell_diameter=64, anchor=True, augment=segment_train.smear_augment, stain="white"),
    "neutral-light": dict(cell_diameter=64, anchor=True, augment=segment_train.smear_augment, stain="neutral"),
    "tint-0.5": dict(cell_diameter=64, anchor=True, augment=lambda pairs: segment_train.smear_augment(pairs, tint=0.5)),
    "lamp": dict(cell_diameter=64, anchor=True, augment=lambda pairs: segment_train.smear_augment(pairs, lamp=0.5)),
    "random-conv": dict(cell_diameter=64, anchor=True,
                        augment=lambda pairs: segment_train.smear_augment(pairs, random_conv=0.5)),
    "recipe": dict(recipe=True),  # the task's default blood recipe (segment_train.BLOOD)
    # The recipe with a wider encoder and decoder: the seed's widths, 4x the parameters and FLOPs.
    "wide": dict(recipe=True, arch_args=dict(widths=(32, 64, 128, 256, 512))),
    # The recipe started from a masked autoencoder (`pretrained`) of the training images, and of them plus BCCD's
    # training smears (a third microscope, unlabelled: its validation smears stay unseen for the bccd section).
    "pretrained": dict(recipe=True, pretrain=False),
    "pretrained-bccd": dict(recipe=True, pretrain=True),
    # The recipe evaluating and keeping a moving average of its weights (flatter minima transfer better: SWAD).
    "ema": dict(recipe=True, config=dict(ema=0.99)),
    # The recipe predicting with batch-norm statistics of the other microscope's unlabelled images (AdaBN).
    "adabn": dict(recipe=True, adapt=True),
    "opening": dict(recipe=True, cleanup="opening"),
    # The two options that each lift the cross matrix most, together.
    "neutral-opening": dict(cell_diameter=64, anchor=True, augment=segment_train.smear_augment, stain="neutral",
                            cleanup="opening"),
}
PREDICTION_ONLY = ("adapt", "cleanup")  # variant settings that change how the models predict, not how they train


def with_red_cells(red_cells: RedCells, shift: bool = False):
    """The blood augmentation with these red cells after its warp (and a BackgroundShift before them)."""
    aug = blood_smear_augment()
    after = next(i for i, t in enumerate(aug.transforms) if isinstance(t, Affine)) + 1
    aug.transforms[after:after] = ([BackgroundShift(p=red_cells.p)] if shift else []) + [red_cells]
    return aug


def recipe(variant: str) -> dict:
    """fit() settings of a variant; 'recipe' is whatever segment_train.DATASETS holds for blood today."""
    changes = dict(VARIANTS[variant])
    if changes.pop("recipe", False):
        blood = segment_train.BLOOD
        return dict(BEFORE, augment=segment_train.AUGMENTS[blood["augment"]], cell_diameter=blood["cell_diameter"],
                    stain=blood["stain"], flips=blood["flips"], anchor=True, **changes)
    return {**BEFORE, **changes}


def fit_on(sources, args, settings: dict, seed: int | None = None) -> tuple[Model, float]:
    """Train 'unet' on one or more datasets, each with its own 10% inner hold-out for selection; the crop is the
    smallest of the datasets' (a Zheng image is ~100 px). The seconds include any pretraining."""
    seed = args.seed if seed is None else seed
    parts = [segment_train.split(d, fold=None, val_fraction=0.1, seed=seed) for d in sources]
    crop = min(segment_train.DATASETS[d.name]["crop"] for d in sources)
    settings = dict(settings, binary=settings["binary"] or len(sources) > 1)  # together they share whole cells
    for key in PREDICTION_ONLY:
        settings.pop(key, None)
    config = segment_train.default_config("unet", epochs=args.epochs, seed=seed, threads=args.threads,
                                          early_stopping=args.patience, **settings.pop("config", {}))
    start = time.perf_counter()
    if "pretrain" in settings:
        with_bccd = settings.pop("pretrain")
        settings["init"] = pretrained([t for t, _ in parts], args, settings, crop=crop, seed=seed,
                                      more=bccd_train_images(args, settings["cell_diameter"]) if with_bccd else [])
    with tempfile.TemporaryDirectory() as tmp:
        model, _, _ = segment_train.fit([t for t, _ in parts], "unet", config, val_set=[v for _, v in parts],
                                        crop=crop, crops_per_epoch=args.crops, run_dir=Path(tmp), progress=False,
                                        **settings)
    return Model(model), time.perf_counter() - start


def pretrained(train_sets, args, settings: dict, *, crop: int, seed: int, more=(), blank: float = 0.5,
               square: int = 16) -> dict:
    """Weights of a 'unet' trained as a masked autoencoder (inpainting, as in context encoders and MAE) on the
    training images and the unlabelled images `more`, all at the recipe's cell scale, with its augmentation: a share
    `blank` of each crop's `square` px squares is set to the training images' mean colour and the network (3
    outputs) redraws them, scored by the squared error on the blanked pixels in normalised colours. Skip connections
    cannot copy what is blanked, so the encoder must learn what cells and smears look like around it."""
    from ocula.engine.device import runtime
    from ocula.engine.trainer import Trainer
    from ocula.models import build

    train, _ = segment_train.prepare(train_sets, cell_diameter_px=settings["cell_diameter"],
                                     binary=settings["binary"])
    arch, info = segment_train.model_info(train, "unet", crop=crop, dataset="pretraining")
    images = segment_train.Pairs([*train, *((image, np.zeros(image.shape[:2], np.uint8)) for image in more)],
                                 train.classes)
    with runtime(seed=seed):
        model = build(info.arch, **dict(arch, num_classes=3))
    config = segment_train.default_config("unet", epochs=args.pretrain_epochs, seed=seed, threads=args.threads,
                                          monitor="loss", mode="min", early_stopping=0)
    batches = segment_train.CropBatches(images, crop=crop, batch_size=config.batch_size, foreground=0.0,
                                        transform=settings["augment"](train), crops=args.crops)
    mean = torch.tensor(arch["mean"]).view(1, 3, 1, 1) * 255

    def loss(m, x, _):
        hidden = torch.rand(len(x), 1, crop // square, crop // square, device=x.device) < blank
        hidden = torch.nn.functional.interpolate(hidden.float(), size=x.shape[-2:], mode="nearest")
        redrawn = m(torch.lerp(x, mean.to(x.device), hidden)).float()
        target = x * m.scale - m.shift  # the normalised image
        return ((redrawn - target) ** 2 * hidden).sum() / (3 * hidden.sum()).clamp(min=1)

    history = Trainer(model, config, loss_fn=loss, train_batches=batches, info=info, progress=False).fit()
    log(f"masked autoencoder on {len(images)} images, seed {seed}: loss {history[0]['loss']:.3f} -> "
        f"{history[-1]['loss']:.3f} in {len(history)} epochs")
    return model.state_dict()


def bccd_train_images(args, cell_diameter: float) -> list:
    """BCCD's training smears (unlabelled use) resampled to `cell_diameter` from their WBC boxes' median diameter."""
    data = registry.load("bccd", "train", args.data_dir)
    wbc = data.classes.index("WBC")
    smears = list(data)
    factor = cell_diameter / median_diameter([target["boxes"][target["labels"] == wbc] for _, target in smears])
    return [segment_train.resize(image, factor) for image, _ in smears]


def median_diameter(boxes) -> float:
    """Median over a list of box arrays (xyxy) of sqrt(w h), the equivalent diameter of the ellipse a box encloses."""
    boxes = np.concatenate(boxes)
    return float(np.median(np.sqrt((boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1]))))


class _BatchStatistics(torch.nn.Module):
    """`model` with its batch norms kept in training mode (normalising by each batch's own statistics and
    averaging them into the running ones) even when prediction switches it to eval."""

    def __init__(self, model: torch.nn.Module, norms: list):
        super().__init__()
        self.model, self.norms = model, norms

    def train(self, mode: bool = True):
        super().train(mode)
        for norm in self.norms:
            norm.train()
        return self

    def forward(self, x):
        return self.model(x)


def adapt_batch_norm(model, images: list[np.ndarray], **settings):
    """AdaBN (Li et al. 2016): a copy of `model` whose batch-norm statistics are those of the unlabelled `images`,
    seen as prediction with `settings` (`tiling`) sees them; the learned weights stay."""
    adapted = copy.deepcopy(model)
    norms = [m for m in adapted.modules() if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)]
    for norm in norms:
        norm.reset_running_stats()
        norm.momentum = None  # the running statistics become the average over every batch seen
    tiles = {k: settings[k] for k in ("tile", "overlap", "scale", "stain", "flips")}
    for image in images:
        segment_train.predict_probs(_BatchStatistics(adapted, norms), image, **tiles)
    return adapted.eval()


# Clean-up of a prediction: with the file's opening, the default (reach), and less of it (see bench_cross's note).
CLEANUPS = ("opening", "reach", "objects", "off")


def prediction_settings(model: Model, diameter: float | None, cleanup: str = "reach") -> dict:
    """The model file's inference settings for cells `diameter` px across, with the clean-up `cleanup` (one of
    CLEANUPS): 'reach' is the default, 'opening' adds the file's opening (`predict --opening`), 'objects' keeps
    foreground near no nucleus, 'off' objects without one too."""
    settings = segment_train.tiling(model.info, diameter, opening=cleanup == "opening")
    settings["reach"] = settings["reach"] if cleanup in ("opening", "reach") else None
    settings["anchor"] = settings["anchor"] if cleanup != "off" else None
    return settings


def cell_dice(model: Model, pairs, *, known_scale: bool, flips: bool | None = None, cleanup: str = "reach",
              adapt: bool = False):
    """Per-image whole-cell Dice and predictions; with `known_scale` the images are resampled from the cell
    diameter measured on their masks (a user who knows the pixel size), else the training images' is assumed.
    `cleanup`: see `prediction_settings`. `adapt`: each half of the images (even and odd places) is predicted by
    the model with the batch-norm statistics of the other half, so no image is predicted with statistics it
    contributed to."""
    diameter = segment_train.cell_diameter(segment_train.whole_cells(pairs)) if known_scale else None
    settings = prediction_settings(model, diameter, cleanup)
    settings["flips"] = settings["flips"] if flips is None else flips
    modules = [model.module] * len(pairs)
    if adapt:
        halves = [range(0, len(pairs), 2), range(1, len(pairs), 2)]
        for own, other in zip(halves, halves[::-1]):
            adapted = adapt_batch_norm(model.module, [pairs[i][0] for i in other], **settings)
            for i in own:
                modules[i] = adapted
    preds = [segment_train.predict_labels(m, image, **settings) for m, (image, _) in zip(modules, pairs)]
    return [dice(p > 0, m > 0) for p, (_, m) in zip(preds, pairs)], preds


def worst_overlays(pairs, preds, scores, path: Path, title: str, n: int = 6) -> Path:
    """Truth and prediction overlays of the `n` images with the lowest Dice."""
    images, titles = [], []
    for i in np.argsort(scores)[:n]:
        image, mask = pairs[i]
        images += [overlay(image, (mask > 0).astype(np.uint8)), overlay(image, (preds[i] > 0).astype(np.uint8))]
        titles += [f"#{i} truth", f"prediction, Dice {scores[i]:.3f}"]
    return image_grid(images, titles, path, cols=4, title=title)


def cross_data(args):
    load = lambda name, split: registry.load(name, split, args.data_dir)  # noqa: E731
    return load("wbc-sigtuple", "train"), load("wbc-zheng", "all")


def limited(pairs, args):
    return pairs[:args.limit] if args.limit else pairs


def bench_ablation(args) -> str:
    sigtuple, zheng = cross_data(args)
    sig_test = limited(segment_train.decode(registry.load("wbc-sigtuple", "patches", args.data_dir)), args)
    zheng_test = limited(segment_train.decode(zheng), args)
    seeds = range(args.seed, args.seed + args.seeds)
    rows, sigtuple_models = [], {}
    for variant in args.variants:
        settings = recipe(variant)
        # SigTuple is binary, with no nucleus class: variants differing only in `binary` or `anchor` share its model.
        key = repr(sorted((k, v) for k, v in settings.items() if k not in ("binary", "anchor", *PREDICTION_ONLY)))
        if key not in sigtuple_models:
            sigtuple_models[key] = [fit_on([sigtuple], args, settings, seed) for seed in seeds]
        s_fits = sigtuple_models[key]
        z_fits = [fit_on([zheng], args, settings, seed) for seed in seeds]

        def pooled(fits, pairs, **kwargs) -> str:
            """Per-image Dice pooled over the seeds' models, then each seed's mean."""
            per_seed = [cell_dice(model, pairs, adapt=settings.get("adapt", False),
                                  cleanup=settings.get("cleanup", "reach"), **kwargs)[0]
                        for model, _ in fits]
            return f"{mean_std(np.concatenate(per_seed))} ({' '.join(f'{np.mean(s):.3f}' for s in per_seed)})"

        cells = []
        for fits, pairs in ((s_fits, zheng_test), (z_fits, sig_test)):
            for known in (False, True):
                cells.append(pooled(fits, pairs, known_scale=known) if known or
                             fits[0][0].info.preprocess["cell_diameter"] else "(no scale set)")
        if variant in args.flip_variants:
            flipped = [pooled(fits, pairs, known_scale=True, flips=True)
                       for fits, pairs in ((s_fits, zheng_test), (z_fits, sig_test))]
        else:
            flipped = ["", ""]
        seconds = [np.mean([sec for _, sec in fits]) for fits in (s_fits, z_fits)]
        log(f"ablation {variant}: S->Z {cells[:2]} Z->S {cells[2:]} flips {flipped}; {seconds[0]:.0f} + "
            f"{seconds[1]:.0f} s")
        rows.append([variant, *cells[:2], flipped[0], *cells[2:], flipped[1], f"{seconds[0]:.0f} / {seconds[1]:.0f}"])
    table = markdown_table(["variant", "SigTuple -> Zheng, scale assumed", "scale known", "+ flips",
                            "Zheng -> SigTuple, scale assumed", "scale known", "+ flips", "train s (S / Z)"], rows)
    return table + (f"\n\nPer-image whole-cell Dice (mean ± std, pooled over {args.seeds} training seed(s); in "
                    "brackets each seed's mean) of a 'unet' trained on all of one dataset (10% "
                    f"held out for selection) and tested on the other: Zheng Dataset 1's {len(zheng_test)} images, "
                    f"SigTuple's {len(sig_test)} patches. Short runs for the comparison: up to {args.epochs} epochs "
                    f"of {args.crops} crops, patience {args.patience}. 'Scale known' resamples the test images "
                    "from the cell diameter measured on their own masks (a user who gives the pixel size); 'scale "
                    "assumed' takes them to be at the training images' scale. Variants change the former recipe "
                    "('before': native scale, zoom 0.9-1.1, stain jitter 0.05 / 0.03, hue 0.02, half the crops on "
                    "a cell) in one respect: 'scale' resamples every dataset to 64 px cells; 'scale-aug' adds zoom "
                    "0.7-1.4; 'stain-jitter' OD-space stain jitter 0.25 / 0.08, RGB tint 0.3 and hue 0.05; "
                    "'reinhard' normalises colours (L*a*b* statistics); 'macenko' unmixes the two stains and "
                    "rebuilds each image with the training images' stain colours, amounts and background light; "
                    "'negatives' centres only a quarter of the crops on a cell; 'binary' trains Zheng as whole cells "
                    "(SigTuple is binary already); 'recipe' is the default blood recipe (with the nucleus anchor: "
                    "cross section); 'red-cells' is the recipe with synthetic red cells drawn on the background "
                    "of half the crops; 'wide' is the recipe with twice the widths (32-512, the seed's): 4x the "
                    "parameters and FLOPs; 'pretrained' starts the recipe from a masked autoencoder (half of each "
                    f"crop's 16 px squares blanked and redrawn, {args.pretrain_epochs} epochs of {args.crops} crops "
                    "with the recipe's augmentation) of the training images, 'pretrained-bccd' of them and BCCD's "
                    "training smears (unlabelled); 'ema' is the recipe evaluating and keeping a moving average of "
                    "its weights (decay 0.99 per step); 'adabn' the recipe predicting each half of the test images "
                    "with batch-norm statistics re-estimated on the other half (AdaBN; BCCD: on its training "
                    "smears); 'neutral-light' the recipe with each image's background light made a grey of its own "
                    "brightness, in training and prediction (`--stain neutral`); 'opening' the recipe's models "
                    "predicting with the opening (`--opening`, see the cross section); 'random-conv' the recipe "
                    "with half the crops recoloured by a random shallow network (GIN: four 1x1 or 3x3 convolutions "
                    "with random weights, given the crop's colour means and spreads and mixed into it by a random "
                    "share), so that colour stops being a cue and shape must carry the decision; "
                    "'neutral-opening' neutral light and the opening together.")


# ------------------------------------------------------------------------------------------------ third domain

# BCCD smears whose white cell has no WBC box (../shared/datasets/README): a found cell would count as an error.
UNLABELLED_WBC = {f"BloodImage_{n:05d}" for n in (133, 135, 171, 178, 228, 327)}


def bccd_cells(args) -> tuple[list, float]:
    """BCCD's validation smears (a third microscope, stain and magnification, with boxes only) paired with their WBC
    boxes, and the boxes' median diameter."""
    data = registry.load("bccd", "val", args.data_dir)
    wbc = data.classes.index("WBC")
    pairs = [(image, target["boxes"][target["labels"] == wbc]) for image, target in data
             if Path(target["path"]).stem not in UNLABELLED_WBC]
    return limited(pairs, args), median_diameter([b for _, b in pairs])


def object_boxes(labels: np.ndarray) -> np.ndarray:
    """Bounding boxes (xyxy) of the foreground objects (8-connected), largest first."""
    from skimage.measure import label, regionprops

    regions = sorted(regionprops(label(labels > 0, connectivity=2)), key=lambda r: -r.area)
    return np.array([[c0, r0, c1, r1] for r0, c0, r1, c1 in (r.bbox for r in regions)], np.float32).reshape(-1, 4)


def box_counts(model: Model, pairs, diameter: float, adapt_to=(), cleanup: str = "reach") -> tuple[list, list]:
    """Per image (white cells found, objects predicted, WBC boxes, IoUs of the found) with each predicted object
    matched one-to-one to a box by the IoU of its bounding box (>= 0.5, largest object first), at the known scale;
    and the predictions. With images `adapt_to` the model predicts with their batch-norm statistics."""
    settings = prediction_settings(model, diameter, cleanup)
    module = adapt_batch_norm(model.module, adapt_to, **settings) if adapt_to else model.module
    preds = [segment_train.predict_labels(module, image, **settings) for image, _ in pairs]
    counts = []
    for labels, (_, truth) in zip(preds, pairs):
        found = object_boxes(labels)
        overlap = box_iou_np(found, truth)
        match = greedy_match(overlap)
        ious = overlap[np.flatnonzero(match >= 0), match[match >= 0]]
        counts.append((len(ious), len(found), len(truth), ious))
    return counts, preds


def box_masks(boxes, shape, ellipses: bool = False) -> np.ndarray:
    """The pixels inside any of the boxes (xyxy), or inside the ellipse each box encloses."""
    yy, xx = np.mgrid[:shape[0], :shape[1]] + 0.5
    inside = np.zeros(shape, bool)
    for x0, y0, x1, y1 in boxes:
        if ellipses:
            inside |= ((xx - (x0 + x1) / 2) / max((x1 - x0) / 2, 1)) ** 2 + \
                      ((yy - (y0 + y1) / 2) / max((y1 - y0) / 2, 1)) ** 2 <= 1
        else:
            inside |= (xx >= x0) & (xx < x1) & (yy >= y0) & (yy < y1)
    return inside


def in_boxes(preds, pairs) -> float:
    """Share of the predicted foreground pixels inside a WBC box: outside one they are certainly no white cell."""
    inside = sum(np.count_nonzero((labels > 0) & box_masks(boxes, labels.shape)) for labels, (_, boxes) in
                 zip(preds, pairs))
    return inside / max(sum(np.count_nonzero(labels) for labels in preds), 1)


def ellipse_dice(preds, pairs) -> float:
    """Mean per-image Dice of the predicted foreground with the ellipses the WBC boxes enclose: a pixel-level score
    that, unlike box matching, a prediction cannot gain by stray pixels that enlarge a box."""
    return float(np.mean([dice(labels > 0, box_masks(boxes, labels.shape, ellipses=True))
                          for labels, (_, boxes) in zip(preds, pairs)]))


def totals(counts) -> tuple[int, int, int]:
    """White cells found, objects predicted and WBC boxes, summed over `box_counts`."""
    return tuple(sum(c[i] for c in counts) for i in range(3))


def f1(counts) -> float:
    found, predicted, truths = totals(counts)
    return 2 * found / max(predicted + truths, 1)


def bench_bccd(args) -> str:
    sigtuple, zheng = cross_data(args)
    bccd, diameter = bccd_cells(args)
    seeds = range(args.seed, args.seed + args.seeds)
    out = Path(args.out)
    rows, trained = [], {}
    for variant in args.variants:
        settings = recipe(variant)
        adapt_to = [image for image, _ in registry.load("bccd", "train", args.data_dir)] \
            if settings.get("adapt") else ()
        for trained_on, data in (("SigTuple", sigtuple), ("Zheng", zheng)):
            if trained_on not in args.trained_on:
                continue
            # Variants that differ only in how they predict share their models.
            key = repr((trained_on, sorted((k, v) for k, v in settings.items() if k not in PREDICTION_ONLY)))
            if key not in trained:
                trained[key] = [fit_on([data], args, settings, seed) for seed in seeds]
            fits = trained[key]
            runs = [box_counts(model, bccd, diameter, adapt_to, settings.get("cleanup", "reach"))
                    for model, _ in fits]
            pooled = [c for counts, _ in runs for c in counts]
            pooled_preds, pooled_pairs = [p for _, preds in runs for p in preds], bccd * len(runs)
            found, predicted, truths = totals(pooled)
            ious = np.concatenate([c[3] for c in pooled])
            rows.append([variant, trained_on, f"{f1(pooled):.3f}", " ".join(f"{f1(c):.3f}" for c, _ in runs),
                         f"{found / max(predicted, 1):.3f}", f"{found / max(truths, 1):.3f}",
                         f"{np.mean(ious):.3f}" if len(ious) else "-",
                         f"{in_boxes(pooled_preds, pooled_pairs):.3f}",
                         f"{ellipse_dice(pooled_preds, pooled_pairs):.3f}",
                         f"{np.mean([s for _, s in fits]):.0f}"])
            log(f"bccd {variant} {trained_on}: F1 {rows[-1][2]} ({rows[-1][3]})")
            counts, preds = runs[0]
            errors = [c[1] + c[2] - 2 * c[0] for c in counts]
            shown = np.argsort(errors, kind="stable")[::-1][:6]
            image_grid([draw_boxes(overlay(bccd[i][0], (preds[i] > 0).astype(np.uint8)), bccd[i][1], classes=["WBC"])
                        for i in shown],
                       [f"#{i}: {counts[i][0]} of {counts[i][2]} found, {counts[i][1]} objects" for i in shown],
                       out / f"bccd-{variant}-{trained_on}.png", cols=3, inches=3.2,
                       title=f"{variant} trained on {trained_on} (seed {args.seed}) on BCCD: the most errors")
    table = markdown_table(["variant", "trained on", "F1", "F1 per seed", "precision", "recall", "IoU of found",
                            "foreground in WBC boxes", "Dice with box ellipses", "train s"], rows)
    return table + (f"\n\nThe third domain, for choosing between recipes without looking at the cross matrix it is "
                    f"reported on: BCCD's validation smears ({len(bccd)} images, without those the datasets README "
                    "lists with an unlabelled white cell), another microscope, stain and magnification, labelled "
                    "with boxes only. A predicted "
                    "object (8-connected) finds a white cell when its bounding box overlaps the cell's WBC box "
                    "with IoU >= 0.5 (one-to-one, largest object first); F1, precision and recall pooled over "
                    f"{args.seeds} training seed(s). Scale known: the images are resampled from the boxes' median "
                    f"diameter, {diameter:.0f} px (sqrt(w h)). Foreground in WBC boxes: the share of the predicted "
                    "pixels inside a WBC box (those outside are certainly no white cell); Dice with box ellipses: the "
                    "mean per-image Dice of the predicted foreground with the ellipses the WBC boxes enclose (a "
                    "pixel-level score, blind to how a cell fills its box). Prediction as the model "
                    "file says: a Zheng model keeps objects with a nucleus piece of its anchor_area or more, within "
                    "the nucleus' reach ('opening': the same models with the opening, see the cross section). Each "
                    "'unet' is trained on all of one dataset (10% held out for selection), up to "
                    f"{args.epochs} epochs of {args.crops} crops, patience "
                    f"{args.patience}. Variants (the others: see the ablation section): 'no-red-cells', the recipe "
                    "without synthetic red cells on any training set; 'crowded-red-cells', up to 12 red cells per "
                    "crop instead of 6; 'pink-red-cells', red cells without haematoxylin (no lilac); "
                    "'shifted-red-cells', a BackgroundShift (the crop's content moved by up to half its size, the "
                    "strip it uncovers filled with its background light) before up to 12 red cells; "
                    "'shifted-6-' and 'shifted-pink-red-cells', the same with up to 6 red cells, and without "
                    "haematoxylin; 'white-balance', the recipe with each image divided by its own background "
                    "light, in training and prediction (`--stain white`); 'tint-0.5', the recipe's RGB tint in "
                    "optical density widened from 0.3 to 0.5; 'lamp', the recipe with half the crops lit by a Lamp "
                    "(warmth -0.2 to 0.6: blue light dimmed by up to 0.6 OD, green by a fifth of that). Overlays of "
                    "the images with the most errors, with "
                    f"the WBC boxes drawn: {out}/bccd-*.png.")


def bench_cross(args) -> str:
    sigtuple, zheng = cross_data(args)
    settings = recipe("recipe")
    sig_patches = registry.load("wbc-sigtuple", "patches", args.data_dir)
    tests = {"SigTuple patches": limited(segment_train.decode(sig_patches), args),
             "SigTuple large smears": segment_train.decode(registry.load("wbc-sigtuple", "large", args.data_dir))[
                 :args.limit or None],
             "Zheng": limited(segment_train.decode(zheng), args)}
    # Trained together: fold 0 of each is the test (SigTuple's published fold: patches train-N, N % 5 == 0).
    s_train, s_test = folds(sigtuple, 5)[0]
    z_train, z_test = folds(zheng, 5)[0]
    both_tests = {"SigTuple fold 0": limited(segment_train.decode(sigtuple.subset(s_test)), args),
                  "Zheng fold 0": limited(segment_train.decode(zheng.subset(z_test)), args)}
    runs = [("SigTuple", [sigtuple], ["Zheng"]), ("Zheng", [zheng], ["SigTuple patches", "SigTuple large smears"]),
            ("both", [sigtuple.subset(s_train), zheng.subset(z_train)], list(both_tests))]
    out = Path(args.out)
    rows = []
    seeds = range(args.seed, args.seed + args.seeds)
    for trained_on, sources, tested_on in runs:
        trained = [fit_on(sources, args, settings, seed) for seed in seeds]
        has_anchor = trained[0][0].info.preprocess["anchor"] is not None
        seconds = np.mean([sec for _, sec in trained])
        for name in tested_on:
            pairs = {**tests, **both_tests}[name]
            # Without a nucleus class there is nothing to anchor, so 'objects' and 'off' would repeat 'reach'.
            cleanups = CLEANUPS if has_anchor else CLEANUPS[:2]
            for known, cleanup in [(k, c) for k in (True, False) for c in cleanups]:
                runs_scores = [cell_dice(model, pairs, known_scale=known, cleanup=cleanup) for model, _ in trained]
                scores = np.concatenate([sc for sc, _ in runs_scores])
                rows.append([trained_on, name, "known" if known else "assumed",
                             cleanup, mean_std(scores),
                             " ".join(f"{np.mean(sc):.3f}" for sc, _ in runs_scores), f"{np.min(scores):.3f}",
                             f"{np.mean(scores >= 0.9):.0%}", len(pairs), f"{seconds:.0f}"])
                log(f"cross {trained_on} -> {name}, scale {rows[-1][2]}, clean-up {rows[-1][3]}: {rows[-1][4]}")
                if known and cleanup == "reach":  # the default's worst images
                    sc, preds = runs_scores[0]
                    worst_overlays(pairs, preds, sc, out / f"{trained_on}-to-{name.replace(' ', '-')}.png",
                                   f"trained on {trained_on} (seed {args.seed}), tested on {name}: the worst images")
    diameters = {name: segment_train.cell_diameter(segment_train.whole_cells(segment_train.decode(d)))
                 for name, d in (("SigTuple", sigtuple), ("Zheng", zheng))}
    table = markdown_table(["trained on", "tested on", "scale", "clean-up", "per-image Dice",
                            "mean per seed", "worst", "images >= 0.90", "images", "train s"], rows)
    blood = segment_train.BLOOD
    return table + ("\n\nWhole-cell Dice per image (Zheng: nucleus + cytoplasm; a Zheng-trained model's "
                    f"nucleus and cytoplasm merged), pooled over {args.seeds} training seed(s). The default blood "
                    f"recipe ({', '.join(f'{k}={v}' for k, v in blood.items())}): 'unet', up to {args.epochs} "
                    f"epochs of {args.crops} crops, patience {args.patience}, 10% of each training set held out for "
                    "selection. Trained on both: whole cells, crop 96. Clean-up: 'opening' (`predict --opening`) "
                    "opens the foreground by a disk of the largest radius the training masks survive with 99% of "
                    "their pixels (thin red-cell rims painted as cytoplasm go; Zheng's masks allow 9 px at the 64 "
                    "px scale, SigTuple's and both's 1); then a model with a nucleus class keeps only objects "
                    "that hold a nucleus piece of the model's anchor_area (half the training nuclei's smallest, 1st "
                    "percentile), cleared of what lies farther from a nucleus than white cells' pixels do in the "
                    "training masks (99th percentile). The same models with less of it: 'reach' (the default) "
                    "without the opening, 'objects' also without the reach, 'off' without any. Scale: pixel sizes "
                    "are stated by neither dataset; the median whole-cell diameter measured on the masks is "
                    f"{diameters['SigTuple']:.1f} px (SigTuple) and {diameters['Zheng']:.1f} px (Zheng). 'known' "
                    "resamples test images from their measured diameter, 'assumed' at the training images' scale "
                    "(what `ocula predict` does without --cell-diameter). Overlays of the worst images (default "
                    f"clean-up, scale known): {out}/.")


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--sections", nargs="+", default=list(SECTIONS), choices=SECTIONS)
    ap.add_argument("--models", nargs="+", default=["unet-seed", "unet"], choices=segment_train.MODELS)
    ap.add_argument("--epochs", type=int, default=30)
    ap.add_argument("--seed-epochs", type=int, help="epochs for unet-seed, ~3x slower per step (default: --epochs)")
    ap.add_argument("--folds", type=int, default=5, help="folds to run, of 5")
    ap.add_argument("--crops", type=int, default=256, help="random training crops per epoch (0 = all)")
    ap.add_argument("--patience", type=int, default=8, help="early stopping patience in epochs")
    ap.add_argument("--pretrain-epochs", type=int, default=20, help="ablation: masked-autoencoder pretraining epochs")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--data-dir")
    ap.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS),
                    help="ablation: the recipe variants to train and score")
    ap.add_argument("--flip-variants", nargs="*", default=["scale", "recipe"],
                    help="ablation: variants also scored with test-time flips (4x the inference)")
    ap.add_argument("--trained-on", nargs="+", default=["SigTuple", "Zheng"], choices=["SigTuple", "Zheng"],
                    help="bccd: the training sets")
    ap.add_argument("--seeds", type=int, default=1, help="cross, ablation: training seeds per model, from --seed")
    ap.add_argument("--out", default="benchmarks/out/segment-cross", help="cross: folder for the worst overlays")
    ap.add_argument("--quick", action="store_true", help="1 fold, 2 epochs of 8 crops, few test images; no record")
    args = ap.parse_args()
    args.limit = 0
    if args.quick:
        args.folds, args.epochs, args.seed_epochs, args.crops, args.limit = 1, min(args.epochs, 2), None, 8, 6
    if not 1 <= args.folds <= 5:
        ap.error("--folds must be 1..5")
    torch.set_num_threads(args.threads)
    titles = {"sigtuple": "Segmentation: SigTuple WBC 5-fold CV", "zheng": "Segmentation: Zheng 2018 WBC Dataset 1",
              "isbi": "Segmentation: ISBI 2012 membranes", "large": "Segmentation: large SigTuple images, tiled "
              "vs candidate crops", "cross": "Segmentation: cross-dataset white cells (SigTuple <-> Zheng)",
              "ablation": "Segmentation: what makes white-cell segmentation generalise",
              "bccd": "Segmentation: white cells on a third domain (BCCD boxes)"}
    benches = {"sigtuple": bench_sigtuple, "zheng": bench_zheng, "isbi": bench_isbi, "large": bench_large,
               "cross": bench_cross, "ablation": bench_ablation, "bccd": bench_bccd}
    for section in args.sections:
        start = time.perf_counter()
        body = benches[section](args)
        log(f"{section}: {time.perf_counter() - start:.0f} s")
        if args.quick:
            log(f"\n## {titles[section]} (--quick, not recorded)\n\n{body}\n")
        else:
            # A run of some variants, or the cross matrix at another length, records under its own heading, so
            # it never replaces another run's table.
            variants = (f" ({', '.join(args.variants)}; {args.epochs} epochs)" if section in ("ablation", "bccd") else
                        f" ({args.epochs} epochs)" if section == "cross" else "")
            record(titles[section] + variants, body)


if __name__ == "__main__":
    main()
