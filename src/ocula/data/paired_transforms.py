"""Augmentation applied identically to an image and its mask, driven by an explicit numpy Generator.

Every transform is called as `t(image, mask, rng) -> (image, mask)`: image uint8 HxWx3 (or HxW), mask HxW of
class indices or None. Geometry moves both (bilinear for the image, nearest for the mask, so no new class values
appear); colour and stain changes touch the image only. Passing the generator in, rather than holding one, lets a
dataset derive it from (seed, epoch, index), so results are repeatable whatever the loader's worker order.
Transforms are dataclasses: their repr is a readable record of the augmentation used in a run.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy import ndimage
from skimage.color import hed_from_rgb, rgb_from_hed


def _to_uint8(x: np.ndarray) -> np.ndarray:
    return np.clip(x + 0.5, 0, 255).astype(np.uint8)


class Compose:
    """Apply transforms in order with one generator; `rng` may be a seed or None (fresh entropy)."""

    def __init__(self, transforms):
        self.transforms = list(transforms)

    def __call__(self, image, mask=None, rng=None):
        rng = rng if isinstance(rng, np.random.Generator) else np.random.default_rng(rng)
        for t in self.transforms:
            image, mask = t(image, mask, rng)
        return image, mask

    def __repr__(self) -> str:
        return "Compose([" + ", ".join(map(repr, self.transforms)) + "])"


@dataclass(frozen=True)
class HFlip:
    p: float = 0.5

    def __call__(self, image, mask, rng):
        if rng.random() >= self.p:
            return image, mask
        # Contiguous copies: torch.from_numpy rejects the negative strides a flipped view has.
        return np.ascontiguousarray(image[:, ::-1]), None if mask is None else np.ascontiguousarray(mask[:, ::-1])


@dataclass(frozen=True)
class VFlip:
    p: float = 0.5

    def __call__(self, image, mask, rng):
        if rng.random() >= self.p:
            return image, mask
        return np.ascontiguousarray(image[::-1]), None if mask is None else np.ascontiguousarray(mask[::-1])


@dataclass(frozen=True)
class Rot90:
    """Rotate by a random multiple of 90 degrees (lossless; swaps height and width for k odd)."""

    def __call__(self, image, mask, rng):
        k = int(rng.integers(4))
        if k == 0:
            return image, mask
        image = np.ascontiguousarray(np.rot90(image, k, axes=(0, 1)))
        return image, None if mask is None else np.ascontiguousarray(np.rot90(mask, k))


@dataclass(frozen=True)
class Affine:
    """Small rotation (degrees), isotropic scale and translation (fraction of size) about the image centre.

    Borders are filled by reflection: cell images continue naturally, where a constant fill would teach the
    model that black corners are background.
    """

    degrees: float = 15.0
    scale: tuple[float, float] = (0.9, 1.1)
    translate: float = 0.05
    p: float = 0.5

    def params(self, shape, rng):
        """(matrix, offset) mapping output (row, col) to input coordinates, as scipy.ndimage expects."""
        angle = np.deg2rad(rng.uniform(-self.degrees, self.degrees))
        s = rng.uniform(*self.scale)
        t = rng.uniform(-self.translate, self.translate, size=2) * np.array(shape[:2])
        c, sn = np.cos(angle), np.sin(angle)
        # forward: out = s R (in - centre) + centre + t;
        # scipy wants the inverse: in = R^T (out - centre - t) / s + centre
        inv = np.array([[c, sn], [-sn, c]]) / s
        centre = (np.array(shape[:2]) - 1) / 2.0
        return inv, centre - inv @ (centre + t)

    def __call__(self, image, mask, rng):
        if rng.random() >= self.p:
            return image, mask
        matrix, offset = self.params(image.shape, rng)
        planes = image[..., None] if image.ndim == 2 else image
        out = np.stack([_warp(planes[..., ch].astype(np.float32), matrix, offset, 1)
                        for ch in range(planes.shape[2])], axis=2)
        return _to_uint8(out.reshape(image.shape)), None if mask is None else _warp(mask, matrix, offset, 0)


def _warp(plane: np.ndarray, matrix, offset, order: int) -> np.ndarray:
    return ndimage.affine_transform(plane, matrix, offset, order=order, mode="reflect", prefilter=False)


_RGB_TO_YIQ = np.array([[0.299, 0.587, 0.114], [0.596, -0.274, -0.322], [0.211, -0.523, 0.312]])


def _hue_rotation(turns: float) -> np.ndarray:
    """3x3 RGB matrix turning hue by `turns` (rotation of the YIQ chroma plane): one matmul, where an HSV round
    trip costs ten times more and hue is only ever nudged here."""
    a = 2 * np.pi * turns
    rot = np.array([[1, 0, 0], [0, np.cos(a), -np.sin(a)], [0, np.sin(a), np.cos(a)]])
    return np.linalg.inv(_RGB_TO_YIQ) @ rot @ _RGB_TO_YIQ


@dataclass(frozen=True)
class ColorJitter:
    """Random brightness, contrast and saturation factors in [1-x, 1+x] and a hue shift in [-hue, hue] turns."""

    brightness: float = 0.1
    contrast: float = 0.1
    saturation: float = 0.1
    hue: float = 0.02
    p: float = 0.8

    def __call__(self, image, mask, rng):
        if rng.random() >= self.p or image.ndim != 3:
            return image, mask
        b, c, s = (rng.uniform(1 - v, 1 + v) for v in (self.brightness, self.contrast, self.saturation))
        h = rng.uniform(-self.hue, self.hue)
        x = image.astype(np.float32) / 255.0
        luma = np.array([0.299, 0.587, 0.114], dtype=np.float32)
        x = x * b
        mean = float((x @ luma).mean())
        x = (x - mean) * c + mean
        grey = (x @ luma)[..., None]
        x = grey + (x - grey) * s
        x = np.clip(x, 0.0, 1.0)
        if h:
            x = np.clip(x @ _hue_rotation(h).T.astype(np.float32), 0.0, 1.0)
        return _to_uint8(x * 255.0), mask


@dataclass(frozen=True)
class StainJitter:
    """H&E / Romanowsky stain variation: scale (1 +- sigma) and shift (+- bias) each stain's optical density, and
    shift each RGB channel's optical density by +- tint (the lamp's colour and the camera's white balance, which
    differ between microscopes: Zheng's yellow background is a blue density of 0.55 where SigTuple's is 0.4).

    Works in the haematoxylin-eosin-DAB space of Ruifrok & Johnston (skimage's matrices). skimage's
    rgb2hed clips negative stain amounts, so rgb2hed -> hed2rgb changes most pixels of a blood smear even with
    no jitter; this linear round trip is exact, and only the sampled factors change colours.
    """

    sigma: float = 0.05
    bias: float = 0.03
    tint: float = 0.0
    p: float = 0.5

    def __call__(self, image, mask, rng):
        if rng.random() >= self.p or image.ndim != 3:
            return image, mask
        alpha = rng.uniform(1 - self.sigma, 1 + self.sigma, size=3)
        beta = rng.uniform(-self.bias, self.bias, size=3)
        od = -np.log((image.astype(np.float64) + 1.0) / 256.0)  # +1: log never sees 0; white is OD 0
        stains = od @ hed_from_rgb
        od = (stains * alpha + beta) @ rgb_from_hed + rng.uniform(-self.tint, self.tint, size=3)
        return _to_uint8(np.exp(-od) * 256.0 - 1.0), mask


@dataclass(frozen=True)
class Lamp:
    """The colour of the illumination: a halogen lamp or a camera's white balance casts yellow, a daylight filter
    blue. Adds warmth x (0, 0.2, 1) optical density, so blue light is dimmed most (Zheng's yellow fields pass 0.6
    of the blue light they pass of red and green: a warmth of 0.5), and a negative warmth turns the image blue."""

    warmth: tuple[float, float] = (-0.2, 0.6)
    p: float = 0.5

    def __call__(self, image, mask, rng):
        if rng.random() >= self.p or image.ndim != 3:
            return image, mask
        od = rng.uniform(*self.warmth) * np.array([0.0, 0.2, 1.0])
        return _to_uint8((image.astype(np.float64) + 1.0) * np.exp(-od) - 1.0), mask


@dataclass(frozen=True)
class BackgroundShift:
    """Moves a crop's content by up to `shift` x its size and fills the strip it uncovers with the crop's own
    background light (the 99th percentile of its background pixels), labelled background. A crop cut tight around
    one white cell (Zheng's) then has room around it for the red cells drawn after this."""

    shift: float = 0.5
    p: float = 0.5

    def __call__(self, image, mask, rng):
        if rng.random() >= self.p or image.ndim != 3 or mask is None or not (mask == 0).any():
            return image, mask
        from ocula.data.stain import background_light

        out = np.empty_like(image)
        out[:] = background_light(image[mask == 0]).astype(image.dtype)
        moved = np.zeros_like(mask)
        src, dst = [], []
        for n in mask.shape:
            d = int(round(rng.uniform(-self.shift, self.shift) * n))
            src.append(slice(max(0, -d), min(n, n - d)))
            dst.append(slice(max(0, d), min(n, n + d)))
        out[dst[0], dst[1]] = image[src[0], src[1]]
        moved[dst[0], dst[1]] = mask[src[0], src[1]]
        return out, moved


@dataclass(frozen=True)
class RedCells:
    """Red blood cells drawn on the background as negatives: discs without a nucleus, thicker at the rim than at
    the centre, of random size, shape and stain colour, added in optical density (light passes through the red
    cell and the slide) where the mask is background, so a white cell stays on top. Images cropped around one
    white cell (Zheng's) show few red cells, and a model that has seen none paints another lab's as cytoplasm.
    `diameter` is in px at the blood recipe's scale (64 px white cells; red cells are about half as wide); `lilac`:
    the largest share of haematoxylin mixed into a red cell's eosin colour."""

    diameter: tuple[float, float] = (28.0, 42.0)
    count: int = 6
    density: tuple[float, float] = (0.1, 0.6)
    lilac: float = 0.6
    p: float = 0.5

    def __call__(self, image, mask, rng):
        if rng.random() >= self.p or image.ndim != 3 or mask is None:
            return image, mask
        h, w = mask.shape
        od = np.zeros((h, w, 3))
        rows, cols = np.mgrid[:h, :w]
        for _ in range(int(rng.integers(1, self.count + 1))):
            radius = rng.uniform(*self.diameter) / 2
            squash, angle = rng.uniform(0.85, 1.0), rng.uniform(0, np.pi)
            dy, dx = rows - rng.uniform(0, h), cols - rng.uniform(0, w)
            u = (dx * np.cos(angle) + dy * np.sin(angle)) / radius
            v = (dy * np.cos(angle) - dx * np.sin(angle)) / (radius * squash)
            r = np.hypot(u, v)
            edge = np.clip((1 - r) * radius / 1.5 + 0.5, 0, 1)  # a 1.5 px soft rim
            pallor = 1 - rng.uniform(0.3, 0.8) * np.exp(-(r / 0.5) ** 2)
            # Eosin with some haematoxylin and grey: pink, lilac or grey, as red cells look under other stains.
            colour = rgb_from_hed[1] + rng.uniform(0, self.lilac) * rgb_from_hed[0] + rng.uniform(0, 0.6)
            od += (rng.uniform(*self.density) * edge * pallor)[..., None] * (colour / np.linalg.norm(colour))
        od[mask > 0] = 0
        out = (image.astype(np.float64) + 1.0) * np.exp(-od) - 1.0
        return _to_uint8(out), mask


@dataclass(frozen=True)
class RandomConv:
    """A random shallow network over the colours (GIN, Ouyang et al. 2022, 'Causality-inspired single-source domain
    generalization for medical image segmentation'): `layers` 1x1 or 3x3 convolutions with random Gaussian weights,
    `width` channels between them and leaky ReLUs, its output given each channel's mean and spread of the input and
    mixed with the input by a random share. Colours and contrasts change in ways no stain model proposes, while
    shapes stay, so the model must lean on shape: a red cell is a disc with a pale centre whatever its colour."""

    layers: int = 4
    width: int = 2
    p: float = 0.5

    def __call__(self, image, mask, rng):
        if rng.random() >= self.p or image.ndim != 3:
            return image, mask
        x = image.astype(np.float32) / 255.0
        h, w = x.shape[:2]
        y = x
        for i in range(self.layers):
            k = int(rng.choice((1, 3)))
            out = 3 if i == self.layers - 1 else self.width
            windows = np.pad(y, ((k // 2,) * 2, (k // 2,) * 2, (0, 0)), mode="reflect")
            taps = np.concatenate([windows[r:r + h, c:c + w] for r in range(k) for c in range(k)], axis=-1)
            y = taps @ rng.normal(0, 1 / np.sqrt(taps.shape[-1]), (taps.shape[-1], out)).astype(np.float32)
            y += rng.normal(0, 0.1, out).astype(np.float32)
            if i < self.layers - 1:
                y = np.where(y > 0, y, 0.2 * y)
        mean, std = x.mean((0, 1)), x.std((0, 1))
        y = (y - y.mean((0, 1))) / (y.std((0, 1)) + 1e-6) * std + mean
        share = rng.uniform()
        return _to_uint8(np.clip(share * y + (1 - share) * x, 0.0, 1.0) * 255.0), mask


def blood_smear_augment(*, scale: tuple[float, float] = (0.9, 1.1), stain_sigma: float = 0.25,
                        stain_bias: float = 0.08, tint: float = 0.3, hue: float = 0.05,
                        red_cells: float = 0.0, lamp: float = 0.0, random_conv: float = 0.0) -> Compose:
    """Default for stained blood smears: cells have no preferred orientation, so all flips and quarter turns are
    free; plus warps (`scale` is the zoom range) and the colour / stain drift seen between labs, scanners and
    staining batches (`stain_sigma`, `stain_bias`, `tint`: StainJitter's; `hue`: ColorJitter's, in turns). The
    strong stain defaults score best over both directions between SigTuple and Zheng (3 seeds; benchmarks/
    RESULTS.md, 'what makes white-cell segmentation generalise'): they carry a SigTuple model over to Zheng's
    yellow smears, at some cost from Zheng to SigTuple; a wider zoom did not help. `red_cells`: the share of
    crops moved by a BackgroundShift, and the share (drawn apart) that get up to 12 RedCells; `lamp`: the share
    lit by a Lamp of random warmth; `random_conv`, the share recoloured by a RandomConv."""
    return Compose([
        HFlip(), VFlip(), Rot90(),
        Affine(degrees=30.0, scale=scale, translate=0.05, p=0.5),
        *([BackgroundShift(p=red_cells), RedCells(count=12, p=red_cells)] if red_cells else []),
        ColorJitter(brightness=0.15, contrast=0.15, saturation=0.1, hue=hue, p=0.8),
        *([Lamp(p=lamp)] if lamp else []),
        StainJitter(sigma=stain_sigma, bias=stain_bias, tint=tint, p=0.5),
        *([RandomConv(p=random_conv)] if random_conv else []),
    ])
