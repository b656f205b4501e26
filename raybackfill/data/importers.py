"""Import galleries as they come into the raybackfill table schemas: images (id, image, label) or texts
(id, text, label).

Image layouts: an ImageFolder tree (one subdirectory per class), the CIFAR-10/100 python pickles and the IDX
files of the MNIST family. Texts: JSONL, CSV or Parquet files. Rows are streamed into shards, so a large
source never has to fit in memory, and ids are deterministic (sorted paths, file order, or the source's own id
column), so a re-import gives the same ids.

A row that cannot be used (an image file that does not decode, an empty text) is not an error: it is left out
of the table and recorded in the quarantine table ``OUT/_quarantine`` (id, reason, stage ``import``), and the
import goes on. A source that is malformed as a whole (a JSONL line that is not JSON, duplicate ids, a pickle
that is not CIFAR) stops the import with an error that names the file and the line or row.

CIFAR pickles are read with an unpickler that only resolves the few numpy globals an array needs;
a pickle that asks for anything else (``os.system``...) is refused before it can run.
"""

from __future__ import annotations

import csv
import gzip
import json
import logging
import os
import pickle
import re
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.csv as pacsv
import pyarrow.parquet as pq
from PIL import Image
from tqdm import tqdm

from raybackfill.data.images import encode_png
from raybackfill.data.info import with_class_names
from raybackfill.data.preprocessing import decode_image
from raybackfill.data.schema import ID, IMAGE, LABEL, image_table, text_table
from raybackfill.data.storage import ShardExistsError, WriteResult, join, next_shard_index, write_table
from raybackfill.types import Stage

logger = logging.getLogger(__name__)

IMAGE_EXTENSIONS = (
    ".png", ".jpg", ".jpeg", ".jpe", ".jfif", ".bmp", ".dib", ".gif", ".ppm", ".pgm", ".pbm", ".pnm",
    ".tif", ".tiff", ".webp", ".tga", ".ico",
)  # fmt: skip
TEXT_FORMATS = {".jsonl": "jsonl", ".ndjson": "jsonl", ".csv": "csv", ".parquet": "parquet", ".pq": "parquet"}
QUARANTINE_DIR = "_quarantine"  # OUT/_quarantine: the rows an import left out, with their reasons
FILES_PER_TASK = 64  # image files one Ray Data task reads and checks (a block of the path dataset)


class DatasetImportError(ValueError):
    """A source file is missing, malformed or not what its layout promises."""


@dataclass(frozen=True)
class ImportResult(WriteResult):
    """What an import wrote: ``rows`` rows in ``shards`` under ``uri``, and how many source rows it left out
    (``quarantined``, listed with their reasons in :attr:`quarantine_uri`)."""

    quarantined: int = 0

    @property
    def quarantine_uri(self) -> str:
        return join(self.uri, QUARANTINE_DIR)


# ---------------------------------------------------------------------------------------------- folder


