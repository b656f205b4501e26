"""ImageFolder trees (one subdirectory per class), read and checked with Ray Data."""

from __future__ import annotations

import logging
import os
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
from PIL import Image

from raybackfill.data.images import encode_png
from raybackfill.data.importers.common import (
    DatasetImportError,
    ImportResult,
    QuarantineWriter,
    ShardWriter,
    check_limit,
    progress_bar,
)
from raybackfill.data.preprocessing import decode_image
from raybackfill.data.schema import ID, IMAGE, LABEL, image_table

logger = logging.getLogger(__name__)

IMAGE_EXTENSIONS = (
    ".png", ".jpg", ".jpeg", ".jpe", ".jfif", ".bmp", ".dib", ".gif", ".ppm", ".pgm", ".pbm", ".pnm",
    ".tif", ".tiff", ".webp", ".tga", ".ico",
)  # fmt: skip
FILES_PER_TASK = 64  # image files one Ray Data task reads and checks (a block of the path dataset)


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
    files = files[: check_limit(limit, len(files))]
    writer = ShardWriter(out_uri, rows_per_shard, classes)
    quarantine = QuarantineWriter(out_uri)
    empty = image_table([], [], [], extra={"path": pa.array([], pa.string())})
    if not files:
        return writer.close(empty, quarantined=0)
    ds = _folder_dataset(os.path.abspath(root), files, size)
    with progress_bar(None, "import imagefolder", progress, total=len(files)) as bar:
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
