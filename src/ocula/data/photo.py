"""Any photo -> the array a classifier was trained on, by the recipe that made its training data.

The recipe is recorded in the model file as `preprocess["style"]`:
  'digits' / 'mnist': the handwritten-digit pipelines of `ocula.data.digit_photo` (ink on paper);
  'fashion': Zalando's recipe for Fashion-MNIST (trim the background, fit the longest side, negate, grey);
  'resize': colour or grey as the model takes it, resized to its input size (CIFAR-10, image folders).
"""

from __future__ import annotations

import numpy as np
from PIL import Image

from ocula.data.digit_photo import prepare_digit
from ocula.data.images import to_mode
from ocula.errors import OculaError

STYLES = ("digits", "mnist", "fashion", "resize")


def _fit_centred(a: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """Fit a grey array in `size` with its aspect kept, centred on black."""
    h, w = a.shape
    s = min(size[0] / h, size[1] / w)
    nh, nw = max(1, round(h * s)), max(1, round(w * s))
    small = np.asarray(Image.fromarray(a.astype(np.uint8)).resize((nw, nh), Image.Resampling.LANCZOS))
    out = np.zeros(size, np.uint8)
    top, left = (size[0] - nh) // 2, (size[1] - nw) // 2
    out[top:top + nh, left:left + nw] = small
    return out


def _fashion(img: Image.Image, size: tuple[int, int]) -> np.ndarray:
    """Product photo -> Fashion-MNIST form: a light background becomes black, the article white and centred."""
    grey = np.asarray(to_mode(img, "L"), np.float32)
    border = np.concatenate([grey[0], grey[-1], grey[:, 0], grey[:, -1]])
    background = float(np.median(border))
    if background > 127:  # product shots are on white; the dataset shows articles light on black
        grey, background = 255.0 - grey, 255.0 - background
    ys, xs = np.nonzero(np.abs(grey - background) > 20)
    if len(ys):
        grey = grey[ys.min():ys.max() + 1, xs.min():xs.max() + 1]
    return _fit_centred(np.clip(grey - background, 0, 255), size).astype(np.float32)


def prepare_photo(image: np.ndarray | Image.Image, *, style: str, size: tuple[int, int], channels: int,
                  name: str | None = None):
    """Return (array [C, H, W] float32 in the model's value range, stages {name: image} for drawing). `name`
    names the image in error messages."""
    img = image if isinstance(image, Image.Image) else Image.fromarray(np.asarray(image, np.uint8))
    if style in ("digits", "mnist"):
        array, steps = prepare_digit(img, style=style, size=size, name=name)
        return array[None], steps
    photo = np.asarray(to_mode(img, "RGB"))
    if style == "fashion":
        out = _fashion(img, size)[None]
    elif style == "resize":
        fitted = to_mode(img, "L" if channels == 1 else "RGB").resize((size[1], size[0]), Image.Resampling.BILINEAR)
        out = np.asarray(fitted, np.float32).reshape(size[0], size[1], channels).transpose(2, 0, 1)
    else:
        raise OculaError(f"unknown photo style {style!r}; known: {', '.join(STYLES)}")
    return out, {"photo": photo, f"model input {size[0]}x{size[1]}": out.transpose(1, 2, 0).squeeze(-1)
                 if channels == 1 else out.transpose(1, 2, 0).astype(np.uint8)}
