"""Segmentation datasets: (image, class-index mask) pairs read lazily from disk, plus folds, crops and drawing.

Readers: SigTuple WBC (JPEG masks), Zheng 2018 WBC Dataset 1 (3-class PNG masks + WBC type), ISBI 2012 membranes,
and a generic `images/` + `masks/` folder. Listing a split only checks that files exist; pixels are decoded when an
item is read, so opening a dataset is instant and a bad file is reported by name when it is reached (or by `check()`).
"""

from __future__ import annotations

import csv
import re
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import numpy as np
from PIL import Image

from ocula.data.draw import PALETTE as CLASS_COLOURS
from ocula.data.images import list_images, read_image, read_raw
from ocula.data.registry import DatasetInfo, register
from ocula.errors import OculaError

MaskReader = Callable[[Path], np.ndarray]
IGNORE_INDEX = 255  # mask value meaning "not labelled" in indexed masks (the Pascal VOC convention)


class MaskDataset(Sequence):
    """A sequence of (image uint8 HxWx3, mask HxW of class indices) pairs; the mask is None when a split has none.

    `files[i]` is (image path, mask path or None), `metadata[i]` a dict of per-item facts (e.g. the WBC type).
    """

    def __init__(self, files: Sequence[tuple[Path, Path | None]], classes: Sequence[str], read_mask: MaskReader,
                 metadata: Sequence[dict] | None = None, name: str = ""):
        self.files = [(Path(i), None if m is None else Path(m)) for i, m in files]
        self.classes = tuple(classes)
        self.read_mask = read_mask
        self.metadata = [dict(d) for d in metadata] if metadata is not None else [{} for _ in self.files]
        if len(self.metadata) != len(self.files):
            raise ValueError("metadata must have one entry per file pair")
        self.name = name

    @property
    def has_masks(self) -> bool:
        return bool(self.files) and all(m is not None for _, m in self.files)

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, i: int) -> tuple[np.ndarray, np.ndarray | None]:
        image_path, mask_path = self.files[i]
        image = read_image(image_path)
        if mask_path is None:
            return image, None
        mask = self.read_mask(mask_path)
        if mask.shape != image.shape[:2]:
            raise OculaError(f"mask is {mask.shape[1]}x{mask.shape[0]} but its image {image_path} is "
                             f"{image.shape[1]}x{image.shape[0]}", mask_path)
        top = int(mask[mask != IGNORE_INDEX].max(initial=0))
        if top >= len(self.classes):
            raise OculaError(f"mask has class index {top} but the dataset has {len(self.classes)} "
                             f"classes ({', '.join(self.classes)})", mask_path)
        return image, mask

    def subset(self, indices: Sequence[int]) -> MaskDataset:
        """The items at `indices`, sharing classes and mask reader (for folds and train/val splits)."""
        indices = [int(i) for i in indices]
        return MaskDataset([self.files[i] for i in indices], self.classes, self.read_mask,
                           [self.metadata[i] for i in indices], self.name)

    def check(self) -> None:
        """Decode every pair once, so a broken file is reported before hours of training, not during them."""
        for i in range(len(self)):
            self[i]

    def __repr__(self) -> str:
        masks = "with masks" if self.has_masks else "without masks"
        return f"MaskDataset({self.name or 'unnamed'}: {len(self)} images {masks}, classes={list(self.classes)})"


# --- mask readers: file -> HxW class indices ------------------------------------------------------------------

def _gray(path: Path) -> np.ndarray:
    """A single-channel view of a mask file; RGB masks are accepted only when grey (all channels equal)."""
    a = read_raw(path)
    if a.ndim == 3:
        if not (np.array_equal(a[..., 0], a[..., 1]) and np.array_equal(a[..., 0], a[..., 2])):
            raise OculaError("colour mask: expected greyscale, indexed or palette image of class indices", path)
        a = a[..., 0]
    return a


def threshold_mask(path: Path, level: int = 127) -> np.ndarray:
    """Binary {0,1} mask from a lossy (JPEG) 0/255 mask: compression smears values near the edges."""
    return (read_image(path, "L") > level).astype(np.uint8)


