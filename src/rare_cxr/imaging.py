"""The one way this project turns an image file into grey pixels.

Why a shared module: the image index (which checks that files decode), the image cache (which
decodes every image once) and any notebook must agree on what "the grey image" of a file is.
Real NIH files are mostly 8-bit `L`, but a few are `RGBA` with R=G=B and alpha 255, and images
from other sources arrive as 16-bit, palette or grey+alpha PNGs. Converting them in one place
means a model never sees a different picture of the same file depending on who decoded it.
"""

from __future__ import annotations

import os

import numpy as np
from PIL import Image

# Modes whose pixel values are 16-bit integers (PIL reads 16-bit grey PNGs as "I;16" or "I").
_SIXTEEN_BIT_MODES = frozenset({"I;16", "I;16B", "I;16L", "I;16N", "I"})


def to_grayscale(image: Image.Image) -> np.ndarray:
    """Return a PIL image as a uint8 H×W array of grey levels.

    * `L`: the pixels as they are.
    * `LA`: the grey channel; alpha is ignored (radiographs carry no transparency).
    * `RGB`/`RGBA`: ITU-R 601 luminance (PIL's `convert("L")`, alpha ignored). PIL's integer
      weights sum to exactly 1, so an image with R=G=B (the RGBA files in NIH) gives back that
      channel bit for bit.
    * `P` (palette) and `1`: through the palette/bit values to luminance.
    * 16-bit (`I;16`, `I`): scaled by a fixed 255/65535 with rounding. A fixed scale, not a
      per-image window, keeps the mapping deterministic and comparable across images.
    * `F` (float): clipped to [0, 255] and rounded.
    """
    mode = image.mode
    if mode == "L":
        return np.asarray(image, dtype=np.uint8).copy()
    if mode == "LA":
        return np.asarray(image.getchannel("L"), dtype=np.uint8).copy()
    if mode in _SIXTEEN_BIT_MODES:
        values = np.asarray(image).astype(np.int64)
        values = np.clip(values, 0, 65535)
        return ((values * 255 + 32767) // 65535).astype(np.uint8)
    if mode == "F":
        values = np.asarray(image, dtype=np.float64)
        return np.clip(np.rint(values), 0, 255).astype(np.uint8)
    if mode in {"RGBA", "RGBa", "PA"}:
        image = image.convert("RGB")
    return np.asarray(image.convert("L"), dtype=np.uint8).copy()


def load_grayscale(path: str | os.PathLike) -> np.ndarray:
    """Decode an image file to a uint8 H×W grey array (see `to_grayscale` for the rules)."""
    with Image.open(path) as image:
        image.load()
        return to_grayscale(image)
