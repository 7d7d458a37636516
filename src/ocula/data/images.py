"""Safe image decoding: every failure becomes one OculaError naming the file.

Guards: missing / empty / truncated / non-image files, decompression bombs, odd modes (16-bit, RGBA, CMYK, palette),
EXIF orientation.
"""

from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps

from ocula.errors import OculaError
from ocula.fileio import atomic_path

# 8k x 8k: large enough for whole-slide crops, small enough that a bomb cannot exhaust memory.
MAX_PIXELS = 64_000_000
IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".gif", ".webp"}


def open_image(path: str | Path) -> Image.Image:
    """Open, fully decode and EXIF-orient an image; raise OculaError on anything wrong."""
    path = Path(path)
    if not path.exists():
        raise OculaError("file not found", path)
    if path.is_dir():
        raise OculaError("is a directory, expected an image file", path)
    if path.stat().st_size == 0:
        raise OculaError("empty file", path)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(path) as img:
                if img.width * img.height > MAX_PIXELS:
                    raise OculaError(
                        f"image is {img.width}x{img.height}, over the {MAX_PIXELS:,}-pixel limit "
                        "(decompression-bomb guard)", path)
                img.load()  # decode now so truncation is caught here, not later
                return ImageOps.exif_transpose(img)
    except OculaError:
        raise
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as e:
        raise OculaError(f"image too large (decompression-bomb guard): {e}", path) from None
    except Image.UnidentifiedImageError:
        raise OculaError("not an image file (format not recognised)", path) from None
    except (OSError, SyntaxError, ValueError) as e:
        raise OculaError(f"corrupt or truncated image: {e}", path) from None


def to_mode(img: Image.Image, mode: str) -> Image.Image:
    """Convert any PIL mode to 'RGB' or 'L', scaling 16/32-bit data and compositing alpha on white."""
    if img.mode in ("I;16", "I;16B", "I;16L", "I", "F"):
        a = np.asarray(img, dtype=np.float64)
        lo, hi = float(a.min()), float(a.max())
        a = (a - lo) / (hi - lo) * 255.0 if hi > lo else np.zeros_like(a)
        img = Image.fromarray(a.round().astype(np.uint8), "L")
    if img.mode in ("RGBA", "LA", "PA") or (img.mode == "P" and "transparency" in img.info):
        rgba = img.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        img = Image.alpha_composite(background, rgba)
    return img.convert(mode)


def read_image(path: str | Path, mode: str = "RGB") -> np.ndarray:
    """Read an image as uint8 HxWx3 (mode 'RGB') or HxW (mode 'L')."""
    return np.asarray(to_mode(open_image(path), mode))


def read_raw(path: str | Path) -> np.ndarray:
    """Read an image keeping its values (label masks: indexed / palette PNG stay indices), as uint8/uint16 array."""
    img = open_image(path)
    if img.mode in ("RGBA", "LA"):
        img = img.convert(img.mode[:-1])
    return np.asarray(img)


def as_rgb(image: np.ndarray) -> np.ndarray:
    """An HxW, HxWx1, HxWx3 or HxWx4 array as HxWx3: grey repeated over three channels, alpha dropped."""
    a = image if image.ndim == 3 else image[..., None]
    return np.repeat(a, 3, 2) if a.shape[2] == 1 else a[..., :3]


def list_images(folder: str | Path) -> list[Path]:
    folder = Path(folder)
    if not folder.is_dir():
        raise OculaError("directory not found", folder)
    return sorted(p for p in folder.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file())


def save_png(array_or_image, path: str | Path) -> Path:
    """Write a PNG atomically (temp file, then rename) so no half-written file is ever left."""
    img = array_or_image if isinstance(array_or_image, Image.Image) else Image.fromarray(np.asarray(array_or_image))
    with atomic_path(path) as tmp:
        img.save(tmp, format="PNG")
    return Path(path)
