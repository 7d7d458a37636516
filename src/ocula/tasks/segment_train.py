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
               arch_args=None, cell_diameter=None, stain=None, flips=None, binary=False)
# Peak learning rates: batch norm and residuals let 'unet' take a larger step than the plain seed.
LEARNING_RATES = {"unet": 2e-3, "unet-seed": 3e-4}
# Per dataset: training crop size, augmentation, the smallest object prediction keeps, and the blood recipe's
# scale and stain handling. Zheng's cells are 88-120 px images, ISBI's slices 512 px. A SigTuple WBC covers about
# 3000 px; the notes ignore blobs under 500. cell_diameter: the px a white cell spans inside the model; every
# training image is resampled to it from the median diameter measured on its own masks (SigTuple 63 px, Zheng
# 75 px), so smears from other microscopes can be brought to the same scale (None: native scale). stain: colour
# normalisation (None or a `data.stain.METHODS` name); flips: average the prediction over the four flips.
BLOOD = dict(augment="smear", cell_diameter=64, stain=None, flips=False)
DATASETS = {"wbc-sigtuple": dict(BLOOD, crop=128, min_area=500),
            "wbc-zheng": dict(BLOOD, crop=96, min_area=0),
            "isbi2012": dict(crop=256, augment="grey", min_area=0, cell_diameter=None, stain=None, flips=False)}
DEFAULT_SETUP = dict(crop=128, augment="geometry", min_area=0, cell_diameter=None, stain=None, flips=False)
FOREGROUND_CROPS = 0.5


def _geometry() -> list:
    return [HFlip(), VFlip(), Rot90(), Affine(degrees=15.0, scale=(0.9, 1.1), translate=0.05, p=0.5)]


def pale_background(pairs, od: float = 0.5, share: float = 0.1) -> bool:
    """Whether the training images show almost no stained red cells: in the median image, under `share` of the
    background pixels are `od` or more optical density (summed over RGB) darker than that image's brightest
    background (its 99th percentile). Zheng's crops, cut tight around one white cell on a pale yellow field, have
    3 % such pixels; SigTuple's smears, crowded with red cells, 53 %."""
    from ocula.data.stain import background_light, optical_density

    shares = []
    for image, mask in pairs:
        background = image[mask == 0]
        if image.ndim == 3 and len(background):
            darker = optical_density(background, background_light(background)).sum(1)
            shares.append(np.mean(darker >= od))
    return bool(shares) and float(np.median(shares)) < share


def smear_augment(pairs, **options) -> Compose:
    """The blood recipe's augmentation, with synthetic red cells when the training images have a pale background.
    A Zheng-trained model had seen no red cells and painted SigTuple's and BCCD's as cytoplasm; it finds BCCD's
    white cells (F1, 3 seeds, benchmarks/segment.py's third domain) 0.01 without red cells, 0.18 with up to 6 on
    half the crops (0.20 with prediction's nucleus pieces), 0.57 with up to 12 after a BackgroundShift gives them
    room around Zheng's tight crops (with the pieces). SigTuple, whose smears have red cells, loses with them:
    0.95 -> 0.85. `options` go to blood_smear_augment."""
    return blood_smear_augment(red_cells=0.5 if pale_background(pairs) else 0.0, **options)


