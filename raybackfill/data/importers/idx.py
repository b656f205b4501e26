"""The IDX files of the MNIST family."""

from __future__ import annotations

import gzip
import os
from collections.abc import Iterator

import numpy as np

from raybackfill.data.images import encode_png
from raybackfill.data.importers.common import DatasetImportError, ImportResult, check_limit, progress_bar, write_rows

# IDX type codes -> big-endian numpy dtypes.
IDX_DTYPES = {0x08: ">u1", 0x09: ">i1", 0x0B: ">i2", 0x0C: ">i4", 0x0D: ">f4", 0x0E: ">f8"}


def read_idx(path: str) -> np.ndarray:
    """Parse an IDX file (plain or gzip-compressed, detected by content): magic, dims, big-endian data."""
    try:
        with open(path, "rb") as f:
            raw = f.read()
        if raw[:2] == b"\x1f\x8b":
            raw = gzip.decompress(raw)
    except FileNotFoundError as err:
        raise DatasetImportError(f"{path}: no such file") from err
    except (OSError, EOFError) as err:
        raise DatasetImportError(f"{path}: not a readable gzip file ({err})") from err
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0 or raw[2] not in IDX_DTYPES:
        raise DatasetImportError(f"{path}: not an IDX file (bad magic number {raw[:4].hex() or 'empty'})")
    ndim = raw[3]
    header = 4 + 4 * ndim
    if ndim == 0 or len(raw) < header:
        raise DatasetImportError(f"{path}: IDX header is truncated or has no dimensions")
    dims = tuple(int(d) for d in np.frombuffer(raw, dtype=">u4", count=ndim, offset=4))
    dtype = np.dtype(IDX_DTYPES[raw[2]])
    expected = int(np.prod(dims)) * dtype.itemsize
    if len(raw) - header != expected:
        raise DatasetImportError(f"{path}: IDX dims {dims} need {expected} data bytes, file has {len(raw) - header}")
    return np.frombuffer(raw, dtype=dtype, offset=header).reshape(dims)


def idx_files(src: str, split: str = "train") -> tuple[str, str]:
    """The (images, labels) files: ``src`` is an images file, or a directory holding one per split.

    The labels file is the images file's sibling with ``images-idx3`` replaced by ``labels-idx1``
    (the MNIST, Fashion-MNIST, KMNIST and EMNIST naming).
    """
    if os.path.isdir(src):
        markers = {"train": ("train",), "test": ("t10k", "test")}
        if split not in markers:
            raise ValueError(f"split must be one of {', '.join(markers)}, got {split!r}")
        found = sorted(n for n in os.listdir(src) if "images-idx3" in n and any(m in n for m in markers[split]))
        if len(found) != 1:
            raise DatasetImportError(
                f"{src}: expected one {split} images file (*images-idx3-ubyte[.gz]), found {found or 'none'}"
            )
        images = os.path.join(src, found[0])
    elif os.path.isfile(src):
        images = src
    else:
        raise DatasetImportError(f"{src}: no such file or directory")
    name = os.path.basename(images)
    if "images-idx3" not in name:
        raise DatasetImportError(f"{images}: cannot locate its labels file (name has no 'images-idx3')")
    labels = os.path.join(os.path.dirname(images), name.replace("images-idx3", "labels-idx1"))
    if not os.path.isfile(labels):
        raise DatasetImportError(f"{images}: labels file {labels} not found")
    return images, labels


def import_idx(
    src: str,
    out_uri: str,
    *,
    split: str = "train",
    limit: int | None = None,
    rows_per_shard: int = 10_000,
    progress: bool = False,
) -> ImportResult:
    """Import an MNIST-family IDX pair (uint8 images (N, H, W) + labels (N,)); grey is stored as RGB."""
    images_path, labels_path = idx_files(src, split)
    images, labels = read_idx(images_path), read_idx(labels_path)
    if images.ndim != 3 or images.dtype != np.uint8:
        raise DatasetImportError(f"{images_path}: expected uint8 images (N, H, W), found {images.dtype} {images.shape}")
    if labels.ndim != 1 or len(labels) != len(images):
        raise DatasetImportError(f"{labels_path}: expected {len(images)} labels (N,), found shape {labels.shape}")
    count = check_limit(limit, len(images))

    def rows() -> Iterator[tuple[int, bytes, int, dict]]:
        for i in range(count):
            yield i, encode_png(np.repeat(images[i][:, :, None], 3, axis=2)), int(labels[i]), {}

    return write_rows(progress_bar(rows(), "import idx", progress, total=count), out_uri, rows_per_shard, None)
