"""Segmentation: the task protocol (see `ocula.tasks`). Random crops -> the engine's Trainer -> a run folder, and
whole-image prediction to a mask, an overlay and a table of cells. (`ocula.tasks.segment` holds the losses,
metrics and tiled inference this module builds on.)

Training draws random `crop` x `crop` windows from images held in memory: every image yields crops in proportion
to its area (a 128x128 patch one, a large smear dozens), half of them centred on a foreground pixel since white
cells cover a few percent of a smear, each passed through a paired augmentation. Validation scores whole images
with the same tiled inference that prediction uses, so val_dice is the number a user will see.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch

from ocula.data.paired_transforms import Affine, ColorJitter, Compose, HFlip, Rot90, VFlip, blood_smear_augment
from ocula.data.images import as_rgb
from ocula.data.segmentation import PALETTE, MaskDataset, RandomCrops, folds, overlay
from ocula.engine.trainer import TrainConfig, Trainer
from ocula.errors import OculaError
from ocula.fileio import write_json
from ocula.modelfile import ModelInfo
from ocula.models import build
from ocula.tasks.segment import (IGNORE_INDEX, CrossEntropyDiceLoss, SegmentationMeter, predict_tiled,
                                 probs_to_labels)

MODELS = ("unet", "unet-seed")
OPTIONS = dict(fold=None, n_folds=5, val_fraction=0.1, crop=None, augment=None, crops_per_epoch=None,
               arch_args=None)
# Peak learning rates: batch norm and residuals let 'unet' take a larger step than the plain seed.
LEARNING_RATES = {"unet": 2e-3, "unet-seed": 3e-4}
# Per dataset: training crop size, augmentation, and the smallest object prediction keeps. Zheng's cells are
# 88-120 px images, ISBI's slices 512 px. A SigTuple WBC covers about 3000 px; the notes ignore blobs under 500.
DATASETS = {"wbc-sigtuple": dict(crop=128, augment="smear", min_area=500),
            "wbc-zheng": dict(crop=96, augment="smear", min_area=0),
            "isbi2012": dict(crop=256, augment="grey", min_area=0)}
DEFAULT_SETUP = dict(crop=128, augment="geometry", min_area=0)
FOREGROUND_CROPS = 0.5


def _geometry() -> list:
    return [HFlip(), VFlip(), Rot90(), Affine(degrees=15.0, scale=(0.9, 1.1), translate=0.05, p=0.5)]


AUGMENTS = {
    "smear": blood_smear_augment,
    # Electron microscopy: no stain, so only brightness and contrast drift besides the geometry.
    "grey": lambda: Compose(_geometry() + [ColorJitter(brightness=0.1, contrast=0.1, saturation=0.0, hue=0.0)]),
    "geometry": lambda: Compose(_geometry()),
    "none": lambda: None,
}


def default_config(model_name: str, **overrides) -> TrainConfig:
    """The source document's callbacks: keep the best val Dice, halve the LR on a plateau, stop early."""
    if model_name not in MODELS:
        raise OculaError(f"unknown segmentation model {model_name!r}; choose one of {', '.join(MODELS)}")
    base = dict(epochs=40, batch_size=8, lr=LEARNING_RATES[model_name], weight_decay=1e-4, schedule="plateau",
                plateau_patience=4, plateau_factor=0.5, early_stopping=10, monitor="val_dice", mode="max",
                bf16=True, channels_last=True)  # about 2x faster steps than float32 NCHW on 2 cores
    return TrainConfig(**{**base, **overrides})


# ------------------------------------------------------------------------------------------------ training data


class Pairs(list):
    """(image, mask) pairs held in memory, with the class names: a dataset as RandomCrops expects one."""

    def __init__(self, pairs, classes):
        super().__init__(pairs)
        self.classes = tuple(classes)


def decode(dataset: MaskDataset) -> Pairs:
    """Every (image, mask) pair of `dataset`, decoded once (the crops of all epochs come from memory)."""
    if not dataset.has_masks:
        raise OculaError(f"dataset {dataset.name or ''} has images without masks: cannot train or score on it")
    return Pairs((dataset[i] for i in range(len(dataset))), dataset.classes)


