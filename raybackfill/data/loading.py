"""Ray Data access to gallery tables (images or texts): lazy reads with column projection, and a prepare step
(an encoder's declared preprocessing) that quarantines bad rows with their reason instead of failing the job."""

from __future__ import annotations

import functools
import hashlib
from collections.abc import Iterable

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import ray
from ray.data.block import BlockMetadata
from ray.data.datasource import Datasource, ReadTask

from raybackfill.data import storage
from raybackfill.data.preprocessing import ImagePreprocessing, Preprocessing, decode_image
from raybackfill.data.schema import ID, IMAGE, gallery_column, quarantine_table, validate_gallery_schema
from raybackfill.data.storage import TableFiles
from raybackfill.types import Stage, locate_sorted


def gallery_shards(table: str | TableFiles, *, require_label: bool = False, column: str | None = None) -> list[str]:
    """The table's shard URIs, each checked for the gallery schema (footers only, no data read).

    ``column`` is the content column (``image`` or ``text``); None takes the first shard's."""
    table = storage.open_table(table)
    column = column or gallery_content(table)
    for shard, schema in table.shard_schemas():
        validate_gallery_schema(schema, shard, require_label, column)
    return list(table.shards)


def gallery_content(table: str | TableFiles) -> str:
    """``image`` or ``text``: what the gallery table holds (first shard's footer)."""
    table = storage.open_table(table)
    return gallery_column(table.schema, table.shards[0])


class ShardFiles(Datasource):
    """Known Parquet shards (local or s3://), one read task per file, ``columns`` read and nothing else.

    Why not ``ray.data.read_parquet``: it lists every read through a pool of footer-reading actors, which on a
    small machine costs more per dataset than embedding a few thousand images, and bin-packs small files into
    ~128 MiB read units, so many small shards become one block for one busy actor. The shards here are already
    listed by ``storage.list_shards``; their footers give the row counts.
    """

    def __init__(self, uris: list[str] | TableFiles, columns: list[str] | None = None) -> None:
        super().__init__()
        if not uris:
            raise storage.StorageError("no parquet shards to read")
        self.columns = columns
        self.files = []
        shards: Iterable[tuple[str, pq.FileMetaData]]
        if isinstance(uris, TableFiles):  # footers already read
            shards = zip(uris.shards, uris.footers, strict=True)
        else:
            shards = ((uri, storage.read_footer(uri)) for uri in uris)
        for uri, meta in shards:
            fs, path = storage.resolve(uri)
            schema = meta.schema.to_arrow_schema()
            if columns is not None:
                schema = pa.schema([schema.field(c) for c in columns])
            size = sum(meta.row_group(i).total_byte_size for i in range(meta.num_row_groups))
            self.files.append((fs, path, meta.num_rows, size, schema))

    def estimate_inmemory_data_size(self) -> int:
        return sum(size for _, _, _, size, _ in self.files)

    def get_read_tasks(self, parallelism: int, per_task_row_limit: int | None = None, data_context=None) -> list:
        def read(fs, path: str) -> list[pa.Table]:
            return [pq.read_table(path, columns=self.columns, filesystem=fs)]

        return [
            ReadTask(functools.partial(read, fs, path), BlockMetadata(rows, size, None, None), schema=schema)
            for fs, path, rows, size, schema in self.files
        ]


def read_shards(
    uris: list[str] | TableFiles,
    *,
    columns: list[str] | None = None,
    rows_per_block: int | None = None,
    block_per_file: bool = True,
) -> ray.data.Dataset:
    """A lazy Dataset over Parquet shards; ``rows_per_block`` cuts blocks to at most that many rows (streaming),
    so an actor pool downstream gets one task per block instead of one task for a whole file.

    One block per file at read time (``override_num_blocks``): otherwise Ray Data splits each file's table into
    ~200/len(files) slices to reach its default parallelism, and the re-blocking (not strict) never merges them
    back, so downstream actors get many small blocks instead of full batches and the pipeline slows down.
    Training passes ``block_per_file=False`` and keeps Ray Data's own split: the blocks an epoch is cut from
    decide which images share a batch, so another split trains other models (and changes every figure derived
    from them)."""
    n_files = len(uris.shards) if isinstance(uris, TableFiles) else len(uris)
    blocks = {"override_num_blocks": n_files} if block_per_file else {}
    ds = ray.data.read_datasource(ShardFiles(uris, columns), **blocks)
    return ds.repartition(target_num_rows_per_block=rows_per_block) if rows_per_block else ds


def read_gallery(
    table: str | TableFiles,
    *,
    columns: list[str] | None = None,
    require_label: bool = False,
    rows_per_block: int | None = None,
    block_per_file: bool = True,
) -> ray.data.Dataset:
    """A lazy Ray Dataset over a gallery table (images or texts, local or s3://), projected to ``columns``."""
    table = storage.open_table(table)
    gallery_shards(table, require_label=require_label)
    return read_shards(table, columns=columns, rows_per_block=rows_per_block, block_per_file=block_per_file)


