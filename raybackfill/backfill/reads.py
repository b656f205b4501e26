"""Reads of chosen rows of Parquet row groups, in a given order, as one Ray Dataset (no torch imported here).

The backfill never copies the gallery: its plan says where each item lives (file, row group, row within
the group), and this module turns a list of :class:`RowGroupRead` units into read tasks that each open
one row group with column projection, take the planned rows in plan order and cut them into blocks.
A unit's rows occupy consecutive *positions* of a ledger track (raybackfill.backfill.ledger), which every
output row carries in the ``position`` column, with its tier.

Memory per read task: one row group of the projected columns (Parquet reads a row group's column chunks
whole). Why a unit is never cut below a row group: Parquet (and pyarrow) cannot read single rows of a
group, so a cut would read the same group once per piece.
"""

from __future__ import annotations

import functools
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import ray
from ray.data.block import BlockMetadata
from ray.data.datasource import Datasource, ReadTask

from raybackfill.backfill.rows import POSITION, TIER
from raybackfill.data import storage
from raybackfill.data.schema import ID


class PlanMismatchError(storage.StorageError):
    """A row group no longer holds the ids the plan located there: the table changed after the plan."""


@dataclass(frozen=True)
class RowGroupRead:
    """Rows ``rows`` (indexes within row group ``row_group`` of file ``uri``, in output order) that take the
    track positions ``start .. start + len(rows) - 1``. ``ids``, when given, are the ids the plan expects
    there (checked, so a gallery rewritten since the plan fails loudly instead of embedding other items)."""

    uri: str
    row_group: int
    rows: np.ndarray
    start: int
    tier: int = 0
    ids: np.ndarray | None = None
    bytes_per_row: float = 0.0  # estimate, for Ray Data's memory accounting

    def __len__(self) -> int:
        return len(self.rows)


def read_unit(unit: RowGroupRead, columns: list[str], rows_per_block: int) -> Iterator[pa.Table]:
    """The unit's rows with ``columns`` plus ``position`` and ``tier``, in blocks of at most ``rows_per_block``."""
    table = storage.read_row_group(unit.uri, unit.row_group, columns).take(pa.array(unit.rows, type=pa.int64()))
    if unit.ids is not None:
        found = table.column(ID).to_numpy()
        if not np.array_equal(found, unit.ids):
            wrong = int(np.flatnonzero(found != unit.ids)[0])
            raise PlanMismatchError(
                f"{unit.uri}: row {int(unit.rows[wrong])} of row group {unit.row_group} holds id {int(found[wrong])}, "
                f"but the plan put id {int(unit.ids[wrong])} there: the table changed after the plan was built "
                f"(back up the old --out and start a new one)"
            )
    n = table.num_rows
    table = table.append_column(POSITION, pa.array(np.arange(unit.start, unit.start + n, dtype=np.int64)))
    table = table.append_column(TIER, pa.array(np.full(n, unit.tier, dtype=np.int64)))
    for offset in range(0, n, rows_per_block):
        yield table.slice(offset, rows_per_block)


class RowGroupReads(Datasource):
    """One read task per :class:`RowGroupRead`, in the order given (the consumer sets ``preserve_order``)."""

    def __init__(self, units: Sequence[RowGroupRead], columns: list[str], schema: pa.Schema, rows_per_block: int):
        super().__init__()
        if not units:
            raise ValueError("no row groups to read")
        self.units, self.columns, self.rows_per_block = list(units), list(columns), max(1, rows_per_block)
        self.schema = pa.schema([schema.field(c) for c in columns] + [(POSITION, pa.int64()), (TIER, pa.int64())])

    def estimate_inmemory_data_size(self) -> int:
        return int(sum(len(u) * u.bytes_per_row for u in self.units))

    def get_read_tasks(self, parallelism: int, per_task_row_limit: int | None = None, data_context=None) -> list:
        # Each task's function carries its own unit only (a closure over self would ship every unit to every task).
        return [
            ReadTask(
                functools.partial(read_unit, unit, self.columns, self.rows_per_block),
                BlockMetadata(len(unit), int(len(unit) * unit.bytes_per_row), None, None),
                schema=self.schema,
            )
            for unit in self.units
        ]


def read_units(
    units: Sequence[RowGroupRead], columns: list[str], schema: pa.Schema, rows_per_block: int
) -> ray.data.Dataset:
    """A lazy Dataset over ``units`` (one read task per unit), in blocks of at most ``rows_per_block`` rows.

    The streaming repartition matters: the blocks one read task yields travel as one bundle, and a map stage
    downstream would run that whole bundle (up to a row group) as one task on one actor, and emit it as one
    batch; cut into bundles of ``rows_per_block`` rows, each becomes its own task and its own ledger batch."""
    ds = ray.data.read_datasource(RowGroupReads(units, columns, schema, rows_per_block), override_num_blocks=len(units))
    return ds.repartition(target_num_rows_per_block=max(1, rows_per_block))


def bytes_per_row(footer: pq.FileMetaData, columns: list[str]) -> float:
    """Uncompressed bytes per row of ``columns`` in a file (from its footer), for memory estimates."""
    if not footer.num_rows:
        return 0.0
    names = set(columns)
    total = 0
    for g in range(footer.num_row_groups):
        group = footer.row_group(g)
        for c in range(group.num_columns):
            column = group.column(c)
            if column.path_in_schema.split(".", 1)[0] in names:
                total += column.total_uncompressed_size
    return total / footer.num_rows


def table_units(table: storage.TableFiles, columns: list[str], start: int = 0) -> list[RowGroupRead]:
    """Every row of a table from global row ``start`` on (shards in order, row groups in order), one unit per
    row group: the positions of a track over the whole table (the instant phase's)."""
    units, offset = [], 0
    for uri, footer in zip(table.shards, table.footers, strict=True):
        per_row = bytes_per_row(footer, columns)
        for g in range(footer.num_row_groups):
            n = footer.row_group(g).num_rows
            if offset + n > start and n:
                first = max(0, start - offset)
                rows = np.arange(first, n, dtype=np.int32)
                units.append(RowGroupRead(uri, g, rows, offset + first, bytes_per_row=per_row))
            offset += n
    return units
