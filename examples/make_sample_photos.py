"""Make the sample 'photos' shipped in src/ocula/samples: real MNIST test digits (handwriting) rendered as phone
photos of ink on paper: off-white paper, a lighting gradient and shadow, camera noise, blur, JPEG, a slight tilt,
and for some an EXIF orientation tag (the pixels stored sideways, as phones do).

    python examples/make_sample_photos.py [--data-dir ../shared/datasets]
"""

import argparse
import io
from pathlib import Path

import numpy as np
from PIL import Image

from ocula.data import registry

OUT = Path(__file__).resolve().parents[1] / "src" / "ocula" / "samples"


def render(digit: np.ndarray, rng: np.random.Generator, size=(480, 640)) -> Image.Image:
    h, w = size
    side = int(rng.integers(200, 300))
    ink = Image.fromarray(digit).resize((side, side), Image.Resampling.BICUBIC)
    ink = ink.rotate(float(rng.uniform(-12, 12)), resample=Image.Resampling.BILINEAR)
    ink = np.asarray(ink, np.float32) / 255.0
    canvas = np.zeros(size, np.float32)
    top, left = int(rng.integers(20, h - side - 20)), int(rng.integers(40, w - side - 40))
    canvas[top:top + side, left:left + side] = ink
    yy, xx = np.mgrid[0:h, 0:w] / max(h, w)
    angle = rng.uniform(0, 2 * np.pi)
    light = 0.75 + 0.25 * (np.cos(angle) * xx + np.sin(angle) * yy)  # lighting gradient across the page
    light *= 1 - 0.35 * np.exp(-((xx - rng.uniform(0, 1)) ** 2) / 0.02)  # a soft shadow band
    paper = np.array([235, 230, 215], np.float32) * light[..., None]
    pen = np.array([30, 40, 110], np.float32)  # blue ballpoint
    rgb = paper * (1 - canvas[..., None]) + pen * canvas[..., None]
    rgb += rng.normal(0, 6, rgb.shape)
    img = Image.fromarray(np.clip(rgb, 0, 255).astype(np.uint8))
    return img


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--data-dir")
    args = ap.parse_args()
    test = registry.load("mnist", "test", args.data_dir)
    rng = np.random.default_rng(2026)
    OUT.mkdir(parents=True, exist_ok=True)
    for label in range(10):
        index = int(np.flatnonzero(test.labels == label)[0])
        img = render(test.images[index], rng)
        exif = Image.Exif()
        if label % 3 == 0:  # stored sideways; EXIF orientation 6 says "rotate 90 degrees clockwise to view"
            img = img.transpose(Image.Transpose.ROTATE_90)
            exif[0x0112] = 6
        buf = io.BytesIO()
        img.save(buf, format="JPEG", quality=85, exif=exif)
        (OUT / f"digit-{label}.jpg").write_bytes(buf.getvalue())
        print(f"digit-{label}.jpg  <- MNIST test index {index}")


if __name__ == "__main__":
    main()