def channel_stats(pairs: Pairs) -> tuple[list[float], list[float]]:
    """Per-channel mean and std (0..1 scale) over every training pixel, for the model's input normalisation."""
    total, square, n = np.zeros(3), np.zeros(3), 0
    for image, _ in pairs:
        x = image.reshape(-1, 3).astype(np.float64) / 255.0
        total, square, n = total + x.sum(0), square + (x * x).sum(0), n + len(x)
    mean = total / n
    std = np.sqrt(np.maximum(square / n - mean**2, 1e-6))
    return [round(float(v), 4) for v in mean], [round(float(v), 4) for v in std]


def to_batch(items) -> tuple[torch.Tensor, torch.Tensor]:
    """[(HxWx3 uint8, HxW mask)] -> float [N, 3, H, W] in 0..255 and long [N, H, W]."""
    x = torch.from_numpy(np.stack([image for image, _ in items])).permute(0, 3, 1, 2).float()
    return x, torch.from_numpy(np.stack([mask for _, mask in items]).astype(np.int64))


class CropBatches:
    """Batches of augmented random crops, drawn anew each epoch from the trainer's generator.

    An epoch visits each image round(area / crop**2) times (at least once), in a random order; `crops` caps the
    epoch (a random subset of those visits) so a budget can be set whatever the image sizes."""

    def __init__(self, pairs: Pairs, *, crop: int, batch_size: int, transform=None, crops: int | None = None,
                 foreground: float = FOREGROUND_CROPS):
        self.pairs, self.crop, self.batch_size, self.transform = pairs, crop, batch_size, transform
        self.foreground = foreground
        visits = [max(1, round(m.shape[0] * m.shape[1] / crop**2)) for _, m in pairs]
        self.visits = torch.repeat_interleave(torch.arange(len(pairs)), torch.tensor(visits))
        self.crops = min(crops, len(self.visits)) if crops else len(self.visits)

    def __len__(self) -> int:
        return math.ceil(self.crops / self.batch_size)

    def __call__(self, g: torch.Generator):
        picks = self.visits[torch.randperm(len(self.visits), generator=g)[:self.crops]].tolist()
        drawn = Pairs((self.pairs[i] for i in picks), self.pairs.classes)
        seed = int(torch.randint(2**31 - 1, (1,), generator=g))
        crops = RandomCrops(drawn, self.crop, seed=seed, foreground=self.foreground, transform=self.transform)
        for start in range(0, len(crops), self.batch_size):
            yield to_batch([crops[i] for i in range(start, min(start + self.batch_size, len(crops)))])


# ------------------------------------------------------------------------------------------------- prediction


def drop_small_objects(labels: np.ndarray, min_area: int) -> np.ndarray:
    """Labels with every foreground component (8-connected, any class) under `min_area` px set to background:
    on whole smears, specks of stain and platelets that a model trained on WBC patches never saw."""
    if min_area <= 0:
        return labels
    from scipy.ndimage import label

    components, _ = label(labels > 0, structure=np.ones((3, 3)))
    small = np.bincount(components.ravel()) < min_area
    small[0] = False
    return np.where(small[components], 0, labels)


def predict_probs(model, image: np.ndarray, *, tile: int, overlap: float = 0.25, batch_size: int = 8) -> torch.Tensor:
    """Probabilities [K, H, W] for an RGB uint8 image of any size, by seamless tiled inference."""
    x = torch.tensor(image).permute(2, 0, 1).float()  # a copy: decoded images are read-only arrays
    return predict_tiled(model, x, tile=tile, overlap=overlap, batch_size=batch_size)


def predict_labels(model, image: np.ndarray, *, tile: int, overlap: float = 0.25, threshold: float = 0.5,
                   min_area: int = 0, batch_size: int = 8) -> np.ndarray:
    """Class labels [H, W] (0 = background) for an RGB uint8 image of any size, without foreground objects
    under `min_area` px."""
    probs = predict_probs(model, image, tile=tile, overlap=overlap, batch_size=batch_size)
    return drop_small_objects(probs_to_labels(probs[None], threshold=threshold)[0], min_area)


def tiling(info: ModelInfo) -> dict:
    """The inference settings a model file records (files written before min_area existed keep every object)."""
    pre = info.preprocess
    return {"tile": pre["tile"], "overlap": pre["overlap"], "threshold": pre["threshold"],
            "min_area": pre.get("min_area", 0)}