@dataclass
class MaskPolicy:
    """What mask readers do with values that are not exactly a class value. Anti-aliasing or re-saving leaves a
    few grey pixels on edges: those within `tolerance` grey levels of a class value are snapped to it, with one
    warning per file that counts them; values farther from every class are an error naming the file. `strict`
    refuses any inexact value. Process-wide: `ocula.data.segmentation.MASK_POLICY.strict = True`, or the CLI's
    --strict-masks."""

    tolerance: int = 32  # a quarter of the 127-level gap between 3-class grey masks (0 / 128 / 255)
    strict: bool = False


MASK_POLICY = MaskPolicy()


def snap_values(a: np.ndarray, values: Sequence[int], path: Path) -> np.ndarray:
    """Class indices (values[k] -> k) of grey mask `a`, applying MASK_POLICY to values that are not in `values`."""
    values = np.asarray(values, dtype=np.int64)
    levels, inverse = np.unique(a, return_inverse=True)
    distance = np.abs(levels[:, None].astype(np.int64) - values[None])
    nearest, off = distance.argmin(1), distance.min(1)
    if off.any():
        limit = 0 if MASK_POLICY.strict else MASK_POLICY.tolerance
        far = levels[off > limit]
        if len(far):
            within = "strict masks" if MASK_POLICY.strict else f"nor within {limit} grey levels of one"
            raise OculaError(f"unexpected mask values {far[:8].tolist()}; expected only {values.tolist()} "
                             f"({within})", path)
        counts = np.bincount(inverse.ravel(), minlength=len(levels))
        warnings.warn(f"{path}: {int(counts[off > 0].sum())} mask pixels with stray values "
                      f"{levels[off > 0][:8].tolist()} snapped to the nearest of {values.tolist()}", stacklevel=2)
    return nearest.astype(np.uint8)[inverse.reshape(a.shape)]


def value_mask(values: Sequence[int]) -> MaskReader:
    """Reader mapping grey levels to class indices (values[k] -> k), stray values handled by MASK_POLICY."""
    return lambda path: snap_values(_gray(path), values, path)


def index_mask(path: Path, num_classes: int = 2) -> np.ndarray:
    """Generic mask: palette / indexed values are class indices (255 = ignore), except that a greyscale 0/255
    mask becomes {0,1} (a two-class one with stray grey values too, by MASK_POLICY); JPEG masks are thresholded
    since their values are never exact."""
    if path.suffix.lower() in (".jpg", ".jpeg"):
        return threshold_mask(path)
    a = _gray(path)
    with Image.open(path) as im:
        palette = im.mode == "P"  # palette indices are classes even when only 0 and 255 occur (VOC's void)
    if not palette and a.size and a.max() == 255:
        indices = np.isin(a, (0, 1, 255)) if num_classes == 2 else None
        if np.isin(a, (0, 255)).all() or (indices is not None and not indices.all()):
            return snap_values(a, (0, 255), path)
    return a.astype(np.uint8) if a.max(initial=0) < 256 else a.astype(np.int64)


# --- readers per dataset ---------------------------------------------------------------------------------------

def _pick(root: Path, inner: str) -> Path:
    """Accept both the registry folder (which holds `inner`) and a path straight to `inner` itself."""
    return root / inner if (root / inner).is_dir() else root


def _numeric_key(p: Path):
    digits = re.findall(r"\d+", p.stem)
    return (int(digits[-1]) if digits else -1, p.name)


def _pairs(images: Sequence[Path], mask_for: Callable[[Path], Path | None], need_masks: bool):
    files = []
    for img in images:
        mask = mask_for(img) if need_masks else None
        if need_masks and (mask is None or not mask.is_file()):
            raise OculaError(f"no mask for this image (expected {mask.name if mask else 'a file of the same stem'})",
                             img)
        files.append((img, mask))
    return files


SIGTUPLE_PATCH = re.compile(r"train-(\d+)$")


