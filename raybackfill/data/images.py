"""Image bytes <-> normalised float tensors, with per-item failure reasons instead of exceptions."""

from __future__ import annotations

import io
from dataclasses import dataclass

import numpy as np
from PIL import Image, UnidentifiedImageError

# Per-channel statistics used for every model: fixed so that embeddings computed by different jobs agree.
MEAN = np.array([0.5, 0.5, 0.5], dtype=np.float32)
STD = np.array([0.25, 0.25, 0.25], dtype=np.float32)


def encode_png(pixels: np.ndarray) -> bytes:
    """(H, W, 3) uint8 -> PNG bytes."""
    buf = io.BytesIO()
    Image.fromarray(np.asarray(pixels, dtype=np.uint8), mode="RGB").save(buf, format="PNG", optimize=False)
    return buf.getvalue()


def decode_rgb(data: bytes) -> np.ndarray:
    """Encoded bytes -> (H, W, 3) uint8; raises ValueError with the reason."""
    if data is None or len(data) == 0:
        raise ValueError("empty image bytes")
    try:
        with Image.open(io.BytesIO(data)) as img:
            img.load()
            return np.asarray(img.convert("RGB"))
    except (UnidentifiedImageError, OSError, SyntaxError) as err:
        raise ValueError(f"corrupt image bytes ({type(err).__name__}: {err})") from err


@dataclass(frozen=True)
class DecodedBatch:
    pixels: np.ndarray  # (n_ok, 3, size, size) float32, normalised
    ok: np.ndarray  # (n,) bool: which input rows decoded
    reasons: list[str]  # one per failed row, in input order


def decode_batch(images: list[bytes] | np.ndarray, size: int) -> DecodedBatch:
    """Decode a batch to normalised CHW float32; rows that fail or have the wrong size are reported."""
    out = np.empty((len(images), size, size, 3), dtype=np.uint8)
    ok = np.zeros(len(images), dtype=bool)
    reasons: list[str] = []
    for i, data in enumerate(images):
        try:
            rgb = decode_rgb(data)
        except ValueError as err:
            reasons.append(str(err))
            continue
        if rgb.shape[:2] != (size, size):
            reasons.append(f"image is {rgb.shape[1]}x{rgb.shape[0]}, expected {size}x{size}")
            continue
        out[i] = rgb
        ok[i] = True
    return DecodedBatch(normalise(out[ok]), ok, reasons)


def normalise(rgb: np.ndarray) -> np.ndarray:
    """(N, H, W, 3) uint8 -> (N, 3, H, W) float32 with the fixed MEAN/STD."""
    x = rgb.astype(np.float32) / 255.0
    x = (x - MEAN) / STD
    return np.ascontiguousarray(x.transpose(0, 3, 1, 2))
