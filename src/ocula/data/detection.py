"""Detection datasets: per-image boxes and labels, the loader policy, `check`, `convert` and the BCCD registration.

Box convention everywhere in ocula: float xyxy in continuous pixel coordinates with the origin at the top-left
corner of the top-left pixel, so pixel column i spans [i, i + 1) and a box covering a whole W x H image is
[0, 0, W, H]; width is x1 - x0. COCO uses this convention already; YOLO stores it normalised; Pascal VOC's
1-based inclusive pixel indices are converted on read and write (see `ocula.data.voc`).

Records keep the boxes exactly as the files give them, so `check` can report what is wrong. Training code sees the
cleaned view (`dataset[i]`, `dataset.clean_record(i)`), under this loader policy:
  * boxes are clipped to the image;
  * degenerate boxes (at most 1 px wide or high after clipping) are dropped: they are stray clicks, not objects.
    In VOC's inclusive coordinates a click without a drag gives xmin == xmax, which is a 1 px box;
  * boxes whose class is not in `classes` are dropped;
  * images without objects are kept: they are valid negatives.
One warning per dataset says how many boxes were dropped or clipped and in which files.
"""

from __future__ import annotations

import importlib
import shutil
import warnings
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np
from PIL import Image

from ocula.data.boxes import box_iou_np
from ocula.data.images import read_image
from ocula.data.registry import DatasetInfo, register
from ocula.errors import OculaError
from ocula.fileio import atomic_path

FORMATS = ("voc", "coco", "yolo")
MIN_SIZE = 1.0  # boxes at most this many pixels wide or high are degenerate
DUPLICATE_IOU = 0.8
SLACK = 0.01  # px a box may pass the image edge unreported: YOLO's 6 decimals are off by up to width * 1e-6
BCCD_CLASSES = ("WBC", "RBC", "Platelets")


@dataclass
class Record:
    """One annotated image. `labels` index `classes`; -1 marks a class name not in `classes` (kept in `unknown`)."""

    image: Path
    width: int
    height: int
    boxes: np.ndarray  # float32 [N, 4] xyxy pixels, as in the file
    labels: np.ndarray  # int64 [N]
    difficult: np.ndarray  # bool [N]: VOC difficult / COCO iscrowd, ignored by evaluation
    truncated: np.ndarray  # bool [N]
    annotation: Path | None = None  # the file the boxes came from, for messages
    unknown: dict[int, str] = field(default_factory=dict)  # box index -> class name not in `classes`

    def __post_init__(self):
        self.image = Path(self.image)
        self.boxes = np.asarray(self.boxes, dtype=np.float32).reshape(-1, 4)
        n = len(self.boxes)
        self.labels = np.asarray(self.labels, dtype=np.int64).reshape(n)
        self.difficult = _flags(self.difficult, n)
        self.truncated = _flags(self.truncated, n)

    @property
    def source(self) -> Path:
        return self.annotation or self.image


def _flags(values, n: int) -> np.ndarray:
    return np.zeros(n, dtype=bool) if values is None else np.asarray(values, dtype=bool).reshape(n)


def degenerate(boxes: np.ndarray) -> np.ndarray:
    """Mask of boxes at most MIN_SIZE px wide or high (zero-area, inverted, or a single-pixel click)."""
    return ((boxes[:, 2] - boxes[:, 0]) <= MIN_SIZE) | ((boxes[:, 3] - boxes[:, 1]) <= MIN_SIZE)


def clip_boxes(boxes: np.ndarray, width: int, height: int) -> np.ndarray:
    return np.clip(boxes, 0, [width, height, width, height]).astype(np.float32)