def load_sigtuple(root: Path, split: str = "train") -> MaskDataset:
    """SigTuple WBC: `patches` (train-0..163, 128x128), `large` (5 big smears), `train` (both), `test` (no masks).

    Patch items carry metadata `fold_index` = N of train-N (the benchmark's fold k is N % 5); large images carry
    `fold_index` None, meaning they always stay in training.
    """
    data = _pick(Path(root), "SigTuple_data")
    classes = ("background", "wbc")
    if split == "test":
        images = list_images(data / "Test_Data")
        return MaskDataset([(p, None) for p in images], classes, threshold_mask,
                           [{"kind": "test"} for _ in images], "wbc-sigtuple")
    if split not in ("train", "patches", "large"):
        raise OculaError(f"wbc-sigtuple has splits train, patches, large, test, not {split!r}")
    images = [p for p in list_images(data / "Train_Data") if not p.stem.endswith("-mask")]
    patches = sorted((p for p in images if SIGTUPLE_PATCH.match(p.stem)), key=_numeric_key)
    large = [p for p in images if not SIGTUPLE_PATCH.match(p.stem)]
    chosen = {"patches": patches, "large": large, "train": patches + large}[split]
    files = _pairs(chosen, lambda p: p.with_name(p.stem + "-mask.jpg"), need_masks=True)
    meta = [{"kind": "patch", "fold_index": int(m.group(1))} if (m := SIGTUPLE_PATCH.match(p.stem))
            else {"kind": "large", "fold_index": None} for p in chosen]
    return MaskDataset(files, classes, threshold_mask, meta, "wbc-sigtuple")


WBC_TYPES = ("neutrophil", "lymphocyte", "monocyte", "eosinophil", "basophil")  # CSV labels 1..5


def _zheng_types(csv_path: Path) -> dict[int, int]:
    """image ID -> class label (1..5) from 'Class Labels of Dataset 1.csv'."""
    types = {}
    with open(csv_path, newline="", encoding="utf-8-sig") as f:
        rows = csv.reader(f)
        try:
            next(rows, None)  # header: image ID,class label
            for row in rows:
                if not row:
                    continue
                image_id, label = int(row[0]), int(row[1])
                if not 1 <= label <= len(WBC_TYPES):
                    raise ValueError(f"class label {label} outside 1..{len(WBC_TYPES)}")
                types[image_id] = label
        except (ValueError, IndexError) as e:
            raise OculaError(f"bad row at line {rows.line_num}: {e}", csv_path) from None
    return types


def zheng_types_csv(root: Path) -> Path:
    """The CSV of WBC types, beside Dataset 1's image folder."""
    return _pick(Path(root), "Dataset 1").parent / "Class Labels of Dataset 1.csv"


def load_zheng(root: Path, split: str = "all") -> MaskDataset:
    """Zheng et al. 2018 WBC Dataset 1: BMP images, PNG masks (0 background, 128 cytoplasm, 255 nucleus).

    Metadata per item: `wbc_type` (name, None when the CSV lacks the image) and `wbc_label` (1..5), from the CSV
    beside the image folder.
    """
    if split != "all":
        raise OculaError(f"wbc-zheng has the single split 'all', not {split!r}")
    root = Path(root)
    folder = _pick(root, "Dataset 1")
    images = sorted(p for p in list_images(folder) if p.suffix.lower() == ".bmp")
    files = _pairs(images, lambda p: p.with_suffix(".png"), need_masks=True)
    csv_path = zheng_types_csv(root)
    types = _zheng_types(csv_path) if csv_path.is_file() else {}
    meta = []
    for p in images:
        label = types.get(int(p.stem)) if p.stem.isdigit() else None
        meta.append({"wbc_label": label, "wbc_type": WBC_TYPES[label - 1] if label else None})
    return MaskDataset(files, ("background", "cytoplasm", "nucleus"), value_mask((0, 128, 255)), meta, "wbc-zheng")


