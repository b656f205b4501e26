"""What every importer shares: errors, results, the quarantine and the shard writer."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

import numpy as np
import pyarrow as pa
from tqdm import tqdm

from raybackfill.data.info import with_class_names
from raybackfill.data.schema import image_table
from raybackfill.data.storage import ShardExistsError, WriteResult, join, next_shard_index, write_table
from raybackfill.types import Stage

QUARANTINE_DIR = "_quarantine"  # OUT/_quarantine: the rows an import left out, with their reasons


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


class ShardWriter:
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


class QuarantineWriter:
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


def write_rows(
    rows: Iterable[tuple[int, bytes, int, dict]], out_uri: str, rows_per_shard: int, names: list[str] | None
) -> ImportResult:
    """Write (id, image, label, extra columns) rows as shards of ``rows_per_shard``, streaming."""
    writer = ShardWriter(out_uri, rows_per_shard, names)
    batch: list[tuple[int, bytes, int, dict]] = []
    for row in rows:
        batch.append(row)
        if len(batch) == rows_per_shard:
            writer.add(image_rows(batch))
            batch = []
    writer.add(image_rows(batch))
    return writer.close(image_rows([]), quarantined=0)


def image_rows(batch: list[tuple[int, bytes, int, dict]]) -> pa.Table:
    extra = {key: [r[3][key] for r in batch] for key in (batch[0][3] if batch else {})}
    return image_table([r[0] for r in batch], [r[1] for r in batch], [r[2] for r in batch], extra=extra)


def check_limit(limit: int | None, available: int) -> int:
    """How many rows to import: all of them, or the first ``limit``."""
    if limit is None:
        return available
    if limit < 0:
        raise ValueError(f"limit must be non-negative, got {limit}")
    return min(limit, available)


def progress_bar(items, desc: str, enabled: bool, total: int | None = None, unit: str = "img"):
    """A progress bar on stderr that appears only if the work lasts more than a second."""
    return tqdm(items, desc=desc, unit=unit, total=total, delay=1.0, disable=not enabled)
