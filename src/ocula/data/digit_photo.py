"""Photo of a handwritten digit -> the small grayscale array a digit model was trained on.

The source document shrank the whole photo to 8x8 and fed values in 0..1 to a model trained on 0..16, so real
photos "worked poorly". Here every stage copies how the training data was made:
  EXIF orientation -> grayscale (0.3 R + 0.59 G + 0.11 B, the document's weights) -> uneven-lighting correction
  (divide by the paper's brightness, estimated by a morphological closing) -> Otsu threshold on the ink ->
  keep the digit's strokes (drop specks and shadows touching the border) -> crop -> pad to square ->
  'digits' style: 32x32 bitmap summed over 4x4 blocks, values 0..16 (exactly how UCI made the 8x8 digits);
  'mnist' style: fit in 20x20, anti-aliased, centred by centre of mass in 28x28, values 0..255.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image
from scipy import ndimage

from ocula.data.images import open_image, to_mode
from ocula.errors import OculaError

WORK_SIZE = 384  # long side for processing: enough for strokes, fast for any camera resolution


def _resize(a: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """Area-style resize of a float array to (height, width)."""
    img = Image.fromarray(a.astype(np.float32), mode="F")
    return np.asarray(img.resize((size[1], size[0]), Image.Resampling.BOX if min(size) < min(a.shape)
                                 else Image.Resampling.BILINEAR))


def _pad_square(a: np.ndarray, margin: float = 0.0) -> np.ndarray:
    h, w = a.shape
    side = int(round(max(h, w) * (1 + margin)))
    out = np.zeros((side, side), a.dtype)
    top, left = (side - h) // 2, (side - w) // 2
    out[top:top + h, left:left + w] = a
    return out


def _keep_digit(binary: np.ndarray) -> np.ndarray:
    """Keep the strokes: components of at least 5% of the largest, preferring those not touching the border."""
    labels, n = ndimage.label(binary, structure=np.ones((3, 3)))
    if n == 0:
        return binary
    areas = ndimage.sum_labels(binary, labels, range(1, n + 1))
    border = set(np.unique(np.concatenate([labels[0], labels[-1], labels[:, 0], labels[:, -1]]))) - {0}
    inner = [i for i in range(1, n + 1) if i not in border]
    candidates = inner if inner and max(areas[i - 1] for i in inner) >= 0.05 * areas.max() else range(1, n + 1)
    largest = max(areas[i - 1] for i in candidates)
    keep = [i for i in candidates if areas[i - 1] >= 0.05 * largest]
    return np.isin(labels, keep)


def prepare_digit(source, *, style: str = "digits", size: tuple[int, int] = (8, 8), name: str | None = None):
    """Return (array [H, W] float32 in the model's value range, steps: dict name -> image for drawing).
    `name` names an in-memory image in error messages."""
    path = source if isinstance(source, (str, Path)) else name or "<image>"
    img = open_image(source) if isinstance(source, (str, Path)) else source
    rgb = to_mode(img, "RGB")
    rgb.thumbnail((WORK_SIZE, WORK_SIZE), Image.Resampling.BOX)
    a = np.asarray(rgb, dtype=np.float32)
    steps = {"photo (EXIF-oriented)": a.astype(np.uint8)}
    gray = a[..., 0] * 0.3 + a[..., 1] * 0.59 + a[..., 2] * 0.11
    steps["gray 0.3/0.59/0.11"] = gray
    # Paper brightness: a closing wider than any stroke erases the dark ink and keeps shading and shadows.
    k = max(3, min(gray.shape) // 12)
    paper = ndimage.gaussian_filter(ndimage.grey_closing(gray, size=(k, k)), k / 2)
    ink = np.clip(1.0 - gray / np.maximum(paper, 1.0), 0.0, 1.0)
    steps["lighting corrected ink"] = ink
    if ink.max() < 0.15:
        raise OculaError("no ink found: the image looks blank (no dark strokes on a light background)", path)
    from skimage.filters import threshold_otsu

    threshold = max(float(threshold_otsu(ink)), 0.1)
    binary = ink > threshold
    steps[f"Otsu threshold {threshold:.2f}"] = binary
    kept = _keep_digit(binary)
    steps["kept strokes"] = kept
    ys, xs = np.nonzero(kept)
    if not len(ys):  # an all-dark or a one-pixel-high picture leaves no stroke to read
        raise OculaError("no digit strokes found in the image", path)
    crop = (ink * kept)[ys.min():ys.max() + 1, xs.min():xs.max() + 1]
    square = _pad_square(crop)
    steps["crop, square"] = square
    if style == "digits":
        # UCI optdigits: a 32x32 binary bitmap, on-pixels counted in 4x4 blocks -> 0..16 per cell.
        bitmap = _resize(square, (4 * size[0], 4 * size[1])) > 0.25 * threshold  # bold, like the scanned pen strokes
        out = bitmap.reshape(size[0], 4, size[1], 4).sum(axis=(1, 3)).astype(np.float32)
    elif style == "mnist":
        # MNIST: digit fitted in a 20x20 box (aspect kept), centred by centre of mass in 28x28, 0..255.
        inner = max(1, round(size[0] * 20 / 28))
        h, w = crop.shape
        scale = inner / max(h, w)
        small = _resize(crop / max(crop.max(), 1e-6), (max(1, round(h * scale)), max(1, round(w * scale))))
        out = np.zeros(size, np.float32)
        top, left = (size[0] - small.shape[0]) // 2, (size[1] - small.shape[1]) // 2
        out[top:top + small.shape[0], left:left + small.shape[1]] = small
        cy, cx = ndimage.center_of_mass(out)
        out = ndimage.shift(out, ((size[0] - 1) / 2 - cy, (size[1] - 1) / 2 - cx), order=1, mode="constant")
        out = np.clip(out, 0, 1) * 255.0
    else:
        raise OculaError(f"unknown photo style {style!r} (digits or mnist)")
    steps[f"model input {size[0]}x{size[1]}"] = out
    return out.astype(np.float32), steps


def draw_steps(steps: dict, path: str | Path, caption: str = "") -> Path:
    from ocula.plots import pyplot, save_figure

    plt = pyplot()
    fig, axes = plt.subplots(1, len(steps), figsize=(2.1 * len(steps), 2.6))
    for ax, (name, img) in zip(axes, steps.items()):
        img = np.asarray(img)
        ax.imshow(img, cmap=None if img.ndim == 3 else "gray_r" if "input" in name or "crop" in name else "gray",
                  interpolation="nearest")
        ax.set_title(name, fontsize=7)
        ax.axis("off")
    if caption:
        fig.suptitle(caption, fontsize=9)
    return save_figure(fig, path)