def import_image_folder(
    root: str,
    out_uri: str,
    *,
    size: int | None = None,
    limit: int | None = None,
    rows_per_shard: int = 10_000,
    progress: bool = False,
) -> ImportResult:
    """Import ``root/<class>/<image>`` (torchvision ImageFolder layout), reading and checking the files with
    Ray Data (the caller initialises Ray; ``ray.data`` starts a local cluster if nobody did).

    Files are listed here, in the driver: sorted relative paths, ids 0..N-1 in that order, labels the indexes
    of the sorted class directory names (kept in the table's schema metadata), and the extra column ``path``
    (each file's path relative to ``root``). Ray tasks read each file and check that it decodes; the rows
    come back in id order and are written in shards of ``rows_per_shard``. Images of any format, size and
    mode are stored with their original bytes; with ``size`` every image is instead resized (shorter side
    ``size``, EXIF orientation applied) and centre-cropped to a square PNG. A file that does not decode is
    left out of the table and written to ``out_uri/_quarantine`` (stage ``import``) with a reason naming its
    relative path.

    ``root`` must be readable by every Ray worker (a local cluster, or a directory shared by all nodes).

    Args:
        root: the directory with one subdirectory per class.
        out_uri: the new table's URI (local path or s3://); it must not hold shards yet.
        size: if given, store every image as a ``size`` x ``size`` PNG instead of its original bytes.
        limit: import only the first ``limit`` files (in id order).
        rows_per_shard: rows per Parquet shard.
        progress: show a progress bar on stderr.

    Returns:
        The shards written, the rows in them and how many files were quarantined.

    Raises:
        DatasetImportError: ``root`` is not an ImageFolder tree, or no file in it decodes.
    """
    if size is not None and size < 1:
        raise ValueError(f"size must be a positive integer, got {size}")
    classes, files = image_folder_files(root)
    files = files[: _check_limit(limit, len(files))]
    writer = _ShardWriter(out_uri, rows_per_shard, classes)
    quarantine = _Quarantine(out_uri)
    empty = image_table([], [], [], extra={"path": pa.array([], pa.string())})
    if not files:
        return writer.close(empty, quarantined=0)
    ds = _folder_dataset(os.path.abspath(root), files, size)
    with _progress(None, "import imagefolder", progress, total=len(files)) as bar:
        for batch in ds.iter_batches(batch_format="pyarrow", batch_size=None):
            bad = batch.column("reason").is_valid()  # a reason only where the file did not decode
            if pc.any(bad).as_py():
                refused = batch.filter(bad)
                quarantine.add(refused.column(ID).to_numpy(), refused.column("reason").to_pylist())
                batch = batch.filter(pc.invert(bad))
            writer.add(batch.drop_columns(["reason"]))
            bar.update(len(bad))
    quarantined = quarantine.close()
    if not writer.rows_added:
        raise DatasetImportError(
            f"{root}: none of the {len(files)} image files decodes (reasons in {quarantine.uri}; "
            f"first: {quarantine.first_reason})"
        )
    if quarantined:
        logger.warning(
            "%s: %d of %d image files quarantined (they do not decode), see %s",
            root,
            quarantined,
            len(files),
            quarantine.uri,
        )
    return writer.close(empty, quarantined=quarantined)


def image_folder_files(root: str) -> tuple[list[str], list[tuple[str, int]]]:
    """Class names (sorted) and (relative path, label) for every image file, in id order.

    Args:
        root: the ImageFolder directory.

    Returns:
        The sorted class directory names, and each image file's POSIX path relative to ``root`` with the
        index of its class; sorted by class, then path.
    """
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


def _folder_dataset(root: str, files: list[tuple[str, int]], size: int | None):
    """A Ray Dataset of (id, image, label, path, reason) rows in id order; ``reason`` is null for good rows."""
    # Imported here: Ray takes seconds to import, and the other importers (and `raybackfill data synth`,
    # which imports this module through the CLI) never need it.
    import ray

    # Built as separate tables, not slices of one: a pickled slice can carry its parent's whole buffers.
    blocks = [
        pa.table({
            ID: pa.array(np.arange(start, min(start + FILES_PER_TASK, len(files)), dtype=np.int64)),
            LABEL: pa.array([label for _, label in files[start : start + FILES_PER_TASK]], pa.int32()),
            "path": pa.array([rel for rel, _ in files[start : start + FILES_PER_TASK]], pa.string()),
        })
        for start in range(0, len(files), FILES_PER_TASK)
    ]  # fmt: skip
    ds = ray.data.from_arrow(blocks).map_batches(
        _read_folder_block,  # type: ignore[arg-type]  # ray's UDF type omits fn_kwargs
        fn_kwargs={"root": root, "size": size},
        batch_format="pyarrow",
        batch_size=None,
    )
    # This dataset's own copy of the DataContext (the setting does not leak into other datasets): rows must
    # come back in id order to be written in id order.
    ds.context.execution_options.preserve_order = True
    return ds


def _read_folder_block(block: pa.Table, root: str, size: int | None) -> pa.Table:
    """Read each file of a block of (id, label, path) and check it decodes (runs in a Ray task)."""
    images: list[bytes | None] = []
    reasons: list[str | None] = []
    for rel in block.column("path").to_pylist():
        try:
            data = _folder_image(os.path.join(root, rel), size)
        except OSError as err:
            images.append(None)
            reasons.append(f"{rel}: cannot read the file ({err.strerror or err})")
        except ValueError as err:
            images.append(None)
            reasons.append(f"{rel}: {err}")
        else:
            images.append(data)
            reasons.append(None)
    return pa.table({
        ID: block.column(ID),
        IMAGE: pa.array(images, pa.binary()),
        LABEL: block.column(LABEL),
        "path": block.column("path"),
        "reason": pa.array(reasons, pa.string()),
    })  # fmt: skip


