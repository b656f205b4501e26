"""Parquet tables on local disk or S3, written as atomic, never-overwritten shards.

Every URI is a local path or ``s3://bucket/prefix``. S3 goes through pyarrow's native S3 filesystem
(much faster than fsspec for Parquet) configured from the standard AWS environment, including
``AWS_ENDPOINT_URL`` so MinIO, moto and real S3 all work the same.
"""

from __future__ import annotations

import os
import re
import uuid
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import pyarrow.dataset as pads
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from raybackfill.data.schema import ID, SchemaError

SHARD_PATTERN = re.compile(r"^part-(\d{5,})\.parquet$")


class ShardExistsError(FileExistsError):
    """Refusing to overwrite a shard that is already committed."""


class StorageError(OSError):
    """A URI could not be reached or read; the message never carries credentials."""


def is_s3(uri: str) -> bool:
    return uri.startswith("s3://")


def s3_filesystem() -> pafs.S3FileSystem:
    """A native S3 filesystem from the AWS environment (credentials come from the default chain)."""
    endpoint = os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL")
    region = os.environ.get("AWS_REGION") or os.environ.get("AWS_DEFAULT_REGION") or "us-east-1"
    kwargs: dict = {"region": region, "connect_timeout": 5, "request_timeout": 30}
    if endpoint:
        scheme, _, host = endpoint.partition("://")
        kwargs["endpoint_override"] = host.rstrip("/") if host else endpoint
        kwargs["scheme"] = scheme if host else "https"
        # Retry quickly: a dead endpoint should fail in seconds with a clear error, not hang.
        kwargs["retry_strategy"] = pafs.AwsStandardS3RetryStrategy(max_attempts=2)
    return pafs.S3FileSystem(**kwargs)


def resolve(uri: str) -> tuple[pafs.FileSystem, str]:
    """The filesystem and the path inside it for a local path or s3:// URI."""
    if is_s3(uri):
        return s3_filesystem(), uri[len("s3://") :].rstrip("/")
    return pafs.LocalFileSystem(), os.path.abspath(os.path.expanduser(uri))


def join(uri: str, *parts: str) -> str:
    return "/".join([uri.rstrip("/"), *parts]) if is_s3(uri) else os.path.join(uri, *parts)


