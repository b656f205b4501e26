"""Deterministic train / gallery / query splits, stratified per class, plus the old model's class subset.

The compatible-upgrade protocol (FCT, FastFill) trains the old model on a subset of the classes and
the new one on all of them, and evaluates both on the same gallery and queries. ``split_table``
produces exactly that: the row splits of every class and ``train_old``, the training rows of the old
classes. Each class is shuffled by a generator seeded with ``(seed, label)`` after sorting its rows by
id, so the result does not depend on the input's row order or on which other classes are present. Each
split is written in a seeded random order, never grouped by class.
"""

from __future__ import annotations

import re

import numpy as np
import pyarrow as pa

from raybackfill.data.info import class_names
from raybackfill.data.schema import ID, LABEL, SchemaError, check_unique_ids
from raybackfill.data.storage import WriteResult, join, write_table

DEFAULT_FRACTIONS = {"train": 0.6, "gallery": 0.3, "query": 0.1}
TRAIN = "train"
OLD_TRAIN = "train_old"
_NAME = re.compile(r"^[A-Za-z0-9_-]+$")
_RANGE = re.compile(r"^(\d+)(?:-(\d+))?$")
_NAMED = "named:"
_WORD_SEPARATORS = re.compile(r"[-_\s]+")


def parse_class_spec(spec: str, available: np.ndarray | None = None, names: list[str] | None = None) -> np.ndarray:
    """Class ids from "0-49", "0,1,5-9", "half" (the lower half of the ``available`` class ids) or
    "named:WORD,WORD" (see :func:`named_classes`; needs ``names``, the class names indexed by label).

    Returns sorted unique ids. With ``available`` given, every listed id must be one of them.
    """
    text = spec.strip().lower()
    present = None if available is None else np.unique(np.asarray(available, dtype=np.int64))
    if text.startswith(_NAMED):
        return named_classes(text[len(_NAMED) :], names, present, spec)
    if text == "half":
        if present is None or len(present) < 2:
            raise ValueError("class spec 'half' needs a table with at least 2 classes")
        return present[: len(present) // 2]
    ids: list[int] = []
    for token in text.split(","):
        match = _RANGE.match(token.strip())
        if not match:
            raise ValueError(f"bad class spec {spec!r}: {token.strip()!r} is not N or N-M (e.g. '0-49' or '0,1,5-9')")
        lo = int(match.group(1))
        hi = int(match.group(2)) if match.group(2) is not None else lo
        if hi < lo:
            raise ValueError(f"bad class spec {spec!r}: range {lo}-{hi} is empty")
        ids.extend(range(lo, hi + 1))
    out = np.unique(np.array(ids, dtype=np.int64))
    if present is not None:
        missing = np.setdiff1d(out, present)
        if len(missing):
            shown = ", ".join(str(x) for x in missing[:5])
            raise ValueError(f"class spec {spec!r} names classes not in the table: {shown}")
    return out


def named_classes(words: str, names: list[str] | None, present: np.ndarray | None, spec: str) -> np.ndarray:
    """Ids of the classes whose name, or one of its '-'/'_'/space-separated words, is in ``words``
    (comma-separated, case-insensitive), among ``present`` ids (all named ones when None).

    Why: an old model trained on a random half of the classes still sees every attribute value when classes
    are conjunctions of shared attributes (as in the built-in data), so it generalises to the other half. Picking
    old classes by a word of their names ("named:hue000,hue030") leaves the old model blind to the attribute
    values it never saw, the situation the FastFill paper's uncertainty-ordered backfill is built for.
    """
    wanted = [w.strip() for w in words.split(",")]
    if not all(wanted):
        raise ValueError(f"bad class spec {spec!r}: give 'named:WORD[,WORD...]' without empty words")
    if names is None:
        raise ValueError(f"class spec {spec!r} needs class names, and the table records none")
    ids = np.arange(len(names)) if present is None else present[present < len(names)]
    parts = {int(i): {names[i].lower(), *_WORD_SEPARATORS.split(names[i].lower())} for i in ids}
    unmatched = [w for w in wanted if not any(w in words_of for words_of in parts.values())]
    if unmatched:
        raise ValueError(f"class spec {spec!r}: no class name has the word(s) {', '.join(unmatched)}")
    return np.array(sorted(i for i, words_of in parts.items() if words_of.intersection(wanted)), dtype=np.int64)


def parse_fractions(text: str) -> dict[str, float]:
    """ "train=0.6,gallery=0.3,query=0.1" -> {"train": 0.6, ...}, checked by ``check_fractions``."""
    fractions: dict[str, float] = {}
    for item in text.split(","):
        name, sep, value = item.partition("=")
        name = name.strip()
        if not sep or not name:
            raise ValueError(f"bad fractions {text!r}: {item.strip()!r} is not NAME=FRACTION")
        if name in fractions:
            raise ValueError(f"bad fractions {text!r}: split {name!r} given twice")
        try:
            fractions[name] = float(value)
        except ValueError as err:
            raise ValueError(f"bad fractions {text!r}: {value.strip()!r} is not a number") from err
    check_fractions(fractions)
    return fractions


def check_fractions(fractions: dict[str, float]) -> None:
    if not fractions:
        raise ValueError("need at least one split fraction")
    for name, value in fractions.items():
        if not _NAME.match(name) or name == OLD_TRAIN:
            raise ValueError(f"bad split name {name!r}: use letters, digits, '-' or '_' (not '{OLD_TRAIN}')")
        if not 0.0 <= value <= 1.0:
            raise ValueError(f"fraction of split {name!r} must be in [0, 1], got {value}")
    total = sum(fractions.values())
    if abs(total - 1.0) > 1e-6:
        raise ValueError(f"split fractions must sum to 1, got {total:g}")


def split_table(
    table: pa.Table,
    fractions: dict[str, float] | None = None,
    *,
    old_classes: str | np.ndarray | None = None,
    seed: int = 0,
    source: str = "table",
) -> dict[str, pa.Table]:
    """Split rows per class by ``fractions`` (default train/gallery/query = 0.6/0.3/0.1).

    Each class contributes round(cumulative fraction x its size) boundaries, so every split gets its
    share of every class and the splits partition the rows. With ``old_classes`` (a class spec or an
    array of ids) the result also has ``train_old``: the train rows of those classes. Rows in each
    split are in a seeded random order (see ``_take_shuffled``); schema metadata (class names) is kept.
    """
    fractions = dict(DEFAULT_FRACTIONS if fractions is None else fractions)
    check_fractions(fractions)
    if seed < 0:
        raise ValueError(f"seed must be non-negative, got {seed}")
    ids, labels = _ids_and_labels(table, source)
    order = np.lexsort((ids, labels))  # by class, then id within each class
    classes, starts = np.unique(labels[order], return_index=True)
    ends = np.append(starts[1:], len(order))
    cumulative = np.cumsum(list(fractions.values()))
    parts: dict[str, list[np.ndarray]] = {name: [] for name in fractions}
    for label, start, end in zip(classes, starts, ends, strict=True):
        rows = order[start:end]
        rows = rows[np.random.default_rng([seed, int(label)]).permutation(len(rows))]
        bounds = np.concatenate([[0], np.rint(cumulative * len(rows)).astype(np.int64)])
        bounds[-1] = len(rows)
        for name, lo, hi in zip(fractions, bounds[:-1], bounds[1:], strict=True):
            parts[name].append(rows[lo:hi])
    result = {name: _take_shuffled(table, ids, chunks, seed) for name, chunks in parts.items()}
    if old_classes is not None:
        if TRAIN not in fractions:
            raise ValueError(f"old_classes needs a '{TRAIN}' split to take the old classes' rows from")
        if isinstance(old_classes, str):
            old = parse_class_spec(old_classes, classes, class_names(table.schema))
        else:
            old = np.asarray(old_classes)
        train = result[TRAIN]
        keep = np.isin(train.column(LABEL).to_numpy(), old)
        result[OLD_TRAIN] = train.filter(pa.array(keep))
    return result


def holdout(
    ids: np.ndarray,
    labels: np.ndarray | None,
    fraction: float,
    *,
    max_rows: int | None = None,
    seed: int = 0,
) -> np.ndarray:
    """A boolean mask of the rows held out for validation: ``fraction`` of each class (of all rows when
    ``labels`` is None), at most ``max_rows`` in all, drawn with a generator seeded by ``(seed, label)`` over the
    rows sorted by id, so the mask depends neither on the rows' order nor on which other classes are present.
    A class of one row keeps it for training.
    """
    ids = np.asarray(ids, dtype=np.int64)
    if not 0.0 <= fraction < 1.0:
        raise ValueError(f"validation fraction must be in [0, 1), got {fraction}")
    if max_rows is not None and len(ids):
        fraction = min(fraction, max_rows / len(ids))
    labels = np.zeros(len(ids), dtype=np.int64) if labels is None else np.asarray(labels, dtype=np.int64)
    mask = np.zeros(len(ids), dtype=bool)
    order = np.lexsort((ids, labels))
    classes, starts = np.unique(labels[order], return_index=True)
    for label, start, end in zip(classes, starts, np.append(starts[1:], len(order)), strict=True):
        rows = order[start:end]
        take = min(int(np.floor(fraction * len(rows) + 0.5)), len(rows) - 1)
        if take > 0:
            mask[rows[np.random.default_rng([seed, int(label)]).permutation(len(rows))[:take]]] = True
    return mask


def write_splits(splits: dict[str, pa.Table], out_uri: str, rows_per_shard: int = 10_000) -> dict[str, WriteResult]:
    """Write each split as its own table under ``out_uri/<split>/``."""
    return {
        name: write_table(table, join(out_uri, name), rows_per_shard=rows_per_shard) for name, table in splits.items()
    }


def _ids_and_labels(table: pa.Table, source: str) -> tuple[np.ndarray, np.ndarray]:
    for name in (ID, LABEL):
        if name not in table.schema.names:
            raise SchemaError(f"{source}: missing column '{name}' (splits are stratified by label)")
        if table.column(name).null_count:
            raise SchemaError(f"{source}: column '{name}' has nulls")
    ids = table.column(ID).to_numpy().astype(np.int64)
    check_unique_ids(ids, source)
    labels = table.column(LABEL).to_numpy().astype(np.int64)
    if len(labels) and labels.min() < 0:
        raise SchemaError(f"{source}: column 'label' has negative values")
    return ids, labels


def _take_shuffled(table: pa.Table, ids: np.ndarray, chunks: list[np.ndarray], seed: int) -> pa.Table:
    """The rows of ``chunks`` in a seeded random order (a pure function of the ids taken and ``seed``).

    Why not by id: importers number rows in class order (one folder after another), and a split written in
    that order is a table sorted by label, whose every file, block and batch holds one class or two."""
    rows = np.concatenate(chunks) if chunks else np.zeros(0, dtype=np.int64)
    rows = rows[np.argsort(ids[rows], kind="stable")]
    return table.take(pa.array(rows[np.random.default_rng([seed, len(rows)]).permutation(len(rows))]))