def _folder_image(path: str, size: int | None) -> bytes:
    """The file's bytes, unchanged, once they are known to decode; or a ``size`` square PNG of the upright image.
    OSError: the file cannot be read; ValueError: it does not decode (with the reason)."""
    with open(path, "rb") as f:
        data = f.read()
    # The same decoder the embed step uses: what passes here, embedding can read.
    rgb = decode_image(data)
    if size is None:
        return data
    return encode_png(np.asarray(_square(rgb, size)))


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
        metas = [os.path.join(os.path.dirname(src), m) for m in ("batches.meta", "meta")]
        return [src], next((m for m in metas if os.path.isfile(m)), None)
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
) -> ImportResult:
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
) -> ImportResult:
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


# ------------------------------------------------------------------------------------------------ text

CHUNK_ROWS = 8192  # source rows held in memory at a time while reading a text file
_MISSING = object()  # a JSONL object without the requested field
_INTEGER = re.compile(r"[+-]?\d+")
_INT32 = np.iinfo(np.int32)


def import_text(
    src: str,
    out_uri: str,
    *,
    format: str | None = None,
    id_column: str = "id",
    text_column: str = "text",
    label_column: str | None = "label",
    assign_ids: bool = False,
    limit: int | None = None,
    rows_per_shard: int = 10_000,
    progress: bool = False,
) -> ImportResult:
    """Import a text gallery from JSONL (one JSON object per line), CSV (with a header row) or Parquet into
    the text table schema (id int64, text string, label int32 when the source has labels).

    The file is streamed twice, a chunk at a time: a first pass reads only ids and labels, so duplicate ids,
    bad labels and malformed lines are refused before anything is written, and string labels can be mapped to
    class indexes (the sorted distinct names, kept in the table's schema metadata); the second pass writes the
    rows. Integer labels (or strings of an integer) are kept as they are. A row whose text is missing, not a
    string, or empty or whitespace only is left out and written to ``out_uri/_quarantine`` (stage
    ``import``). Texts are stored unchanged.

    Args:
        src: the JSONL, CSV or Parquet file.
        out_uri: the new table's URI (local path or s3://); it must not hold shards yet.
        format: ``jsonl``, ``csv`` or ``parquet``; None tells it from the extension (``.jsonl``, ``.ndjson``,
            ``.csv``, ``.parquet``, ``.pq``).
        id_column: the column (JSON field) holding each row's integer id.
        text_column: the column holding the text.
        label_column: the column holding the label (an integer class index or a class name); a source
            without it, or None, imports no labels.
        assign_ids: number the rows 0..N-1 in file order instead of reading ``id_column``.
        limit: import only the first ``limit`` rows of the file.
        rows_per_shard: rows per Parquet shard.
        progress: show a progress bar on stderr.

    Returns:
        The shards written, the rows in them and how many rows were quarantined.

    Raises:
        DatasetImportError: the file is missing or malformed, has no id column (and ``assign_ids`` is off), an
            id or label that is not an integer, a duplicate id, a row without a label while others have one, or
            no row with a usable text. The message names the file and the line (JSONL) or data row (CSV,
            Parquet; 1 is the first row after a CSV's header).
    """
    fmt = _text_format(src, format)
    count = _check_limit(limit, np.iinfo(np.int64).max)
    writer = _ShardWriter(out_uri, rows_per_shard, None)  # refuses a non-empty target before any reading
    source = _TextSource(src, fmt)
    if source.header is not None and text_column not in source.header:
        raise DatasetImportError(f"{src}: no column '{text_column}' (columns: {', '.join(source.header) or 'none'})")
    if not assign_ids and source.header is not None and id_column not in source.header:
        raise DatasetImportError(
            f"{src}: no column '{id_column}' (columns: {', '.join(source.header) or 'none'}); pass assign_ids=True "
            "(--assign-ids) to number the rows 0..N-1 in file order"
        )
    if label_column is not None and source.header is not None and label_column not in source.header:
        label_column = None
    scan = _scan_text(source, None if assign_ids else id_column, label_column, count)
    if label_column is not None and not scan.has_labels:
        label_column = None  # a JSONL file none of whose objects has the field
    if scan.rows == 0 and count:
        raise DatasetImportError(f"{src}: no rows")
    names = scan.class_names()
    writer.names = names
    mapping = {name: i for i, name in enumerate(names)} if names is not None else None
    quarantine = _Quarantine(out_uri)
    columns = [c for c in (None if assign_ids else id_column, text_column, label_column) if c is not None]
    next_id = 0
    with _progress(None, f"import {fmt}", progress, total=scan.rows, unit="row") as bar:
        for chunk in source.chunks(columns, count):
            n = len(chunk.positions)
            if assign_ids:
                ids = np.arange(next_id, next_id + n, dtype=np.int64)
                next_id += n
            else:
                ids = np.array(
                    [
                        _source_id(v, source.where(p), id_column)
                        for v, p in zip(chunk.values[id_column], chunk.positions, strict=True)
                    ],
                    dtype=np.int64,
                )
            keep, texts, bad, reasons = [], [], [], []
            for i, text in enumerate(chunk.values[text_column]):
                reason = _text_problem(text)
                if reason is None:
                    keep.append(i)
                    texts.append(text)
                else:
                    bad.append(i)
                    reasons.append(reason)
            labels = None
            if label_column is not None:
                values = chunk.values[label_column]
                labels = [_label_index(_label_key(values[i], source.where(chunk.positions[i]), label_column), mapping)
                          for i in keep]  # fmt: skip
            if bad:
                quarantine.add(ids[bad], reasons)
            writer.add(text_table(ids[keep], texts, labels))
            bar.update(n)
    quarantined = quarantine.close()
    empty = text_table([], [], [] if label_column is not None else None)
    if scan.rows and not writer.rows_added:
        raise DatasetImportError(
            f"{src}: none of the {scan.rows} rows has a usable '{text_column}' (reasons in {quarantine.uri}; "
            f"first: {quarantine.first_reason})"
        )
    if quarantined:
        logger.warning(
            "%s: %d of %d rows quarantined (no usable text), see %s", src, quarantined, scan.rows, quarantine.uri
        )
    return writer.close(empty, quarantined=quarantined)


