"""COCO instances JSON (boxes only): read and write.

Layout: a JSON file (or a folder holding <split>.json, else annotations.json) with images in `images/` beside it,
else beside the JSON itself. COCO boxes are [x, y, width, height] in ocula's continuous pixel convention, so only
the corner form changes. `iscrowd` maps to and from ocula's `difficult` flag: both mean "ignore when evaluating".
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from pathlib import Path

from ocula.data.detection import DetectionDataset, Record, copy_image
from ocula.errors import OculaError
from ocula.fileio import write_json


def _json_path(path: Path, split: str | None) -> Path:
    if path.is_file():
        return path
    if not path.is_dir():
        raise OculaError("COCO file or folder not found", path)
    if split:
        return path / f"{split}.json"
    if (path / "annotations.json").is_file():
        return path / "annotations.json"
    found = sorted(path.glob("*.json"))
    if len(found) != 1:
        raise OculaError("expected annotations.json or a single .json file (or pass a split)", path)
    return found[0]


def _load(path: Path) -> dict:
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise OculaError("COCO annotation file not found", path) from None
    except (OSError, UnicodeDecodeError) as e:
        raise OculaError(f"cannot read COCO annotation file: {e}", path) from None
    if not text.strip():
        raise OculaError("empty file", path)
    try:
        data = json.loads(text)
    except json.JSONDecodeError as e:
        raise OculaError(f"not valid JSON at line {e.lineno}, column {e.colno}: {e.msg}", path) from None
    if not isinstance(data, dict):
        raise OculaError(f"not a COCO instances file: the top level is a {type(data).__name__}, not an object", path)
    for key in ("images", "annotations", "categories"):
        if not isinstance(data.get(key), list):
            raise OculaError(f"not a COCO instances file: no {key!r} list", path)
    return data


def _field(entry, key: str, where: str, path: Path, kind=(int, float)):
    if not isinstance(entry, dict):
        raise OculaError(f"{where} is not an object", path)
    value = entry.get(key)
    if value is None:
        raise OculaError(f"{where}: missing {key!r}", path)
    if isinstance(value, bool) or not isinstance(value, kind):
        raise OculaError(f"{where}: {key!r} is {value!r}, of the wrong type", path)
    return value


def _bbox(ann: dict, where: str, path: Path) -> tuple[float, float, float, float]:
    b = _field(ann, "bbox", where, path, list)
    if len(b) != 4 or not all(isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)
                              for v in b):
        raise OculaError(f"{where}: 'bbox' is {b!r}, expected 4 finite numbers [x, y, width, height]", path)
    x, y, w, h = (float(v) for v in b)
    return x, y, x + w, y + h


def read(path: Path, split: str | None = None, classes: Sequence[str] | None = None, name: str | None = None,
         image_dir: Path | None = None) -> DetectionDataset:
    path = _json_path(Path(path), split)
    data = _load(path)
    if image_dir is None:
        image_dir = path.parent / "images" if (path.parent / "images").is_dir() else path.parent
    cats = {}
    for k, c in enumerate(data["categories"]):
        cats[_field(c, "id", f"categories[{k}]", path, int)] = str(_field(c, "name", f"categories[{k}]", path, str))
    if classes is None:
        classes = [cats[i] for i in sorted(cats)]
    index = {c: i for i, c in enumerate(classes)}
    images: dict[int, dict] = {}
    for k, im in enumerate(data["images"]):
        where = f"images[{k}]"
        image_id = _field(im, "id", where, path, (int, str))
        if image_id in images:
            raise OculaError(f"{where}: image id {image_id!r} appears twice", path)
        images[image_id] = {"file": _field(im, "file_name", where, path, str),
                            "width": int(_field(im, "width", where, path)),
                            "height": int(_field(im, "height", where, path)), "anns": []}
    for k, ann in enumerate(data["annotations"]):
        where = f"annotations[{k}]"
        image_id = _field(ann, "image_id", where, path, (int, str))
        if image_id not in images:
            raise OculaError(f"{where}: image_id {image_id!r} is not in 'images'", path)
        cat = _field(ann, "category_id", where, path, int)
        images[image_id]["anns"].append((cat, _bbox(ann, where, path), bool(ann.get("iscrowd", 0))))
    records = []
    for im in images.values():
        anns = im["anns"]
        names = [cats.get(c, str(c)) for c, _, _ in anns]
        labels = [index.get(n, -1) for n in names]
        records.append(Record(
            image=image_dir / im["file"], width=im["width"], height=im["height"], boxes=[a[1] for a in anns],
            labels=labels, difficult=[a[2] for a in anns], truncated=None, annotation=path,
            unknown={k: n for k, n in enumerate(names) if labels[k] < 0}))
    return DetectionDataset(records, classes, name=name or str(path))


def to_coco(dataset: DetectionDataset, file_names: Sequence[str]) -> dict:
    images, annotations = [], []
    for i, file_name in enumerate(file_names):
        r = dataset.clean_record(i)
        images.append({"id": i + 1, "file_name": file_name, "width": r.width, "height": r.height})
        for box, label, crowd in zip(r.boxes.tolist(), r.labels.tolist(), r.difficult.tolist()):
            x0, y0, x1, y1 = (round(v, 3) for v in box)
            w, h = round(x1 - x0, 3), round(y1 - y0, 3)
            annotations.append({"id": len(annotations) + 1, "image_id": i + 1, "category_id": label + 1,
                                "bbox": [x0, y0, w, h], "area": round(w * h, 3), "iscrowd": int(crowd)})
    return {"info": {"description": dataset.name}, "images": images, "annotations": annotations,
            "categories": [{"id": k + 1, "name": c, "supercategory": ""} for k, c in enumerate(dataset.classes)]}


def write(dataset: DetectionDataset, dst: Path, split: str | None = None) -> Path:
    """Write images/ and <split>.json (annotations.json without a split); category ids are class index + 1."""
    seen: dict[str, Path] = {}
    names = [copy_image(dataset.clean_record(i), dst / "images", seen) for i in range(len(dataset))]
    write_json(dst / f"{split or 'annotations'}.json", to_coco(dataset, names))
    return dst