def score(model, pairs, **settings) -> dict:
    """Dice / IoU (global, per image, per class) of whole-image predictions (`predict_labels` settings) against
    the masks."""
    meter = SegmentationMeter(num_classes=max(2, model.num_classes), ignore_index=IGNORE_INDEX)
    for image, mask in pairs:
        meter.update(predict_labels(model, image, **settings), mask)
    return meter.compute()


def write_evaluation(model, dataset: MaskDataset, out_dir: Path) -> dict:
    """Score whole-image predictions on `dataset` and write eval.json (global, per-class and per-image Dice /
    IoU, each image named) and predictions.png (truth and prediction overlays of the first images)."""
    pairs, settings = decode(dataset), tiling(model.info)
    scores = score(model, pairs, **settings)
    names = [image.name for image, _ in dataset.files]
    result = {"dataset": dataset.name, "images": len(pairs), "classes": list(model.info.classes),
              **{k: v for k, v in scores.items() if not k.endswith("per_image")},
              "per_image": [{"file": n, "dice": float(np.mean(d[1:])), "iou": float(np.mean(i[1:]))}
                            for n, d, i in zip(names, scores["dice_per_image"], scores["iou_per_image"])]}
    out_dir = Path(out_dir)
    plot_predictions(model, pairs, out_dir / "predictions.png", **settings,
                     title=f"{Path(dataset.name).name}: Dice {scores['dice']:.3f} on {len(pairs)} images")
    write_json(out_dir / "eval.json", result)
    return result


def save_mask(labels: np.ndarray, path: Path, multiclass: bool) -> Path:
    """Binary masks as 0/255 greyscale; multi-class as a palette PNG whose indices are the classes (readable by
    `index_mask` and coloured like the overlays)."""
    from PIL import Image

    from ocula.data.images import save_png

    if not multiclass:
        return save_png((labels > 0).astype(np.uint8) * 255, path)
    im = Image.fromarray(labels.astype(np.uint8), "P")
    im.putpalette(PALETTE.ravel().tolist())
    return save_png(im, path)


@dataclass
class Segmentation:
    """One image's answer: the class of every pixel (0 = background) and its cells, measured."""

    source: str
    image: np.ndarray  # the RGB input, for the overlay
    mask: np.ndarray  # [H, W] class indices
    cells: "Cells"  # noqa: F821 (ocula.tasks.cells, imported when predicting)
    multiclass: bool

    def describe(self) -> str:
        return f"{self.source}: {self.cells.count} cells, {(self.mask > 0).mean():.1%} foreground"

    def to_json(self) -> dict:
        return {"file": self.source, "count": self.cells.count, "foreground": round(float((self.mask > 0).mean()), 5),
                "pixel_size_um": self.cells.pixel_size, "cells": self.cells.rows}

    def save(self, out_dir: Path, stem: str) -> dict:
        """STEM-mask.png, STEM-overlay.png, STEM-cells.csv and STEM-cells.json in `out_dir`."""
        from ocula.data.images import save_png

        files = {kind: Path(out_dir) / f"{stem}-{kind}" for kind in ("mask.png", "overlay.png", "cells.csv",
                                                                      "cells.json")}
        save_mask(self.mask, files["mask.png"], self.multiclass)
        save_png(overlay(self.image, self.mask), files["overlay.png"])
        self.cells.write_csv(files["cells.csv"])
        self.cells.write_json(files["cells.json"])
        return {"mask": str(files["mask.png"]), "overlay": str(files["overlay.png"]),
                "cells_csv": str(files["cells.csv"]), "cells_json": str(files["cells.json"])}


def predict(model, images: list[np.ndarray], sources: list[str], *, batch_size: int = 8,
            pixel_size: float | None = None, min_area: int | None = None) -> list[Segmentation]:
    """Segment RGB images of any size by tiled inference (`batch_size` tiles at a time) and measure their cells.
    `min_area` overrides the model file's smallest kept object; `pixel_size` (um per px) adds sizes in um."""
    from ocula.tasks.cells import find_cells

    settings = tiling(model.info) if min_area is None else {**tiling(model.info), "min_area": min_area}
    multiclass = model.info.preprocess["output"] == "multiclass"
    results = []
    for image, source in zip(images, sources):
        image = as_rgb(image)
        labels = predict_labels(model, image, **settings, batch_size=batch_size)
        cells = find_cells(labels, image, multiclass=multiclass, pixel_size=pixel_size)
        results.append(Segmentation(source, image, labels, cells, multiclass))
    return results


