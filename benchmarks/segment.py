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

Every training holds out 10% of its own training images for checkpoint selection and early stopping, so no test
image ever steers training. `--quick` (one fold, 2 epochs of 8 crops, a few test images, nothing recorded)
checks that the script runs; budget the real run with --epochs, --folds, --models, --crops and --sections.

    python benchmarks/segment.py [--epochs 30] [--seed-epochs 20] [--folds 5] [--models unet-seed unet]
                                 [--crops 256] [--quick]
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).parent))
from common import markdown_table, per_item_us, record  # noqa: E402

from ocula.api import Model  # noqa: E402
from ocula.data import registry  # noqa: E402
from ocula.data.segmentation import folds  # noqa: E402
from ocula.export.onnx import onnx_session  # noqa: E402
from ocula.models.unet import count_parameters  # noqa: E402
from ocula.tasks import segment_train  # noqa: E402
from ocula.tasks.segment import predict_candidates, segmentation_scores  # noqa: E402

SECTIONS = ("sigtuple", "zheng", "isbi", "large")
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
    tile = segment_train.tiling(model.info)
    return segment_train.predict_probs(model.module, image, tile=tile["tile"], overlap=tile["overlap"])[0].numpy()


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
                                              run_dir=Path(tmp), progress=False)
    return Model(model), time.perf_counter() - start, len(history)


def epochs_for(model_name: str, args) -> int:
    return args.seed_epochs if model_name == "unet-seed" and args.seed_epochs else args.epochs


def test_pairs(data, indices, args):
    pairs = segment_train.decode(data.subset(indices))
    return pairs[:args.limit] if args.limit else pairs


def latency_ms(model: Model, size: int = 128) -> tuple[float, float]:
    """Best-of-5 milliseconds for one size x size RGB patch through the network, torch and ONNX Runtime."""
    x = torch.rand(1, 3, size, size) * 255
    with torch.no_grad():
        torch_ms = per_item_us(lambda: model.module(x), 1) / 1000
    with tempfile.TemporaryDirectory() as tmp:
        model.export("onnx", Path(tmp) / "m.onnx")
        session = onnx_session(Path(tmp) / "m.onnx")
        ort_ms = per_item_us(lambda: session.run(None, {"image": x.numpy()}), 1) / 1000
    return torch_ms, ort_ms


def bench_sigtuple(args) -> str:
    data = registry.load("wbc-sigtuple", "train", args.data_dir)
    patches = [mask for _, mask in segment_train.decode(registry.load("wbc-sigtuple", "patches", args.data_dir))]
    on_grid = boundaries_on_grid(patches, LABEL_GRID)
    rows, grid_rows = [], []
    for name in args.models:
        image_dice, fold_dice, seconds, epochs, snapped, ceiling = [], [], [], [], [], []
        for k, (train, test) in enumerate(folds(data, 5)[:args.folds]):
            model, s, e = fit(name, data.subset(train), "wbc-sigtuple", args)
            d = []
            for image, mask in test_pairs(data, test, args):
                probs = foreground_probs(model, image)
                on_labels_grid = snap(probs, LABEL_GRID)
                d.append(dice(probs > 0.5, mask))
                snapped.append(dice(on_labels_grid, mask))
                ceiling.append(dice(on_labels_grid, probs > 0.5))
            image_dice += d
            fold_dice.append(np.mean(d))
            seconds.append(s)
            epochs.append(e)
            log(f"sigtuple {name} fold {k}: per-image Dice {np.mean(d):.4f} on {len(d)} patches, {s:.0f} s, "
                f"{e} epochs")
        torch_ms, ort_ms = latency_ms(model)
        grid_rows.append([name, mean_std(image_dice), mean_std(snapped), mean_std(ceiling)])
        rows.append([name, f"{count_parameters(model.module):,}", f"{mean_std(image_dice)} (n={len(image_dice)})",
                     " / ".join(f"{v:.3f}" for v in fold_dice), f"{np.mean(seconds):.0f}",
                     " / ".join(map(str, epochs)), f"{torch_ms:.1f}", f"{ort_ms:.1f}"])
    table = markdown_table(["model", "params", "held-out per-image Dice", "fold means", "train s / fold",
                            "epochs", "torch ms / patch", "ORT ms / patch"],
                           [["notes' U-Net, as reported (training set)", "7,846,081", f"{NOTES_DICE}", "", "", "",
                             "", ""]] + rows)
    grid = markdown_table(["model", "Dice (as above)", f"Dice, prediction drawn on the {LABEL_GRID}-px grid",
                           f"Dice of the prediction with itself drawn on the {LABEL_GRID}-px grid"], grid_rows)
    return table + (f"\n\nFolds run: {args.folds} of 5 (fold k validates patches train-N with N % 5 == k; the five "
                    f"large images always train). Up to {args.epochs} epochs ({epochs_for('unet-seed', args)} for "
                    f"unet-seed) of {args.crops or 'all'} random crops, bf16 autocast, early stopping on a 10% inner "
                    "hold-out. Dice of the thresholded prediction, no clean-up. Latency: one 128x128 patch, best of 5."
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


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--sections", nargs="+", default=list(SECTIONS), choices=SECTIONS)
    ap.add_argument("--models", nargs="+", default=["unet-seed", "unet"], choices=segment_train.MODELS)
    ap.add_argument("--epochs", type=int, default=30)
    ap.add_argument("--seed-epochs", type=int, help="epochs for unet-seed, ~3x slower per step (default: --epochs)")
    ap.add_argument("--folds", type=int, default=5, help="folds to run, of 5")
    ap.add_argument("--crops", type=int, default=256, help="random training crops per epoch (0 = all)")
    ap.add_argument("--patience", type=int, default=8, help="early stopping patience in epochs")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--data-dir")
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
              "vs candidate crops"}
    benches = {"sigtuple": bench_sigtuple, "zheng": bench_zheng, "isbi": bench_isbi, "large": bench_large}
    for section in args.sections:
        start = time.perf_counter()
        body = benches[section](args)
        log(f"{section}: {time.perf_counter() - start:.0f} s")
        if args.quick:
            log(f"\n## {titles[section]} (--quick, not recorded)\n\n{body}\n")
        else:
            record(titles[section], body)


if __name__ == "__main__":
    main()
