"""Import public image datasets into the raybackfill image-table schema (id, image PNG/JPEG, label).

Three layouts: an ImageFolder tree (one subdirectory per class), the CIFAR-10/100 python pickles and
the IDX files of the MNIST family. Rows are streamed into shards, so a large folder never has to fit
in memory. Ids are 0..N-1 in a deterministic order (sorted paths, file order), so a re-import gives
the same ids. Any file that cannot be read stops the import with an error that names the file.

CIFAR pickles are read with an unpickler that only resolves the few numpy globals an array needs;
a pickle that asks for anything else (``os.system``...) is refused before it can run.
"""

from __future__ import annotations

import gzip
import io
import os
import pickle
from collections.abc import Iterable, Iterator
from pathlib import Path

import numpy as np
from PIL import Image, UnidentifiedImageError
from tqdm import tqdm

from raybackfill.data.images import encode_png
from raybackfill.data.info import with_class_names
from raybackfill.data.io import WriteResult, write_table
from raybackfill.data.schema import image_table

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".ppm", ".pgm", ".tif", ".tiff", ".webp")
PASSTHROUGH_FORMATS = ("PNG", "JPEG")  # stored as they are; other formats are re-encoded as PNG


class DatasetImportError(ValueError):
    """A source file is missing, malformed or not what its layout promises."""


# ---------------------------------------------------------------------------------------------- folder


def import_image_folder(
    root: str,
    out_uri: str,
    *,
    size: int | None = None,
    limit: int | None = None,
    rows_per_shard: int = 10_000,
    progress: bool = False,
) -> WriteResult:
    """Import ``root/<class>/<image>`` (torchvision ImageFolder layout).

    Labels are the indexes of the sorted class directory names, which are kept in the table's schema
    metadata; the extra column ``path`` holds each file's path relative to ``root``. PNG and JPEG
    bytes are stored unchanged; other formats, and every image when ``size`` is given (resized so
    the shorter side is ``size``, then centre-cropped to a square), are stored as PNG.
    """
    classes, files = image_folder_files(root)
    files = files[: _check_limit(limit, len(files))]

    def rows() -> Iterator[tuple[int, bytes, int, dict]]:
        for i, (rel, label) in enumerate(_progress(files, "import imagefolder", progress)):
            yield i, _folder_image(Path(root) / rel, size), label, {"path": rel}

    return _write_rows(rows(), out_uri, rows_per_shard, classes)


def image_folder_files(root: str) -> tuple[list[str], list[tuple[str, int]]]:
    """Class names (sorted) and (relative path, label) for every image file, in id order."""
    base = Path(root)
    if not base.is_dir():
        raise DatasetImportError(f"{root}: not a directory (expected one subdirectory per class)")
    classes = sorted(d.name for d in base.iterdir() if d.is_dir() and not d.name.startswith("."))
    if not classes:
        raise DatasetImportError(f"{root}: no class subdirectories found")
    files: list[tuple[str, int]] = []
    empty: list[str] = []
    for label, name in enumerate(classes):
        found = sorted(
            p.relative_to(base).as_posix()
            for p in (base / name).rglob("*")
            if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS and not _hidden(p.relative_to(base))
        )
        if not found:
            empty.append(name)
        files.extend((rel, label) for rel in found)
    if empty:
        raise DatasetImportError(
            f"{root}: class directories without image files ({', '.join(IMAGE_EXTENSIONS)}): {', '.join(empty)}"
        )
    return classes, files


def _hidden(rel: Path) -> bool:
    return any(part.startswith(".") for part in rel.parts)


def _folder_image(path: Path, size: int | None) -> bytes:
    data = path.read_bytes()
    try:
        with Image.open(io.BytesIO(data)) as img:
            img.load()
            if size is None and img.format in PASSTHROUGH_FORMATS:
                return data
            rgb = img.convert("RGB")
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as err:
        raise DatasetImportError(f"{path}: not a readable image ({type(err).__name__}: {err})") from err
    if size is not None:
        rgb = _square(rgb, size)
    return encode_png(np.asarray(rgb))


def _square(img: Image.Image, size: int) -> Image.Image:
    """Resize so the shorter side is ``size``, then crop the centre square."""
    scale = size / min(img.size)
    w, h = max(size, round(img.width * scale)), max(size, round(img.height * scale))
    img = img.resize((w, h), Image.Resampling.BICUBIC)
    left, top = (w - size) // 2, (h - size) // 2
    return img.crop((left, top, left + size, top + size))


