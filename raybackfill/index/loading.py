"""Streaming, parallel loads of an old-embedding table into the serving index, and bounded training samples.

Why not read the table in one process: at 100M items x d=128 the vectors alone are 51 GB. Here Ray tasks read
the table one Parquet row group each (``id``, ``embedding`` and ``model`` columns only), split every batch of at
most ``LoadConfig.batch_rows`` rows by owning shard (raybackfill.index.sharding) and send each piece straight to
its shard actor; at most ``LoadConfig.in_flight`` row groups are read at once, so the memory in use is bounded by
``in_flight`` row groups wherever the tasks run, and no process ever holds the whole gallery. The driver holds
the id column (8 bytes per item) once, to find duplicate ids before anything is loaded.

Bad rows. A file whose ``embedding`` column has another dim than the first file's, or no integer ``id``, is
refused by name before anything is loaded. Rows whose vector is null, has NaN/inf, or (metric cosine) is zero,
and every occurrence of an id after its first (files in order, rows in order), are quarantined with their reason
at stage ``load`` when ``LoadConfig.quarantine_uri`` is set; without it the load refuses them with an error that
names the file and the ids (rows of other row groups may already be loaded: stop the index and serve again).

Training. An index kind that needs training (``IndexConfig.needs_training``) gets its old space trained first, on
a bounded uniform sample of the table (:func:`sample_rows`: random row groups, rows drawn uniformly among them),
never on the whole table.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import ray

from raybackfill import NAMESPACE
from raybackfill.data import storage
from raybackfill.data.loading import write_quarantine
from raybackfill.data.schema import (
    EMBEDDING,
    GENERATION,
    ID,
    LINEAGE,
    MODEL,
    SchemaError,
    embedding_dim,
    vectors_of,
)
from raybackfill.data.storage import TableFiles
from raybackfill.index.router import get
from raybackfill.index.shard import IndexConfig
from raybackfill.index.sharding import split_by_shard
from raybackfill.index.validate import show_ids
from raybackfill.types import Metric, Space, Stage

logger = logging.getLogger(__name__)

DEFAULT_TRAIN_SAMPLE = 100_000  # vectors a space is trained on (IVF wants >= 39 per list; PQ256 wants >= 256x256)
# A sample draws its rows among randomly chosen row groups holding this many times the rows it needs: enough
# groups that a table sorted by class or upload time is still sampled across its range.
SAMPLE_SPREAD = 4


@dataclass(frozen=True)
class LoadConfig:
    """How a table is loaded. The defaults fit a laptop: 4 row groups in flight, batches of 64k rows."""

    batch_rows: int = 65_536  # rows per call to a shard (split by shard first)
    in_flight: int = 4  # row groups read at once (each by one task)
    task_cpus: float = 0.25
    train_sample: int = DEFAULT_TRAIN_SAMPLE
    seed: int = 0
    quarantine_uri: str | None = None  # where bad rows go; None: refuse them

    def __post_init__(self) -> None:
        for name in ("batch_rows", "in_flight", "train_sample"):
            if getattr(self, name) <= 0:
                raise ValueError(f"{name} must be positive, got {getattr(self, name)}")
        if self.task_cpus < 0:
            raise ValueError(f"task_cpus must be non-negative, got {self.task_cpus}")


@dataclass(frozen=True)
class LoadSummary:
    """What a load did: items loaded, rows quarantined, the version and dim of the old space, the row groups
    read, and how many vectors the old space was trained on (0: its kind needs no training)."""

    items: int
    quarantined: int
    version: str
    dim: int
    row_groups: int
    trained_on: int
    seconds: float


def index_config_of(health: dict) -> IndexConfig:
    """The :class:`IndexConfig` of a running index, from its router's ``health()``."""
    return IndexConfig(**health["config"]["index"])


# --------------------------------------------------------------------- table checks
def table_dim(table: TableFiles) -> int:
    """The dim of the ``embedding`` column, the same in every file (footers only); refuses a file by name."""
    dims = {}
    for shard, schema in table.shard_schemas():
        if ID not in schema.names or not pa.types.is_integer(schema.field(ID).type):
            raise SchemaError(f"{shard}: needs an integer column 'id' (columns: {', '.join(schema.names)})")
        dims[shard] = embedding_dim(schema, EMBEDDING, shard)
    first = table.shards[0]
    for shard, dim in dims.items():
        if dim != dims[first]:
            raise SchemaError(f"{shard}: column 'embedding' has dim {dim}, but {first} has dim {dims[first]}")
    return dims[first]