def plot_predictions(model, pairs, path: Path, *, limit: int = 8, title: str = "", **tiles) -> Path:
    """Truth and prediction overlays side by side for the first `limit` images, each with its Dice."""
    from ocula.plots import image_grid
    from ocula.tasks.segment import segmentation_scores

    images, titles = [], []
    for image, mask in list(pairs)[:limit]:
        pred = predict_labels(model, image, **tiles)
        dice = segmentation_scores(pred, mask, num_classes=max(2, model.num_classes))["dice"]
        images += [overlay(image, mask), overlay(image, pred)]
        titles += ["truth", f"prediction, Dice {dice:.3f}"]
    return image_grid(images, titles, path, cols=4, title=title)


# --------------------------------------------------------------------------------------------------- training


def model_info(train: Pairs, model_name: str, *, crop: int, dataset: str, arch_args: dict | None = None):
    """Architecture arguments (the named U-Net, normalised with the training set's statistics) and ModelInfo."""
    from ocula.models.unet import unet_config

    classes = list(train.classes)
    mean, std = channel_stats(train)
    config = unet_config(model_name)
    args = {**config, "widths": list(config["widths"]), "in_channels": 3,
            "num_classes": 1 if len(classes) == 2 else len(classes), "value_max": 255.0, "mean": mean, "std": std,
            **(arch_args or {})}
    # Inference tiles twice the training crop: more context per window and fewer seams, same weights.
    preprocess = {"channels": 3, "value_max": 255.0, "input_size": [crop, crop], "tile": 2 * crop,
                  "overlap": 0.25, "threshold": 0.5, "min_area": DATASETS.get(dataset, DEFAULT_SETUP)["min_area"],
                  "output": "binary" if len(classes) == 2 else "multiclass", "dataset": dataset}
    return args, ModelInfo(task="segment", arch="normalized-unet", args=args, classes=classes,
                           preprocess=preprocess, extra={"model": model_name})


def fit(train_set: MaskDataset, model_name: str, config: TrainConfig, *, val_set: MaskDataset | None = None,
        crop: int = 128, augment: str = "smear", crops_per_epoch: int | None = None, run_dir: Path | None = None,
        resume: bool = False, progress: bool = True, arch_args: dict | None = None):
    """Train a U-Net on crops of `train_set`, scoring `val_set` each epoch; returns (model, info, history).

    The model is the best by val_dice when there is a validation set (reloaded from run_dir/best.ocula), the
    last one otherwise."""
    if augment not in AUGMENTS:
        raise OculaError(f"unknown augmentation {augment!r}; choose one of {', '.join(AUGMENTS)}")
    from ocula.engine.device import runtime

    if val_set is None and config.monitor.startswith("val_"):
        config = TrainConfig(**{**asdict(config), "monitor": "loss", "mode": "min"})
    train = decode(train_set)
    args, info = model_info(train, model_name, crop=crop, dataset=train_set.name, arch_args=arch_args)
    with runtime(seed=config.seed):  # the same initial weights for the same seed, global RNG left alone
        model = build(info.arch, **args)
    loss = CrossEntropyDiceLoss()  # BCE + Dice for one output channel, softmax CE + Dice for several
    batches = CropBatches(train, crop=crop, batch_size=config.batch_size, transform=AUGMENTS[augment](),
                          crops=crops_per_epoch)
    evaluate_fn = None
    if val_set is not None:
        val = decode(val_set)

        def evaluate_fn(m):
            scores = score(m, val, **tiling(info))
            return {"dice": scores["dice"], "image_dice": scores["mean_image_dice"], "iou": scores["iou"]}

    trainer = Trainer(model, config, loss_fn=lambda m, x, y: loss(m(x), y), train_batches=batches,
                      evaluate_fn=evaluate_fn, info=info, run_dir=run_dir, progress=progress)
    history = trainer.fit(resume=resume)
    best = Path(run_dir) / "best.ocula" if run_dir else None
    if val_set is not None and best and best.is_file():
        from ocula.modelfile import load_model

        model = load_model(best, device=config.device)
        return model, model.info, history
    model.info = info
    return model, info, history