# ----------------------------------------------------------------------------------------------- CIFAR

# What a numpy array needs to be rebuilt from a pickle (protocols 2-5, numpy 1.x and 2.x module names),
# plus the codec call protocol 2 uses for bytes. Nothing else is ever resolved.
_PICKLE_GLOBALS = frozenset(
    [(mod, "_reconstruct") for mod in ("numpy.core.multiarray", "numpy._core.multiarray")]
    + [(mod, "_frombuffer") for mod in ("numpy.core.numeric", "numpy._core.numeric")]
    + [("numpy", "ndarray"), ("numpy", "dtype"), ("_codecs", "encode")]
)


class _ArrayOnlyUnpickler(pickle.Unpickler):
    def __init__(self, file, source: str):
        super().__init__(file, encoding="bytes")
        self.source = source

    def find_class(self, module: str, name: str):
        if (module, name) not in _PICKLE_GLOBALS:
            raise DatasetImportError(
                f"{self.source}: refusing to load '{module}.{name}': only plain containers and numpy arrays "
                "are allowed in a CIFAR pickle"
            )
        return super().find_class(module, name)


def load_cifar_pickle(path: str) -> dict:
    """One CIFAR python pickle as a dict with str keys, through the array-only unpickler."""
    try:
        with open(path, "rb") as f:
            obj = _ArrayOnlyUnpickler(f, path).load()
    except FileNotFoundError as err:
        raise DatasetImportError(f"{path}: no such file") from err
    except DatasetImportError:
        raise
    except (pickle.UnpicklingError, EOFError, ValueError, TypeError, AttributeError, IndexError) as err:
        raise DatasetImportError(f"{path}: truncated or malformed pickle ({type(err).__name__}: {err})") from err
    if not isinstance(obj, dict):
        raise DatasetImportError(f"{path}: expected a pickled dict, found {type(obj).__name__}")
    return {k.decode("latin1") if isinstance(k, bytes) else k: v for k, v in obj.items()}


CIFAR_SPLITS = {
    "train": (tuple(f"data_batch_{i}" for i in range(1, 6)), ("train",)),
    "test": (("test_batch",), ("test",)),
}


def cifar_files(src: str, split: str = "train") -> tuple[list[str], str | None]:
    """The batch files of a split (CIFAR-10 ``data_batch_*``/``test_batch`` or CIFAR-100 ``train``/``test``)
    in a directory, or ``src`` itself if it is a file; plus the meta file with the class names if present."""
    if split not in CIFAR_SPLITS:
        raise ValueError(f"split must be one of {', '.join(CIFAR_SPLITS)}, got {split!r}")
    if os.path.isfile(src):
        meta = [os.path.join(os.path.dirname(src), m) for m in ("batches.meta", "meta")]
        return [src], next((m for m in meta if os.path.isfile(m)), None)
    if not os.path.isdir(src):
        raise DatasetImportError(f"{src}: no such file or directory")
    cifar10, cifar100 = CIFAR_SPLITS[split]
    for names, meta in ((cifar10, "batches.meta"), (cifar100, "meta")):
        found = [os.path.join(src, n) for n in names if os.path.isfile(os.path.join(src, n))]
        if found:
            meta_path = os.path.join(src, meta)
            return found, meta_path if os.path.isfile(meta_path) else None
    expected = ", ".join(cifar10 + cifar100)
    raise DatasetImportError(f"{src}: no CIFAR {split} batches found (expected one of: {expected})")


def import_cifar(
    src: str,
    out_uri: str,
    *,
    split: str = "train",
    limit: int | None = None,
    rows_per_shard: int = 10_000,
    progress: bool = False,
) -> WriteResult:
    """Import CIFAR-10 or CIFAR-100 (python version) from the extracted directory or one batch file.

    CIFAR-100 uses its fine labels. Class names come from ``batches.meta``/``meta`` when present.
    """
    files, meta = cifar_files(src, split)
    names = _cifar_class_names(meta) if meta else None
    count = _check_limit(limit, np.iinfo(np.int64).max)

    def rows() -> Iterator[tuple[int, bytes, int, dict]]:
        next_id = 0
        for path in files:
            pixels, labels = _cifar_batch(path)
            for img, label in zip(pixels, labels, strict=True):
                if next_id >= count:
                    return
                yield next_id, encode_png(img), int(label), {}
                next_id += 1

    return _write_rows(_progress(rows(), "import cifar", progress), out_uri, rows_per_shard, names)


