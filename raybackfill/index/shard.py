"""One shard of the serving index: old-space and new-space FAISS indexes in a Ray actor.

Layout. Every gallery item of the shard has a *slot* (0..n-1, in load order); the FAISS indexes are keyed
by slot and numpy arrays map slot -> item id and slot -> state (old / transformed / new, int8), so a
batch of 10k ids is looked up, moved and labelled with vectorised numpy, never per-row Python.
Three indexes hold disjoint sets of slots:

    pending     old vectors of items still in the old space        (state old)
    backfilled  old vectors of items already moved to the new space (state transformed / new)
    new         new-space vectors (transformed or true new)          (state transformed / new)

Why split the old vectors in two instead of one old index plus an IDSelector excluding backfilled ids:
FAISS 1.15 runs a flat search that has a selector on its non-BLAS path, several times slower than a plain
search of the same size, and over-fetch-and-filter is not exact. With the
split every search is a plain BLAS search, and the work of a merged query stays the gallery size:
`rank_merge` searches pending + new, `compatible` new + pending, `old` pending + backfilled (which is
exactly the pre-upgrade answer, since no old vector is dropped until `promote`). Moving an id is
remove-from-pending + add-to-backfilled + add-to-new, each O(batch) (raybackfill.index.slots), so an
upsert holds the shard for milliseconds, not for a compaction of the whole index. Old vectors are kept
until `promote`, so `rollback` only moves them back.

Generations. `promote` turns the new space into the serving generation: the "new" index becomes "pending" (the
old space of the next upgrade) and the replaced old-space indexes are kept as the *retired* generation, with
every item's state and lineage at that moment, until `gc` or ``retention_s``; `rollback(undo_promote=True)`
swaps them back. Each item records the lineage of its old-space vector ("v1>v2": a v1 embedding transformed
into v2) as a code into a small table; its new-space lineage follows from its state.

Index kinds. Each space is a FAISS index built from the config's factory string ("Flat", "IVF1024,PQ32",
"HNSW32", ...; raybackfill.index.kinds). A factory that needs training is trained once per space on a sample
(:meth:`IndexRouter.train`: one training shared by every shard) before anything is added; an untrained space
refuses vectors. Each layout removes in O(batch) its own way (raybackfill.index.slots); a graph index (HNSW)
marks removed rows deleted and is rebuilt in a background thread past ``rebuild_deleted_fraction``: the
rebuild reads the live rows under the lock, builds outside it while queries and upserts go on, and swaps in
under the lock after replaying the moves made meanwhile. With ``keep_old=False`` an item's old vector is
dropped once a true new vector replaces it (state new): less memory, but no strategy 'old' and no rollback.

Atomicity. All mutations and searches run under one lock, so a search sees every id exactly once
(in pending, or in new). GPU copies follow their CPU index in place (raybackfill.index.gpu). The actor's
default concurrency group runs one call at a time (search, promote, rollback, ...), and a "write" group runs
upserts and loads one at a time; an upsert encodes its vectors before it takes the lock and applies them (to
an IVF or graph index) in chunks, one short hold of the lock each (about WRITE_HOLD_S), so searches go on
meanwhile and a search may see part of a batch moved (a batch spread over several shards is never applied at
one instant anyway); the counts the light group reads are kept per chunk in O(chunk), not recounted over the
shard; `counts`/`describe` run in a separate "light" group and read only immutable values that mutations
replace in one assignment, so they answer while a long search runs; `snapshot` runs in its own group and
copies code rows in chunks, taking the lock per chunk and once more at the end to copy the rows changed
meanwhile (see :meth:`IndexShard.snapshot`), so serving goes on while it copies and uploads.

Restart. A shard created with ``snapshot_uri`` restores its last snapshot in its constructor, so a Ray
restart (max_restarts) comes back with the state of the last snapshot; later upserts are replayed by
the backfill from its ledger (upserts are idempotent).
"""

from __future__ import annotations

import contextlib
import dataclasses
import io
import json
import logging
import threading
import time
from dataclasses import dataclass, field
from typing import Any

import faiss
import numpy as np
import pyarrow as pa
import ray

from raybackfill.index import kinds
from raybackfill.index.gpu import GPU_MAX_K, GpuMirror, gpu_supported
from raybackfill.index.merge import EMPTY_ID, TopK, empty_topk, merge_results
from raybackfill.index.metrics import ShardMetrics
from raybackfill.index.slots import (
    CodesSlots,
    GraphSlots,
    IVFSlots,
    SlotIndex,
    map_large_blocks,
    release_free_memory,
    slot_index,
)
from raybackfill.index.snapshot import SnapshotWriter, read_snapshot
from raybackfill.index.validate import as_batch, as_ids, as_queries, check_k, show_ids, unit_rows
from raybackfill.logs import configure_logging
from raybackfill.priority import check_nice_increment, lower_thread_priority
from raybackfill.types import Layout, Metric, Space, Strategy, locate_sorted, parse

logger = logging.getLogger(__name__)

SERVING = ("pending", "backfilled", "new")
RETIRED = ("retired_pending", "retired_backfilled")  # the generation a promote replaced, kept for rollback
INDEXES = SERVING + RETIRED
SPACE_OF = {"pending": Space.OLD, "backfilled": Space.OLD, "new": Space.NEW}
# A vector's lineage: the model versions it went through, first the encoder that embedded it, then each
# transformation that carried it into the next generation ("v1>v2>v3").
LINEAGE_SEP = ">"
TRAINABLE_SPACES = (Space.OLD, Space.NEW)
UPSERT_STATES = (Space.TRANSFORMED, Space.NEW)
# 3: any factory; a space's trained empty index is saved apart from its contents; code rows and inverted lists
# in chunks. 4: generations (per-item lineage, the retired generation kept for rollback after promote).
SNAPSHOT_FORMAT = 4
SNAPSHOT_CHUNK_ROWS = 65_536  # code rows (or IVF entries) copied per lock hold while a snapshot runs
MOVE_CHUNK_ROWS = 65_536  # vectors decoded at once when a rollback moves every item back (bounds its memory)
WRITE_YIELD_S = 0.05  # the longest a write waits for searches queued on the shard lock to go first
# An upsert applies its batch in chunks sized so that one hold of the lock lasts about WRITE_HOLD_S: the write
# thread runs below the queries' priority, and a search that waits for it must not wait for a whole batch of
# graph insertions or list moves done at that priority on busy cores.
WRITE_HOLD_S = 0.002
APPLY_MIN_ROWS = 64  # the smallest chunk (below it the per-hold overhead is a large part of the hold)
APPLY_FIRST_ROWS = 256  # the first chunk of a shard, before it has measured how fast it applies
COMPACT_MIN_ROWS = 65_536  # vectors that must have left an index before it is copied into exact-size storage
# Config fields that change what a shard stores (a snapshot restores only under the same values); the others
# (search parameters, limits, GPU, rebuild and sync thresholds) only change how it serves.
STORED_FIELDS = ("factory", "metric", "keep_old")
# FAISS 1.15 scans a flat index with BLAS only when n_queries * dim >= distance_compute_blas_threshold
# (default 128000: 1000 queries at d=128); below that it scans query by query, which is much slower per query
# once a batch holds more than a few queries (one or two queries are faster without BLAS). A shard takes the
# BLAS path from this many queries.
BLAS_MIN_QUERIES = 4