class DetectionDataset(Sequence):
    """A sequence of (image uint8 HxWx3, target) pairs; target = {boxes float32 [N,4] xyxy, labels int64 [N],
    difficult bool [N], image_id, path}, cleaned under the module's loader policy. `records` keep the raw boxes."""

    def __init__(self, records: Sequence[Record], classes: Sequence[str], name: str = ""):
        self.records = list(records)
        self.classes = tuple(classes)
        self.name = name
        self._clean = [self._cleaned(r) for r in self.records]
        self._warn_policy()

    def _cleaned(self, r: Record) -> tuple[Record, int, int]:
        """(cleaned record, boxes dropped, boxes clipped)."""
        boxes = clip_boxes(r.boxes, r.width, r.height)
        clipped = int(np.any(np.abs(boxes - r.boxes) > SLACK, axis=1).sum())
        keep = ~degenerate(boxes) & (r.labels >= 0) & (r.labels < len(self.classes))
        if keep.all() and not clipped:
            return r, 0, 0
        clean = replace(r, boxes=boxes[keep], labels=r.labels[keep], difficult=r.difficult[keep],
                        truncated=r.truncated[keep], unknown={})
        return clean, int((~keep).sum()), clipped

    def _warn_policy(self) -> None:
        dropped = [(r.source.name, d) for r, (_, d, _) in zip(self.records, self._clean) if d]
        clipped = sum(c for _, _, c in self._clean)
        if not dropped and not clipped:
            return
        parts = []
        if dropped:
            where = ", ".join(f"{name} ({d})" if d > 1 else name for name, d in dropped[:5])
            more = f" and {len(dropped) - 5} more files" if len(dropped) > 5 else ""
            parts.append(f"dropped {sum(d for _, d in dropped)} degenerate or unknown-class box(es) in {where}{more}")
        if clipped:
            parts.append(f"clipped {clipped} box(es) to the image")
        warnings.warn(f"{self.name or 'detection dataset'}: {'; '.join(parts)} (run `ocula data check` for details)",
                      stacklevel=3)

    def __len__(self) -> int:
        return len(self.records)

    def clean_record(self, i: int) -> Record:
        return self._clean[i][0]

    def target(self, i: int) -> dict:
        """The cleaned boxes of item i without decoding its image (copies: augmentations may edit them in place)."""
        r = self.clean_record(i)
        return {"boxes": r.boxes.copy(), "labels": r.labels.copy(), "difficult": r.difficult.copy(), "image_id": i,
                "path": str(r.image)}

    def __getitem__(self, i: int) -> tuple[np.ndarray, dict]:
        r = self.records[i]
        image = read_image(r.image)
        if image.shape[:2] != (r.height, r.width):
            raise OculaError(f"image is {image.shape[1]}x{image.shape[0]} but its annotation "
                             f"{r.source.name} says {r.width}x{r.height}", r.image)
        return image, self.target(i)

    def subset(self, indices: Sequence[int]) -> DetectionDataset:
        with warnings.catch_warnings():  # the parent dataset has already warned
            warnings.simplefilter("ignore")
            return DetectionDataset([self.records[int(i)] for i in indices], self.classes, self.name)

    def __repr__(self) -> str:
        n = sum(len(r.boxes) for r, _, _ in self._clean)
        return (f"DetectionDataset({self.name or 'unnamed'}: {len(self)} images, {n} boxes, "
                f"classes={list(self.classes)})")


# --- check -----------------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Issue:
    image: str
    kind: str  # missing_image | unreadable_image | size_mismatch | no_objects | zero_area | outside_image
    #            | unknown_class | near_duplicate
    detail: str


@dataclass
class CheckReport:
    issues: list[Issue]
    n_images: int
    classes: tuple[str, ...]
    boxes_per_class: dict[str, int]  # raw boxes, before the loader policy
    images_without: dict[str, list[str]]  # class -> images that have no box of that class

    def counts(self) -> dict[str, int]:
        out: dict[str, int] = {}
        for issue in self.issues:
            out[issue.kind] = out.get(issue.kind, 0) + 1
        return out

    def of_kind(self, kind: str) -> list[Issue]:
        return [i for i in self.issues if i.kind == kind]

    def text(self) -> str:
        lines = [f"{self.n_images} images, {sum(self.boxes_per_class.values())} boxes "
                 "(boxes below are xyxy in 0-based pixels; a VOC file stores xmin + 1, ymin + 1)"]
        for c in self.classes:
            lines.append(f"  {c}: {self.boxes_per_class[c]} boxes, {len(self.images_without[c])} images without")
        counts = self.counts()
        lines.append("issues: " + (", ".join(f"{k} {v}" for k, v in sorted(counts.items())) or "none"))
        lines += [f"  {i.image}: {i.kind}: {i.detail}" for i in self.issues]
        return "\n".join(lines)


