"""Stain normalisation (Reinhard et al. 2001): move an image's colour statistics onto a target's.

Each image's L*a*b* channels are standardised and given the target's mean and standard deviation, so smears
stained, lit and photographed differently reach the model in one colour range. The target is the average of the
training images' statistics and is recorded in the model file, so prediction normalises the same way.
"""

from __future__ import annotations

import warnings

import numpy as np
from skimage.color import lab2rgb, rgb2lab


def lab_stats(image: np.ndarray) -> np.ndarray:
    """[[mean L, a, b], [std L, a, b]] of an RGB uint8 image."""
    lab = rgb2lab(image).reshape(-1, 3)
    return np.stack([lab.mean(0), lab.std(0)])


def reinhard_target(images) -> dict:
    """The average L*a*b* mean and std over `images`: the colour every image is moved to."""
    stats = np.mean([lab_stats(image) for image in images], axis=0)
    return {"method": "reinhard", "mean": stats[0].round(3).tolist(), "std": stats[1].round(3).tolist()}


def reinhard(image: np.ndarray, target: dict) -> np.ndarray:
    """`image` (RGB uint8) with its L*a*b* mean and std replaced by the target's."""
    lab = rgb2lab(image)
    mean, std = lab_stats(image)
    lab = (lab - mean) / np.maximum(std, 1e-3) * np.asarray(target["std"]) + np.asarray(target["mean"])
    lab[..., 0] = np.clip(lab[..., 0], 0, 100)
    with warnings.catch_warnings():  # colours outside sRGB are clipped, as intended, without a warning per image
        warnings.simplefilter("ignore", UserWarning)
        rgb = lab2rgb(lab)
    return np.clip(rgb * 255 + 0.5, 0, 255).astype(np.uint8)
