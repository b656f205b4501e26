"""Ray Data access to image tables: lazy reads with column projection, and a decode step that
quarantines bad rows (with their reason) instead of failing the whole job."""

from __future__ import annotations

import hashlib

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import ray
from ray.data.block import BlockMetadata
from ray.data.datasource import Datasource, ReadTask

from raybackfill.data import io
from raybackfill.data.images import decode_batch, decode_rgb
from raybackfill.data.schema import ID, IMAGE, quarantine_table, validate_image_schema


def image_shards(uri: str, *, require_label: bool = False) -> list[str]:
    """The table's shard URIs, each checked for the image schema (footers only, no data read)."""
    shards = io.table_shards(uri)
    for shard in shards:
        validate_image_schema(io.read_footer(shard).schema.to_arrow_schema(), shard, require_label=require_label)
    return shards


class ShardFiles(Datasource):
    """Known Parquet shards (local or s3://), one read task per file, ``columns`` read and nothing else.

    Why not ``ray.data.read_parquet``: in Ray 2.60 it lists every read through a pool of 32 footer-reading
    actors (5-25 s per dataset on a 2-core machine, more than embedding a few thousand images) and
    bin-packs small files into ~128 MiB read units (20 shards became one block for one busy actor). The
    shards here are already listed by ``io.list_shards``; their footers give the row counts.
    """

    def __init__(self, uris: list[str], columns: list[str] | None = None) -> None:
        super().__init__()
        if not uris:
            raise io.StorageError("no parquet shards to read")
        self.columns = columns
        self.files = []
        for uri in uris:
            fs, path = io.resolve(uri)
            meta = io.read_footer(uri)
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
            ReadTask(lambda fs=fs, path=path: read(fs, path), BlockMetadata(rows, size, None, None), schema=schema)
            for fs, path, rows, size, schema in self.files
        ]


def read_shards(uris: list[str], *, columns: list[str] | None = None, rows_per_block: int | None = None,
                block_per_file: bool = True) -> ray.data.Dataset:
    """A lazy Dataset over Parquet shards; ``rows_per_block`` cuts blocks to at most that many rows (streaming),
    so an actor pool downstream gets one task per block instead of one task for a whole file.

    One block per file at read time (``override_num_blocks``): otherwise Ray Data splits each file's table into
    ~200/len(files) slices to reach its default parallelism, and the re-blocking (not strict) never merges them
    back, so 1M stored embeddings in 16 files went downstream as 208 blocks of ~4.8k rows instead of 123 of 8192
    (the transform pipeline: 68 s vs 48 s). Training passes ``block_per_file=False``: the blocks a training
    epoch is cut from decide which images share a batch, and the published demo figures were measured with
    Ray Data's own split (other blocks moved new/new top-1 by 4 points and BCT's below old/old)."""
    blocks = {"override_num_blocks": len(uris)} if block_per_file else {}
    ds = ray.data.read_datasource(ShardFiles(uris, columns), **blocks)
    return ds.repartition(target_num_rows_per_block=rows_per_block) if rows_per_block else ds


def read_images(uri: str, *, columns: list[str] | None = None, require_label: bool = False,
                rows_per_block: int | None = None, block_per_file: bool = True) -> ray.data.Dataset:
    """A lazy Ray Dataset over an image table (local or s3://), projected to ``columns``."""
    return read_shards(image_shards(uri, require_label=require_label), columns=columns, rows_per_block=rows_per_block,
                       block_per_file=block_per_file)


def decode_images(
    ds: ray.data.Dataset,
    *,
    size: int,
    quarantine_uri: str | None = None,
    batch_size: int = 256,
    num_cpus: float = 1.0,
) -> ray.data.Dataset:
    """Decode the ``image`` column to normalised ``pixels`` (N, 3, size, size) float32.

    Rows whose bytes are corrupt or of the wrong size are dropped from the stream and written to the
    quarantine table (id, reason, stage) when ``quarantine_uri`` is given.
    """
    return ds.map_batches(
        _decode_numpy_batch,
        fn_kwargs={"size": size, "quarantine_uri": quarantine_uri},
        batch_format="numpy",
        batch_size=batch_size,
        num_cpus=num_cpus,
    )


def _decode_numpy_batch(batch: dict[str, np.ndarray], size: int, quarantine_uri: str | None) -> dict:
    decoded = decode_batch(batch[IMAGE], size)
    if not decoded.ok.all():
        bad_ids = batch[ID][~decoded.ok]
        if quarantine_uri is not None:
            write_quarantine(quarantine_uri, bad_ids, decoded.reasons, stage="decode")
    out = {name: values[decoded.ok] for name, values in batch.items() if name != IMAGE}
    out["pixels"] = decoded.pixels
    return out


def write_quarantine(uri: str, ids: np.ndarray, reasons: list[str], *, stage: str) -> str:
    """Write quarantined rows under a name derived from their ids, so a retried batch writes it once."""
    ids = np.asarray(ids, dtype=np.int64)
    digest = hashlib.sha1(np.sort(ids).tobytes() + stage.encode()).hexdigest()[:16]
    return io.write_shard(quarantine_table(ids, reasons, stage), uri, f"{stage}-{digest}.parquet", if_exists="skip")


def quarantined_ids(uri: str, stages: tuple[str, ...]) -> np.ndarray:
    """Ids in the quarantine table at ``uri`` quarantined at any of ``stages`` (none if it is absent)."""
    table = io.read_committed(uri, [ID, "stage"])
    stage = table.column("stage").to_numpy(zero_copy_only=False)
    return table.column(ID).to_numpy()[np.isin(stage, stages)]


def keep_mask(ids: np.ndarray, keep: np.ndarray) -> np.ndarray:
    """Mask of ``ids`` that are in the sorted array ``keep`` (binary search, no per-row Python)."""
    if not len(keep):
        return np.zeros(len(ids), dtype=bool)
    pos = np.minimum(np.searchsorted(keep, ids), len(keep) - 1)
    return keep[pos] == ids


def keep_rows(batch: pa.Table, keep: np.ndarray) -> pa.Table:
    """The rows of ``batch`` whose id is in the sorted array ``keep``: what a resumed job still has to do."""
    return batch.filter(pa.array(keep_mask(batch.column(ID).to_numpy(), keep)))


def keep_only(ds: ray.data.Dataset, keep: np.ndarray) -> ray.data.Dataset:
    """``ds`` without the rows a resumed job already finished: only ids in the sorted array ``keep``."""
    return ds.map_batches(keep_rows, fn_kwargs={"keep": keep}, batch_format="pyarrow", batch_size=None, num_cpus=0.25)


def probe_image_size(uri: str) -> int:
    """The side of the (square) images of a table, read from its first row."""
    first = io.read_shard(io.list_shards(uri)[0], columns=[IMAGE]).column(IMAGE)
    if len(first) == 0:
        raise io.StorageError(f"{uri}: first shard is empty; cannot tell the image size")
    height, width = decode_rgb(first[0].as_py()).shape[:2]
    if height != width:
        raise ValueError(f"{uri}: images must be square, the first is {width}x{height}")
    return height
