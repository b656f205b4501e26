"""The CIFAR-10/100 python pickles, read with an unpickler that resolves only numpy array globals."""

from __future__ import annotations

import os
import pickle
from collections.abc import Iterator

import numpy as np

from raybackfill.data.images import encode_png
from raybackfill.data.importers.common import DatasetImportError, ImportResult, check_limit, progress_bar, write_rows

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
    count = check_limit(limit, np.iinfo(np.int64).max)

    def rows() -> Iterator[tuple[int, bytes, int, dict]]:
        next_id = 0
        for path in files:
            pixels, labels = _cifar_batch(path)
            for img, label in zip(pixels, labels, strict=True):
                if next_id >= count:
                    return
                yield next_id, encode_png(img), int(label), {}
                next_id += 1

    return write_rows(progress_bar(rows(), "import cifar", progress), out_uri, rows_per_shard, names)


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
