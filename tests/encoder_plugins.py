"""User encoders for the entrypoint tests, written the way a team would wrap a model raybackfill cannot build:
a factory returning a callable. Imported by Ray workers through PYTHONPATH (conftest) or a job's working_dir."""

from __future__ import annotations

import hashlib

import numpy as np


class PixelProjection:
    """Images: a fixed random projection of the pooled pixels (numpy only, like a call to an embedding API)."""

    def __init__(self, dim: int = 12, seed: int = 0, grid: int = 4) -> None:
        self.grid = grid
        self.weights = np.random.default_rng(seed).standard_normal((3 * grid * grid, dim)).astype(np.float32)

    def __call__(self, pixels: np.ndarray) -> np.ndarray:
        n, c, h, w = pixels.shape
        pooled = pixels.reshape(n, c, self.grid, h // self.grid, self.grid, w // self.grid).mean(axis=(3, 5))
        return pooled.reshape(n, -1) @ self.weights


class HashedBagOfWords:
    """Texts: each word hashed into ``dim`` buckets, counts L2-normalised; returns plain lists (any array-like)."""

    def __init__(self, dim: int = 16) -> None:
        self.dim = dim

    def embed(self, texts: list[str]) -> list[list[float]]:
        out = np.zeros((len(texts), self.dim), dtype=np.float32)
        for row, text in enumerate(texts):
            for word in text.lower().split():
                out[row, int(hashlib.md5(word.encode()).hexdigest(), 16) % self.dim] += 1.0
        out /= np.maximum(np.linalg.norm(out, axis=1, keepdims=True), 1e-6)
        return out.tolist()


def make_image_encoder(dim: int = 12, seed: int = 0) -> PixelProjection:
    return PixelProjection(dim=dim, seed=seed)


def make_text_encoder(dim: int = 16) -> HashedBagOfWords:
    return HashedBagOfWords(dim=dim)