def _scrub(err: Exception) -> str:
    """The error's text with any AWS credential from the environment masked."""
    text = str(err)
    for var in ("AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "AWS_ACCESS_KEY_ID"):
        secret = os.environ.get(var)
        if secret:
            text = text.replace(secret, "***")
    return text


def _describe(uri: str, err: Exception) -> str:
    return f"{uri}: {_scrub(err)}"


def exists(uri: str) -> bool:
    fs, path = resolve(uri)
    try:
        return fs.get_file_info(path).type != pafs.FileType.NotFound
    except OSError as err:
        raise StorageError(_describe(uri, err)) from err


def shard_name(index: int) -> str:
    return f"part-{index:05d}.parquet"


def list_shards(uri: str) -> list[str]:
    """Committed shard URIs under a table directory, in path order; a single file is its own shard.

    Shards in subdirectories belong to the table too (the backfill writes ``OUT/new/tier-00003/...``), except
    under names starting with ``_`` or ``.``: a table's own quarantine (``_quarantine``) and uncommitted
    temporary files (``.tmp-...``) are not its rows.
    """
    fs, path = resolve(uri)
    try:
        info = fs.get_file_info(path)
        if info.type == pafs.FileType.File:
            return [uri]
        if info.type == pafs.FileType.NotFound:
            raise StorageError(f"{uri}: no such table (path not found)")
        infos = fs.get_file_info(pafs.FileSelector(path, recursive=True))
    except StorageError:
        raise
    except OSError as err:
        raise StorageError(_describe(uri, err)) from err
    root = path.rstrip("/") + "/"
    names = []
    for i in infos:
        relative = i.path[len(root) :] if i.path.startswith(root) else i.base_name
        if i.type != pafs.FileType.File or not relative.endswith(".parquet"):
            continue
        if any(part.startswith(("_", ".")) for part in relative.split("/")):
            continue
        names.append(relative)
    return [join(uri, n) for n in sorted(names)]


def table_shards(uri: str) -> list[str]:
    """``list_shards`` of a table that must hold data: a table without shards is an error naming it."""
    shards = list_shards(uri)
    if not shards:
        raise StorageError(f"{uri}: table has no parquet shards")
    return shards


def read_footer(uri: str) -> pq.FileMetaData:
    """One shard's Parquet footer (rows, schema, sizes), no data read; an empty or truncated file
    (ArrowInvalid) or an unreachable one is a StorageError naming the shard."""
    fs, path = resolve(uri)
    try:
        return pq.read_metadata(path, filesystem=fs)
    except (OSError, pa.ArrowInvalid) as err:
        raise StorageError(f"{uri}: cannot read parquet footer ({_scrub(err)})") from err


@dataclass(frozen=True)
class TableFiles:
    """A table resolved once: its committed shards and each shard's Parquet footer (schema, row count).

    Why: a backfill reads the same gallery and old-embedding tables in several steps (input checks, ids, plan,
    instant phase, re-embedding). Resolving each table once lists its shards and reads their footers once (a
    request per file on S3), instead of once per step; every step then sees the same files.
    """

    uri: str
    shards: tuple[str, ...]
    footers: tuple[pq.FileMetaData, ...]

    @property
    def schema(self) -> pa.Schema:
        """The first shard's schema (``shard_schemas`` has every shard's)."""
        return self.footers[0].schema.to_arrow_schema()

    def shard_schemas(self) -> list[tuple[str, pa.Schema]]:
        """(shard URI, schema) of every shard."""
        pairs = zip(self.shards, self.footers, strict=True)
        return [(shard, footer.schema.to_arrow_schema()) for shard, footer in pairs]

    @property
    def num_rows(self) -> int:
        return sum(footer.num_rows for footer in self.footers)

    def read(self, columns: list[str] | None = None) -> pa.Table:
        """Every shard of the table in memory (``columns`` only)."""
        return _read_shards(self.shards, columns)


def open_table(table: str | TableFiles) -> TableFiles:
    """The table at a URI with its shards listed and footers read (a table without shards is an error naming
    it); a :class:`TableFiles` is returned as it is."""
    if isinstance(table, TableFiles):
        return table
    shards = table_shards(table)
    return TableFiles(table, tuple(shards), tuple(read_footer(shard) for shard in shards))


def read_table(uri: str, columns: list[str] | None = None) -> pa.Table:
    """Read every committed shard of a table (or one file) into memory."""
    return _read_shards(table_shards(uri), columns)


def _read_shards(shards: Sequence[str], columns: list[str] | None) -> pa.Table:
    tables = [read_shard(u, columns) for u in shards]
    return pa.concat_tables(tables, promote_options="default") if len(tables) > 1 else tables[0]


def read_row_group(uri: str, row_group: int, columns: list[str] | None = None) -> pa.Table:
    """One row group of a Parquet file (``columns`` only); errors name the file and the group."""
    fs, path = resolve(uri)
    try:
        with fs.open_input_file(path) as f:
            return pq.ParquetFile(f).read_row_group(row_group, columns=columns)
    except (OSError, pa.ArrowInvalid) as err:
        raise StorageError(f"{uri}: cannot read row group {row_group} ({err})") from err


def read_shard(uri: str, columns: list[str] | None = None) -> pa.Table:
    fs, path = resolve(uri)
    try:
        if columns is not None:
            names = pq.read_schema(path, filesystem=fs).names
            missing = [c for c in columns if c not in names]
            if missing:
                raise SchemaError(f"{uri}: missing column '{missing[0]}' (columns: {', '.join(names)})")
        return pq.read_table(path, filesystem=fs, columns=columns)
    except pa.ArrowInvalid as err:
        raise StorageError(f"{uri}: not a readable parquet file ({err})") from err
    except OSError as err:
        raise StorageError(_describe(uri, err)) from err


def committed_files(uri: str, *, recursive: bool = True) -> list[pafs.FileInfo]:
    """Committed Parquet files under ``uri``, oldest first; none if the directory is absent. Written by
    jobs that resume (the backfill's batches, embed's shards), which list what an earlier run finished."""
    fs, path = resolve(uri)
    try:
        if fs.get_file_info(path).type == pafs.FileType.NotFound:
            return []
        infos = fs.get_file_info(pafs.FileSelector(path, recursive=recursive))
    except OSError as err:
        raise StorageError(f"{uri}: cannot list ({_scrub(err)})") from err
    files = [i for i in infos if i.type == pafs.FileType.File and i.base_name.endswith(".parquet")]
    # Hidden names are uncommitted temporary files of a write that was interrupted.
    files = [i for i in files if not i.base_name.startswith(".")]
    return sorted(files, key=lambda i: (i.mtime_ns or 0, i.path))


def read_committed(uri: str, columns: list[str], *, recursive: bool = True) -> pa.Table:
    """``columns`` of every committed file under ``uri`` (an empty table, id int64 and strings, if none)."""
    infos = committed_files(uri, recursive=recursive)
    if not infos:
        return pa.table({c: pa.array([], type=pa.int64() if c == ID else pa.string()) for c in columns})
    fs, _ = resolve(uri)
    try:
        return pads.dataset([i.path for i in infos], filesystem=fs, format="parquet").to_table(columns=columns)
    except (OSError, pa.ArrowInvalid) as err:
        raise StorageError(f"{uri}: cannot read {', '.join(columns)} ({_scrub(err)})") from err


def committed_ids(uri: str, *, recursive: bool = True) -> np.ndarray:
    """Ids of every committed file under ``uri`` (id column only: cheap); none if it is absent.
    ``recursive=False`` for a table whose directory also holds other tables (e.g. its ``_quarantine``)."""
    return read_committed(uri, [ID], recursive=recursive).column(ID).to_numpy()


def dictionary_columns(table: pa.Table) -> list[str]:
    """Columns worth Parquet dictionary encoding: strings (model tags, class names repeat). Vectors and image
    bytes are all distinct: trying a dictionary on them makes writing an embedding batch several times slower,
    for a larger file."""
    return [f.name for f in table.schema if pa.types.is_string(f.type) or pa.types.is_large_string(f.type)]


def write_shard(table: pa.Table, uri: str, name: str, *, if_exists: str = "error") -> str:
    """Write one shard atomically under a table directory and return its URI.

    Local: written to a hidden temporary file, then hard-linked to its final name, which fails if the
    name is taken, so a committed shard is never overwritten. S3: a single PUT (or completed multipart
    upload) is atomic, so the object is written under its final key after checking it is absent.
    ``if_exists="skip"`` makes idempotent re-runs (retries writing the same batch) a no-op.
    """
    if if_exists not in ("error", "skip"):
        raise ValueError(f"if_exists must be 'error' or 'skip', got {if_exists!r}")
    target = join(uri, name)
    fs, path = resolve(target)
    try:
        if fs.get_file_info(path).type != pafs.FileType.NotFound:
            if if_exists == "skip":
                return target
            raise ShardExistsError(f"{target}: shard already exists; refusing to overwrite it")
        parent = path.rsplit("/", 1)[0]
        fs.create_dir(parent, recursive=True)
        if is_s3(target):
            pq.write_table(table, path, filesystem=fs, use_dictionary=dictionary_columns(table))
            return target
        tmp = os.path.join(parent, f".tmp-{uuid.uuid4().hex}-{name}")
        pq.write_table(table, tmp, use_dictionary=dictionary_columns(table))
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        try:
            os.link(tmp, path)
        except FileExistsError as err:
            if if_exists == "skip":
                return target
            raise ShardExistsError(f"{target}: shard already exists; refusing to overwrite it") from err
        finally:
            os.unlink(tmp)
        return target
    except (ShardExistsError, StorageError):
        raise
    except OSError as err:
        raise StorageError(_describe(target, err)) from err


def next_shard_index(uri: str) -> int:
    try:
        shards = list_shards(uri)
    except StorageError:
        return 0
    indexes = [int(m.group(1)) for s in shards if (m := SHARD_PATTERN.match(s.rsplit("/", 1)[-1]))]
    return max(indexes) + 1 if indexes else 0


@dataclass(frozen=True)
class WriteResult:
    uri: str
    shards: list[str]
    rows: int


def write_table(table: pa.Table, uri: str, *, rows_per_shard: int = 100_000, append: bool = False) -> WriteResult:
    """Write a table as ``part-NNNNN.parquet`` shards. A new table must not already have shards."""
    start = next_shard_index(uri)
    if start and not append:
        raise ShardExistsError(f"{uri}: table already has {start} shard(s); pass append=True or use a new URI")
    shards = [write_shard(chunk, uri, shard_name(start + i)) for i, chunk in enumerate(_chunks(table, rows_per_shard))]
    return WriteResult(uri, shards, table.num_rows)


def _chunks(table: pa.Table, rows: int) -> Iterator[pa.Table]:
    if rows <= 0:
        raise ValueError(f"rows_per_shard must be positive, got {rows}")
    if table.num_rows == 0:
        yield table
        return
    for offset in range(0, table.num_rows, rows):
        yield table.slice(offset, rows)


def write_bytes(uri: str, data: bytes | memoryview, *, if_exists: str = "replace") -> None:
    """Write a small file (e.g. model.json) in one atomic step.

    ``if_exists="error"`` never replaces a committed file (local: hard link to the final name, which
    fails if it is taken; S3: checked, then a single atomic PUT).
    """
    if if_exists not in ("replace", "error"):
        raise ValueError(f"if_exists must be 'replace' or 'error', got {if_exists!r}")
    fs, path = resolve(uri)
    try:
        fs.create_dir(path.rsplit("/", 1)[0], recursive=True)
        if is_s3(uri):
            if if_exists == "error" and fs.get_file_info(path).type != pafs.FileType.NotFound:
                raise FileExistsError(f"{uri}: already exists; refusing to overwrite it")
            with fs.open_output_stream(path) as out:
                out.write(data)
            return
        tmp = f"{path}.tmp-{uuid.uuid4().hex}"
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        if if_exists == "replace":
            os.replace(tmp, path)
            return
        try:
            os.link(tmp, path)
        except FileExistsError as err:
            raise FileExistsError(f"{uri}: already exists; refusing to overwrite it") from err
        finally:
            os.unlink(tmp)
    except FileExistsError:
        raise
    except OSError as err:
        raise StorageError(_describe(uri, err)) from err


def read_bytes(uri: str) -> bytes:
    fs, path = resolve(uri)
    try:
        with fs.open_input_stream(path) as f:
            return f.read()
    except FileNotFoundError as err:
        raise StorageError(f"{uri}: no such file") from err
    except OSError as err:
        raise StorageError(_describe(uri, err)) from err