# Factories of the training augmentation, given the training pairs at the model's scale.
AUGMENTS = {
    "smear": smear_augment,
    # Electron microscopy: no stain, so only brightness and contrast drift besides the geometry.
    "grey": lambda pairs: Compose(_geometry() + [ColorJitter(brightness=0.1, contrast=0.1, saturation=0.0,
                                                             hue=0.0)]),
    "geometry": lambda pairs: Compose(_geometry()),
    "none": lambda pairs: None,
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


def whole_cells(pairs: Pairs) -> Pairs:
    """Multi-class masks as background / cell (every foreground class is the cell; ignored pixels stay so)."""
    return Pairs(((image, np.where(mask == IGNORE_INDEX, mask, mask > 0).astype(np.uint8)) for image, mask in pairs),
                 ("background", "cell"))


def cell_diameter(pairs: Pairs) -> float:
    """Median equivalent diameter (px) of the masks' foreground objects that lie wholly inside their image: the
    scale of a dataset, since neither SigTuple nor Zheng states a pixel size."""
    from skimage.measure import regionprops, label

    diameters = []
    for _, mask in pairs:
        h, w = mask.shape
        for region in regionprops(label((mask > 0) & (mask != IGNORE_INDEX))):
            r0, c0, r1, c1 = region.bbox
            if r0 > 0 and c0 > 0 and r1 < h and c1 < w:
                diameters.append(region.equivalent_diameter_area)
    if not diameters:
        raise OculaError("no object lies wholly inside its image, so the cell diameter cannot be measured; train "
                         "at the native scale (cell_diameter=0)")
    return float(np.median(diameters))


def resize(array: np.ndarray, factor: float, nearest: bool = False) -> np.ndarray:
    """`array` (uint8 image or mask) scaled by `factor`: bilinear (antialiased when shrinking) or nearest."""
    from PIL import Image

    if factor == 1:
        return array
    h, w = array.shape[:2]
    size = (max(1, round(w * factor)), max(1, round(h * factor)))
    return np.asarray(Image.fromarray(array).resize(size, Image.NEAREST if nearest else Image.BILINEAR))


def prepare(datasets, *, cell_diameter_px: float | None, binary: bool = False) -> tuple[Pairs, float | None]:
    """(pairs, native cell diameter): the decoded pairs of one dataset or several, each resampled from its
    measured cell diameter to `cell_diameter_px` (None: native scale, nothing measured), and the mean of the
    measured diameters; `binary` merges foreground classes into one (whole cells)."""
    parts, diameters = [], []
    for dataset in _datasets(datasets):
        pairs = decode(dataset)
        pairs = whole_cells(pairs) if binary and len(pairs.classes) > 2 else pairs
        if cell_diameter_px:
            diameters.append(cell_diameter(pairs))
            factor = cell_diameter_px / diameters[-1]
            pairs = Pairs(((resize(i, factor), resize(m, factor, nearest=True)) for i, m in pairs), pairs.classes)
        parts.append(pairs)
    if len({len(p.classes) if binary else p.classes for p in parts}) > 1:
        raise OculaError(f"datasets trained together need the same classes, not {[list(p.classes) for p in parts]}; "
                         "train on whole cells (binary=True)")
    return Pairs((pair for p in parts for pair in p), parts[0].classes), (float(np.mean(diameters)) if diameters
                                                                         else None)


def _datasets(data) -> list[MaskDataset]:
    return [data] if isinstance(data, MaskDataset) else list(data)


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


def pieces(binary: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The 8-connected pieces of a binary mask (labelled 1..N) and their sizes in px (index 0: the rest)."""
    from scipy.ndimage import label

    labelled, n = label(binary, structure=np.ones((3, 3)))
    return labelled, np.bincount(labelled.ravel(), minlength=n + 1)


def drop_objects(labels: np.ndarray, min_area: int, anchor: int | None = None,
                 reach: float | None = None, anchor_area: int = 0) -> np.ndarray:
    """Labels with every foreground component (8-connected, any class) under `min_area` px set to background (on
    whole smears, specks of stain and platelets that a model trained on WBC patches never saw), and with
    `anchor` (a class index) also every component without a piece of that class of `anchor_area` px or more: a
    white cell has a nucleus, so cytoplasm alone is a red cell painted by a model that has not seen such red cells,
    and a few nucleus pixels on a platelet or a red cell's rim are no nucleus. `reach` (px, with `anchor`) also
    clears foreground farther than that from the nearest such nucleus: red cells touching a white cell join its
    component, but lie beyond the reach of its cytoplasm."""
    if min_area <= 0 and anchor is None:
        return labels
    from scipy.ndimage import distance_transform_edt

    components, sizes = pieces(labels > 0)
    drop = sizes < min_area
    if anchor is not None:
        nuclei = labels == anchor
        if anchor_area > 0:
            nucleus_pieces, nucleus_sizes = pieces(nuclei)
            nuclei &= (nucleus_sizes >= anchor_area)[nucleus_pieces]
        drop |= np.bincount(components.ravel(), weights=nuclei.ravel(), minlength=len(sizes)) == 0
    drop[0] = False
    labels = np.where(drop[components], 0, labels)
    if anchor is not None and reach and nuclei.any():
        labels = np.where(distance_transform_edt(~nuclei) > reach, 0, labels)
    return labels


def open_objects(labels: np.ndarray, radius: int) -> np.ndarray:
    """`labels` with the foreground opened by a disk of `radius` px: what is narrower than the disk goes, whatever
    its class. The image's edge is continued outward, so an object cut by the frame keeps its edge."""
    if radius < 1:
        return labels
    from scipy.ndimage import binary_opening
    from skimage.morphology import disk

    padded = np.pad(labels > 0, radius, mode="edge")
    return np.where(binary_opening(padded, disk(radius).astype(bool))[radius:-radius, radius:-radius], labels, 0)


def opening_radius(pairs, keep: float = 0.99, largest: int = 32) -> int:
    """The widest opening prediction may apply (px): the largest disk radius, up to `largest`, whose opening keeps
    `keep` of the training masks' foreground pixels. A white cell is a solid disc, so what is narrower than the
    training cells ever are (a red cell's rim painted as cytoplasm, joined to a white cell) is no white cell. At the
    blood recipe's 64 px scale: Zheng's smooth masks allow 9 px, SigTuple's, drawn on a 4 px grid, 1."""
    masks = [mask > 0 for _, mask in pairs]
    total = sum(int(m.sum()) for m in masks)
    radius = 0
    while radius < largest and sum(int(open_objects(m, radius + 1).sum()) for m in masks) >= keep * total:
        radius += 1
    return radius


def nucleus_reach(pairs, nucleus: int) -> float | None:
    """How far (px) a white cell's pixels lie from its nucleus in training masks: the 99th percentile over the
    images with a nucleus of each image's farthest cell pixel (None when no mask has a nucleus pixel)."""
    from scipy.ndimage import distance_transform_edt

    farthest = [distance_transform_edt(mask != nucleus)[mask > 0].max() for _, mask in pairs
                if (mask == nucleus).any()]
    return round(float(np.percentile(farthest, 99)), 1) if farthest else None


def nucleus_piece(pairs, nucleus: int) -> int:
    """The smallest nucleus piece (px) prediction takes as a white cell's: half the 1st percentile of the areas of
    the nucleus pieces (8-connected; a lobed nucleus comes in several) in the training masks. Zheng's at the
    blood recipe's scale: 190 px and up, 1st percentile 234, so 117 px; the specks a model trained on them paints
    on platelets and red cells' rims elsewhere are a few tens."""
    areas = [a for _, mask in pairs for a in pieces(mask == nucleus)[1][1:]]
    return int(np.percentile(areas, 1) / 2) if areas else 0


FLIPS = ((), (-1,), (-2,), (-2, -1))  # identity, left-right, up-down, both


def predict_probs(model, image: np.ndarray, *, tile: int, overlap: float = 0.25, batch_size: int = 8,
                  scale: float = 1.0, stain: dict | None = None, flips: bool = False) -> torch.Tensor:
    """Probabilities [K, H, W] for an RGB uint8 image of any size, by seamless tiled inference on the image
    stain-normalised to `stain` and resampled by `scale` (the model's cell size over the image's); the
    probabilities come back at the image's own size. `flips` averages the four flipped predictions."""
    from ocula.data.stain import normalise

    h, w = image.shape[:2]
    image = resize(normalise(image, stain), scale)
    x = torch.tensor(image).permute(2, 0, 1).float()  # a copy: decoded images are read-only arrays
    probs = torch.stack([predict_tiled(model, x.flip(f), tile=tile, overlap=overlap, batch_size=batch_size).flip(f)
                         for f in (FLIPS if flips else FLIPS[:1])]).mean(0)
    if probs.shape[1:] != (h, w):
        probs = torch.nn.functional.interpolate(probs[None], size=(h, w), mode="bilinear", align_corners=False)[0]
    return probs


def predict_labels(model, image: np.ndarray, *, tile: int, overlap: float = 0.25, threshold: float = 0.5,
                   min_area: int = 0, batch_size: int = 8, scale: float = 1.0, stain: dict | None = None,
                   flips: bool = False, opening: int = 0, anchor: int | None = None, reach: float | None = None,
                   anchor_area: int = 0) -> np.ndarray:
    """Class labels [H, W] (0 = background) for an RGB uint8 image of any size (`predict_probs`), without the
    foreground narrower than a disk of radius `opening` (`open_objects`), nor objects under `min_area` px or
    farther than `reach` px from class `anchor`, or without a piece of class `anchor` of `anchor_area` px (all at
    the model's scale): `drop_objects`."""
    probs = predict_probs(model, image, tile=tile, overlap=overlap, batch_size=batch_size, scale=scale,
                          stain=stain, flips=flips)
    labels = open_objects(probs_to_labels(probs[None], threshold=threshold)[0], round(opening / scale))
    return drop_objects(labels, round(min_area / scale**2), anchor, reach and reach / scale,
                        round(anchor_area / scale**2))


def tiling(info: ModelInfo, cell_diameter_px: float | None = None, opening: bool = False) -> dict:
    """The inference settings a model file records (files written before min_area, stain, flips, opening, anchor,
    reach or anchor_area existed keep every object, leave colours and do not flip), for images whose cells span
    `cell_diameter_px` (default: as in the training images). `opening` applies the opening the file records, an
    option: it lifts a Zheng model on SigTuple's smears but costs it on BCCD's (README, "Other microscopes")."""
    pre = info.preprocess
    return {"tile": pre["tile"], "overlap": pre["overlap"], "threshold": pre["threshold"],
            "min_area": pre.get("min_area", 0), "stain": pre.get("stain"), "flips": pre.get("flips", False),
            "opening": pre.get("opening", 0) if opening else 0, "anchor": pre.get("anchor"), "reach": pre.get("reach"),
            "anchor_area": pre.get("anchor_area", 0),
            "scale": scale_for(info, cell_diameter_px)}


def scale_for(info: ModelInfo, cell_diameter_px: float | None) -> float:
    """Resampling factor from images whose cells span `cell_diameter_px` (default: the training images'
    measured diameter) to the model's scale (1: a model without a set scale)."""
    model_px = info.preprocess.get("cell_diameter")
    if cell_diameter_px is not None and cell_diameter_px <= 0:
        raise OculaError(f"cell diameter must be positive, got {cell_diameter_px}")
    assumed = cell_diameter_px or info.preprocess.get("training_cell_diameter")
    return model_px / assumed if model_px and assumed else 1.0


def class_count(model) -> int:
    """Classes the network tells apart, background included (an ONNX file knows them from its recorded info)."""
    return len(model.info.classes) if hasattr(model, "session") else max(2, model.num_classes)


def score(model, pairs, **settings) -> dict:
    """Dice / IoU (global, per image, per class) of whole-image predictions (`predict_labels` settings) against
    the masks."""
    meter = SegmentationMeter(num_classes=class_count(model), ignore_index=IGNORE_INDEX)
    for image, mask in pairs:
        meter.update(predict_labels(model, image, **settings), mask)
    return meter.compute()


def write_evaluation(model, dataset: MaskDataset, out_dir: Path) -> dict:
    """Score whole-image predictions on `dataset` and write eval.json (global, per-class and per-image Dice /
    IoU, each image named) and predictions.png (truth and prediction overlays of the first images)."""
    pairs = decode(dataset)
    settings = evaluation_settings(model.info, pairs)
    scores = score(model, pairs, **settings)
    names = [image.name for image, _ in dataset.files]
    result = {"dataset": dataset.name, "images": len(pairs), "classes": list(model.info.classes),
              "scale": settings["scale"],
              **{k: v for k, v in scores.items() if not k.endswith("per_image")},
              "per_image": [{"file": n, "dice": float(np.mean(d[1:])), "iou": float(np.mean(i[1:]))}
                            for n, d, i in zip(names, scores["dice_per_image"], scores["iou_per_image"])]}
    out_dir = Path(out_dir)
    plot_predictions(model, pairs, out_dir / "predictions.png", **settings,
                     title=f"{Path(dataset.name).name}: Dice {scores['dice']:.3f} on {len(pairs)} images")
    write_json(out_dir / "eval.json", result)
    return result


def evaluation_settings(info: ModelInfo, pairs: Pairs) -> dict:
    """Inference settings for scoring on `pairs`: a model that works at a set cell size gets the images
    resampled from the cell diameter measured on their masks, as a user who knows the scale would."""
    return tiling(info, cell_diameter(pairs) if info.preprocess.get("cell_diameter") else None)


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
    cell_diameter_px: float | None = None  # the white-cell size the image was taken to have (None: no scale set)
    assumed: bool = False  # True when that size is the model's own, not one the caller gave

    def describe(self) -> str:
        text = f"{self.source}: {self.cells.count} cells, {(self.mask > 0).mean():.1%} foreground"
        if self.assumed:
            text += (f"; scale unknown, assumed white cells {self.cell_diameter_px:g} px across as in the training "
                     "images (set --cell-diameter if not)")
        return text

    def to_json(self) -> dict:
        return {"file": self.source, "count": self.cells.count, "foreground": round(float((self.mask > 0).mean()), 5),
                "pixel_size_um": self.cells.pixel_size, "cell_diameter_px": self.cell_diameter_px,
                "scale_assumed": self.assumed, "cells": self.cells.rows}

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
            pixel_size: float | None = None, min_area: int | None = None,
            cell_diameter: float | None = None, opening: bool = False) -> list[Segmentation]:
    """Segment RGB images of any size by tiled inference (`batch_size` tiles at a time) and measure their cells.
    `min_area` overrides the model file's smallest kept object; `pixel_size` (um per px) adds sizes in um;
    `cell_diameter` (px a white cell spans in these images) resamples them to the model's scale; when it is not
    given the images are taken to be at the training images' scale, and the result says so. `opening` removes
    what is narrower than the training cells (`tiling`)."""
    from ocula.tasks.cells import find_cells

    settings = tiling(model.info, cell_diameter, opening)
    if min_area is not None:
        settings["min_area"] = min_area
    own = model.info.preprocess.get("cell_diameter") and model.info.preprocess.get("training_cell_diameter")
    multiclass = model.info.preprocess["output"] == "multiclass"
    results = []
    for image, source in zip(images, sources):
        image = as_rgb(image)
        labels = predict_labels(model, image, **settings, batch_size=batch_size)
        cells = find_cells(labels, image, multiclass=multiclass, pixel_size=pixel_size)
        results.append(Segmentation(source, image, labels, cells, multiclass, cell_diameter or own,
                                    assumed=bool(own) and cell_diameter is None))
    return results


def plot_predictions(model, pairs, path: Path, *, limit: int = 8, title: str = "", **tiles) -> Path:
    """Truth and prediction overlays side by side for the first `limit` images, each with its Dice."""
    from ocula.plots import image_grid
    from ocula.tasks.segment import segmentation_scores

    images, titles = [], []
    for image, mask in list(pairs)[:limit]:
        pred = predict_labels(model, image, **tiles)
        dice = segmentation_scores(pred, mask, num_classes=class_count(model))["dice"]
        images += [overlay(image, mask), overlay(image, pred)]
        titles += ["truth", f"prediction, Dice {dice:.3f}"]
    return image_grid(images, titles, path, cols=4, title=title)


# --------------------------------------------------------------------------------------------------- training


def model_info(train: Pairs, model_name: str, *, crop: int, dataset: str, min_area: int = 0,
               arch_args: dict | None = None, cell_diameter_px: float | None = None, stain: dict | None = None,
               flips: bool = False, native_px: float | None = None, anchor: bool = True):
    """Architecture arguments (the named U-Net, normalised with the training set's statistics) and ModelInfo."""
    from ocula.models.unet import unet_config

    classes = list(train.classes)
    nucleus = classes.index("nucleus") if anchor and "nucleus" in classes else None
    mean, std = channel_stats(train)
    config = unet_config(model_name)
    args = {**config, "widths": list(config["widths"]), "in_channels": 3,
            "num_classes": 1 if len(classes) == 2 else len(classes), "value_max": 255.0, "mean": mean, "std": std,
            **(arch_args or {})}
    # Inference tiles twice the training crop: more context per window and fewer seams, same weights.
    preprocess = {"channels": 3, "value_max": 255.0, "input_size": [crop, crop], "tile": 2 * crop,
                  "overlap": 0.25, "threshold": 0.5, "min_area": min_area,
                  "output": "binary" if len(classes) == 2 else "multiclass", "dataset": dataset,
                  "cell_diameter": cell_diameter_px, "training_cell_diameter": native_px and round(native_px, 1),
                  "stain": stain, "flips": flips, "opening": opening_radius(train) if cell_diameter_px else 0,
                  "anchor": nucleus, "reach": None if nucleus is None else nucleus_reach(train, nucleus),
                  "anchor_area": 0 if nucleus is None else nucleus_piece(train, nucleus)}
    return args, ModelInfo(task="segment", arch="normalized-unet", args=args, classes=classes,
                           preprocess=preprocess, extra={"model": model_name})


def fit(train_set, model_name: str, config: TrainConfig, *, val_set=None, crop: int = 128, augment="smear",
        crops_per_epoch: int | None = None, run_dir: Path | None = None, resume: bool = False,
        progress: bool = True, arch_args: dict | None = None, cell_diameter: float | None = None,
        stain: str | None = None, flips: bool = False, binary: bool = False, foreground: float = FOREGROUND_CROPS,
        anchor: bool = True, init: dict | None = None):
    """Train a U-Net on crops of `train_set` (a MaskDataset, or several trained together), scoring `val_set`
    (likewise) each epoch; returns (model, info, history).

    `cell_diameter` resamples every dataset to that cell size (`prepare`), `stain` (reinhard, macenko, white or neutral)
    normalises colours, `flips` makes prediction average the four flips, `binary` trains whole cells from
    multi-class masks, `foreground` is the share of crops centred on a cell (the rest fall anywhere: red cells and
    background), `anchor` makes prediction keep only objects with a nucleus when the masks have that class
    (`drop_objects`); `init` is a state dict to start from (a pretrained U-Net's: tensors of another shape, such as
    the head, keep their initialisation).
    `augment` names an AUGMENTS entry or is a factory of paired transforms given the training pairs. The model is
    the best by val_dice when there is a validation set (reloaded from run_dir/best.ocula), the last one
    otherwise."""
    if isinstance(augment, str) and augment not in AUGMENTS:
        raise OculaError(f"unknown augmentation {augment!r}; choose one of {', '.join(AUGMENTS)}")
    from ocula.data.stain import METHODS as STAINS, normalise, stain_target
    from ocula.engine.device import runtime

    if stain not in (None, *STAINS):
        raise OculaError(f"unknown stain normalisation {stain!r}; choose {', '.join(STAINS)} or none")

    if val_set is None and config.monitor.startswith("val_"):
        config = TrainConfig(**{**asdict(config), "monitor": "loss", "mode": "min"})
    sources = _datasets(train_set)
    train, native_px = prepare(sources, cell_diameter_px=cell_diameter, binary=binary)
    target = stain_target(stain, (image for image, _ in train)) if stain else None
    if target:
        train = Pairs(((normalise(image, target), mask) for image, mask in train), train.classes)
    min_area = max(DATASETS.get(d.name, DEFAULT_SETUP)["min_area"] for d in sources)
    args, info = model_info(train, model_name, crop=crop, dataset="+".join(d.name for d in sources),
                            min_area=min_area, arch_args=arch_args, cell_diameter_px=cell_diameter, stain=target,
                            flips=flips, native_px=native_px, anchor=anchor)
    with runtime(seed=config.seed):  # the same initial weights for the same seed, global RNG left alone
        model = build(info.arch, **args)
    if init:
        own = model.state_dict()
        model.load_state_dict({k: v for k, v in init.items() if k in own and own[k].shape == v.shape}, strict=False)
    loss = CrossEntropyDiceLoss()  # BCE + Dice for one output channel, softmax CE + Dice for several
    transform = (AUGMENTS[augment] if isinstance(augment, str) else augment)(train)
    batches = CropBatches(train, crop=crop, batch_size=config.batch_size, transform=transform,
                          crops=crops_per_epoch, foreground=foreground)
    evaluate_fn = None
    if val_set is not None:
        val, _ = prepare(val_set, cell_diameter_px=cell_diameter, binary=binary)  # at the model's scale

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
    model = trainer.kept_model
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
          arch_args: dict | None = None, cell_diameter: float | None = None, stain: str | None = None,
          flips: bool | None = None, binary: bool = False):
    """Train `model_name` ('unet' or 'unet-seed') on a segmentation dataset (name or folder), validating on
    cross-validation fold `fold` of `n_folds` or a `val_fraction` hold-out. Crop size, augmentation and the blood
    recipe's scale (`cell_diameter`, 0 = native), `stain` ('reinhard', 'macenko', 'white', 'neutral' or 'none') and
    `flips` default per dataset; `binary` trains whole cells from multi-class masks; `arch_args` override the named
    U-Net's arguments (e.g. widths). Returns (model, summary)."""
    run_dir = Path(run_dir)
    dataset = load_data(data, None, data_dir)
    setup = {**DATASETS.get(data, DEFAULT_SETUP)}
    setup.update({k: v for k, v in (("crop", crop), ("augment", augment), ("cell_diameter", cell_diameter),
                                    ("stain", stain), ("flips", flips)) if v is not None})
    setup["stain"] = None if setup["stain"] == "none" else setup["stain"]
    train_set, val_set = split(dataset, fold=fold, n_folds=n_folds, val_fraction=val_fraction, seed=config.seed)
    model, info, history = fit(train_set, model_name, config, val_set=val_set, crop=setup["crop"],
                               augment=setup["augment"], crops_per_epoch=crops_per_epoch, run_dir=run_dir,
                               resume=resume, progress=progress, arch_args=arch_args,
                               cell_diameter=setup["cell_diameter"] or None, stain=setup["stain"],
                               flips=setup["flips"], binary=binary)
    summary = {"fold": fold, "epochs": len(history), "train_images": len(train_set),
               "val_images": len(val_set) if val_set else 0, **setup}
    if val_set is not None:
        pairs = decode(val_set)
        pairs = whole_cells(pairs) if binary and len(pairs.classes) > 2 else pairs
        settings = evaluation_settings(info, pairs)
        scores = score(model, pairs, **settings)
        summary.update(val_dice=scores["dice"], val_image_dice=scores["mean_image_dice"])
        plot_predictions(model, pairs, run_dir / "val_predictions.png", **settings,
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
    pairs = decode(data)
    return score(model, pairs, **evaluation_settings(model.info, pairs))


def calibration_inputs(model, data, data_dir, n: int, seed: int) -> list[np.ndarray]:
    """For int8 calibration: a seeded sample of `n` training images (of dataset `data`, or a MaskDataset such as
    a cross-validation fold's training part) as the tiled prediction feeds them (colours normalised, resampled to
    the model's scale), each cut to one tile at a random place."""
    from ocula.compression.quantize import sample
    from ocula.data.stain import normalise

    dataset = data if isinstance(data, MaskDataset) else load_data(data, None, data_dir)
    settings = tiling(model.info)
    rng, tile, inputs = np.random.default_rng(seed), settings["tile"], []
    for i in np.sort(sample(len(dataset), n, seed)):
        image = dataset[int(i)][0]
        image = resize(normalise(image, settings["stain"]), settings["scale"])
        y, x = (rng.integers(0, max(1, size - tile) + 1) for size in image.shape[:2])
        inputs.append(np.ascontiguousarray(image[y:y + tile, x:x + tile].transpose(2, 0, 1)[None], np.float32))
    return inputs


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