def version_column(table: TableFiles) -> str:
    """The column naming the space's model version: ``generation`` in an export (whose ``model`` column says
    which encoder embedded each item before any transformation), else ``model``."""
    names = table.footers[0].schema.to_arrow_schema().names if table.footers else []
    return GENERATION if GENERATION in names else MODEL


def has_lineage(table: TableFiles) -> bool:
    """Whether the table records each vector's lineage (an export does)."""
    return bool(table.footers) and LINEAGE in table.footers[0].schema.to_arrow_schema().names


def table_version(table: TableFiles) -> str:
    """The model version in the version column (``generation``, else ``model``) of the table's first non-empty
    row group (the load checks every other row against it)."""
    column = version_column(table)
    for uri, footer in zip(table.shards, table.footers, strict=True):
        if column not in footer.schema.to_arrow_schema().names:
            raise SchemaError(f"{uri}: no {column!r} column; pass --version (the old model's version tag)")
        for group in range(footer.num_row_groups):
            if footer.row_group(group).num_rows:
                versions = storage.read_row_group(uri, group, [column]).column(column).unique().to_pylist()
                if len(versions) != 1 or not versions[0]:
                    raise SchemaError(
                        f"{uri}: column {column!r} holds {len(versions)} versions ({versions[:5]}); an old space "
                        f"holds one model; pass --version to choose"
                    )
                return str(versions[0])
    raise SchemaError(f"{table.uri}: table has no rows")


# --------------------------------------------------------------------- sampling
def sample_rows(table: str | TableFiles, n: int, columns: list[str], *, seed: int = 0) -> pa.Table:
    """A uniform random sample of at most ``n`` rows of a table (``columns`` only), reading only some row groups.

    Row groups are drawn at random until they hold ``SAMPLE_SPREAD * n`` rows (or all of them), then ``n`` rows
    are drawn uniformly among those groups' rows; the groups are read one at a time, so memory holds one row
    group and the sample. Deterministic for a seed.

    Args:
        table: the table (local or s3://).
        n: rows wanted; the whole table when it is smaller.
        columns: columns to read.
        seed: the random seed.

    Returns:
        The sampled rows, in table order.

    Example:
        >>> sample = sample_rows("emb/gallery_v1", 100_000, ["id", "embedding"])  # doctest: +SKIP
    """
    table = storage.open_table(table)
    groups = [
        (uri, g, footer.row_group(g).num_rows)
        for uri, footer in zip(table.shards, table.footers, strict=True)
        for g in range(footer.num_row_groups)
        if footer.row_group(g).num_rows
    ]
    rng = np.random.default_rng(seed)
    chosen, rows = [], 0
    for i in rng.permutation(len(groups)):
        if rows >= SAMPLE_SPREAD * n:
            break
        chosen.append(int(i))
        rows += groups[i][2]
    chosen.sort()  # table order
    picks = np.sort(rng.choice(rows, size=min(n, rows), replace=False)) if rows else np.zeros(0, np.int64)
    parts, offset = [], 0
    for i in chosen:
        uri, group, size = groups[i]
        mine = picks[(picks >= offset) & (picks < offset + size)] - offset
        if len(mine):
            parts.append(storage.read_row_group(uri, group, columns).take(pa.array(mine)))
        offset += size
    if not parts:
        schema = table.schema
        return pa.table({c: pa.array([], type=schema.field(c).type) for c in columns})
    return pa.concat_tables(parts)


def usable_vectors(sample: pa.Table, metric: Metric) -> np.ndarray:
    """The sample's vectors without null, non-finite and (cosine) zero rows: what training may see."""
    sample = sample.filter(sample.column(EMBEDDING).is_valid())
    vectors = vectors_of(sample)
    good = np.asarray(np.isfinite(vectors).all(axis=1), dtype=bool)
    if metric is Metric.COSINE:
        good &= np.linalg.norm(np.where(good[:, None], vectors, 0), axis=1) > 0
    return vectors[good]


def train_space(router, space: Space, table: TableFiles, version: str, config: LoadConfig) -> int:
    """Train ``space`` of a running index on a bounded sample of ``table`` (old embeddings); returns its size."""
    health = get(router.health.remote())
    sample = sample_rows(table, config.train_sample, [ID, EMBEDDING], seed=config.seed)
    vectors = usable_vectors(sample, index_config_of(health).metric)
    if not len(vectors):
        raise SchemaError(f"{table.uri}: no usable vector in a sample of {sample.num_rows} rows to train on")
    get(router.train.remote(space, vectors, version))
    return len(vectors)


