"""A task's typed result -> the JSON `/v1/predict` answers: the result's own `to_json()` plus what a page needs to
show it: the preprocessing stages of a photo (classify) and the mask as a transparent colour overlay
(segment), as PNG data URLs. Detections are boxes in image pixels, which the page draws itself."""

from __future__ import annotations

import base64
import io

import numpy as np
from PIL import Image

from ocula.data.segmentation import PALETTE


def png_data_url(array: np.ndarray) -> str:
    buf = io.BytesIO()
    Image.fromarray(array).save(buf, format="PNG", compress_level=1)  # fast: these are sent once, not stored
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode("ascii")


def stage_image(array) -> np.ndarray:
    """A preprocessing stage as uint8 for display: colour photos as they are, grey stages (ink 0..1, grey 0..255,
    masks, 0..16 digit cells) stretched to their own maximum."""
    a = np.asarray(array)
    if a.ndim == 3:
        return a.astype(np.uint8)
    a = a.astype(np.float32)
    peak = float(a.max())
    return (a / peak * 255 if peak > 0 else a).clip(0, 255).astype(np.uint8)


def mask_overlay(mask: np.ndarray) -> np.ndarray:
    """RGBA [H, W, 4]: each foreground class in the colour of ocula's overlays, half transparent; background
    clear."""
    rgba = np.zeros((*mask.shape, 4), np.uint8)
    fg = mask > 0
    rgba[fg, :3] = PALETTE[1:][(mask[fg].astype(np.int64) - 1) % (len(PALETTE) - 1)]
    rgba[fg, 3] = 140
    return rgba


def answer(result, task: str, classes: list[str], *, stages: bool = True) -> dict:
    out = {k: v for k, v in result.to_json().items() if k != "file"}
    if task == "classify" and stages:
        out["stages"] = [{"name": name, "png": png_data_url(stage_image(a))} for name, a in result.steps.items()]
    elif task == "segment":
        out["mask_png"] = png_data_url(mask_overlay(result.mask))
        out["counts"] = count_by_class(out["cells"], out["count"], classes)
    return out


def count_by_class(cells: list[dict], total: int, classes: list[str]) -> dict[str, int]:
    """Cells per class name when the rows carry a class index (multi-class masks), else the one total."""
    if not cells or any("class" not in c for c in cells):
        return {"cells": total}
    names = [classes[c["class"]] if c["class"] < len(classes) else str(c["class"]) for c in cells]
    return {name: names.count(name) for name in dict.fromkeys(names)}
