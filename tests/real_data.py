"""Real images for tests: scikit-learn's wheel ships the UCI 8x8 handwritten digits (1,797 images, 10 classes).

``export_digits`` writes them as a torchvision ImageFolder tree (one sub-folder per class, greyscale PNGs), the
way a user's photo folder arrives; importing that tree numbers the rows class after class, so the table is sorted
by label, which is what real exports look like.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image


def export_digits(root: str | Path, *, per_class: int | None = None) -> Path:
    """Write ``root/<digit>/<n>.png`` for every digit image (or the first ``per_class`` of each class)."""
    from sklearn.datasets import load_digits

    digits = load_digits()
    root = Path(root)
    counts: dict[int, int] = {}
    for image, label in zip(digits.images, digits.target, strict=True):
        label = int(label)
        if per_class is not None and counts.get(label, 0) >= per_class:
            continue
        counts[label] = counts.get(label, 0) + 1
        folder = root / f"digit{label}"
        folder.mkdir(parents=True, exist_ok=True)
        pixels = np.clip(image * (255.0 / 16.0), 0, 255).astype(np.uint8)  # values are 0..16
        Image.fromarray(pixels, mode="L").save(folder / f"{counts[label]:04d}.png")
    return root
