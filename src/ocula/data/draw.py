"""Drawing boxes: class-coloured rectangles with "label score" tags, and a contact sheet of dataset samples.

Used for `ocula data show` (ground truth) and for predictions (pass `scores`).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from ocula.errors import OculaError

# Saturated colours that stay visible on pink/purple stained smears as well as on natural images.
PALETTE = ((0, 220, 80), (255, 210, 0), (0, 160, 255), (255, 60, 60), (200, 0, 255), (0, 255, 255),
           (255, 130, 0), (255, 0, 150), (150, 255, 0), (120, 120, 255))


def class_color(label: int) -> tuple[int, int, int]:
    return PALETTE[int(label) % len(PALETTE)]


def _font(size: int):
    try:
        return ImageFont.load_default(size=size)
    except TypeError:  # Pillow < 10.1: only the fixed bitmap font
        return ImageFont.load_default()


def draw_boxes(image, boxes, labels=None, scores=None, classes: Sequence[str] | None = None,
               width: int = 2, font_size: int | None = None) -> np.ndarray:
    """A copy of `image` (HxWx3 or HxW array, or PIL image) with xyxy `boxes` drawn, coloured by label.

    Each box gets a tag with its class name (or index) and, when `scores` are given, the score.
    """
    img = image.copy() if isinstance(image, Image.Image) else Image.fromarray(np.asarray(image))
    img = img.convert("RGB")
    boxes = np.asarray(boxes, dtype=np.float32).reshape(-1, 4)
    labels = np.zeros(len(boxes), np.int64) if labels is None else np.asarray(labels).reshape(-1)
    font = _font(font_size or max(10, round(min(img.size) / 32)))
    draw = ImageDraw.Draw(img)
    for k, (box, label) in enumerate(zip(boxes.tolist(), labels.tolist())):
        color = class_color(label)
        draw.rectangle(box, outline=color, width=width)
        tag = classes[label] if classes is not None and 0 <= label < len(classes) else str(label)
        if scores is not None:
            tag += f" {float(scores[k]):.2f}"
        left, top, right, bottom = draw.textbbox((0, 0), tag, font=font)
        tw, th = right - left + 4, bottom - top + 4
        x = min(max(box[0], 0), max(img.width - tw, 0))
        y = box[1] - th if box[1] - th >= 0 else box[1]  # above the box, or inside it at the top edge
        draw.rectangle([x, y, x + tw, y + th], fill=color)
        ink = (0, 0, 0) if sum(color) > 380 else (255, 255, 255)
        draw.text((x + 2 - left, y + 2 - top), tag, fill=ink, font=font)
    return np.asarray(img)


def draw_samples(dataset, n: int = 6, cols: int = 3, tile: int = 320,
                 indices: Sequence[int] | None = None) -> np.ndarray:
    """RGB uint8 sheet of dataset items with their boxes: `indices`, else `n` spread evenly over the dataset.

    `dataset` yields (image, {boxes, labels}) and has `.classes`; images are scaled to fit `tile` before drawing
    so the tags stay readable.
    """
    if len(dataset) == 0:
        raise OculaError("dataset is empty: nothing to draw")
    if indices is None:
        indices = np.unique(np.linspace(0, len(dataset) - 1, min(n, len(dataset))).round().astype(int))
    cells = []
    for i in indices:
        image, target = dataset[int(i)]
        h, w = image.shape[:2]
        s = tile / max(h, w)
        small = Image.fromarray(image).resize((max(1, round(w * s)), max(1, round(h * s))), Image.BILINEAR)
        cells.append(draw_boxes(small, np.asarray(target["boxes"]) * s, target["labels"],
                                classes=dataset.classes))
    cols = min(cols, len(cells))
    rows = -(-len(cells) // cols)
    gap = 4
    ch, cw = max(c.shape[0] for c in cells), max(c.shape[1] for c in cells)
    sheet = np.full((rows * (ch + gap) - gap, cols * (cw + gap) - gap, 3), 255, np.uint8)
    for k, cell in enumerate(cells):
        y, x = (k // cols) * (ch + gap), (k % cols) * (cw + gap)
        sheet[y:y + cell.shape[0], x:x + cell.shape[1]] = cell
    return sheet