def prepare_rows(
    ds: ray.data.Dataset,
    preprocessing: dict[str, Preprocessing],
    *,
    quarantine_uri: str | None = None,
    batch_size: int = 256,
    num_cpus: float = 1.0,
) -> ray.data.Dataset:
    """Prepare the gallery content (``image`` or ``text``) for encoders: one output column per entry of
    ``preprocessing`` (e.g. ``{"pixels": ImagePreprocessing(crop=32)}``), the content column dropped.

    Rows that no preprocessing can prepare (undecodable bytes, empty texts) are dropped from the stream and
    written to the quarantine table (id, reason, stage "decode") when ``quarantine_uri`` is given.
    """
    modalities = {p.modality for p in preprocessing.values()}
    if len(modalities) != 1:
        raise ValueError(f"one pass prepares one content column, got {sorted(m.value for m in modalities)}")
    return ds.map_batches(
        _prepare_numpy_batch,  # type: ignore[arg-type]  # ray's UDF type omits fn_kwargs
        fn_kwargs={"preprocessing": preprocessing, "quarantine_uri": quarantine_uri},
        batch_format="numpy",
        batch_size=batch_size,
        num_cpus=num_cpus,
    )


def _prepare_numpy_batch(
    batch: dict[str, np.ndarray], preprocessing: dict[str, Preprocessing], quarantine_uri: str | None
) -> dict:
    content = next(iter(preprocessing.values())).modality.column
    prepared, reasons = prepare_values(batch[content], preprocessing)
    ok = reasons == ""
    if not ok.all() and quarantine_uri is not None:
        write_quarantine(quarantine_uri, batch[ID][~ok], [str(r) for r in reasons[~ok]], stage=Stage.DECODE)
    out = {name: values[ok] for name, values in batch.items() if name != content}
    return out | {column: values[ok] for column, values in prepared.items()}


def prepare_values(
    values: np.ndarray | list, preprocessing: dict[str, Preprocessing]
) -> tuple[dict[str, np.ndarray], np.ndarray]:
    """Prepare ``values`` with each preprocessing: one full-length array per output column (rows that failed
    hold zeros, or empty strings) and the reason of each row ("" when every preprocessing prepared it)."""
    reasons = np.full(len(values), "", dtype=object)
    out: dict[str, np.ndarray] = {}
    for column, p in preprocessing.items():
        prepared = p.prepare(values)
        failed = np.flatnonzero(~prepared.ok)
        first = failed[reasons[failed] == ""]  # keep the first preprocessing's reason for a row
        reasons[first] = np.asarray(prepared.reasons, dtype=object)[np.isin(failed, first)]
        if prepared.ok.all():
            out[column] = prepared.values
            continue
        shape = (len(values), *prepared.values.shape[1:])
        full = (
            np.full(shape, "", dtype=object)
            if prepared.values.dtype == object
            else np.zeros(shape, dtype=prepared.values.dtype)
        )
        full[prepared.ok] = prepared.values
        out[column] = full
    return out, reasons


def write_quarantine(uri: str, ids: np.ndarray, reasons: list[str], *, stage: Stage) -> str:
    """Write quarantined rows under a name derived from their ids, so a retried batch writes it once."""
    ids = np.asarray(ids, dtype=np.int64)
    digest = hashlib.sha1(np.sort(ids).tobytes() + stage.encode()).hexdigest()[:16]
    table = quarantine_table(ids, reasons, stage)
    return storage.write_shard(table, uri, f"{stage}-{digest}.parquet", if_exists="skip")


def quarantined_ids(uri: str, stages: tuple[Stage, ...]) -> np.ndarray:
    """Ids in the quarantine table at ``uri`` quarantined at any of ``stages`` (none if it is absent)."""
    table = storage.read_committed(uri, [ID, "stage"])
    stage = table.column("stage").to_numpy(zero_copy_only=False)
    return table.column(ID).to_numpy()[np.isin(stage, stages)]


def keep_rows(batch: pa.Table, keep: np.ndarray) -> pa.Table:
    """The rows of ``batch`` whose id is in the sorted array ``keep``: what a resumed job still has to do."""
    return batch.filter(pa.array(locate_sorted(keep, batch.column(ID).to_numpy(), missing="mask") >= 0))


def keep_only(ds: ray.data.Dataset, keep: np.ndarray) -> ray.data.Dataset:
    """``ds`` without the rows a resumed job already finished: only ids in the sorted array ``keep``."""
    return ds.map_batches(keep_rows, fn_kwargs={"keep": keep}, batch_format="pyarrow", batch_size=None, num_cpus=0.25)  # type: ignore[arg-type]  # ray's UDF type omits fn_kwargs


def probe_image_size(table: str | TableFiles) -> int:
    """The shorter side of the first image of a table: the size a model that recorded none is given."""
    table = storage.open_table(table)
    first = storage.read_shard(table.shards[0], columns=[IMAGE]).column(IMAGE)
    if len(first) == 0:
        raise storage.StorageError(f"{table.uri}: first shard is empty; cannot tell the image size")
    return min(decode_image(first[0].as_py()).size)


def resolve_preprocessing(preprocessing: Preprocessing, gallery: str | TableFiles) -> Preprocessing:
    """``preprocessing`` with an image size left open filled in from the gallery's first image."""
    if isinstance(preprocessing, ImagePreprocessing) and preprocessing.crop is None:
        return preprocessing.resolved(probe_image_size(gallery))
    return preprocessing