def _text_format(src: str, format: str | None) -> str:
    if format is not None:
        if format not in set(TEXT_FORMATS.values()):
            raise ValueError(f"format must be one of jsonl, csv, parquet, got {format!r}")
        return format
    suffix = Path(src).suffix.lower()
    if suffix not in TEXT_FORMATS:
        raise DatasetImportError(
            f"{src}: cannot tell the format from the extension {suffix or '(none)'} "
            f"(known: {', '.join(TEXT_FORMATS)}); pass format= jsonl, csv or parquet"
        )
    return TEXT_FORMATS[suffix]


@dataclass(frozen=True)
class _Chunk:
    """Up to CHUNK_ROWS consecutive source rows: the requested columns' values (``_MISSING`` where a JSONL
    object lacks the field) and each row's line (JSONL) or data row (CSV, Parquet) number, from 1."""

    values: dict[str, list[Any]]
    positions: Sequence[int]


class _TextSource:
    """A JSONL, CSV or Parquet file read a chunk at a time; ``header`` is its column names (None for JSONL,
    whose objects each have their own fields)."""

    def __init__(self, path: str, fmt: str) -> None:
        if not os.path.isfile(path):
            raise DatasetImportError(f"{path}: no such file")
        self.path = path
        self.format = fmt
        self.header = self._header()

    def where(self, position: int) -> str:
        return f"{self.path}: {'line' if self.format == 'jsonl' else 'row'} {position}"

    def _header(self) -> list[str] | None:
        if self.format == "jsonl":
            return None
        if self.format == "parquet":
            try:
                return pq.ParquetFile(self.path).schema_arrow.names
            except (OSError, pa.ArrowInvalid) as err:
                raise DatasetImportError(f"{self.path}: not a readable Parquet file ({err})") from err
        try:
            with open(self.path, newline="", encoding="utf-8-sig") as f:
                return next(csv.reader(f), [])
        except (UnicodeDecodeError, csv.Error) as err:
            raise DatasetImportError(f"{self.path}: cannot read the CSV header ({err})") from err

    def chunks(self, columns: list[str], limit: int) -> Iterator[_Chunk]:
        """The ``columns`` of the first ``limit`` rows, CHUNK_ROWS at a time, in file order."""
        reader = {"jsonl": self._jsonl, "csv": self._csv, "parquet": self._parquet}[self.format]
        yield from reader(columns, limit)

    def _jsonl(self, columns: list[str], limit: int) -> Iterator[_Chunk]:
        values: dict[str, list[Any]] = {c: [] for c in columns}
        positions: list[int] = []
        rows = 0
        with open(self.path, "rb") as f:
            for number, line in enumerate(f, start=1):
                if rows >= limit:
                    break
                if not line.strip():
                    continue  # blank lines (a trailing newline, spacing) hold no row
                try:
                    obj = json.loads(line)
                except ValueError as err:  # JSONDecodeError, or UnicodeDecodeError for bytes that are not UTF-8
                    raise DatasetImportError(f"{self.path}: line {number}: not valid JSON ({err})") from err
                if not isinstance(obj, dict):
                    raise DatasetImportError(
                        f"{self.path}: line {number}: expected a JSON object, found {type(obj).__name__}"
                    )
                for c in columns:
                    values[c].append(obj.get(c, _MISSING))
                positions.append(number)
                rows += 1
                if len(positions) == CHUNK_ROWS:
                    yield _Chunk(values, positions)
                    values, positions = {c: [] for c in columns}, []
        if positions:
            yield _Chunk(values, positions)

    def _csv(self, columns: list[str], limit: int) -> Iterator[_Chunk]:
        # Every column read as a string: the streaming reader infers types from its first block only, so a
        # later block could not be converted (an id "0012a" after thousands of numbers). Ids and labels are
        # parsed here, with the row in the error. Quoted newlines are allowed: texts have them.
        options = pacsv.ConvertOptions(include_columns=columns, column_types={c: pa.string() for c in columns})
        try:
            reader = pacsv.open_csv(
                self.path, parse_options=pacsv.ParseOptions(newlines_in_values=True), convert_options=options
            )
            yield from self._batches(reader, columns, limit)
        except (OSError, pa.ArrowInvalid) as err:
            raise DatasetImportError(f"{self.path}: malformed CSV ({err})") from err

    def _parquet(self, columns: list[str], limit: int) -> Iterator[_Chunk]:
        try:
            batches = pq.ParquetFile(self.path).iter_batches(batch_size=CHUNK_ROWS, columns=columns)
            yield from self._batches(batches, columns, limit)
        except (OSError, pa.ArrowInvalid) as err:
            raise DatasetImportError(f"{self.path}: not a readable Parquet file ({err})") from err

    @staticmethod
    def _batches(batches: Iterable[pa.RecordBatch], columns: list[str], limit: int) -> Iterator[_Chunk]:
        rows = 0
        for batch in batches:
            # CSV blocks are cut by bytes, not rows: cut them again so no chunk holds more than CHUNK_ROWS.
            for start in range(0, batch.num_rows, CHUNK_ROWS):
                if rows >= limit:
                    return
                part = batch.slice(start, min(CHUNK_ROWS, batch.num_rows - start, limit - rows))
                values = {c: part.column(c).to_pylist() for c in columns}
                yield _Chunk(values, range(rows + 1, rows + 1 + part.num_rows))
                rows += part.num_rows


