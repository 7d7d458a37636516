"""YOLO txt boxes: read and write.

Layout: <root>/images[/<split>]/<name>.jpg with <root>/labels[/<split>]/<name>.txt (a flat folder with the .txt
beside the images also reads), class names in <root>/classes.txt (one a line), obj.names, or the `names:` of
data.yaml / dataset.yaml. A label line is `class cx cy w h`, centre and size normalised by the image size to
[0, 1]; an image without a label file has no objects. Image sizes come from the image headers.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Sequence
from pathlib import Path

from ocula.data.detection import DetectionDataset, Record, copy_image, image_size
from ocula.data.images import list_images
from ocula.errors import OculaError
from ocula.fileio import write_text


def _unquote(s: str) -> str:
    s = s.strip()
    return s[1:-1] if len(s) >= 2 and s[0] == s[-1] and s[0] in "'\"" else s


def yaml_names(path: Path) -> list[str] | None:
    """The `names:` of an Ultralytics data YAML (flow or block list, or index: name mapping), without a YAML library."""
    lines = [re.sub(r"(^|\s)#.*$", "", line).rstrip() for line in path.read_text(encoding="utf-8").splitlines()]
    for k, line in enumerate(lines):
        m = re.match(r"names\s*:\s*(.*)$", line)
        if not m:
            continue
        rest = m.group(1)
        if rest:  # flow style: [a, b] or {0: a, 1: b}
            items = [i for i in rest.strip("[]{}").split(",") if i.strip()]
        else:  # block style, indented below
            items = []
            for sub in lines[k + 1:]:
                if sub and not sub[0].isspace():
                    break
                if sub.strip():
                    items.append(sub.strip().removeprefix("- "))
        return [_unquote(re.sub(r"^\s*\d+\s*:", "", i)) for i in items]
    return None


def read_classes(root: Path) -> list[str] | None:
    for name in ("classes.txt", "obj.names"):
        if (root / name).is_file():
            return [c.strip() for c in (root / name).read_text(encoding="utf-8").splitlines() if c.strip()]
    for name in ("data.yaml", "dataset.yaml"):
        if (root / name).is_file() and (names := yaml_names(root / name)) is not None:
            return names
    return None


def parse(path: Path) -> list[tuple[int, float, float, float, float]]:
    """One label file -> [(class, cx, cy, w, h)]; any malformed line is an OculaError naming the line."""
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise OculaError(f"cannot read label file: {e}", path) from None
    rows = []
    for n, line in enumerate(text.splitlines(), start=1):
        fields = line.split()
        if not fields:
            continue
        if len(fields) != 5:
            raise OculaError(f"line {n}: {len(fields)} fields, expected 5 (class cx cy w h)", path)
        try:
            values = [float(v) for v in fields]
        except ValueError:
            raise OculaError(f"line {n}: {line.strip()!r} is not all numbers", path) from None
        cls = values[0]
        if not (cls >= 0 and cls.is_integer()):
            raise OculaError(f"line {n}: class {fields[0]!r} is not a class index", path)
        for v, s in zip(values[1:], fields[1:]):
            if not (math.isfinite(v) and 0.0 <= v <= 1.0):
                raise OculaError(f"line {n}: value {s} is outside [0, 1] (coordinates are normalised)", path)
        rows.append((int(cls), *values[1:]))
    return rows


def _dirs(root: Path, split: str | None) -> tuple[Path, Path]:
    if split:
        images = root / "images" / split
        if not images.is_dir():
            raise OculaError(f"no split {split!r}: folder images/{split} not found", root)
        return images, root / "labels" / split
    if (root / "images").is_dir():
        return root / "images", root / "labels"
    return root, root


def read(root: Path, split: str | None = None, classes: Sequence[str] | None = None,
         name: str | None = None) -> DetectionDataset:
    root = Path(root)
    if not root.is_dir():
        raise OculaError("YOLO folder not found", root)
    if classes is None:
        classes = read_classes(root)
        if classes is None:
            raise OculaError("no class names: expected classes.txt, obj.names or data.yaml with names", root)
    image_dir, label_dir = _dirs(root, split)
    records = []
    for image in list_images(image_dir):
        label_file = label_dir / f"{image.stem}.txt"
        rows = parse(label_file) if label_file.is_file() else []
        w, h = image_size(image)
        boxes = [((cx - bw / 2) * w, (cy - bh / 2) * h, (cx + bw / 2) * w, (cy + bh / 2) * h)
                 for _, cx, cy, bw, bh in rows]
        labels = [c if c < len(classes) else -1 for c, *_ in rows]
        records.append(Record(image=image, width=w, height=h, boxes=boxes, labels=labels, difficult=None,
                              truncated=None, annotation=label_file if label_file.is_file() else None,
                              unknown={k: str(c) for k, (c, *_) in enumerate(rows) if labels[k] < 0}))
    return DetectionDataset(records, classes, name=name or f"{root}" + (f"/{split}" if split else ""))


def to_lines(record: Record) -> str:
    w, h = record.width, record.height
    out = []
    for (x0, y0, x1, y1), label in zip(record.boxes.tolist(), record.labels.tolist()):
        out.append(f"{label} {(x0 + x1) / 2 / w:.6f} {(y0 + y1) / 2 / h:.6f} {(x1 - x0) / w:.6f} {(y1 - y0) / h:.6f}\n")
    return "".join(out)


def write(dataset: DetectionDataset, dst: Path, split: str | None = None) -> Path:
    """Write images[/split]/, labels[/split]/ (an empty file for an image without objects), classes.txt and a
    data.yaml naming the classes and every split folder present under images/."""
    sub = Path(split) if split else Path()
    seen: dict[str, Path] = {}
    for i in range(len(dataset)):
        r = dataset.clean_record(i)
        filename = copy_image(r, dst / "images" / sub, seen)
        write_text(dst / "labels" / sub / f"{Path(filename).stem}.txt", to_lines(r))
    write_text(dst / "classes.txt", "".join(f"{c}\n" for c in dataset.classes))
    splits = sorted(p.name for p in (dst / "images").iterdir() if p.is_dir())
    yaml = [f"path: {json.dumps(str(dst.resolve()))}"] + [f"{s}: images/{s}" for s in splits]
    yaml += [f"nc: {len(dataset.classes)}", f"names: {json.dumps(list(dataset.classes))}"]
    write_text(dst / "data.yaml", "\n".join(yaml) + "\n")
    return dst