@dataclass(frozen=True)
class IndexConfig:
    """How each space is indexed.

    Args:
        factory: a FAISS ``index_factory`` string: "Flat" (exact, default), "IVF1024,Flat", "IVF4096,PQ32",
            "OPQ16,IVF1024,PQ16", "IVF1024,SQ8", "HNSW32", "PQ16", ... Checked here; a kind that needs training
            is trained per space with :meth:`IndexRouter.train` before vectors are added.
        metric: cosine (vectors and queries are L2-normalised by the shard), ip or l2.
        search_params: defaults for every query (``nprobe``/``max_codes`` for IVF, ``efSearch`` for HNSW,
            ``k_factor`` for a refined index); a query may override them. Unset ones: nprobe 16, efSearch 64.
        build_params: how each index of a space is built (``efConstruction`` for HNSW; unset: 80, since a shard
            grows a graph by small additions, see raybackfill.index.kinds). Kept in the trained template, so a
            rebuild and a restored snapshot build alike.
        keep_old: keep an item's old vector after a true new one arrives (state new). False saves the memory
            of the old vectors but refuses strategy 'old' and rollback once any item is new.
        rebuild_deleted_fraction: a graph index (HNSW, ...) is rebuilt in the background once this fraction of
            its rows are deleted (moved to another index).
        gpu_sync_rows / gpu_sync_seconds: a GPU copy is copied again after this many removed rows or when a
            removal is this old (additions go to the copy in place; raybackfill.index.gpu).
        max_k / max_queries: limits per search call.
        use_gpu: search on a GPU copy when faiss has GPU support and the actor got a GPU.
        retention_s: how long a promote keeps the generation it replaced (for ``rollback`` after promote);
            None keeps it until ``gc``. The retired generation holds its vectors in memory meanwhile.
        write_nice_increment: how many nice steps (Linux) the thread that applies upserts and loads runs below the
            process's own priority (capped at nice 19): above 0, the scheduler serves queries on the same cores
            first while a backfill writes. A shard's process starts at ``RouterConfig.serving_nice`` (0 by
            default; capped at 19, so from Ray's default of 15 at most 4 steps count). 0 treats writes and
            queries alike.

    Example:
        >>> IndexConfig(factory="IVF1024,PQ32", search_params={"nprobe": 32}).needs_training
        True
    """

    factory: str = "Flat"
    metric: Metric = Metric.COSINE  # the models' default; vectors and queries are L2-normalised by the shard
    search_params: dict[str, Any] = field(default_factory=dict)
    build_params: dict[str, Any] = field(default_factory=dict)
    keep_old: bool = True
    rebuild_deleted_fraction: float = 0.25
    gpu_sync_rows: int = 50_000
    gpu_sync_seconds: float = 10.0
    max_k: int = 10_000
    max_queries: int = 10_000
    use_gpu: bool = True  # only when faiss has GPU support AND the actor was given a GPU
    retention_s: float | None = None
    write_nice_increment: int = 4

    def __post_init__(self) -> None:
        object.__setattr__(self, "metric", parse(Metric, self.metric))
        kinds.probe(self.factory, self.metric)  # a string FAISS cannot build fails here, naming the factory
        params = kinds.check_params(self.search_params, self.factory, self.metric, "search_params")
        object.__setattr__(self, "search_params", params)
        built = kinds.check_build_params(self.build_params, self.factory, self.metric, "build_params")
        object.__setattr__(self, "build_params", built)
        for name in ("max_k", "max_queries", "gpu_sync_rows"):
            if getattr(self, name) <= 0:
                raise ValueError(f"{name} must be positive, got {getattr(self, name)}")
        if not 0 < self.rebuild_deleted_fraction <= 1:
            raise ValueError(f"rebuild_deleted_fraction must be in (0, 1], got {self.rebuild_deleted_fraction}")
        if self.gpu_sync_seconds < 0:
            raise ValueError(f"gpu_sync_seconds must be non-negative, got {self.gpu_sync_seconds}")
        check_nice_increment(self.write_nice_increment, "write_nice_increment")
        if self.retention_s is not None and self.retention_s < 0:
            raise ValueError(f"retention_s must be non-negative (or None: until gc), got {self.retention_s}")

    @property
    def needs_training(self) -> bool:
        """Whether an empty index of this factory must be trained before vectors are added."""
        return kinds.needs_training(self.factory, self.metric)

    @property
    def layout(self) -> Layout:
        return kinds.layout_of(kinds.probe(self.factory, self.metric))

    def index_build_params(self) -> dict[str, Any]:
        """The build parameters of every index of a space: the defaults that apply, then ``build_params``."""
        return kinds.default_build_params(self.factory, self.metric, self.build_params)

    def query_params(self, overrides: dict[str, Any] | None = None) -> dict[str, Any]:
        """The search parameters of a query: the defaults, then ``overrides`` (validated)."""
        return kinds.default_params(self.factory, self.metric, self.search_params) | kinds.check_params(
            overrides, self.factory, self.metric
        )


@dataclass(frozen=True)
class SpaceInfo:
    """Provenance of a space: the model version tag and dim of every vector in it."""

    version: str
    dim: int


@dataclass(frozen=True)
class ItemVectors:
    """Stored vectors of some items: ``old`` (the serving generation; NaN rows where ``keep_old=False`` dropped
    it), ``new`` (None before the first upsert; zero rows where ``states`` is old). Compressed kinds (PQ, SQ)
    return the decoded approximation. ``old_lineage`` / ``new_lineage`` say which models made each vector
    ("v1>v2": a v1 embedding transformed into v2; None where the item has no such vector)."""

    ids: np.ndarray
    states: np.ndarray
    old: np.ndarray | None
    new: np.ndarray | None
    old_lineage: list[str | None] | None = None
    new_lineage: list[str | None] | None = None


@dataclass
class _Retired:
    """The generation a promote replaced: its space, stores and every item's state and lineage at that moment,
    kept so that ``rollback`` can undo the promote until it is collected (``gc`` or ``retention_s``)."""

    space: SpaceInfo
    template: bytes | None
    pending: SlotIndex | None
    backfilled: SlotIndex | None
    states: np.ndarray
    lineage: np.ndarray
    items: int  # items at the promote: items loaded later have no vector in this generation
    promoted_at: float
    expires_at: float | None

    def describe(self) -> dict:
        return {
            "version": self.space.version,
            "dim": self.space.dim,
            "items": self.items,
            "promoted_at": self.promoted_at,
            "expires_at": self.expires_at,
        }


def _check_version(version) -> str:
    if not isinstance(version, str) or not version:
        raise ValueError(f"version must be a non-empty model version tag, got {version!r}")
    if LINEAGE_SEP in version:
        raise ValueError(f"version {version!r} must not contain {LINEAGE_SEP!r} (it separates a lineage's steps)")
    return version


def check_lineage(lineage: str, version: str) -> str:
    """A lineage string ("v1>v2") whose last step is ``version`` (the space it is served in)."""
    steps = lineage.split(LINEAGE_SEP) if isinstance(lineage, str) else []
    if not steps or not all(steps) or steps[-1] != version:
        raise ValueError(
            f"lineage {lineage!r} must be model versions joined by {LINEAGE_SEP!r}, ending with the space's "
            f"version {version!r}"
        )
    return lineage


def _to_bytes(index: faiss.Index) -> memoryview:
    return faiss.serialize_index(index).data


def _from_bytes(data: bytes | memoryview) -> faiss.Index:
    return faiss.deserialize_index(np.frombuffer(data, dtype=np.uint8))


def train_index(config: IndexConfig, vectors: np.ndarray) -> bytes:
    """An empty index of ``config.factory`` trained on ``vectors`` (validated, normalised for cosine), serialised.

    Raises:
        ValueError: the sample cannot train this factory (too few vectors for nlist or the PQ codebooks, a dim
            the factory does not take), with FAISS's reason.
    """
    vectors = np.asarray(vectors)
    if vectors.ndim != 2 or not len(vectors):
        raise ValueError(f"train: vectors must be a non-empty (n, d) array, got shape {vectors.shape}")
    from raybackfill.index.validate import as_vectors

    vectors = as_vectors(vectors, None, "training vectors")
    if config.metric is Metric.COSINE:
        vectors = unit_rows(vectors, "training vectors")
    index = kinds.build(config.factory, vectors.shape[1], config.metric, config.index_build_params())
    try:
        index.train(vectors)
    except RuntimeError as err:
        reason = str(err).strip().splitlines()[-1]
        raise ValueError(
            f"train: {len(vectors)} vectors cannot train index {config.factory!r}: {reason} "
            f"(FAISS wants about 40 x nlist vectors for IVF and at least 256 x for PQ codebooks)"
        ) from None
    return bytes(_to_bytes(index))


def _rows_of(prepared, rows: np.ndarray | slice):
    """The part of a prepared encoding (codes, or an IVF's (vectors, lists)) for a boolean row mask or a slice."""
    if prepared is None:
        return None
    if isinstance(prepared, tuple):
        return tuple(part[rows] for part in prepared)
    return prepared[rows]


def _threads() -> int:
    """FAISS threads: the actor's CPUs (one outside an actor, e.g. a shard object in a test process)."""
    if not ray.is_initialized():
        return 1
    try:
        cpus = ray.get_runtime_context().get_assigned_resources().get("CPU", 1.0)
    except AssertionError:  # a driver, not a Ray worker
        cpus = 1.0
    return max(1, int(cpus))