def load_data(data: str, split: str | None = None, data_dir=None) -> MaskDataset:
    """Split `split` (default: the training split) of a registered segmentation dataset or a mask folder."""
    from ocula.data.layout import open_dataset, splits

    return open_dataset(data, split or splits(data, data_dir)[0], data_dir)


def split(data: MaskDataset, *, fold: int | None, n_folds: int = 5, val_fraction: float = 0.1, seed: int = 0):
    """(train, validation) items: cross-validation fold `fold` of `n_folds`, else a seeded `val_fraction`
    hold-out taken only from items that may be validated on (not SigTuple's always-trained large images)."""
    if fold is not None:
        if not 0 <= fold < n_folds:
            raise OculaError(f"fold must be in 0..{n_folds - 1}, got {fold}")
        train, val = folds(data, n_folds, seed)[fold]
    elif val_fraction > 0:
        eligible = [i for i, m in enumerate(data.metadata) if m.get("fold_index", 0) is not None]
        n_val = max(1, round(val_fraction * len(eligible)))
        val = np.sort(np.random.default_rng(seed).permutation(eligible)[:n_val])
        train = np.setdiff1d(np.arange(len(data)), val)
    else:
        return data, None
    return data.subset(train), data.subset(val)


def train(data: str, model_name: str, config: TrainConfig, *, run_dir: Path, data_dir=None, resume: bool = False,
          progress: bool = True, fold: int | None = None, n_folds: int = 5, val_fraction: float = 0.1,
          crop: int | None = None, augment: str | None = None, crops_per_epoch: int | None = None,
          arch_args: dict | None = None):
    """Train `model_name` ('unet' or 'unet-seed') on a segmentation dataset (name or folder), validating on
    cross-validation fold `fold` of `n_folds` or a `val_fraction` hold-out. Crop size and augmentation default
    per dataset; `arch_args` override the named U-Net's arguments (e.g. widths). Returns (model, summary)."""
    run_dir = Path(run_dir)
    dataset = load_data(data, None, data_dir)
    setup = {**DATASETS.get(data, DEFAULT_SETUP)}
    setup.update({k: v for k, v in (("crop", crop), ("augment", augment)) if v is not None})
    train_set, val_set = split(dataset, fold=fold, n_folds=n_folds, val_fraction=val_fraction, seed=config.seed)
    model, info, history = fit(train_set, model_name, config, val_set=val_set, crop=setup["crop"],
                               augment=setup["augment"], crops_per_epoch=crops_per_epoch, run_dir=run_dir,
                               resume=resume, progress=progress, arch_args=arch_args)
    summary = {"fold": fold, "epochs": len(history), "train_images": len(train_set),
               "val_images": len(val_set) if val_set else 0, **setup}
    if val_set is not None:
        pairs = decode(val_set)
        scores = score(model, pairs, **tiling(info))
        summary.update(val_dice=scores["dice"], val_image_dice=scores["mean_image_dice"])
        plot_predictions(model, pairs, run_dir / "val_predictions.png", **tiling(info),
                         title=f"{Path(data).name} {model_name}: val Dice {scores['dice']:.3f}")
    info.metrics = {k: v for k, v in summary.items() if k.startswith("val_")}
    model.info = info
    return model, summary


def show(data: MaskDataset, n: int, path: Path) -> Path:
    """A sheet of `n` items, each image beside its mask overlay."""
    from ocula.data.images import save_png
    from ocula.data.segmentation import mask_grid

    return save_png(mask_grid(data, n), path)


def evaluate(model, data: MaskDataset, out_dir: Path | None = None) -> dict:
    """Dice / IoU of whole-image predictions; with `out_dir`, also eval.json and predictions.png."""
    if out_dir is not None:
        return write_evaluation(model, data, out_dir)
    return score(model, decode(data), **tiling(model.info))


def export(model, fmt: str, path: Path) -> str:
    """ONNX with dynamic batch, height and width, checked against torch at the traced size and another one."""
    from ocula.export.onnx import check_parity, export_onnx

    if fmt != "onnx":
        raise OculaError(f"segmentation models export to ONNX only, not {fmt}")
    out = export_onnx(model, path, dynamic_hw=True)
    pre = model.info.preprocess
    odd = torch.rand(1, pre["channels"], 300, 420) * pre["value_max"]
    diff = max(check_parity(model, out), check_parity(model, out, odd))
    return f"{out} (ONNX Runtime vs torch at two sizes: max abs difference {diff:.2e})"