def load_isbi2012(root: Path, split: str = "train") -> MaskDataset:
    """ISBI 2012 EM membranes (U-Net paper data): train/image + train/label (0 membrane, 255 cell), test unlabelled."""
    data = _pick(Path(root), "data/membrane")
    classes = ("membrane", "cell")
    if split == "test":
        images = sorted(list_images(data / "test"), key=_numeric_key)
        return MaskDataset([(p, None) for p in images], classes, value_mask((0, 255)), name="isbi2012")
    if split != "train":
        raise OculaError(f"isbi2012 has splits train, test, not {split!r}")
    images = sorted(list_images(data / "train" / "image"), key=_numeric_key)
    files = _pairs(images, lambda p: data / "train" / "label" / p.name, need_masks=True)
    return MaskDataset(files, classes, value_mask((0, 255)), name="isbi2012")


def load_mask_folder(root: str | Path, split: str = "train", classes: Sequence[str] | None = None,
                     masks: bool = True) -> MaskDataset:
    """Generic layout: `root/[split/]images/*` with masks of the same stem in `root/[split/]masks/`.

    Masks: binary 0/255 (-> 0/1; stray grey values by MASK_POLICY), indexed or palette PNG (values are class
    indices, 255 = ignore), or JPEG (thresholded).
    Class names come from `classes`, else from `root/classes.txt` (one per line), else background/foreground.
    `masks=False` lists the images alone, for prediction.
    """
    root = Path(root)
    base = root / split if (root / split / "images").is_dir() else root
    images = list_images(base / "images")
    if classes is None:
        names = root / "classes.txt"
        classes = ([s.strip() for s in names.read_text(encoding="utf-8").splitlines() if s.strip()]
                   if names.is_file() else ["background", "foreground"])
    by_stem: dict[str, Path] = {}
    if masks:
        for m in list_images(base / "masks"):
            if m.stem in by_stem:
                raise OculaError(f"two masks share the stem {m.stem!r} (also {by_stem[m.stem].name})", m)
            by_stem[m.stem] = m
    files = _pairs(images, lambda p: by_stem.get(p.stem), need_masks=masks)
    return MaskDataset(files, classes, partial(index_mask, num_classes=len(classes)), name=str(root))


register(DatasetInfo(
    name="wbc-sigtuple", task="segment", folder="wbc_sigtuple",
    description="SigTuple AI challenge white blood cells: 164 128x128 patches + 5 large smears with JPEG WBC "
                "masks (threshold 127); 61 test smears without masks",
    loader="ocula.data.segmentation:load_sigtuple", splits=("train", "patches", "large", "test"),
    license="Apache-2.0 (repo-level, bsrinivas8687/WBC_Segmentaion); no data licence stated by SigTuple/HackerEarth",
    urls={"SigTuple_data.tar": "https://s3-ap-southeast-1.amazonaws.com/he-public-data/contests/SigTuple_data.tar",
          "SigTuple_data": "https://github.com/bsrinivas8687/WBC_Segmentaion"},
))
register(DatasetInfo(
    name="wbc-zheng", task="segment", folder="wbc_zheng2018",
    description="Zheng et al. 2018 WBC Dataset 1: 300 BMP cells (88-120 px) with background/cytoplasm/nucleus "
                "PNG masks and the WBC type of each image",
    loader="ocula.data.segmentation:load_zheng", splits=("all",),
    license="GPL-3.0; acknowledge Jiangxi Tecom Science Corporation and cite Zheng et al., Micron 107:55-71 (2018)",
    urls={"Dataset 1": "https://github.com/zxaoyou/segmentation_WBC"},
))
register(DatasetInfo(
    name="isbi2012", task="segment", folder="isbi2012_em",
    description="ISBI 2012 EM membrane segmentation as used by U-Net: 30 train 512x512 slices with labels "
                "(0 membrane, 255 cell), 30 test slices without",
    loader="ocula.data.segmentation:load_isbi2012", splits=("train", "test"),
    license="MIT (repo-level, zhixuhao/unet); original data from the ISBI 2012 challenge",
    urls={"data/membrane": "https://github.com/zhixuhao/unet/tree/master/data/membrane",
          "challenge": "http://brainiac2.mit.edu/isbi_challenge/"},
))