@dataclass
class _TextScan:
    """What the first pass learnt: the row count and the distinct labels (ints, or strings of class names)."""

    rows: int
    has_labels: bool
    labels: set[int | str]

    def class_names(self) -> list[str] | None:
        """None when every label is an integer (kept as it is); else the sorted names, each label's index."""
        if not self.has_labels or all(isinstance(v, int) for v in self.labels):
            return None
        return sorted({str(v) for v in self.labels})


def _scan_text(source: _TextSource, id_column: str | None, label_column: str | None, limit: int) -> _TextScan:
    """First pass over ids and labels only: integer, unique ids; a label in every row or in none."""
    ids: list[np.ndarray] = []
    positions: list[np.ndarray] = []
    labels: set[int | str] = set()
    first_missing_label: int | None = None
    has_labels = False
    rows = 0
    columns = [c for c in (id_column, label_column) if c is not None]
    if not columns:
        # Nothing to check, but the rows still have to be counted (and JSONL lines parsed).
        columns = [source.header[0]] if source.header else ["_"]
    for chunk in source.chunks(columns, limit):
        rows += len(chunk.positions)
        if id_column is not None:
            ids.append(
                np.array(
                    [
                        _source_id(v, source.where(p), id_column)
                        for v, p in zip(chunk.values[id_column], chunk.positions, strict=True)
                    ],
                    np.int64,
                )
            )
            positions.append(np.asarray(chunk.positions, dtype=np.int64))
        if label_column is not None:
            for value, position in zip(chunk.values[label_column], chunk.positions, strict=True):
                key = _label_key(value, source.where(position), label_column)
                if key is None:
                    first_missing_label = first_missing_label or position
                else:
                    has_labels = True
                    labels.add(key)
    if has_labels and first_missing_label is not None:
        raise DatasetImportError(
            f"{source.where(first_missing_label)}: no '{label_column}' (other rows have one: every row needs a label)"
        )
    if ids:
        assert id_column is not None  # ids are read only from an id column
        _check_unique(source, id_column, np.concatenate(ids), np.concatenate(positions))
    return _TextScan(rows, has_labels, labels)


