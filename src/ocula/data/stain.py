"""Stain normalisation: smears stained, lit and photographed differently reach the model in one colour range.

- Reinhard et al. 2001: each image's L*a*b* channels are standardised and given the target's mean and standard
  deviation. Simple, but the statistics mix stain with content: an image filled by one cell is pulled towards
  the colours of images that are mostly background.
- White balance: each image divided by its own background light (`background_light`), so the lamp's colour and
  the camera's white balance (Zheng's yellow fields against SigTuple's white ones) no longer reach the model;
  the stain colours are left as they are. Neutral light takes only the lamp's colour out and keeps its brightness.
- Macenko et al. 2009: light absorbed (optical density, OD) is a sum of two stains' fixed colours weighted by
  their amounts; each image's two stain colours are estimated from its stained pixels, its amounts unmixed, and
  the image rebuilt with the target's stain colours, amounts and background light. Blood stains (azure-eosin:
  Wright, Giemsa, May-Grunwald) have two dyes like H&E.

The target comes from the training images and is recorded in the model file (`stain`), so prediction
normalises the same way; `normalise` applies whichever method a target names.
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


# ------------------------------------------------------------------------------------------------------- Macenko

STAINED_OD = 0.15  # pixels absorbing less (OD norm) are background and do not inform the stain colours
ANGLE_PERCENTILE = 1.0  # the extreme stain angles, robust to a few odd pixels
MAX_PIXELS = 200_000  # pixels an image's stain estimate samples (a whole smear has millions)


def background_light(image: np.ndarray) -> np.ndarray:
    """Per-channel brightness of the illumination: the 99th percentile of each channel (a yellow lamp or
    white balance gives a yellow background, which is light, not stain)."""
    return np.maximum(np.percentile(image.reshape(-1, 3), 99, axis=0), 1.0)


def optical_density(image: np.ndarray, background: np.ndarray) -> np.ndarray:
    """[N, 3] light absorbed by each pixel, -log(I / I0), zero for the background."""
    return np.maximum(-np.log(np.maximum(image.reshape(-1, 3).astype(np.float64), 1.0) / background), 0.0)


def stain_colours(od: np.ndarray) -> np.ndarray | None:
    """[3, 2] unit OD colours of the two stains, from the plane of the stained pixels' two main directions;
    None when too few pixels are stained. The nuclear dye comes first: the one the darkest pixels hold most of
    (nuclei are the darkest things in a smear, whatever colour a lab's dyes give them)."""
    density = np.linalg.norm(od, axis=1)
    stained = density > STAINED_OD
    od, density = od[stained], density[stained]
    if len(od) < 100:
        return None
    plane = np.linalg.eigh(np.cov(od.T))[1][:, [2, 1]]
    plane *= np.sign(plane.sum(0))  # eigenvectors have no sign: point them where OD is positive
    angle = np.arctan2(*(od @ plane).T[::-1])
    ends = np.percentile(angle, [ANGLE_PERCENTILE, 100 - ANGLE_PERCENTILE])
    colours = np.clip(plane @ np.stack([np.cos(ends), np.sin(ends)]), 1e-6, None)
    colours /= np.linalg.norm(colours, axis=0)
    darkest = od[density >= np.percentile(density, 99)]
    nuclear = np.linalg.lstsq(colours, darkest.T, rcond=None)[0].mean(1)
    return colours if nuclear[0] >= nuclear[1] else colours[:, ::-1]


def _stains(image: np.ndarray, rng: np.random.Generator) -> tuple | None:
    """(background light, optical density [N, 3], stain colours, 99th-percentile amount of each stain) of one
    RGB image."""
    background = background_light(image)
    od = optical_density(image, background)
    sample = od[rng.choice(len(od), MAX_PIXELS, replace=False)] if len(od) > MAX_PIXELS else od
    colours = stain_colours(sample)
    if colours is None:
        return None
    amounts = np.linalg.lstsq(colours, sample.T, rcond=None)[0]
    return background, od, colours, np.percentile(amounts, 99, axis=1)


def macenko_target(images) -> dict:
    """The median background light, stain colours and stain amounts over `images` (images without stain are
    skipped)."""
    rng = np.random.default_rng(0)
    found = [(light, colours, amounts) for light, _, colours, amounts in
             filter(None, (_stains(image, rng) for image in images))]
    if not found:
        raise ValueError("no stained pixels in the training images to take the stain colours from")
    background, colours, amounts = (np.median(np.stack(part), axis=0) for part in zip(*found))
    colours /= np.linalg.norm(colours, axis=0)
    return {"method": "macenko", "background": background.round(2).tolist(), "colours": colours.round(5).tolist(),
            "amounts": amounts.round(5).tolist()}


def macenko(image: np.ndarray, target: dict) -> np.ndarray:
    """`image` (RGB uint8) rebuilt with the target's stain colours, amounts and background light; an image
    without stained pixels comes back as it is."""
    stains = _stains(image, np.random.default_rng(0))
    if stains is None:
        return image
    _, od, colours, amounts = stains
    unmixed = np.linalg.lstsq(colours, od.T, rcond=None)[0]
    unmixed *= (np.asarray(target["amounts"]) / np.maximum(amounts, 1e-6))[:, None]
    rebuilt = np.asarray(target["background"]) * np.exp(-(np.asarray(target["colours"]) @ unmixed).T)
    return np.clip(rebuilt + 0.5, 0, 255).astype(np.uint8).reshape(image.shape)


# ------------------------------------------------------------------------------------------------ white balance


def named_target(method: str):
    """The target of a method that needs nothing from the training images (white balance, neutral light: each
    image is corrected by its own background light): it only names the method."""
    return lambda images: {"method": method}


def white_balance(image: np.ndarray, target: dict) -> np.ndarray:
    """`image` (RGB uint8) with each channel scaled so that its background light becomes 255."""
    light = background_light(image)
    return np.clip(image * (255.0 / light) + 0.5, 0, 255).astype(np.uint8)


def neutral_light(image: np.ndarray, target: dict) -> np.ndarray:
    """`image` (RGB uint8) with each channel scaled so that its background light becomes a grey as bright as the
    channels' mean: the lamp's colour goes, its brightness stays (white balance would also brighten a dim field
    and flatten the pale cytoplasm against 255)."""
    light = background_light(image)
    return np.clip(image * (light.mean() / light) + 0.5, 0, 255).astype(np.uint8)


METHODS = {"reinhard": (reinhard_target, reinhard), "macenko": (macenko_target, macenko),
           "white": (named_target("white"), white_balance),
           "neutral": (named_target("neutral"), neutral_light)}


def stain_target(method: str, images) -> dict:
    """The colour target of `method` (a METHODS name) over the training `images`."""
    return METHODS[method][0](images)


def normalise(image: np.ndarray, target: dict | None) -> np.ndarray:
    """`image` normalised to `target` by the method the target names (a model file's `stain`); None: as is."""
    return METHODS[target["method"]][1](image, target) if target else image
