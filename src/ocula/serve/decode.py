"""Uploaded bytes -> an RGB image array, safely: the type is read from the bytes (never from a file name or a
client's content type), the pixel count is checked from the header before anything is decoded, and every failure
is a `BadImage` carrying an HTTP status and one sentence."""

from __future__ import annotations

import io
import warnings

import numpy as np
from PIL import Image, ImageOps

from ocula.data.images import to_mode

# Leading bytes of the image types the server accepts (RIFF....WEBP is checked on bytes 0-3 and 8-11).
SIGNATURES = {b"\xff\xd8\xff": "JPEG", b"\x89PNG\r\n\x1a\n": "PNG", b"GIF87a": "GIF", b"GIF89a": "GIF",
              b"BM": "BMP", b"II*\x00": "TIFF", b"MM\x00*": "TIFF"}
ALLOWED = ("JPEG", "PNG", "WEBP", "GIF", "BMP", "TIFF")


class BadImage(Exception):
    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status = status


def sniff(data: bytes) -> str | None:
    if data[:4] == b"RIFF" and data[8:12] == b"WEBP":
        return "WEBP"
    return next((kind for magic, kind in SIGNATURES.items() if data.startswith(magic)), None)


def decode_image(data: bytes, *, max_pixels: int) -> np.ndarray:
    """uint8 HxWx3, EXIF-oriented, for bytes of an allowed type with at most `max_pixels` pixels."""
    if not data:
        raise BadImage(400, "the image is empty")
    kind = sniff(data)
    if kind is None:
        raise BadImage(415, f"not an image of an accepted type ({', '.join(ALLOWED)}), judged from its bytes")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(io.BytesIO(data), formats=[kind]) as img:
                if img.width * img.height > max_pixels:  # from the header: nothing is decoded yet
                    raise BadImage(413, f"the image is {img.width}x{img.height}, over the {max_pixels:,}-pixel "
                                        "limit")
                img.load()
                return np.asarray(to_mode(ImageOps.exif_transpose(img), "RGB"))
    except BadImage:
        raise
    except (Image.DecompressionBombError, Image.DecompressionBombWarning):
        raise BadImage(413, "the image is too large to decode (decompression-bomb guard)") from None
    except Image.UnidentifiedImageError:  # its message names a BytesIO object, which says nothing to a client
        raise BadImage(400, f"the bytes start like a {kind} image but cannot be decoded as one") from None
    except (OSError, SyntaxError, ValueError) as e:
        first = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise BadImage(400, f"corrupt or truncated {kind} image: {first}") from None