# --------------------------------------------------------------------- the load
@ray.remote
def _file_ids(uri: str) -> np.ndarray:
    """The id column of one file (nothing else is read)."""
    return storage.read_shard(uri, [ID]).column(ID).to_numpy().astype(np.int64)


def duplicate_rows(table: TableFiles, in_flight: int) -> dict[str, np.ndarray]:
    """Per file, the rows (within the file) whose id already occurred earlier in the table (files in order)."""
    refs: dict[ray.ObjectRef, str] = {}
    ids: dict[str, np.ndarray] = {}
    for uri in table.shards:
        if len(refs) >= in_flight:
            ready, _ = ray.wait(list(refs), num_returns=1)
            for ref in ready:
                ids[refs.pop(ref)] = ray.get(ref)
        refs[_file_ids.options(num_cpus=0.25).remote(uri)] = uri
    for ref, uri in refs.items():
        ids[uri] = ray.get(ref)
    every = np.concatenate([ids[u] for u in table.shards]) if table.shards else np.zeros(0, np.int64)
    _, first = np.unique(every, return_index=True)
    repeated = np.ones(len(every), dtype=bool)
    repeated[first] = False
    out, offset = {}, 0
    for uri in table.shards:
        n = len(ids[uri])
        rows = np.flatnonzero(repeated[offset : offset + n])
        if len(rows):
            out[uri] = rows
        offset += n
    return out


@dataclass(frozen=True)
class _GroupJob:
    uri: str
    group: int
    first_row: int  # row of the group's first row within its file
    repeated: np.ndarray  # rows (within the group) holding an id seen earlier in the table
    version: str
    check_column: str | None  # the version came from this column of the table: every row's must match it
    lineage: bool  # the table records each vector's lineage (an export)
    dim: int
    metric: Metric
    shard_names: list[str]
    batch_rows: int
    quarantine_uri: str | None


@ray.remote
def _load_group(job: _GroupJob) -> tuple[int, int]:
    """Read one row group, quarantine (or refuse) its bad rows, send the rest to their shards in bounded batches.
    Returns (rows loaded, rows quarantined)."""
    columns = [ID, EMBEDDING] + ([job.check_column] if job.check_column else []) + ([LINEAGE] if job.lineage else [])
    table = storage.read_row_group(job.uri, job.group, columns)
    where = f"{job.uri} (row group {job.group})"
    if job.check_column:
        versions = set(table.column(job.check_column).unique().to_pylist())
        if versions != {job.version}:
            raise SchemaError(
                f"{where}: column {job.check_column!r} holds {sorted(map(str, versions))[:5]}, not only "
                f"{job.version!r}; an old space holds one model (pass --version to choose)"
            )
    ids = table.column(ID).to_numpy().astype(np.int64)
    reasons = np.full(len(ids), "", dtype=object)
    reasons[job.repeated] = "duplicate id: an earlier row of the table has it (that row is loaded)"
    valid = np.asarray(table.column(EMBEDDING).is_valid().to_numpy(zero_copy_only=False), dtype=bool)
    reasons[~valid & (reasons == "")] = "null embedding"
    vectors = np.zeros((len(ids), job.dim), dtype=np.float32)
    vectors[valid] = vectors_of(table.filter(pa.array(valid)))
    finite = np.asarray(np.isfinite(vectors).all(axis=1), dtype=bool)
    reasons[~finite & (reasons == "")] = "non-finite embedding (NaN or inf)"
    if job.metric is Metric.COSINE:
        zero = finite & (np.linalg.norm(np.where(finite[:, None], vectors, 0), axis=1) == 0)
        reasons[zero & valid & (reasons == "")] = "zero embedding: no direction for the cosine metric"
    bad = reasons != ""
    if bad.any():
        if job.quarantine_uri is None:
            first = str(reasons[bad][0])
            raise SchemaError(
                f"{where}: {int(bad.sum())} bad rows (ids {show_ids(ids[bad])}; first: {first}); pass a quarantine "
                f"URI to load the other rows and set these aside"
            )
        write_quarantine(job.quarantine_uri, ids[bad], [str(r) for r in reasons[bad]], stage=Stage.LOAD)
    ids, vectors = ids[~bad], vectors[~bad]
    lineages = np.asarray(table.column(LINEAGE).to_pylist(), dtype=object)[~bad] if job.lineage else None
    shards = [ray.get_actor(name, namespace=NAMESPACE) for name in job.shard_names]
    for start in range(0, len(ids), job.batch_rows):
        batch_ids, batch = ids[start : start + job.batch_rows], vectors[start : start + job.batch_rows]
        batch_lineage = None if lineages is None else lineages[start : start + job.batch_rows]
        calls = [
            shards[s].load_old.remote(
                batch_ids[rows],
                batch[rows],
                job.version,
                lineage=None if batch_lineage is None else batch_lineage[rows],
            )
            for s, rows in enumerate(split_by_shard(batch_ids, len(shards)))
            if len(rows)
        ]
        get(calls)
    return len(ids), int(bad.sum())