def _cifar_batch(path: str) -> tuple[np.ndarray, np.ndarray]:
    batch = load_cifar_pickle(path)
    key = next((k for k in ("labels", "fine_labels") if k in batch), None)
    if "data" not in batch or key is None:
        raise DatasetImportError(f"{path}: not a CIFAR batch (keys: {', '.join(sorted(map(str, batch)))})")
    data = np.asarray(batch["data"])
    labels = np.asarray(batch[key])
    if data.dtype != np.uint8 or data.ndim != 2 or data.shape[1] != 3 * 32 * 32:
        raise DatasetImportError(f"{path}: 'data' must be uint8 of shape (N, 3072), found {data.dtype} {data.shape}")
    if labels.shape != (len(data),):
        raise DatasetImportError(f"{path}: {len(labels)} labels for {len(data)} images")
    # Rows are 1024 red, then 1024 green, then 1024 blue values, each 32x32 row-major.
    return data.reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1), labels


def _cifar_class_names(meta: str) -> list[str] | None:
    info = load_cifar_pickle(meta)
    names = info.get("label_names", info.get("fine_label_names"))
    if names is None:
        return None
    return [n.decode() if isinstance(n, bytes) else str(n) for n in names]


# ------------------------------------------------------------------------------------------------- IDX

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
) -> WriteResult:
    """Import an MNIST-family IDX pair (uint8 images (N, H, W) + labels (N,)); grey is stored as RGB."""
    images_path, labels_path = idx_files(src, split)
    images, labels = read_idx(images_path), read_idx(labels_path)
    if images.ndim != 3 or images.dtype != np.uint8:
        raise DatasetImportError(f"{images_path}: expected uint8 images (N, H, W), found {images.dtype} {images.shape}")
    if labels.ndim != 1 or len(labels) != len(images):
        raise DatasetImportError(f"{labels_path}: expected {len(images)} labels (N,), found shape {labels.shape}")
    count = _check_limit(limit, len(images))

    def rows() -> Iterator[tuple[int, bytes, int, dict]]:
        for i in range(count):
            yield i, encode_png(np.repeat(images[i][:, :, None], 3, axis=2)), int(labels[i]), {}

    return _write_rows(_progress(rows(), "import idx", progress, total=count), out_uri, rows_per_shard, None)


# -------------------------------------------------------------------------------------------- writing


def _write_rows(
    rows: Iterable[tuple[int, bytes, int, dict]], out_uri: str, rows_per_shard: int, names: list[str] | None
) -> WriteResult:
    """Write (id, image, label, extra columns) rows as shards of ``rows_per_shard``, streaming."""
    if rows_per_shard <= 0:
        raise ValueError(f"rows_per_shard must be positive, got {rows_per_shard}")
    shards: list[str] = []
    total = 0
    batch: list[tuple[int, bytes, int, dict]] = []
    for row in rows:
        batch.append(row)
        if len(batch) == rows_per_shard:
            shards += _write_batch(batch, out_uri, names, append=bool(shards))
            total += len(batch)
            batch = []
    if batch or not shards:
        shards += _write_batch(batch, out_uri, names, append=bool(shards))
        total += len(batch)
    return WriteResult(out_uri, shards, total)


def _write_batch(batch: list, out_uri: str, names: list[str] | None, append: bool) -> list[str]:
    ids = [r[0] for r in batch]
    extra = {key: [r[3][key] for r in batch] for key in (batch[0][3] if batch else {})}
    table = image_table(ids, [r[1] for r in batch], [r[2] for r in batch], extra=extra)
    if names is not None:
        table = with_class_names(table, names)
    # Each batch is exactly one shard; append=False on the first refuses a non-empty target.
    return write_table(table, out_uri, rows_per_shard=max(len(batch), 1), append=append).shards


def _check_limit(limit: int | None, available: int) -> int:
    """How many rows to import: all of them, or the first ``limit``."""
    if limit is None:
        return available
    if limit < 0:
        raise ValueError(f"limit must be non-negative, got {limit}")
    return min(limit, available)


def _progress(items, desc: str, enabled: bool, total: int | None = None):
    """A progress bar on stderr that appears only if the work lasts more than a second."""
    return tqdm(items, desc=desc, unit="img", total=total, delay=1.0, disable=not enabled)
