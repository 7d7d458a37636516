"""Figures saved as PNG (matplotlib with the non-interactive Agg backend), written atomically."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np

from ocula.fileio import atomic_path


def pyplot():
    """matplotlib.pyplot on the file-only Agg backend (no display here, and faster to import)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def save_figure(fig, path: str | Path) -> Path:
    plt = pyplot()
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=110)
    plt.close(fig)
    return Path(path)


def image_grid(images, titles, path: str | Path, *, value_max: float = 255.0, cols: int = 8, title: str = "",
               cmap: str = "gray_r", inches: float = 1.3) -> Path:
    """A grid of grayscale (or RGB) images with a caption each, like the source document's show_image; `inches`:
    the width of one panel (wider for large images)."""
    plt = pyplot()
    n = max(len(images), 1)
    cols = min(cols, n)
    rows = math.ceil(n / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(inches * cols, inches * 1.15 * rows + 0.4), squeeze=False)
    for ax in axes.flat:
        ax.axis("off")
    for ax, img, t in zip(axes.flat, images, titles):
        img = np.asarray(img)
        if img.ndim == 3:  # matplotlib draws RGB floats on 0..1 and ignores vmin / vmax
            img = np.clip(img / value_max, 0, 1)
        ax.imshow(img, cmap=None if img.ndim == 3 else cmap, vmin=0, vmax=value_max, interpolation="nearest")
        ax.set_title(t, fontsize=7)
    if title:
        fig.suptitle(title, fontsize=9)
    return save_figure(fig, path)


def filter_panels(panels, path: str | Path, *, cols: int = 4, title: str = "") -> Path:
    """(title, [H, W] array, kind) panels from `ocula.filters.lecture_panels`: images in grey, signed responses
    on a diverging map centred on zero, magnitudes in grey, angles on a cyclic map."""
    plt = pyplot()
    rows = math.ceil(len(panels) / cols)
    h, w = np.asarray(panels[0][1]).shape
    fig, axes = plt.subplots(rows, cols, figsize=(2.6 * cols, 2.6 * rows * h / w + 0.5), squeeze=False)
    for ax in axes.flat:
        ax.axis("off")
    for ax, (name, image, kind) in zip(axes.flat, panels):
        image = np.asarray(image, dtype=np.float32)
        if kind == "signed":
            bound = float(np.percentile(np.abs(image), 99.5)) or 1.0  # a few strong edges must not wash out the rest
            ax.imshow(image, cmap="RdBu_r", vmin=-bound, vmax=bound)
        elif kind == "angle":
            ax.imshow(image, cmap="twilight", vmin=-np.pi, vmax=np.pi)
        else:
            ax.imshow(image, cmap="gray", vmin=0, vmax=1 if kind == "image" else float(image.max()) or 1.0)
        ax.set_title(name, fontsize=8)
    if title:
        fig.suptitle(title, fontsize=10)
    return save_figure(fig, path)