def load_old_table(
    router,
    table: str | TableFiles,
    *,
    version: str | None = None,
    config: LoadConfig | None = None,
    on_progress: Callable[[int], None] | None = None,
) -> LoadSummary:
    """Load an old-embedding table into a running index's old space, streaming and in parallel.

    Args:
        router: the index's router handle (:func:`raybackfill.index.router.create_index`); its shards must not
            hold these ids yet.
        table: Parquet table (local or s3://) with ``id`` and ``embedding`` (and ``model``).
        version: the old model's version tag; None reads it from the ``model`` column (one value for all rows).
        config: batch size, parallelism, training sample and quarantine; see :class:`LoadConfig`.
        on_progress: called with the number of rows of each row group once it is loaded (e.g. a tqdm update).

    Returns:
        A :class:`LoadSummary`.

    Example:
        >>> router = create_index(RouterConfig(shards=4))  # doctest: +SKIP
        >>> config = LoadConfig(quarantine_uri="s3://bucket/q")
        >>> load_old_table(router, "s3://bucket/emb/v1", config=config)  # doctest: +SKIP
    """
    config = config or LoadConfig()
    started = time.monotonic()
    table = storage.open_table(table)
    dim = table_dim(table)
    check_column = version_column(table) if version is None else None
    lineage = has_lineage(table)
    version = version or table_version(table)
    health = get(router.health.remote())
    index = index_config_of(health)
    repeated = duplicate_rows(table, config.in_flight)
    trained = train_space(router, Space.OLD, table, version, config) if index.needs_training else 0
    jobs = []
    for uri, footer in zip(table.shards, table.footers, strict=True):
        first = 0
        dups = repeated.get(uri, np.zeros(0, np.int64))
        for group in range(footer.num_row_groups):
            n = footer.row_group(group).num_rows
            mine = dups[(dups >= first) & (dups < first + n)] - first
            job = _GroupJob(
                uri, group, first, mine, version, check_column, lineage, dim, index.metric,
                list(health["shard_names"]), config.batch_rows, config.quarantine_uri,
            )  # fmt: skip
            jobs.append((job, n))
            first += n
    tally = _Tally(table.num_rows, on_progress)
    pending: dict[ray.ObjectRef, int] = {}
    for job, rows in jobs:
        if len(pending) >= config.in_flight:
            tally.collect(pending)
        pending[_load_group.options(num_cpus=config.task_cpus).remote(job)] = rows
    while pending:
        tally.collect(pending)
    seconds = time.monotonic() - started
    logger.info(
        "loaded %d items (%d quarantined) from %d row groups in %.1fs", tally.loaded, tally.bad, len(jobs), seconds
    )
    return LoadSummary(tally.loaded, tally.bad, version, dim, len(jobs), trained, seconds)


@dataclass
class _Tally:
    """Rows loaded and quarantined so far; progress to the callback per row group, to the log per tenth."""

    total: int
    on_progress: Callable[[int], None] | None
    loaded: int = 0
    bad: int = 0
    logged: int = 0  # tenths of the table logged so far

    def collect(self, pending: dict) -> None:
        """Wait for one row group task and account for it. A task's error stops the load (after the other tasks
        in flight end, so nothing is still writing when the error is reported)."""
        ready, _ = ray.wait(list(pending), num_returns=1)
        rows = pending.pop(ready[0])
        try:
            done, bad = get(ready[0])
        except Exception:
            if pending:
                ray.wait(list(pending), num_returns=len(pending))
            raise
        self.loaded, self.bad = self.loaded + done, self.bad + bad
        if self.on_progress is not None:
            self.on_progress(rows)
        tenths = 10 * (self.loaded + self.bad) // max(self.total, 1)
        if tenths > self.logged:
            self.logged = tenths
            logger.info("loaded %d of %d rows (%d quarantined)", self.loaded + self.bad, self.total, self.bad)