def image_size(path: Path) -> tuple[int, int]:
    """(width, height) from the header as displayed (EXIF rotation applied), without decoding pixels."""
    try:
        with Image.open(path) as img:
            w, h = img.size
            if img.getexif().get(0x0112) in (5, 6, 7, 8):  # orientations that swap width and height
                w, h = h, w
            return w, h
    except FileNotFoundError:
        raise OculaError("image file not found", path) from None
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as e:
        raise OculaError(f"cannot read image header: {e}", path) from None


def _fmt(box) -> str:
    return "[" + ", ".join(f"{v:g}" for v in box) + "]"


def check(dataset: DetectionDataset, duplicate_iou: float = DUPLICATE_IOU) -> CheckReport:
    """Report annotation defects in the raw records (before the loader policy); reads image headers only."""
    classes = dataset.classes
    issues: list[Issue] = []
    boxes_per_class = dict.fromkeys(classes, 0)
    images_without: dict[str, list[str]] = {c: [] for c in classes}
    for r in dataset.records:
        name = r.image.name
        if not r.image.is_file():
            issues.append(Issue(name, "missing_image", f"{r.image} not found"))
        else:
            try:
                real = image_size(r.image)
                if real != (r.width, r.height):
                    issues.append(Issue(name, "size_mismatch",
                                        f"annotation says {r.width}x{r.height}, image is {real[0]}x{real[1]}"))
            except OculaError as e:
                issues.append(Issue(name, "unreadable_image", str(e)))
        if len(r.boxes) == 0:
            issues.append(Issue(name, "no_objects", "no boxes (kept as a negative example)"))
        for c, cname in enumerate(classes):
            n = int((r.labels == c).sum())
            boxes_per_class[cname] += n
            if n == 0:
                images_without[cname].append(name)
        label_name = {**{i: classes[l] for i, l in enumerate(r.labels) if 0 <= l < len(classes)}, **r.unknown}
        for i in np.flatnonzero((r.labels < 0) | (r.labels >= len(classes))):
            issues.append(Issue(name, "unknown_class",
                                f"box {_fmt(r.boxes[i])} has class {label_name.get(i, int(r.labels[i]))!r}, "
                                f"not one of {', '.join(classes)}"))
        for i in np.flatnonzero(degenerate(r.boxes)):
            issues.append(Issue(name, "zero_area", f"{label_name.get(i, '?')} box {_fmt(r.boxes[i])} is at most "
                                                   f"{MIN_SIZE:g} px wide or high"))
        limit = np.array([r.width, r.height, r.width, r.height], dtype=np.float32)
        outside = np.any((r.boxes < -SLACK) | (r.boxes > limit + SLACK), axis=1)
        for i in np.flatnonzero(outside):
            issues.append(Issue(name, "outside_image", f"{label_name.get(i, '?')} box {_fmt(r.boxes[i])} extends "
                                                       f"outside the {r.width}x{r.height} image"))
        for c in np.unique(r.labels[(r.labels >= 0) & (r.labels < len(classes))]):
            idx = np.flatnonzero(r.labels == c)
            iou = np.triu(box_iou_np(r.boxes[idx], r.boxes[idx]), k=1)
            for a, b in zip(*np.nonzero(iou > duplicate_iou)):
                issues.append(Issue(name, "near_duplicate",
                                    f"{label_name[idx[a]]} boxes {_fmt(r.boxes[idx[a]])} and "
                                    f"{_fmt(r.boxes[idx[b]])} overlap with IoU {iou[a, b]:.2f}"))
    return CheckReport(issues, len(dataset), classes, boxes_per_class, images_without)