class _IndexShard:
    """The shard's logic (the actor :data:`IndexShard` wraps it; see the module docstring)."""

    def __init__(self, config: IndexConfig | None = None, snapshot_uri: str | None = None) -> None:
        configure_logging()
        map_large_blocks()  # the process holds the index: its growing lists must not fragment the heap
        self._config = config or IndexConfig()
        self._config_fields = dataclasses.asdict(self._config)  # frozen: described on every publish, built once
        self._snapshot_uri = snapshot_uri
        self._lock = threading.Lock()
        self._threads = _threads()
        self._gpu = self._gpu_resources()
        self._mirrors: dict[str, GpuMirror] = {}
        self._no_gpu: set[str] = set()  # indexes whose GPU copy failed: searched on the CPU
        self._rebuilds: dict[str, threading.Thread] = {}
        # Python's lock is not fair: a writer that releases and takes it again at once can keep a waiting search
        # out for several batches. Searches count themselves waiting; writes wait (briefly) until none is.
        self._searches = threading.Condition()
        self._searches_waiting = 0
        self._published = 0  # counts _publish calls: an upsert sees whether the shard changed between its holds
        self._apply_rows_per_s: float | None = None  # how fast upserts apply here: sizes their chunks
        # A code-row index (Flat, PQ, SQ) compacts its rows on every removal, O(rows held) per call: split into
        # chunks, a batch would cost that many times over, so it is applied in one hold of the lock.
        self._chunked_writes = self._config.layout is not Layout.CODES
        actor_name = ray.get_runtime_context().get_actor_name() if ray.is_initialized() else None
        self._metrics = ShardMetrics(actor_name or "")
        self._reset()
        if snapshot_uri:
            blobs = read_snapshot(snapshot_uri)
            if blobs is not None:
                self._restore(blobs)
                logger.info(
                    "restored %d items from the snapshot under %s: %s", len(self._ids), snapshot_uri, self._counts
                )

    # ----------------------------------------------------------------- state
    def _reset(self) -> None:
        self._ids = np.zeros(0, dtype=np.int64)  # slot -> item id
        self._state = np.zeros(0, dtype=np.int8)  # slot -> Space.code (old / transformed / new)
        self._by_id = np.zeros(0, dtype=np.int64)  # slots sorted by id, for vectorised lookups
        self._sorted_ids = np.zeros(0, dtype=np.int64)  # = self._ids[self._by_id]
        self._old_space: SpaceInfo | None = None
        self._new_space: SpaceInfo | None = None
        self._templates: dict[Space, bytes] = {}  # space -> its trained empty index, serialised
        self._pending: SlotIndex | None = None
        self._backfilled: SlotIndex | None = None
        self._new: SlotIndex | None = None
        self._lineage = np.zeros(0, dtype=np.int32)  # slot -> code of its old-space vector's lineage
        self._lineages: list[str] = []  # code -> lineage ("v1>v2")
        self._generation = 1  # +1 per promote, -1 per rollback of a promote
        self._retired: _Retired | None = None
        self._publish()

    def _lineage_codes(self, lineages: list[str]) -> np.ndarray:
        """Codes of lineage strings (new ones are added to the table; a gallery has a handful of lineages)."""
        if not lineages:
            return np.zeros(0, dtype=np.int32)
        unique, inverse = np.unique(np.asarray(lineages, dtype=object), return_inverse=True)
        for lineage in unique:
            if lineage not in self._lineages:
                self._lineages.append(str(lineage))
        table = np.asarray([self._lineages.index(str(lineage)) for lineage in unique], dtype=np.int32)
        return table[inverse]

    def _new_lineage(self, slots: np.ndarray) -> np.ndarray:
        """Lineage codes of the new-space vectors of moved slots: a transformed vector continues its old vector's
        lineage, a new one starts with the new model."""
        assert self._new_space is not None  # slots are moved, so the new space exists
        version = self._new_space.version
        codes = np.empty(len(slots), dtype=np.int32)
        new = self._state[slots] == Space.NEW.code
        if new.any():
            codes[new] = self._lineage_codes([version])[0]
        carried = np.flatnonzero(~new)
        old_codes = self._lineage[slots[carried]]
        for code in np.unique(old_codes):
            step = f"{self._lineages[code]}{LINEAGE_SEP}{version}"
            codes[carried[old_codes == code]] = self._lineage_codes([step])[0]
        return codes

    def _expire(self) -> None:
        """Collect the retired generation once its retention is over (checked on each call, under the lock)."""
        retired = self._retired
        if retired is not None and retired.expires_at is not None and time.time() >= retired.expires_at:
            logger.info("retention of generation %s is over: collected", retired.space.version)
            self._collect()

    def _retired_info(self) -> dict | None:
        return self._retired.describe() if self._retired else None

    def _collect(self) -> dict:
        retired, self._retired = self._retired, None
        self._drop_derived(*RETIRED)
        self._publish()
        description = retired.describe() if retired else {}
        del retired  # the last reference to its indexes: their memory goes back to the system below
        release_free_memory()
        return description

    def _publish(self, recount: bool = True) -> None:
        """Replace the immutable views that the light concurrency group reads without the lock. ``recount=False``:
        the caller kept the per-state counts up to date (an upsert, which must not scan every slot per chunk)."""
        self._published += 1  # changes on every change of the shard
        if recount:
            self._per_state = np.bincount(self._state, minlength=len(Space)).astype(np.int64)
        self._counts: dict[str, int] = {space: int(self._per_state[space.code]) for space in Space}
        stores = {name: store for name in INDEXES if (store := self._index(name)) is not None}
        self._description = {
            "counts": self._counts,
            "old_space": dataclasses.asdict(self._old_space) if self._old_space else None,
            "new_space": dataclasses.asdict(self._new_space) if self._new_space else None,
            "trained": sorted(self._templates),
            "generation": self._generation,
            "promoted": self._generation > 1,
            "retired": self._retired_info(),
            "config": self._config_fields,
            "threads": self._threads,
            "gpu": self._gpu is not None,
            "indexes": {
                name: {"stored": store.ntotal, "live": store.size, "layout": store.layout.value}
                for name, store in stores.items()
            },
            "snapshot_uri": self._snapshot_uri,
        }
        self._metrics.export_counts(self._counts)

    def _gpu_resources(self):
        has_gpu_faiss = hasattr(faiss, "StandardGpuResources") and faiss.get_num_gpus() > 0
        if self._config.use_gpu and has_gpu_faiss and ray.get_gpu_ids():
            return faiss.StandardGpuResources()
        return None

    def _to_gpu(self, index: faiss.Index) -> faiss.Index:
        return faiss.index_cpu_to_gpu(self._gpu, 0, index)

    def _sort_ids(self) -> None:
        self._by_id = np.argsort(self._ids, kind="stable")
        self._sorted_ids = self._ids[self._by_id]

    def _lookup(self, ids: np.ndarray) -> np.ndarray:
        """Slots of known ids (a binary search in the sorted ids); unknown ids are refused by name."""
        pos = locate_sorted(self._sorted_ids, ids, missing="mask")
        if (pos < 0).any():
            raise ValueError(
                f"unknown ids (not in the gallery loaded by load_old on this shard): {show_ids(ids[pos < 0])}"
            )
        return self._by_id[pos]

    def _set_threads(self) -> None:
        # OpenMP thread counts are per calling thread, and Ray runs calls on its own threads: set it each time.
        faiss.omp_set_num_threads(self._threads)

    # ----------------------------------------------------------------- training
    def set_trained(self, space: Space, blob: bytes, version: str) -> dict[str, int]:
        """Install a trained empty index (``blob``, from :func:`train_index`) as ``space``'s index (old: pending
        and backfilled; new: new). A space that already holds vectors keeps its training when ``version`` is
        its own (a resumed backfill trains again) and refuses another version."""
        space = parse(Space, space, what="space", among=TRAINABLE_SPACES)
        version = _check_version(version)
        index = _from_bytes(blob)
        if not index.is_trained or index.ntotal:
            raise ValueError("set_trained takes a trained, empty index (see train_index)")
        with self._lock:
            info = self._old_space if space is Space.OLD else self._new_space
            held = sum(self._size(name) for name in SERVING if SPACE_OF[name] is space)
            if held:
                assert info is not None  # set with the first vectors
                if info.version != version:
                    raise ValueError(
                        f"the {space} space holds {held} vectors of model version {info.version!r}; refusing "
                        f"a training for version {version!r} (spaces never mix; rollback first to change models)"
                    )
                if info.dim != index.d:
                    raise ValueError(
                        f"the {space} space holds vectors of dim {info.dim}; the training has dim {index.d}"
                    )
                logger.info("%s space already holds %d vectors of %s: training kept", space, held, version)
                return self._counts
            self._install(space, bytes(blob), SpaceInfo(version, int(index.d)))
            self._publish()
            return self._counts

    def _install(self, space: Space, template: bytes, info: SpaceInfo) -> None:
        """Empty indexes of ``space`` from a trained empty index."""
        self._templates[space] = template
        if space is Space.OLD:
            self._pending, self._backfilled = slot_index(_from_bytes(template)), slot_index(_from_bytes(template))
            self._old_space = info
            self._drop_derived("pending", "backfilled")
        else:
            self._new = slot_index(_from_bytes(template))
            self._new_space = info
            self._drop_derived("new")

    def _ensure_space(self, space: Space, dim: int, version: str) -> None:
        """Create an empty space at its first vectors when its kind needs no training (Flat, HNSW, ...)."""
        if space in self._templates:
            return
        if self._config.needs_training:
            raise ValueError(
                f"the {space} space of index {self._config.factory!r} is not trained: train it first with "
                f"router.train(Space.{space.name}, sample, version) on a sample of its vectors (`raybackfill serve` "
                f"trains the old space from --train-sample rows of the table; a backfill trains the new space "
                f"before its first upsert)"
            )
        template = kinds.build(self._config.factory, dim, self._config.metric, self._config.index_build_params())
        self._install(space, bytes(_to_bytes(template)), SpaceInfo(version, dim))

    # ----------------------------------------------------------------- mutations
    def load_old(self, ids, vectors, version: str, dry_run: bool = False, lineage=None) -> dict[str, int]:
        """Add gallery items with their vectors of the serving generation (state old). Ids must be new to the
        shard. ``lineage`` (one string per row, e.g. "v1>v2" for a v1 embedding transformed into v2; default
        ``version``) records which models made each vector. ``dry_run`` only validates (the router checks every
        shard before any shard applies a batch)."""
        version = _check_version(version)
        with self._lock:
            self._set_threads()
            self._expire()
            if self._old_space and self._old_space.version != version:
                raise ValueError(
                    f"old space holds model version {self._old_space.version!r}; refusing "
                    f"vectors of version {version!r} (spaces never mix)"
                )
            ids, vectors = self._batch(ids, vectors, self._old_space)
            lineages = [version] * len(ids) if lineage is None else [check_lineage(x, version) for x in lineage]
            if len(lineages) != len(ids):
                raise ValueError(f"lineage has {len(lineages)} entries for {len(ids)} ids")
            known = locate_sorted(self._sorted_ids, ids, missing="mask") >= 0
            if known.any():
                raise ValueError(f"ids already loaded in this shard: {show_ids(ids[known])}")
            if Space.OLD not in self._templates and self._config.needs_training:
                self._ensure_space(Space.OLD, vectors.shape[1], version)  # raises: train first
            if dry_run:
                return self._counts
            self._ensure_space(Space.OLD, vectors.shape[1], version)
            slots = np.arange(len(self._ids), len(self._ids) + len(ids), dtype=np.int64)
            self._add("pending", slots, vectors)
            self._ids = np.concatenate([self._ids, ids])
            self._state = np.concatenate([self._state, np.full(len(ids), Space.OLD.code, dtype=np.int8)])
            self._lineage = np.concatenate([self._lineage, self._lineage_codes(lineages)])
            self._sort_ids()
            self._publish()
            self._metrics.observe_write("load_old", len(ids))
            return self._counts

    def upsert(self, ids, vectors, state: Space, version: str, dry_run: bool = False) -> dict[str, int]:
        """Put new-space vectors for gallery items: old items move to the new space, transformed ones are
        replaced. Idempotent: the same batch twice gives the same state. ``dry_run`` only validates.

        The costly part, encoding the vectors for the new index (an IVF's coarse assignment, a code's
        quantisation), runs before the lock is taken again, so queries go on meanwhile; the batch is then applied
        in chunks, one hold of the lock each, sized so that a hold lasts about WRITE_HOLD_S (an IVF or graph
        index; a code-row index, whose removals cost O(rows held) per call, in one hold). Before each hold it
        lets waiting searches go first (:meth:`_yield_to_searches`). If a lifecycle call changed the shard between
        two holds, the rest of the batch is validated again (and encoded again if the new index was replaced)."""
        self._yield_to_searches()
        with self._lock:
            self._set_threads()
            self._expire()
            ids, vectors, slots, code = self._validated_upsert(ids, vectors, state, version)
            if dry_run:
                return self._counts
            self._ensure_space(Space.NEW, vectors.shape[1], version)
            store, published = self._new, self._published
        assert store is not None  # _ensure_space made it
        prepared = store.prepare(vectors)
        done = 0
        while done < len(ids):
            self._yield_to_searches()
            with self._lock:
                self._set_threads()
                if self._published != published:  # a call changed the shard in between: validate the rest again
                    ids, vectors, slots, code = self._validated_upsert(ids[done:], vectors[done:], state, version)
                    prepared, done = _rows_of(prepared, slice(done, None)), 0
                    self._ensure_space(Space.NEW, vectors.shape[1], version)
                if self._new is not store:
                    prepared = None
                chunk = self._apply_chunk_rows() if self._chunked_writes else len(ids)
                rows = slice(done, done + chunk)
                started = time.perf_counter()
                self._apply_upsert(ids[rows], vectors[rows], slots[rows], code, _rows_of(prepared, rows))
                self._observe_apply(len(ids[rows]), time.perf_counter() - started)
                done, published = rows.stop, self._published
        return self._counts

    def _apply_chunk_rows(self) -> int:
        """Rows of the next chunk of an upsert: what this shard applied in about WRITE_HOLD_S lately."""
        if self._apply_rows_per_s is None:
            return APPLY_FIRST_ROWS
        return max(APPLY_MIN_ROWS, int(self._apply_rows_per_s * WRITE_HOLD_S))

    def _observe_apply(self, rows: int, seconds: float) -> None:
        """Fold one chunk's speed into the estimate that sizes the next (a moving average: the cost per row
        drifts with the index kind, the lists' sizes and how busy the cores are)."""
        rate = rows / max(seconds, 1e-6)
        previous = self._apply_rows_per_s
        self._apply_rows_per_s = rate if previous is None else 0.7 * previous + 0.3 * rate

    def _apply_upsert(self, ids: np.ndarray, vectors: np.ndarray, slots: np.ndarray, code: int, prepared) -> None:
        """Under the lock: move, add and replace a validated batch (``prepared``: its encoding for the new index,
        or None)."""
        drop_old = code == Space.NEW.code and not self._config.keep_old
        waiting = self._state[slots] == Space.OLD.code
        moving = slots[waiting]
        if len(moving):
            if drop_old:
                self._remove("pending", moving)
            else:
                self._move("pending", "backfilled", moving)
            self._add("new", moving, vectors[waiting], _rows_of(prepared, waiting))
        replacing = ~waiting
        if replacing.any():
            self._replace("new", slots[replacing], vectors[replacing], _rows_of(prepared, replacing))
            transformed = slots[replacing][self._state[slots[replacing]] == Space.TRANSFORMED.code]
            if drop_old and len(transformed):
                self._remove("backfilled", transformed)
        self._per_state -= np.bincount(self._state[slots], minlength=len(Space))
        self._per_state[code] += len(slots)
        self._state[slots] = code
        for name in ("pending", "backfilled", "new"):
            self._maybe_rebuild(name)
        self._publish(recount=False)
        self._metrics.observe_write("upsert", len(ids))

    @contextlib.contextmanager
    def _search_waiting(self):
        """Around a search's wait for the lock: counted, so writes let it go first."""
        with self._searches:
            self._searches_waiting += 1
        try:
            yield
        finally:
            with self._searches:
                self._searches_waiting -= 1
                if not self._searches_waiting:
                    self._searches.notify_all()

    def _yield_to_searches(self) -> None:
        """Wait until no search waits for the lock, at most WRITE_YIELD_S (a steady stream of searches must not
        stop a backfill)."""
        with self._searches:
            self._searches.wait_for(lambda: not self._searches_waiting, timeout=WRITE_YIELD_S)

    def _validated_upsert(self, ids, vectors, state: Space, version: str):
        state = parse(Space, state, what="upsert state", among=UPSERT_STATES)
        version = _check_version(version)
        if self._new_space and self._new_space.version != version:
            raise ValueError(
                f"new space holds model version {self._new_space.version!r}; refusing vectors "
                f"of version {version!r} (spaces never mix; rollback first to change models)"
            )
        ids, vectors = self._batch(ids, vectors, self._new_space)
        slots = self._lookup(ids)
        if Space.NEW not in self._templates and self._config.needs_training:
            self._ensure_space(Space.NEW, vectors.shape[1], version)  # raises: train first
        if state is Space.TRANSFORMED and not self._config.keep_old:
            dropped = self._state[slots] == Space.NEW.code
            if dropped.any():
                raise ValueError(
                    f"items {show_ids(ids[dropped])} are new and their old vectors were dropped (keep_old=False): "
                    f"a transformed vector cannot replace their new one"
                )
        return ids, vectors, slots, state.code

    def _batch(self, ids, vectors, space: SpaceInfo | None) -> tuple[np.ndarray, np.ndarray]:
        """A validated batch, normalised when the metric is cosine (so the index stores unit vectors)."""
        ids, vectors = as_batch(ids, vectors, space.dim if space else None)
        return ids, (unit_rows(vectors, "vectors", ids) if self._config.metric is Metric.COSINE else vectors)

    def _queries(self, queries, dim: int | None, name: str) -> np.ndarray:
        q = as_queries(queries, dim, self._config.max_queries, name)
        return unit_rows(q, name) if self._config.metric is Metric.COSINE else q

    # Every change to an index goes through these, so its GPU copy follows it.
    def _add(self, name: str, slots: np.ndarray, vectors: np.ndarray, prepared=None) -> None:
        store = self._index(name)
        assert store is not None  # the space exists
        store.add(slots, vectors, prepared)
        if (mirror := self._mirrors.get(name)) is not None:
            mirror.add(slots, vectors, store.layout)

    def _remove(self, name: str, slots: np.ndarray) -> None:
        store = self._index(name)
        assert store is not None
        store.remove(slots)
        if (mirror := self._mirrors.get(name)) is not None:
            mirror.remove(slots)
        store.maybe_compact(COMPACT_MIN_ROWS)

    def _replace(self, name: str, slots: np.ndarray, vectors: np.ndarray, prepared=None) -> None:
        store = self._index(name)
        assert store is not None
        store.replace(slots, vectors, prepared)
        if (mirror := self._mirrors.get(name)) is not None:
            mirror.remove(slots)
            mirror.add(slots, vectors, store.layout)

    def _move(self, source: str, target: str, slots: np.ndarray) -> None:
        src, dst = self._index(source), self._index(target)
        assert src is not None and dst is not None
        target_mirror = self._mirrors.get(target)
        vectors = src.reconstruct(slots) if target_mirror is not None else None
        src.move_to(dst, slots)
        if (mirror := self._mirrors.get(source)) is not None:
            mirror.remove(slots)
        src.maybe_compact(COMPACT_MIN_ROWS)
        if target_mirror is not None:
            assert vectors is not None
            target_mirror.add(slots, vectors, dst.layout)

    def _drop_derived(self, *names: str) -> None:
        """Forget GPU copies of indexes that were replaced or dropped."""
        for name in names:
            self._mirrors.pop(name, None)
            self._no_gpu.discard(name)

    # ----------------------------------------------------------------- graph rebuilds
    def _maybe_rebuild(self, name: str) -> None:
        """Start a background rebuild of a graph index past its deleted fraction (under the lock)."""
        store = self._index(name)
        if not isinstance(store, GraphSlots) or store.rebuilding or name in self._rebuilds:
            return
        if not store.ntotal or store.deleted < self._config.rebuild_deleted_fraction * store.ntotal:
            return
        slots, vectors = store.begin_rebuild()
        template = self._template_of(name)
        assert template is not None  # a store exists only with its space's template
        thread = threading.Thread(
            target=self._rebuild, args=(name, store, slots, vectors, template), name=f"rebuild-{name}", daemon=True
        )
        self._rebuilds[name] = thread
        logger.info("rebuilding %s: %d of %d rows deleted", name, store.deleted, store.ntotal)
        thread.start()

    def _rebuild(self, name: str, store: GraphSlots, slots: np.ndarray, vectors: np.ndarray, template: bytes) -> None:
        """Build the new index outside the lock (queries and upserts go on), swap it in under the lock."""
        try:
            faiss.omp_set_num_threads(self._threads)
            index = _from_bytes(template)
            if len(vectors):
                index.add(vectors)
            with self._lock:
                replayed = store.finish_rebuild(index, slots) if self._index(name) is store else None
                if self._index(name) is not store:  # promoted or rolled back meanwhile: it may serve on elsewhere
                    store.abort_rebuild()
                if replayed is not None:
                    self._drop_derived(name)
                    logger.info("rebuilt %s: %d rows, %d moves replayed", name, len(slots), replayed)
                    self._publish()
        except Exception:
            logger.exception("rebuild of %s failed; it keeps its deleted rows (filtered at search)", name)
            with self._lock:
                store.abort_rebuild()
        finally:
            with self._lock:
                self._rebuilds.pop(name, None)
                self._maybe_rebuild(name)  # moves made meanwhile may have crossed the threshold again

    def wait_for_rebuilds(self, timeout: float | None = None) -> bool:
        """Wait until background rebuilds (graph indexes) are done; False if ``timeout`` passed first."""
        while True:
            with self._lock:
                running = list(self._rebuilds.values())
            if not running:
                return True
            for thread in running:
                thread.join(timeout)
                if thread.is_alive():
                    return False

    # ----------------------------------------------------------------- lifecycle
    def promote(self, new_space: dict | None = None, retain: bool = True) -> dict[str, int]:
        """Make the new space the serving generation (every item must be in it): its vectors become the old space
        of the next upgrade, and the generation it replaces is kept for ``rollback`` until ``gc`` or
        ``retention_s`` (``retain=False`` drops it now). ``new_space`` ({"version", "dim"}, from the router) names
        the generation on a shard that holds none of its vectors."""
        with self._lock:
            self._expire()
            waiting = self._state == Space.OLD.code
            if waiting.any():
                raise ValueError(
                    f"cannot promote: {int(waiting.sum())} items are not in the new space yet "
                    f"(ids {show_ids(self._ids[waiting])})"
                )
            serving = self._new_space or (SpaceInfo(**new_space) if new_space else None)
            if serving is None and len(self._ids):
                raise ValueError("cannot promote: there is no new space (no upgrade was started)")
            if new_space and serving is not None and serving.version != new_space["version"]:
                raise ValueError(
                    f"cannot promote: this shard's new space holds {serving.version!r}, not {new_space['version']!r}"
                )
            moved = np.arange(len(self._ids), dtype=np.int64)
            lineage = self._new_lineage(moved) if len(moved) else self._lineage
            dropped = not self._config.keep_old and bool((self._state == Space.NEW.code).any())
            now = time.time()
            self._drop_derived(*INDEXES)
            self._retired = None
            if retain and self._old_space is not None and not dropped:
                retention = self._config.retention_s
                self._retired = _Retired(
                    space=self._old_space,
                    template=self._templates.get(Space.OLD),
                    pending=self._pending,
                    backfilled=self._backfilled,
                    states=self._state.copy(),
                    lineage=self._lineage,
                    items=len(self._ids),
                    promoted_at=now,
                    expires_at=None if retention is None else now + retention,
                )
            elif retain and dropped:
                logger.warning("promote keeps no rollback generation: keep_old=False dropped old vectors")
            template = self._templates.pop(Space.NEW, None)
            self._templates.pop(Space.OLD, None)
            if template is not None:
                self._templates[Space.OLD] = template
            self._pending = self._new if self._new is not None else self._empty(template)
            self._backfilled = self._empty(template)
            self._new = None
            self._old_space, self._new_space = serving, None
            self._state[:] = Space.OLD.code
            self._lineage = lineage
            self._generation += 1
            self._publish()
            release_free_memory()  # the indexes a promote without retention dropped
            return self._counts

    @staticmethod
    def _empty(template: bytes | None) -> SlotIndex | None:
        return slot_index(_from_bytes(template)) if template is not None else None

    def rollback(self, undo_promote: bool = False) -> dict[str, int]:
        """Undo the last step of the lifecycle.

        ``undo_promote=False``: return every item to the old space and forget the new space (its version and
        training may then change: a factory that needs training is trained again). ``undo_promote=True``: bring
        back the generation the last promote replaced, as it was at the promote (every item in the new space
        again); refused once it was collected, while an upgrade of the current generation has begun, or when
        items were loaded after the promote (they have no vector in the retired generation)."""
        with self._lock:
            self._set_threads()
            self._expire()
            if undo_promote:
                self._undo_promote()
                return self._counts
            self._refuse_without_old("rollback")
            self._new = None  # its memory goes before the old space grows back
            self._drop_derived("new")
            moved = np.flatnonzero(self._state != Space.OLD.code).astype(np.int64)
            if len(moved):
                assert self._pending is not None and self._backfilled is not None  # items loaded
                for start in range(0, len(moved), MOVE_CHUNK_ROWS):
                    self._move("backfilled", "pending", moved[start : start + MOVE_CHUNK_ROWS])
                self._backfilled.reset()
                self._drop_derived("backfilled")
            self._new_space = None
            self._templates.pop(Space.NEW, None)
            self._state[:] = Space.OLD.code
            self._publish()
            release_free_memory()
            return self._counts

    def _undo_promote(self) -> None:
        if self._new_space is not None or Space.NEW in self._templates or (self._state != Space.OLD.code).any():
            raise ValueError(
                "cannot roll back the promote: an upgrade of the current generation has begun; roll it back first"
            )
        retired = self._retired
        if retired is None:
            if not len(self._ids) and self._generation > 1:
                self._generation -= 1  # an empty shard follows the others
                self._publish()
                return
            raise ValueError(
                "cannot roll back the promote: the generation it replaced is gone (collected by gc or its "
                "retention, or never kept)"
            )
        added = len(self._ids) - retired.items
        if added:
            raise ValueError(
                f"cannot roll back the promote: {added} items were loaded after it and have no vector of "
                f"{retired.space.version!r}"
            )
        self._drop_derived(*INDEXES)
        template = self._templates.pop(Space.OLD, None)
        if template is not None:
            self._templates[Space.NEW] = template
        if retired.template is not None:
            self._templates[Space.OLD] = retired.template
        self._new, self._pending, self._backfilled = self._pending, retired.pending, retired.backfilled
        self._new_space, self._old_space = self._old_space, retired.space
        self._state, self._lineage = retired.states.copy(), retired.lineage
        self._generation -= 1
        self._retired = None
        self._publish()

    def gc(self) -> dict:
        """Drop the retired generation now (its memory is freed; rollback of the promote is no longer possible).
        Returns what was collected ({} when there was nothing)."""
        with self._lock:
            return self._collect()

    def _refuse_without_old(self, what: str) -> None:
        if not self._config.keep_old:
            dropped = int((self._state == Space.NEW.code).sum())
            if dropped:
                raise ValueError(
                    f"{what} is unavailable: the index runs with keep_old=False and dropped the old vectors of "
                    f"{dropped} re-embedded (new) items"
                )

    # ----------------------------------------------------------------- queries
    def search(self, queries_old, queries_new, k: int, strategy: Strategy, params: dict | None = None) -> TopK:
        """Top-k per query under a strategy (see module docstring of raybackfill.index.router); ``params``
        overrides the configured search parameters for this query (e.g. ``{"nprobe": 32}``)."""
        strategy = parse(Strategy, strategy)
        k = check_k(k, self._config.max_k)
        search_params = self._config.query_params(params)
        started = time.perf_counter()
        with self._search_waiting():
            self._lock.acquire()
        try:
            self._set_threads()
            self._expire()
            parts = self._plan(queries_old, queries_new, strategy)
            rows = {len(q) for _, q, _ in parts}
            if len(rows) > 1:
                raise ValueError(f"queries_old and queries_new must hold the same queries, got {sorted(rows)} rows")
            results = [
                self._search_part(name, q, k, code, search_params) for name, q, code in parts if self._live(name)
            ]
        finally:
            self._lock.release()
        self._metrics.observe_search(time.perf_counter() - started)
        if not results:
            return empty_topk(rows.pop(), k, self._config.metric)
        return merge_results(results, k, self._config.metric)

    def _plan(self, queries_old, queries_new, strategy: Strategy) -> list[tuple[str, np.ndarray, int | None]]:
        """(index name, validated queries, space code or None = from the item state) per part to search.

        A query batch is required for every non-empty part it searches; `rank_merge` also validates a batch
        given for a part that is still empty (e.g. new queries before the first upsert)."""
        old_dim = self._old_space.dim if self._old_space else None
        new_dim = self._new_space.dim if self._new_space else None
        if strategy is Strategy.OLD:
            self._refuse_without_old("strategy 'old'")
            q = self._queries(self._required(queries_old, "queries_old", strategy), old_dim, "queries_old")
            return [("pending", q, Space.OLD.code), ("backfilled", q, Space.OLD.code)]
        if strategy is Strategy.COMPATIBLE:
            q = self._queries(self._required(queries_new, "queries_new", strategy), new_dim or old_dim, "queries_new")
            if self._live("pending") and new_dim is not None and new_dim != old_dim:
                raise ValueError(
                    f"strategy 'compatible' compares new queries with old vectors, but the new space has dim "
                    f"{new_dim} and the old space dim {old_dim}, and {self._live('pending')} items are not in "
                    f"the new space yet: use 'rank_merge', or move every item to the new space first"
                )
            return [("new", q, None), ("pending", q, Space.OLD.code)]
        parts: list[tuple[str, np.ndarray, int | None]] = []
        if self._live("pending") or queries_old is not None:
            q = self._queries(self._required(queries_old, "queries_old", strategy), old_dim, "queries_old")
            parts.append(("pending", q, Space.OLD.code))
        if self._live("new") or queries_new is not None:
            q = self._queries(self._required(queries_new, "queries_new", strategy), new_dim, "queries_new")
            parts.append(("new", q, None))
        if not parts:
            raise ValueError("strategy 'rank_merge' needs queries_old and/or queries_new")
        return parts

    @staticmethod
    def _required(queries, name: str, strategy: Strategy):
        if queries is None:
            raise ValueError(f"strategy {strategy.value!r} needs {name}")
        return queries

    def _index(self, name: str) -> SlotIndex | None:
        if name in RETIRED:
            retired = self._retired
            return None if retired is None else (retired.pending if name == "retired_pending" else retired.backfilled)
        return {"pending": self._pending, "backfilled": self._backfilled, "new": self._new}[name]

    def _template_of(self, name: str) -> bytes | None:
        if name in RETIRED:
            return self._retired.template if self._retired else None
        return self._templates.get(SPACE_OF[name])

    def _size(self, name: str) -> int:
        """Vectors stored (deleted graph rows included)."""
        index = self._index(name)
        return int(index.ntotal) if index is not None else 0

    def _live(self, name: str) -> int:
        """Vectors a search can return."""
        index = self._index(name)
        return int(index.size) if index is not None else 0

    def _search_part(self, name: str, queries: np.ndarray, k: int, code: int | None, params: dict) -> TopK:
        store = self._index(name)
        assert store is not None  # only non-empty indexes are searched
        faiss.cvar.distance_compute_blas_threshold = BLAS_MIN_QUERIES * store.index.d  # per process; under the lock
        k = min(k, store.size)
        mirror = self._mirror(name, store, k)
        if mirror is not None:
            scores, slots = mirror.search(store, len(self._ids), queries, k, params)
        else:
            scores, slots = store.search(queries, k, params)
        hit = slots >= 0
        safe = np.where(hit, slots, 0)
        ids = np.where(hit, self._ids[safe], EMPTY_ID)
        spaces = self._state[safe] if code is None else np.full(slots.shape, code, dtype=np.int8)
        return TopK(ids, scores, spaces.astype(np.int8))

    def _mirror(self, name: str, store: SlotIndex, k: int) -> GpuMirror | None:
        """The GPU copy that serves this search, made on the first search of a GPU-capable index."""
        if self._gpu is None or k > GPU_MAX_K or name in self._no_gpu or not gpu_supported(store):
            return None
        mirror = self._mirrors.get(name)
        if mirror is None:
            mirror = GpuMirror(self._to_gpu, self._config.gpu_sync_rows, self._config.gpu_sync_seconds)
            try:
                mirror.resync(store, len(self._ids))
            except RuntimeError as err:  # a kind FAISS has no GPU version of
                logger.warning("no GPU copy of %s (%s): searching it on the CPU", name, err)
                self._no_gpu.add(name)
                return None
            self._mirrors[name] = mirror
        return mirror

    def vectors(self, ids) -> ItemVectors:
        """The stored vectors of some items (e.g. to use an item as a query)."""
        ids = as_ids(ids)
        with self._lock:
            slots = self._lookup(ids)
            states = self._state[slots].copy()
            old = new = None
            if self._old_space is not None and self._pending is not None and self._backfilled is not None:
                old = self._old_vectors(slots, states)
            if self._new is not None:
                assert self._new_space is not None  # set with the new index
                new = np.zeros((len(ids), self._new_space.dim), dtype=np.float32)
                moved = states != Space.OLD.code
                if moved.any():
                    new[moved] = self._new.reconstruct(slots[moved])
            return ItemVectors(ids, states, old, new, *self._lineages_of(slots, states))

    def _old_vectors(self, slots: np.ndarray, states: np.ndarray) -> np.ndarray:
        """The old-space vectors of some slots (under the lock): from pending for items still old, from backfilled
        for moved ones; NaN rows where ``keep_old=False`` dropped them."""
        assert self._old_space is not None and self._pending is not None and self._backfilled is not None
        old = np.zeros((len(slots), self._old_space.dim), dtype=np.float32)
        waiting = states == Space.OLD.code
        kept = ~waiting
        if not self._config.keep_old:
            kept &= states != Space.NEW.code
            old[states == Space.NEW.code] = np.nan  # dropped
        if waiting.any():
            old[waiting] = self._pending.reconstruct(slots[waiting])
        if kept.any():
            old[kept] = self._backfilled.reconstruct(slots[kept])
        return old

    def _lineages_of(self, slots: np.ndarray, states: np.ndarray) -> tuple[list[str | None], list[str | None]]:
        dropped = (states == Space.NEW.code) & (not self._config.keep_old)
        old_lineage = [None if d else self._lineages[c] for c, d in zip(self._lineage[slots], dropped, strict=True)]
        new_lineage: list[str | None] = [None] * len(slots)
        moved = np.flatnonzero(states != Space.OLD.code)
        if len(moved):
            for i, code in zip(moved, self._new_lineage(slots[moved]), strict=True):
                new_lineage[i] = self._lineages[code]
        return old_lineage, new_lineage

    def provenance(self) -> dict:
        """Which models made the vectors: items per lineage in the serving (old) space and in the new space
        (per state), with the generation number and the retired generation.

        Returns:
            ``{"generation": 2, "old": {"version": "v2", "lineages": {"v2": 60, "v1>v2": 40}},
            "new": {"version": "v3", "lineages": {"v3": {"new": 10}, "v1>v2>v3": {"transformed": 30}, ...}},
            "retired": {"version": "v1", ...} or None}``; ``old``/``new`` are None for a space not created.
        """
        with self._lock:
            self._expire()
            old = None
            if self._old_space is not None:
                has_old = np.ones(len(self._ids), dtype=bool)
                if not self._config.keep_old:
                    has_old = self._state != Space.NEW.code
                codes, counts = np.unique(self._lineage[has_old], return_counts=True)
                lineages = {self._lineages[c]: int(n) for c, n in zip(codes, counts, strict=True)}
                old = {"version": self._old_space.version, "lineages": lineages}
            new = None
            if self._new_space is not None:
                moved = np.flatnonzero(self._state != Space.OLD.code)
                pairs, counts = np.unique(
                    np.stack([self._new_lineage(moved), self._state[moved]]), axis=1, return_counts=True
                )
                per: dict[str, dict[str, int]] = {}
                for (code, state), n in zip(pairs.T, counts, strict=True):
                    per.setdefault(self._lineages[code], {})[Space.from_code(state).value] = int(n)
                new = {"version": self._new_space.version, "lineages": per}
            return {
                "generation": self._generation,
                "old": old,
                "new": new,
                "retired": self._retired_info(),
            }

    def export(self, uri: str, prefix: str, space: Space, part_rows: int = 100_000) -> dict:
        """Write the vectors of one space as Parquet parts ``{prefix}-00000.parquet``, ... under ``uri`` (columns
        id, embedding, model, generation, lineage), ``part_rows`` items per part, each part copied under the lock
        and written without it so serving goes on.

        The items are those in the space when the export starts (every item for the old space, the moved ones
        for the new space); a promote or rollback during the export refuses it (run it again).

        Returns:
            ``{"files": [...], "items": n, "version": ..., "dim": ..., "lineages": {lineage: n}}``.
        """
        from raybackfill.data import storage
        from raybackfill.data.schema import GENERATION, LINEAGE, MODEL, embedding_table

        space = parse(Space, space, what="space", among=TRAINABLE_SPACES)
        if part_rows <= 0:
            raise ValueError(f"part_rows must be positive, got {part_rows}")
        with self._lock:
            info = self._old_space if space is Space.OLD else self._new_space
            if info is None:
                return {"files": [], "items": 0, "version": None, "dim": None, "lineages": {}}
            if space is Space.OLD:
                self._refuse_without_old("export of the old space")
                slots = np.arange(len(self._ids), dtype=np.int64)
            else:
                slots = np.flatnonzero(self._state != Space.OLD.code).astype(np.int64)
            generation = self._generation
        files: list[str] = []
        lineage_counts: dict[str, int] = {}
        for part, start in enumerate(range(0, len(slots), part_rows)):
            chunk = slots[start : start + part_rows]
            with self._lock:
                if self._generation != generation or (space is Space.NEW and self._new_space is None):
                    raise ValueError("the index was promoted or rolled back during the export; run it again")
                ids = self._ids[chunk]
                if space is Space.OLD:
                    vectors = self._old_vectors(chunk, self._state[chunk])
                    codes = self._lineage[chunk]
                else:
                    assert self._new is not None
                    vectors = self._new.reconstruct(chunk)
                    codes = self._new_lineage(chunk)
                table_of_lineages = list(self._lineages)  # the table only grows: this copy covers every code
            lineages = pa.array(table_of_lineages, type=pa.string())
            models = pa.array([lineage.split(LINEAGE_SEP, 1)[0] for lineage in table_of_lineages], type=pa.string())
            table = embedding_table(
                ids,
                vectors,
                extra={
                    MODEL: models.take(codes),
                    GENERATION: pa.array([info.version] * len(ids), type=pa.string()),
                    LINEAGE: lineages.take(codes),
                },
            )
            files.append(storage.write_shard(table, uri, f"{prefix}-{part:05d}.parquet"))
            for code, n in zip(*np.unique(codes, return_counts=True), strict=True):
                lineage = table_of_lineages[code]
                lineage_counts[lineage] = lineage_counts.get(lineage, 0) + int(n)
        logger.info("exported %d %s-space vectors (%s) to %s", len(slots), space, info.version, uri)
        return {
            "files": files,
            "items": len(slots),
            "version": info.version,
            "dim": info.dim,
            "lineages": lineage_counts,
        }

    def index_bytes(self) -> dict[str, int]:
        """Serialised size of each index (what a snapshot of it takes; close to its memory)."""
        with self._lock:
            return {
                name: len(faiss.serialize_index(store.index))
                for name in INDEXES
                if (store := self._index(name)) is not None
            }

    # ----------------------------------------------------------------- light calls
    def counts(self) -> dict[str, int]:
        return self._counts

    def describe(self) -> dict:
        return {**self._description, "gpu_mirrors": self._mirror_stats()}

    def _mirror_stats(self) -> dict[str, dict[str, int]]:
        """Each GPU copy's full copies, rows added in place and stale rows (read without the lock: a search
        updates them, and a reader may see one search's update half-way)."""
        return {
            name: {"copies": m.copies, "in_place": m.in_place, "stale": m.stale}
            for name, m in list(self._mirrors.items())
        }

    # ----------------------------------------------------------------- snapshots
    def snapshot(self) -> str:
        """Write the shard (trained indexes, contents, ids, states, provenance) as a new snapshot under its
        snapshot URI; return the version URI.

        Code rows (Flat, PQ, SQ, ...) are copied in chunks of SNAPSHOT_CHUNK_ROWS rows, and IVF indexes in
        ranges of inverted lists holding about as many entries, each chunk under the lock for the time of its
        copy and written out without it; rows and lists changed meanwhile are recorded and copied again in a
        final, short hold of the lock that also copies ids and states, so the snapshot is the state at that
        moment. Graph indexes (HNSW) are serialised whole in that final hold (a graph has no independent
        parts). A snapshot that dies half-way leaves the last committed one (raybackfill.index.snapshot)."""
        if not self._snapshot_uri:
            raise ValueError("this shard has no snapshot_uri; create it with one to take snapshots")
        writer = SnapshotWriter(self._snapshot_uri)
        with self._lock:
            stores = {name: store for name in INDEXES if (store := self._index(name)) is not None}
            chunked = {name: store for name, store in stores.items() if isinstance(store, (CodesSlots, IVFSlots))}
            for store in chunked.values():
                store.track()
        chunks: dict[str, int] = {}
        try:
            for name, store in chunked.items():
                chunks[name] = self._write_chunks(writer, name, store)
        except BaseException:
            with self._lock:
                for store in chunked.values():
                    store.untrack()
            raise
        with self._lock:
            stores = {name: store for name in INDEXES if (store := self._index(name)) is not None}
            replaced = [name for name, store in chunked.items() if stores.get(name) is not store]
            if replaced:
                for store in chunked.values():
                    store.untrack()
                raise RuntimeError(f"{replaced} replaced (promote or rollback) during the snapshot; take it again")
            items = io.BytesIO()
            blobs: dict[str, bytes | memoryview] = {}
            arrays: dict[str, np.ndarray] = {
                "ids": self._ids.copy(),
                "state": self._state.copy(),
                "lineage": self._lineage.copy(),
            }
            if self._retired is not None:
                arrays["retired_state"] = self._retired.states
                arrays["retired_lineage"] = self._retired.lineage
                if self._retired.template is not None:
                    blobs["retired.template.faiss"] = self._retired.template
            for name, store in stores.items():
                arrays[f"{name}_rows"] = store.row_slots().copy()
                if isinstance(store, GraphSlots):
                    arrays[f"{name}_alive"] = store.alive.copy()
                if isinstance(store, CodesSlots):
                    # rows written since their chunk was copied (all rows of an index made meanwhile)
                    rows = store.untrack() if name in chunked else np.arange(store.ntotal, dtype=np.int64)
                    arrays[f"{name}_patch_rows"] = rows
                    arrays[f"{name}_patch_codes"] = store.codes()[rows].copy()
                    arrays[f"{name}_ntotal"] = np.array([store.ntotal], np.int64)
                elif isinstance(store, IVFSlots):
                    # lists changed since their chunk was copied (all lists of an index made meanwhile)
                    lists = store.untrack() if name in chunked else np.arange(store.nlist, dtype=np.int64)
                    for key, value in store.copy_lists(lists).items():
                        arrays[f"{name}_patch_{key}"] = value
                else:
                    blobs[f"{name}.faiss"] = bytes(_to_bytes(store.index))
            templates = dict(self._templates)
            meta = self._meta(chunks, templates)
            items_held = len(self._ids)
        np.savez(items, **arrays)  # type: ignore[arg-type]  # mypy: **arrays vs allow_pickle
        for space, template in templates.items():
            writer.write(f"{space}.template.faiss", template)
        for name, data in blobs.items():
            writer.write(name, data)
        writer.write("items.npz", items.getvalue())
        writer.write("meta.json", json.dumps(meta).encode())
        uri = writer.commit()
        logger.info("snapshot of %d items written to %s", items_held, uri)
        return uri

    def _write_chunks(self, writer: SnapshotWriter, name: str, store: CodesSlots | IVFSlots) -> int:
        """Write ``store``'s code rows or inverted lists chunk by chunk (the lock held per chunk copy only);
        return the number of chunks."""
        start, count = 0, 0
        while True:
            with self._lock:
                if self._index(name) is not store:
                    return count  # replaced meanwhile: the final step refuses the snapshot
                if isinstance(store, CodesSlots):
                    chunk = store.codes()[start : start + SNAPSHOT_CHUNK_ROWS].copy()
                    data, size = chunk.tobytes(), len(chunk)
                else:
                    sizes = store.list_sizes()[start:]
                    size = int(np.searchsorted(np.cumsum(sizes), SNAPSHOT_CHUNK_ROWS) + 1) if len(sizes) else 0
                    lists = np.arange(start, min(start + size, store.nlist), dtype=np.int64)
                    size = len(lists)
                    content = store.copy_lists(lists)
            if not size:
                return count
            if isinstance(store, IVFSlots):
                buffer = io.BytesIO()
                np.savez(buffer, **content)  # type: ignore[arg-type]  # mypy: **content vs allow_pickle
                data = buffer.getvalue()
            writer.write(f"{name}.chunk.{count:06d}", data)
            start, count = start + size, count + 1

    def _meta(self, chunks: dict[str, int], templates: dict[Space, bytes]) -> dict:
        return {
            "format": SNAPSHOT_FORMAT,
            "config": self._config_fields,
            "old_space": dataclasses.asdict(self._old_space) if self._old_space else None,
            "new_space": dataclasses.asdict(self._new_space) if self._new_space else None,
            "trained": sorted(templates),
            "chunks": chunks,
            "generation": self._generation,
            "lineages": self._lineages,
            "retired": self._retired_info(),
        }

    def _restore(self, blobs: dict[str, bytes]) -> None:
        meta = json.loads(blobs["meta.json"])
        where = f"snapshot under {self._snapshot_uri}"
        if meta.get("format") != SNAPSHOT_FORMAT:
            raise ValueError(
                f"{where} has format {meta.get('format')!r}, this raybackfill reads format {SNAPSHOT_FORMAT}: "
                f"restore it with the raybackfill version that wrote it, or serve again from the embedding table "
                f"into a new --snapshot-uri"
            )
        stored = {key: meta["config"].get(key) for key in STORED_FIELDS}
        ours = {key: dataclasses.asdict(self._config)[key] for key in STORED_FIELDS}
        if stored != ours:
            raise ValueError(f"{where} was written with index config {stored}, this shard has {ours}")
        self._templates = {parse(Space, s): blobs[f"{s}.template.faiss"] for s in meta["trained"]}
        with np.load(io.BytesIO(blobs["items.npz"])) as items:
            self._ids = items["ids"].astype(np.int64)
            self._state = items["state"].astype(np.int8)
            self._lineage = items["lineage"].astype(np.int32)
            retired_arrays = (
                (items["retired_state"].astype(np.int8), items["retired_lineage"].astype(np.int32))
                if "retired_state" in items.files
                else None
            )
            retired_template = blobs.get("retired.template.faiss")
            restored: dict[str, SlotIndex] = {}
            for name in INDEXES:
                template = retired_template if name in RETIRED else self._templates.get(SPACE_OF[name])
                if template is None or f"{name}_rows" not in items:
                    continue
                if f"{name}.faiss" in blobs:
                    alive = items[f"{name}_alive"] if f"{name}_alive" in items.files else None
                    restored[name] = slot_index(_from_bytes(blobs[f"{name}.faiss"]), items[f"{name}_rows"], alive)
                    continue
                store = slot_index(_from_bytes(template))
                chunks = [blobs[f"{name}.chunk.{i:06d}"] for i in range(meta["chunks"].get(name, 0))]
                if isinstance(store, IVFSlots):
                    for chunk in chunks:
                        with np.load(io.BytesIO(chunk)) as content:
                            store.set_lists({key: content[key] for key in content.files})
                    patch = ("lists", "sizes", "ids", "codes")
                    store.set_lists({key: items[f"{name}_patch_{key}"] for key in patch})
                    store.finish_restore()
                    restored[name] = store
                    continue
                assert isinstance(store, CodesSlots)  # graphs were serialised whole
                codes = np.frombuffer(b"".join(chunks), np.uint8).reshape(-1, store.code_size)
                n = int(items[f"{name}_ntotal"][0])
                codes = np.concatenate([codes, np.zeros((max(n - len(codes), 0), store.code_size), np.uint8)])[:n]
                codes[items[f"{name}_patch_rows"]] = items[f"{name}_patch_codes"]
                store.add_codes(items[f"{name}_rows"], codes)
                restored[name] = store
        self._sort_ids()
        self._old_space = SpaceInfo(**meta["old_space"]) if meta["old_space"] else None
        self._new_space = SpaceInfo(**meta["new_space"]) if meta["new_space"] else None
        self._generation = int(meta["generation"])
        self._lineages = list(meta["lineages"])
        self._retired = None
        if meta["retired"] is not None:
            assert retired_arrays is not None  # written with the retired generation's meta
            retired = meta["retired"]
            states, lineage = retired_arrays
            self._retired = _Retired(
                space=SpaceInfo(retired["version"], retired["dim"]),
                template=retired_template,
                pending=restored.get("retired_pending"),
                backfilled=restored.get("retired_backfilled"),
                states=states,
                lineage=lineage,
                items=int(retired["items"]),
                promoted_at=float(retired["promoted_at"]),
                expires_at=retired["expires_at"],
            )
        self._pending = restored.get("pending")
        self._backfilled = restored.get("backfilled")
        self._new = restored.get("new")
        self._publish()