def _check_unique(source: _TextSource, column: str, ids: np.ndarray, positions: np.ndarray) -> None:
    order = np.argsort(ids, kind="stable")
    same = np.flatnonzero(ids[order][1:] == ids[order][:-1])
    if len(same):
        # Of the duplicated ids, report the one whose second occurrence comes first in the file.
        second = order[same + 1]
        k = int(np.argmin(positions[second]))
        first, again = int(positions[order[same[k]]]), int(positions[second[k]])
        unit = "line" if source.format == "jsonl" else "row"
        raise DatasetImportError(
            f"{source.path}: {unit} {again}: duplicate {column} {int(ids[second[k]])} (already at {unit} {first})"
        )


def _as_int(value: Any) -> int | None:
    """An integer, an integral float or a string of an integer, as an int; None for anything else."""
    if isinstance(value, bool):
        return None  # JSON true/false are not ids
    if isinstance(value, int):
        return value
    if isinstance(value, float) and value.is_integer():
        return int(value)
    if isinstance(value, str) and _INTEGER.fullmatch(value.strip()):
        return int(value.strip())
    return None


def _source_id(value: Any, where: str, column: str) -> int:
    if value is _MISSING or value is None or value == "":
        raise DatasetImportError(
            f"{where}: no '{column}'; pass assign_ids=True (--assign-ids) to number the rows 0..N-1 in file order"
        )
    number = _as_int(value)
    if number is None:
        raise DatasetImportError(f"{where}: '{column}' must be an integer, found {value!r}")
    if not np.iinfo(np.int64).min <= number <= np.iinfo(np.int64).max:
        raise DatasetImportError(f"{where}: '{column}' {number} does not fit in int64")
    return number


def _label_key(value: Any, where: str, column: str) -> int | str | None:
    """A label as an int (class index) or a str (class name); None when the row has none."""
    if value is _MISSING or value is None or (isinstance(value, str) and not value.strip()):
        return None
    number = _as_int(value)
    if number is not None:
        if not 0 <= number <= _INT32.max:
            raise DatasetImportError(f"{where}: '{column}' {number} is not a class index (0..{_INT32.max})")
        return number
    if isinstance(value, str):
        return value.strip()
    raise DatasetImportError(f"{where}: '{column}' must be an integer or a class name, found {value!r}")


def _label_index(key: int | str | None, mapping: dict[str, int] | None) -> int:
    # The first pass refused missing labels, so key is never None here.
    assert key is not None
    return int(key) if mapping is None else mapping[str(key)]


def _text_problem(value: Any) -> str | None:
    """Why a text cannot be embedded, or None if it can."""
    if value is _MISSING or value is None:
        return "missing text"
    if not isinstance(value, str):
        return f"text is not a string ({type(value).__name__})"
    if not value.strip():
        return "empty text"
    return None


# -------------------------------------------------------------------------------------------- writing