# --- formats ---------------------------------------------------------------------------------------------------

def _format(fmt: str):
    """The reader/writer module of a format (imported lazily: they import this module's types)."""
    if fmt not in FORMATS:
        raise OculaError(f"unknown detection format {fmt!r}; known: {', '.join(FORMATS)}")
    return importlib.import_module(f"ocula.data.{fmt}")


def load_detection(path: str | Path, format: str, split: str | None = None,
                   classes: Sequence[str] | None = None) -> DetectionDataset:
    """Read a user's detection folder (or COCO JSON file) in `format` ('voc', 'coco' or 'yolo').

    `split` picks ImageSets/Main/<split>.txt (VOC), <split>.json (COCO) or images/<split> (YOLO); `classes` fixes
    the class order (VOC otherwise uses the sorted names found; COCO and YOLO carry their own).
    """
    return _format(format).read(Path(path), split=split, classes=classes)


def write(dataset: DetectionDataset, dst: str | Path, format: str, split: str | None = None) -> Path:
    """Write the cleaned dataset, with copies of its images, as a `format` folder at `dst` (atomic per file)."""
    return _format(format).write(dataset, Path(dst), split=split)


def convert(src: str | Path, src_format: str, dst: str | Path, dst_format: str, split: str | None = None,
            classes: Sequence[str] | None = None) -> Path:
    """Read `src` in `src_format` and write it to `dst` in `dst_format`, under the loader policy.

    Images are copied, never linked, so edits in `dst` cannot reach the source. `dst` may not lie inside `src`.
    """
    src, dst = Path(src).resolve(), Path(dst).resolve()
    src_dir = src.parent if src.is_file() else src
    if dst == src_dir or src_dir in dst.parents:
        raise OculaError(f"output must be outside the source folder {src_dir}", dst)
    dataset = load_detection(src, src_format, split=split, classes=classes)
    return write(dataset, dst, dst_format, split=split)


def copy_image(record: Record, dst: Path, seen: dict[str, Path]) -> str:
    """Copy a record's image into the folder `dst` (atomically); return its file name there.

    `seen` maps file stems already written to their source: VOC and YOLO pair images and labels by stem.
    """
    name = record.image.name
    if seen.setdefault(record.image.stem, record.image) != record.image:
        raise OculaError(f"two images share the name {record.image.stem!r} ({seen[record.image.stem]} and "
                         f"{record.image}); the output pairs images and labels by name", record.image)
    if not record.image.is_file():
        raise OculaError("image file not found", record.image)
    target = dst / name
    if not (target.exists() and target.samefile(record.image)):
        with atomic_path(target) as tmp:
            shutil.copyfile(record.image, tmp)
    return name


# --- BCCD ------------------------------------------------------------------------------------------------------

def load_bccd(root: Path, split: str = "train") -> DetectionDataset:
    """BCCD blood-cell boxes (VOC layout) for one ImageSets/Main split; classes fixed as WBC, RBC, Platelets."""
    from ocula.data import voc

    return voc.read(Path(root), split=split, classes=BCCD_CLASSES, name=f"bccd/{split}")


register(DatasetInfo(
    name="bccd", task="detect", folder="bccd/BCCD",
    description="BCCD blood smears: 364 640x480 JPEGs with Pascal VOC boxes for WBC, RBC and Platelets "
                "(known defects: 2 zero-area RBC boxes, 8 near-duplicate RBC pairs, some cells unlabelled)",
    loader="ocula.data.detection:load_bccd", splits=("train", "val", "test", "trainval"),
    license="MIT (Shenggan/BCCD_Dataset; data from cosmicad/dataset and akshaylamba/all_CELL_data)",
    urls={"BCCD": "https://github.com/Shenggan/BCCD_Dataset"},
))
