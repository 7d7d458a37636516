"""What a dataset argument is (a registered name or a user's folder), its task, format and splits, and one split
of it opened as the task's dataset object (ImageSet, MaskDataset or DetectionDataset).

An existing path wins over a registered name, so a local folder called `mnist` is read as that folder.

Folder layouts, tried in this order; the first match wins, which settles the ambiguous cases:
  segment   mask-folder   images/ + masks/, in the folder or in split sub-folders (<split>/images + <split>/masks)
  detect    voc           Annotations/, or .xml files in the folder
  detect    yolo          images/ + labels/, in the folder or in split sub-folders (<split>/images + <split>/labels)
  classify  image-folder  train|val|test/<class>/<image>
  detect    coco          a .json file, or a folder holding .json files
  detect    yolo          data.yaml, dataset.yaml, classes.txt or obj.names
Mask folders come before YOLO's class files because they may carry classes.txt too; the images/ + masks/ and
images/ + labels/ checks come before the image-folder one, where <split>/images would pass for a class "images".

Splits of a folder; "all" is the whole folder when it has no split structure:
  image-folder  those of train, val, test that exist
  mask-folder   the sub-folders holding images/ + masks/, else "all"
  voc           ImageSets/Main/<split>.txt (VOC's per-class <class>_<split>.txt lists left out), else "all"
  coco          the folder's .json file stems, annotations.json being "all"; a .json file itself: "all"
  yolo          the sub-folders of images/, else the sub-folders holding images/ + labels/, else "all"
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path

from ocula.data import registry, yolo
from ocula.data.classification import image_folder_splits, load_image_folder
from ocula.data.detection import load_detection
from ocula.data.images import IMAGE_SUFFIXES
from ocula.data.segmentation import load_mask_folder
from ocula.errors import OculaError

YOLO_CLASS_FILES = ("data.yaml", "dataset.yaml", "classes.txt", "obj.names")
SPLIT_ORDER = ("train", "trainval", "val", "valid", "test")
EXPECTED = ("train/<class>/<image> (classify), images/ + masks/ (segment), Annotations/ or .xml files (VOC), "
            "a COCO .json, images/ + labels/ or data.yaml / classes.txt / obj.names (YOLO)")


def _ordered(names: Iterable[str]) -> tuple[str, ...]:
    """The usual split names in that order, then any others alphabetically."""
    rank = {s: i for i, s in enumerate(SPLIT_ORDER)}
    return tuple(sorted(set(names), key=lambda s: (rank.get(s, len(rank)), s)))


def _split_dirs(root: Path, *inner: str) -> tuple[str, ...]:
    """Sub-folders of `root` that hold every one of the `inner` folders (a split-first layout)."""
    return _ordered(d.name for d in root.iterdir()
                    if d.is_dir() and not d.name.startswith(".") and all((d / i).is_dir() for i in inner))


def _paired(root: Path, a: str, b: str) -> bool:
    return ((root / a).is_dir() and (root / b).is_dir()) or bool(_split_dirs(root, a, b))


def _has_image(folder: Path) -> bool:
    return any(p.suffix.lower() in IMAGE_SUFFIXES for p in folder.iterdir())


def _is_image_folder(root: Path) -> bool:
    return any(c.is_dir() and _has_image(c) for s in image_folder_splits(root) for c in (root / s).iterdir())


def folder_layout(path: str | Path) -> tuple[str, str]:
    """(task, format) of a user's folder or COCO .json file; see the module docstring for the rules."""
    path = Path(path)
    if path.is_file() and path.suffix.lower() == ".json":
        return "detect", "coco"
    if not path.is_dir():
        raise OculaError("not a folder or COCO .json file" if path.exists() else "folder not found", path)
    if _paired(path, "images", "masks"):
        return "segment", "mask-folder"
    if (path / "Annotations").is_dir() or any(path.glob("*.xml")):
        return "detect", "voc"
    if _paired(path, "images", "labels"):
        return "detect", "yolo"
    if _is_image_folder(path):
        return "classify", "image-folder"
    if any(path.glob("*.json")):
        return "detect", "coco"
    if any((path / n).is_file() for n in YOLO_CLASS_FILES):
        return "detect", "yolo"
    raise OculaError(f"no known dataset layout; expected {EXPECTED}", path)


def _voc_splits(root: Path) -> tuple[str, ...]:
    sets = root / "ImageSets" / "Main"
    stems = {p.stem for p in sets.glob("*.txt")} if sets.is_dir() else set()
    return _ordered(s for s in stems if "_" not in s or s.rpartition("_")[2] not in stems)


def _coco_splits(path: Path) -> tuple[str, ...]:
    if path.is_file():
        return ("all",)
    return _ordered("all" if p.stem == "annotations" else p.stem for p in path.glob("*.json"))


def _yolo_splits(root: Path) -> tuple[str, ...]:
    if (root / "images").is_dir():
        return _ordered(d.name for d in (root / "images").iterdir() if d.is_dir())
    return _split_dirs(root, "images", "labels")


def _folder_splits(path: Path, fmt: str) -> tuple[str, ...]:
    if fmt == "image-folder":
        return image_folder_splits(path)
    if fmt == "mask-folder":
        return _split_dirs(path, "images", "masks") or ("all",)
    if fmt == "voc":
        return _voc_splits(path) or ("all",)
    if fmt == "coco":
        return _coco_splits(path)
    return _yolo_splits(path) or ("all",)


def _as_path(data: str | Path) -> Path | None:
    """The path `data` names when it exists, None when it is a registered dataset name; else an error."""
    path = Path(data)
    if path.exists():
        return path
    if str(data) in registry.names():
        return None
    raise OculaError(f"{str(data)!r} is neither a registered dataset ({', '.join(registry.names())}) "
                     "nor an existing folder or file")


def resolve_task(data: str | Path, data_dir: str | Path | None = None) -> str:
    """'classify', 'segment' or 'detect' for a registered dataset name or a folder.

    `data_dir` is accepted so that resolve_task, splits and open_dataset take the same arguments: a registered
    dataset's task does not depend on where its copy lives.
    """
    path = _as_path(data)
    return registry.get_info(str(data)).task if path is None else folder_layout(path)[0]


def splits(data: str | Path, data_dir: str | Path | None = None) -> tuple[str, ...]:
    """The split names `open_dataset` accepts for `data` (a registered name's come from the registry)."""
    path = _as_path(data)
    return registry.get_info(str(data)).splits if path is None else _folder_splits(path, folder_layout(path)[1])


def open_dataset(data: str | Path, split: str, data_dir: str | Path | None = None):
    """Split `split` of a registered dataset (its copy looked for under `data_dir`) or of a folder, as the task's
    dataset object: ImageSet (classify), MaskDataset (segment) or DetectionDataset (detect)."""
    path = _as_path(data)
    if path is None:
        return registry.load(str(data), split, data_dir)
    fmt = folder_layout(path)[1]
    known = _folder_splits(path, fmt)
    if split not in known:
        raise OculaError(f"no split {split!r}; splits here: {', '.join(known) or 'none'}", path)
    if fmt == "image-folder":
        return load_image_folder(path, split)
    if fmt == "mask-folder":
        return load_mask_folder(path, split)  # "all": no <split>/images, so it reads images/ + masks/ of the folder
    if split == "all":
        return load_detection(path, fmt)
    if fmt == "yolo" and not (path / "images").is_dir():  # split-first: <split>/images + <split>/labels
        return yolo.read(path / split, classes=yolo.read_classes(path))
    return load_detection(path, fmt, split=split)
