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


def write_mixed_image_folder(root: str | Path) -> dict:
    """Write a small ImageFolder tree shaped like the photos users bring: many sizes and aspect ratios, every
    common mode (RGB, grey, RGBA, palette, CMYK, 16-bit grey), JPEG with an EXIF rotation, PNG, GIF, BMP, and
    one corrupt file (random bytes named ``.jpg``).

    Returns:
        ``root`` (Path), ``classes`` (sorted class directory names), ``files`` (every image file's relative
        path, sorted: the order, and so the ids, the ImageFolder importer gives them), ``good`` (the files
        that decode), ``corrupt`` (the corrupt file's relative path), ``corrupt_id`` (its id after an import),
        ``modes`` (relative path -> PIL mode as saved) and ``sizes`` (relative path -> upright (width,
        height), EXIF orientation applied).
    """
    from raybackfill.data.preprocessing import decode_image

    root = Path(root)
    rng = np.random.default_rng(7)

    def rgb(width: int, height: int) -> Image.Image:
        # Smooth gradients plus noise: compresses like a photo, and every pixel differs from its neighbours.
        y, x = np.mgrid[0:height, 0:width]
        base = np.stack([x * 255 // max(width - 1, 1), y * 255 // max(height - 1, 1), (x + y) % 256], axis=-1)
        noise = rng.integers(0, 40, (height, width, 3))
        return Image.fromarray(np.clip(base + noise, 0, 255).astype(np.uint8))

    exif = Image.Exif()
    exif[0x0112] = 6  # orientation: the camera was turned; viewers rotate 90 degrees clockwise
    grey16 = (np.arange(28 * 20, dtype=np.uint16).reshape(20, 28) * 117).astype(np.uint16)
    # (relative path, image, save options, upright size)
    images: list[tuple[str, Image.Image, dict, tuple[int, int]]] = [
        ("animals/landscape.jpg", rgb(96, 40), {"quality": 90}, (96, 40)),
        ("animals/grey_portrait.png", rgb(30, 52).convert("L"), {}, (30, 52)),
        ("animals/transparent.png", rgb(33, 21).convert("RGBA"), {}, (33, 21)),
        ("animals/palette.gif", rgb(24, 24).convert("P"), {}, (24, 24)),
        ("animals/cmyk.jpg", rgb(40, 26).convert("CMYK"), {"quality": 90}, (40, 26)),
        ("plants/camera_rotated.jpg", rgb(48, 32), {"exif": exif}, (32, 48)),
        ("plants/depth16.png", Image.fromarray(grey16), {}, (28, 20)),
        ("plants/tiny.bmp", rgb(5, 9), {}, (5, 9)),
        ("plants/large_square.png", rgb(128, 128), {}, (128, 128)),
    ]
    modes = {}
    sizes = {}
    for rel, image, options, upright in images:
        path = root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        image.save(path, **options)
        modes[rel] = image.mode
        sizes[rel] = upright
    corrupt = "plants/corrupt.jpg"
    data = rng.integers(0, 256, 2048, dtype=np.uint8).tobytes()
    (root / corrupt).write_bytes(data)
    try:
        decode_image(data)
    except ValueError:
        pass
    else:  # random bytes that happen to decode would make every test built on this folder meaningless
        raise AssertionError(f"{corrupt}: the random bytes decode as an image; change the seed")
    files = sorted([rel for rel, *_ in images] + [corrupt], key=lambda rel: (rel.split("/")[0], rel))
    return {
        "root": root,
        "classes": sorted({rel.split("/")[0] for rel in files}),
        "files": files,
        "good": [rel for rel in files if rel != corrupt],
        "corrupt": corrupt,
        "corrupt_id": files.index(corrupt),
        "modes": modes,
        "sizes": sizes,
    }