# --- folds -----------------------------------------------------------------------------------------------------

def kfold_indices(n: int, n_folds: int = 5, seed: int = 0) -> list[tuple[np.ndarray, np.ndarray]]:
    """Shuffled k-fold: [(train indices, validation indices)] per fold; every index validates exactly once."""
    if not 2 <= n_folds <= n:
        raise OculaError(f"cannot make {n_folds} folds from {n} items")
    order = np.random.default_rng(seed).permutation(n)
    parts = np.array_split(order, n_folds)
    return [(np.sort(np.concatenate(parts[:k] + parts[k + 1:])), np.sort(parts[k])) for k in range(n_folds)]


def folds(dataset: MaskDataset, n_folds: int = 5, seed: int = 0) -> list[tuple[np.ndarray, np.ndarray]]:
    """Cross-validation folds for the benchmark protocol.

    Items with a `fold_index` in their metadata (SigTuple patches) follow the published protocol: fold k
    validates the items with fold_index % n_folds == k, and items whose fold_index is None (SigTuple's large
    images) are always trained on. Other datasets get a shuffled, seeded k-fold.
    """
    if not any("fold_index" in m for m in dataset.metadata):
        return kfold_indices(len(dataset), n_folds, seed)
    fold_of = np.array([-1 if m.get("fold_index") is None else m["fold_index"] % n_folds for m in dataset.metadata])
    everyone = np.arange(len(dataset))
    return [(everyone[fold_of != k], everyone[fold_of == k]) for k in range(n_folds)]


# --- crops and augmentation wrappers ---------------------------------------------------------------------------

def _item_rng(seed: int, epoch: int, i: int) -> np.random.Generator:
    """One generator per (seed, epoch, item): results do not depend on loader workers or reading order."""
    return np.random.default_rng([seed, epoch, i])


def pad_to(image: np.ndarray, mask: np.ndarray | None, size: int):
    """Reflect-pad image (and mask) so both sides are at least `size`; the original sits top-left."""
    ph, pw = max(0, size - image.shape[0]), max(0, size - image.shape[1])
    if ph or pw:
        image = np.pad(image, ((0, ph), (0, pw)) + ((0, 0),) * (image.ndim - 2), mode="reflect")
        if mask is not None:
            mask = np.pad(mask, ((0, ph), (0, pw)), mode="reflect")
    return image, mask


