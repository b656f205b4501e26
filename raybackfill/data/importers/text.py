"""Text galleries from JSONL, CSV or Parquet files with id/text/label columns."""

from __future__ import annotations

import csv
import json
import logging
import os
import re
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.csv as pacsv
import pyarrow.parquet as pq

from raybackfill.data.importers.common import (
    DatasetImportError,
    ImportResult,
    QuarantineWriter,
    ShardWriter,
    check_limit,
    progress_bar,
)
from raybackfill.data.schema import text_table

logger = logging.getLogger(__name__)

TEXT_FORMATS = {".jsonl": "jsonl", ".ndjson": "jsonl", ".csv": "csv", ".parquet": "parquet", ".pq": "parquet"}

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
    count = check_limit(limit, np.iinfo(np.int64).max)
    writer = ShardWriter(out_uri, rows_per_shard, None)  # refuses a non-empty target before any reading
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
    quarantine = QuarantineWriter(out_uri)
    columns = [c for c in (None if assign_ids else id_column, text_column, label_column) if c is not None]
    next_id = 0
    with progress_bar(None, f"import {fmt}", progress, total=scan.rows, unit="row") as bar:
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