@ray.remote(concurrency_groups={"light": 2, "snapshot": 1, "write": 1})  # type: ignore[call-overload]  # ray's overloads omit it
class IndexShard(_IndexShard):
    """The shard actor: one call of the default group (searches, lifecycle) at a time; ``upsert``/``load_old``
    in the write group (one at a time, on a thread ``write_nice_increment`` nice steps lower: raybackfill.priority),
    so a search waits for a write's short holds of the lock only, not for the whole call; ``counts``/``describe``
    and ``wait_for_rebuilds`` in the light group, ``snapshot`` in its own. (The overrides only place the calls in
    their concurrency groups; mypy sees ray.method's remote-method type instead of the plain method.)"""

    @ray.method(concurrency_group="write")
    def upsert(self, ids, vectors, state: Space, version: str, dry_run: bool = False) -> dict[str, int]:  # type: ignore[override]
        lower_thread_priority(self._config.write_nice_increment)
        return super().upsert(ids, vectors, state, version, dry_run)

    @ray.method(concurrency_group="write")
    def load_old(self, ids, vectors, version: str, dry_run: bool = False, lineage=None) -> dict[str, int]:  # type: ignore[override]
        lower_thread_priority(self._config.write_nice_increment)
        return super().load_old(ids, vectors, version, dry_run, lineage)

    @ray.method(concurrency_group="light")
    def counts(self) -> dict[str, int]:  # type: ignore[override]
        return self._counts

    @ray.method(concurrency_group="light")
    def describe(self) -> dict:  # type: ignore[override]
        return super().describe()

    @ray.method(concurrency_group="light")
    def wait_for_rebuilds(self, timeout: float | None = None) -> bool:  # type: ignore[override]
        return super().wait_for_rebuilds(timeout)

    @ray.method(concurrency_group="snapshot")
    def snapshot(self) -> str:  # type: ignore[override]
        return super().snapshot()
