"""Pascal VOC XML boxes: read and write.

Layout: <root>/Annotations/<id>.xml, <root>/JPEGImages/<image>, optional <root>/ImageSets/Main/<split>.txt (one id
a line); a flat folder with the XML files beside the images also reads.

Coordinates: VOC stores 1-based inclusive pixel indices (xmin = 1 is the first column, xmax = W the last), so a box
over the whole image is (1, 1, W, H). Ocula's continuous 0-based xyxy is therefore (xmin - 1, ymin - 1, xmax, ymax);
the writer inverts this and rounds to integers, as VOC tools expect. Parsing goes through defusedxml: entity
declarations (billion laughs) and external references are refused, never expanded.
"""

from __future__ import annotations

import xml.etree.ElementTree as ET
from collections.abc import Sequence
from pathlib import Path

import defusedxml
import defusedxml.ElementTree as SafeET
import numpy as np

from ocula.data.detection import DetectionDataset, Record, copy_image, image_size
from ocula.data.images import IMAGE_SUFFIXES
from ocula.errors import OculaError
from ocula.fileio import write_bytes, write_text

COORDS = ("xmin", "ymin", "xmax", "ymax")


def _number(elem: ET.Element, tag: str, where: str, path: Path) -> float:
    text = elem.findtext(tag)
    if text is None or not text.strip():
        raise OculaError(f"{where}: missing <{tag}>", path)
    try:
        value = float(text)
    except ValueError:
        raise OculaError(f"{where}: <{tag}> is {text.strip()!r}, not a number", path) from None
    if not np.isfinite(value):
        raise OculaError(f"{where}: <{tag}> is {text.strip()!r}, not a finite number", path)
    return value


def _flag(elem: ET.Element, tag: str) -> bool:
    return (elem.findtext(tag) or "0").strip() not in ("", "0")


def parse(path: Path) -> dict:
    """One annotation file -> {filename, width, height (0 when absent), objects: [(name, xyxy, difficult,
    truncated)]}, with the box already in ocula's 0-based convention."""
    try:
        data = path.read_bytes()
    except OSError as e:
        raise OculaError(f"cannot read annotation: {e.strerror or e}", path) from None
    if not data.strip():
        raise OculaError("empty annotation file", path)
    try:
        root = SafeET.fromstring(data)
    except defusedxml.EntitiesForbidden:
        raise OculaError("XML declares entities; refused (entity expansion can exhaust memory)", path) from None
    except (defusedxml.DTDForbidden, defusedxml.ExternalReferenceForbidden):
        raise OculaError("XML refers to an external DTD or entity; refused", path) from None
    except ET.ParseError as e:
        line, col = e.position
        raise OculaError(f"malformed XML at line {line}, column {col + 1}", path) from None
    if root.tag != "annotation":
        raise OculaError(f"not a Pascal VOC annotation: root element is <{root.tag}>, expected <annotation>", path)
    size = root.find("size")
    width = height = 0
    if size is not None and (size.findtext("width") or "").strip():
        width = int(_number(size, "width", "<size>", path))
        height = int(_number(size, "height", "<size>", path))
    objects = []
    for k, obj in enumerate(root.iter("object"), start=1):
        name = (obj.findtext("name") or "").strip()
        where = f"object {k}" + (f" ({name})" if name else "")
        if not name:
            raise OculaError(f"{where}: missing <name>", path)
        box = obj.find("bndbox")
        if box is None:
            raise OculaError(f"{where}: missing <bndbox>", path)
        x0, y0, x1, y1 = (_number(box, t, where, path) for t in COORDS)
        objects.append((name, (x0 - 1, y0 - 1, x1, y1), _flag(obj, "difficult"), _flag(obj, "truncated")))
    return {"filename": (root.findtext("filename") or "").strip(), "width": width, "height": height,
            "objects": objects}


def _image_for(image_dir: Path, stem: str, filename: str) -> Path:
    """The image an annotation names; failing that, any image with the annotation's stem."""
    if filename and (image_dir / filename).is_file():
        return image_dir / filename
    for suffix in sorted(IMAGE_SUFFIXES):
        for cand in (image_dir / f"{stem}{suffix}", image_dir / f"{stem}{suffix.upper()}"):
            if cand.is_file():
                return cand
    return image_dir / (filename or f"{stem}.jpg")  # missing: `check` reports it


