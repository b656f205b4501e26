"""Image bytes <-> pixel arrays (tests, synthetic data and importers). Model inputs are prepared by an
encoder's declared preprocessing (raybackfill.data.preprocessing), not here."""

from __future__ import annotations

import io

import numpy as np
from PIL import Image

from raybackfill.data.preprocessing import decode_image


def encode_png(pixels: np.ndarray) -> bytes:
    """(H, W, 3) uint8 -> PNG bytes."""
    buf = io.BytesIO()
    Image.fromarray(np.asarray(pixels, dtype=np.uint8), mode="RGB").save(buf, format="PNG", optimize=False)
    return buf.getvalue()


def decode_rgb(data: bytes) -> np.ndarray:
    """Encoded bytes -> upright (H, W, 3) uint8; raises ValueError with the reason."""
    return np.asarray(decode_image(data))
