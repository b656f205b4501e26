"""The paired table: the same items embedded by the old and the new encoder, what every adapter is fitted on.

Columns: ``id`` (int64, unique), ``old`` and ``new`` (fixed_size_list<float32>), optionally ``side``
(side-information of the old item, fixed_size_list<float32>) and ``label`` (int), and the encoders' version tags
``old_model`` / ``new_model`` (one value each). Written by `raybackfill sample`
(:func:`raybackfill.adapters.sample.paired_sample`).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pyarrow as pa

from raybackfill.data import storage
from raybackfill.data.schema import ID, LABEL, SchemaError, check_unique_ids, embedding_dim, vectors_of

OLD = "old"
NEW = "new"
SIDE = "side"
OLD_MODEL = "old_model"
NEW_MODEL = "new_model"


@dataclass(frozen=True)
class Pairs:
    """Paired rows in memory, in id order."""

    ids: np.ndarray
    old: np.ndarray  # (n, d_old) float32
    new: np.ndarray  # (n, d_new) float32
    side: np.ndarray | None = None  # (n, d_side) float32
    labels: np.ndarray | None = None  # (n,) int64
    old_version: str | None = None
    new_version: str | None = None
    source: str = "paired rows"

    def __post_init__(self) -> None:
        n = len(self.ids)
        for name in ("old", "new", "side", "labels"):
            value = getattr(self, name)
            if value is not None and len(value) != n:
                raise SchemaError(f"{self.source}: {n} ids but {len(value)} rows of {name!r}")
        for name in ("old", "new", "side"):
            value = getattr(self, name)
            if value is not None and not np.isfinite(value).all():
                bad = self.ids[~np.isfinite(value).all(axis=1)]
                raise SchemaError(f"{self.source}: column {name!r} has NaN/inf at ids {bad[:5].tolist()}")

    def __len__(self) -> int:
        return len(self.ids)

    def take(self, rows: np.ndarray) -> Pairs:
        """The pairs at ``rows`` (positions or a boolean mask)."""
        pick = lambda a: None if a is None else a[rows]  # noqa: E731  # one line per column below
        return Pairs(
            self.ids[rows],
            self.old[rows],
            self.new[rows],
            pick(self.side),
            pick(self.labels),
            self.old_version,
            self.new_version,
            self.source,
        )


def _version(table: pa.Table, column: str, source: str) -> str | None:
    if column not in table.schema.names:
        return None
    values = [v for v in table.column(column).unique().to_pylist() if v]
    if len(values) > 1:
        raise SchemaError(f"{source}: column {column!r} holds {len(values)} versions {values[:5]}; pairs come from one")
    return values[0] if values else None


def pairs_from_table(table: pa.Table, source: str) -> Pairs:
    """Validate a paired table (see the module docstring) and load it in id order."""
    names = table.schema.names
    missing = [c for c in (ID, OLD, NEW) if c not in names]
    if missing:
        raise SchemaError(f"{source}: a paired table needs columns {missing} (columns: {', '.join(names)})")
    for column in (OLD, NEW, *([SIDE] if SIDE in names else [])):
        embedding_dim(table.schema, column, source)
    check_unique_ids(table.column(ID), source)
    if len(table) == 0:
        raise SchemaError(f"{source}: no pairs")
    table = table.sort_by(ID)
    labels = None
    if LABEL in names:
        if table.column(LABEL).null_count:
            raise SchemaError(f"{source}: column 'label' has {table.column(LABEL).null_count} nulls")
        labels = table.column(LABEL).to_numpy().astype(np.int64)
    return Pairs(
        ids=table.column(ID).to_numpy().astype(np.int64),
        old=vectors_of(table, OLD),
        new=vectors_of(table, NEW),
        side=vectors_of(table, SIDE) if SIDE in names else None,
        labels=labels,
        old_version=_version(table, OLD_MODEL, source),
        new_version=_version(table, NEW_MODEL, source),
        source=source,
    )


def read_pairs(uri: str) -> Pairs:
    """Read and validate the paired table at ``uri`` (local or s3://)."""
    return pairs_from_table(storage.read_table(uri), uri)