def _split_ids(root: Path, split: str) -> list[str]:
    sets = root / "ImageSets" / "Main"
    path = sets / f"{split}.txt"
    if not path.is_file():
        known = sorted(p.stem for p in sets.glob("*.txt")) if sets.is_dir() else []
        raise OculaError(f"no split {split!r}" + (f"; known: {', '.join(known)}" if known else ""), path)
    return [line.split()[0] for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


def read(root: Path, split: str | None = None, classes: Sequence[str] | None = None,
         name: str | None = None) -> DetectionDataset:
    root = Path(root)
    if not root.is_dir():
        raise OculaError("VOC folder not found", root)
    if (root / "Annotations").is_dir():
        ann_dir, image_dir = root / "Annotations", root / "JPEGImages"
    else:
        ann_dir = image_dir = root
    if split:
        files = [ann_dir / f"{i}.xml" for i in _split_ids(root, split)]
        for f in files:
            if not f.is_file():
                raise OculaError(f"annotation listed in split {split!r} not found", f)
    else:
        files = sorted(ann_dir.glob("*.xml"))
        if not files:
            raise OculaError("no .xml annotations found", ann_dir)
    parsed = [(f, parse(f)) for f in files]
    if classes is None:
        classes = sorted({obj[0] for _, p in parsed for obj in p["objects"]})
    index = {c: i for i, c in enumerate(classes)}
    records = []
    for f, p in parsed:
        image = _image_for(image_dir, f.stem, p["filename"])
        width, height = p["width"], p["height"]
        if width <= 0 or height <= 0:
            if not image.is_file():
                raise OculaError(f"no image size in the annotation and its image {image.name} is missing", f)
            width, height = image_size(image)
        objs = p["objects"]
        labels = [index.get(o[0], -1) for o in objs]
        records.append(Record(
            image=image, width=width, height=height, boxes=[o[1] for o in objs], labels=labels,
            difficult=[o[2] for o in objs], truncated=[o[3] for o in objs], annotation=f,
            unknown={k: o[0] for k, o in enumerate(objs) if labels[k] < 0}))
    return DetectionDataset(records, classes, name=name or f"{root}" + (f"/{split}" if split else ""))


def _sub(parent: ET.Element, tag: str, text=None) -> ET.Element:
    elem = ET.SubElement(parent, tag)
    if text is not None:
        elem.text = str(text)
    return elem


def to_xml(record: Record, classes: Sequence[str], filename: str) -> bytes:
    ann = ET.Element("annotation")
    _sub(ann, "folder", "JPEGImages")
    _sub(ann, "filename", filename)
    size = _sub(ann, "size")
    for tag, v in (("width", record.width), ("height", record.height), ("depth", 3)):
        _sub(size, tag, v)
    _sub(ann, "segmented", 0)
    one_based = np.rint(record.boxes).astype(np.int64) + np.array([1, 1, 0, 0])
    for box, label, difficult, truncated in zip(one_based, record.labels, record.difficult, record.truncated):
        obj = _sub(ann, "object")
        _sub(obj, "name", classes[label])
        _sub(obj, "pose", "Unspecified")
        _sub(obj, "truncated", int(truncated))
        _sub(obj, "difficult", int(difficult))
        bndbox = _sub(obj, "bndbox")
        for tag, v in zip(COORDS, box):
            _sub(bndbox, tag, int(v))
    ET.indent(ann, space="\t")
    return ET.tostring(ann, encoding="utf-8") + b"\n"


def write(dataset: DetectionDataset, dst: Path, split: str | None = None) -> Path:
    """Write Annotations/, JPEGImages/ and, when `split` is given, ImageSets/Main/<split>.txt."""
    seen: dict[str, Path] = {}
    for i in range(len(dataset)):
        r = dataset.clean_record(i)
        filename = copy_image(r, dst / "JPEGImages", seen)
        write_bytes(dst / "Annotations" / f"{Path(filename).stem}.xml", to_xml(r, dataset.classes, filename))
    if split:
        write_text(dst / "ImageSets" / "Main" / f"{split}.txt", "".join(f"{s}\n" for s in seen))
    return dst