class _ShardWriter:
    """Writes tables to ``out_uri`` as shards of exactly ``rows_per_shard`` rows (the last may be shorter), in
    the order they are added, with ``names`` (when set) as the class names in every shard's metadata."""

    def __init__(self, out_uri: str, rows_per_shard: int, names: list[str] | None) -> None:
        if rows_per_shard <= 0:
            raise ValueError(f"rows_per_shard must be positive, got {rows_per_shard}")
        # Checked before any work: an import can take hours, and would otherwise fail at its first shard.
        if next_shard_index(out_uri):
            raise ShardExistsError(f"{out_uri}: table already has shards; import into a new URI")
        self.out_uri = out_uri
        self.rows_per_shard = rows_per_shard
        self.names = names
        self.rows_added = 0
        self._pending: list[pa.Table] = []
        self._pending_rows = 0
        self._shards: list[str] = []

    def add(self, table: pa.Table) -> None:
        if not table.num_rows:
            return
        self._pending.append(table)
        self._pending_rows += table.num_rows
        self.rows_added += table.num_rows
        while self._pending_rows >= self.rows_per_shard:
            pending = pa.concat_tables(self._pending)
            self._write(pending.slice(0, self.rows_per_shard))
            rest = pending.slice(self.rows_per_shard)
            self._pending, self._pending_rows = ([rest] if rest.num_rows else []), rest.num_rows

    def close(self, empty: pa.Table, *, quarantined: int) -> ImportResult:
        """Write what is pending (``empty``, the table's schema with no rows, if nothing was ever written)."""
        if self._pending:
            self._write(pa.concat_tables(self._pending))
        elif not self._shards:
            self._write(empty)
        self._pending, self._pending_rows = [], 0
        return ImportResult(self.out_uri, list(self._shards), self.rows_added, quarantined)

    def _write(self, table: pa.Table) -> None:
        if self.names is not None:
            table = with_class_names(table, self.names)
        # One shard per call; append=False on the first refuses a target another writer filled meanwhile.
        result = write_table(table, self.out_uri, rows_per_shard=max(table.num_rows, 1), append=bool(self._shards))
        self._shards += result.shards


class _Quarantine:
    """Collects the ids and reasons of rows an import leaves out and writes them to ``out_uri/_quarantine``
    (stage ``import``) every ``flush_rows`` rows, so a source that is mostly bad never piles up in memory."""

    def __init__(self, out_uri: str, flush_rows: int = 10_000) -> None:
        self.uri = join(out_uri, QUARANTINE_DIR)
        self.flush_rows = flush_rows
        self.count = 0
        self.first_reason: str | None = None
        self._ids: list[np.ndarray] = []
        self._reasons: list[str] = []

    def add(self, ids: np.ndarray, reasons: list[str]) -> None:
        if not reasons:
            return
        self.first_reason = self.first_reason or reasons[0]
        self._ids.append(np.asarray(ids, dtype=np.int64))
        self._reasons += reasons
        self.count += len(reasons)
        if len(self._reasons) >= self.flush_rows:
            self._flush()

    def close(self) -> int:
        self._flush()
        return self.count

    def _flush(self) -> None:
        if not self._reasons:
            return
        # Imported here: loading imports Ray, which the CIFAR/IDX/text importers do not otherwise need.
        from raybackfill.data.loading import write_quarantine

        write_quarantine(self.uri, np.concatenate(self._ids), self._reasons, stage=Stage.IMPORT)
        self._ids, self._reasons = [], []


def _write_rows(
    rows: Iterable[tuple[int, bytes, int, dict]], out_uri: str, rows_per_shard: int, names: list[str] | None
) -> ImportResult:
    """Write (id, image, label, extra columns) rows as shards of ``rows_per_shard``, streaming."""
    writer = _ShardWriter(out_uri, rows_per_shard, names)
    batch: list[tuple[int, bytes, int, dict]] = []
    for row in rows:
        batch.append(row)
        if len(batch) == rows_per_shard:
            writer.add(_image_rows(batch))
            batch = []
    writer.add(_image_rows(batch))
    return writer.close(_image_rows([]), quarantined=0)


def _image_rows(batch: list[tuple[int, bytes, int, dict]]) -> pa.Table:
    extra = {key: [r[3][key] for r in batch] for key in (batch[0][3] if batch else {})}
    return image_table([r[0] for r in batch], [r[1] for r in batch], [r[2] for r in batch], extra=extra)


def _check_limit(limit: int | None, available: int) -> int:
    """How many rows to import: all of them, or the first ``limit``."""
    if limit is None:
        return available
    if limit < 0:
        raise ValueError(f"limit must be non-negative, got {limit}")
    return min(limit, available)


def _progress(items, desc: str, enabled: bool, total: int | None = None, unit: str = "img"):
    """A progress bar on stderr that appears only if the work lasts more than a second."""
    return tqdm(items, desc=desc, unit=unit, total=total, delay=1.0, disable=not enabled)