class RandomCrops(Sequence):
    """Random `size` x `size` crops of a dataset's images (reflect-padded when smaller), `per_image` per image.

    `foreground` is the chance that a crop is centred on a non-background pixel: WBCs cover a few percent of a
    large smear, so uniform crops would be almost all background. Seeded per (seed, epoch, index); call
    `set_epoch` to draw new crops each epoch. `transform(image, mask, rng)` is applied to each crop.
    """

    def __init__(self, dataset: MaskDataset, size: int = 128, per_image: int = 1, seed: int = 0,
                 foreground: float = 0.0, transform=None):
        self.dataset, self.size, self.per_image, self.seed = dataset, size, per_image, seed
        self.foreground, self.transform, self.epoch = foreground, transform, 0
        self.classes = dataset.classes

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return len(self.dataset) * self.per_image

    def __getitem__(self, i: int):
        if not 0 <= i < len(self):
            raise IndexError(i)
        rng = _item_rng(self.seed, self.epoch, i)
        image, mask = pad_to(*self.dataset[i // self.per_image], self.size)
        h, w = image.shape[:2]
        if mask is not None and self.foreground and rng.random() < self.foreground and mask.any():
            ys, xs = np.nonzero(mask)
            j = rng.integers(len(ys))
            y = int(np.clip(ys[j] - self.size // 2, 0, h - self.size))
            x = int(np.clip(xs[j] - self.size // 2, 0, w - self.size))
        else:
            y, x = int(rng.integers(h - self.size + 1)), int(rng.integers(w - self.size + 1))
        image = image[y:y + self.size, x:x + self.size]
        mask = None if mask is None else mask[y:y + self.size, x:x + self.size]
        return self.transform(image, mask, rng) if self.transform else (image, mask)


class Augmented(Sequence):
    """A dataset whose items pass through a paired `transform(image, mask, rng)`, seeded per (seed, epoch, index)."""

    def __init__(self, dataset: Sequence, transform, seed: int = 0):
        self.dataset, self.transform, self.seed, self.epoch = dataset, transform, seed, 0
        self.classes = dataset.classes

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, i: int):
        if not 0 <= i < len(self):
            raise IndexError(i)
        image, mask = self.dataset[i]
        return self.transform(image, mask, _item_rng(self.seed, self.epoch, i))


# --- drawing ---------------------------------------------------------------------------------------------------

# Class 0 (background) stays undrawn (black in palette PNGs); the others take the class colours boxes use too.
PALETTE = np.array([(0, 0, 0), *CLASS_COLOURS], dtype=np.uint8)


def overlay(image: np.ndarray, mask: np.ndarray, alpha: float = 0.45) -> np.ndarray:
    """RGB uint8 image with each non-background class tinted in its colour and its boundary drawn solid."""
    from skimage.segmentation import find_boundaries

    image = np.asarray(image)
    if image.ndim == 2:
        image = np.repeat(image[..., None], 3, axis=2)
    if mask.shape != image.shape[:2]:
        raise ValueError(f"mask shape {mask.shape} differs from image shape {image.shape[:2]}")
    colours = PALETTE[1:][(mask.astype(np.int64) - 1) % (len(PALETTE) - 1)]
    out = image.astype(np.float32)
    fg = mask > 0
    out[fg] = (1 - alpha) * out[fg] + alpha * colours[fg]
    edge = find_boundaries(mask, mode="inner") & fg
    out[edge] = colours[edge]
    return np.clip(out + 0.5, 0, 255).astype(np.uint8)


def _fit(array: np.ndarray, tile: int, resample) -> np.ndarray:
    """Scale to fit a tile x tile square (aspect kept), centred on black."""
    h, w = array.shape[:2]
    s = tile / max(h, w)
    nh, nw = max(1, round(h * s)), max(1, round(w * s))
    small = np.asarray(Image.fromarray(array).resize((nw, nh), resample))
    out = np.zeros((tile, tile) + array.shape[2:], dtype=array.dtype)
    y, x = (tile - nh) // 2, (tile - nw) // 2
    out[y:y + nh, x:x + nw] = small
    return out


def mask_grid(dataset: Sequence, n: int = 8, tile: int = 128, cols: int = 4) -> np.ndarray:
    """RGB uint8 sheet of `n` items spread evenly over the dataset, each as image | overlay side by side.

    Items without a mask show the image twice, so a test split still renders.
    """
    if len(dataset) == 0:
        raise OculaError("dataset is empty: nothing to draw")
    picks = np.unique(np.linspace(0, len(dataset) - 1, min(n, len(dataset))).round().astype(int))
    cells = []
    for i in picks:
        image, mask = dataset[int(i)]
        img = _fit(np.ascontiguousarray(image), tile, Image.BILINEAR)
        over = img if mask is None else overlay(img, _fit(mask.astype(np.uint8), tile, Image.NEAREST))
        cells.append(np.concatenate([img, np.full((tile, 2, 3), 255, np.uint8), over], axis=1))
    cols = min(cols, len(cells))
    rows = -(-len(cells) // cols)
    gap = 4
    ch, cw = cells[0].shape[:2]
    sheet = np.full((rows * (ch + gap) - gap, cols * (cw + gap) - gap, 3), 255, np.uint8)
    for k, cell in enumerate(cells):
        r, c = divmod(k, cols)
        sheet[r * (ch + gap):r * (ch + gap) + ch, c * (cw + gap):c * (cw + gap) + cw] = cell
    return sheet
