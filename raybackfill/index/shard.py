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

Atomicity. All mutations and searches run under one lock, so a search sees every id exactly once
(in pending, or in new) and never half a batch. The actor's default concurrency group runs one call at a
time (search, upsert, ...); `counts`/`describe` run in a separate "light" group and read only immutable
values that mutations replace in one assignment, so they answer while a long search runs; `snapshot`
runs in its own group, holds the lock only while it serialises the indexes (a memory copy) and uploads
outside the lock, so serving goes on while a snapshot is written.

Restart. A shard created with ``snapshot_uri`` restores its last snapshot in its constructor, so a Ray
restart (max_restarts) comes back with the state of the last snapshot; later upserts are replayed by
the backfill from its ledger (upserts are idempotent).
"""

from __future__ import annotations

import dataclasses
import io
import json
import logging
import threading
import time
from dataclasses import dataclass

import faiss
import numpy as np
import ray

from raybackfill.index.merge import EMPTY_ID, TopK, empty_topk, merge_results
from raybackfill.index.metrics import ShardMetrics
from raybackfill.index.slots import SlotIndex, slot_index
from raybackfill.index.snapshot import read_snapshot, write_snapshot
from raybackfill.index.validate import as_batch, as_ids, as_queries, check_k, show_ids, unit_rows
from raybackfill.logs import configure_logging
from raybackfill.types import Metric, Space, Strategy, locate_sorted, parse

logger = logging.getLogger(__name__)

INDEXES = ("pending", "backfilled", "new")
UPSERT_STATES = (Space.TRANSFORMED, Space.NEW)
SNAPSHOT_FORMAT = 2  # 2: flat indexes are plain IndexFlat with a row -> slot map (items.npz)
# GPU flat search handles at most this k; larger k searches the CPU index.
GPU_MAX_K = 2048
# FAISS 1.15 scans a flat index with BLAS only when n_queries * dim >= distance_compute_blas_threshold
# (default 128000: 1000 queries at d=128); below that it scans query by query, which is much slower per query
# once a batch holds more than a few queries (one or two queries are faster without BLAS). A shard takes the
# BLAS path from this many queries.
BLAS_MIN_QUERIES = 4


@dataclass(frozen=True)
class IndexConfig:
    """How each space is indexed. Flat is exact; IVF-Flat trades recall (nprobe/nlist) for speed and is
    trained on the first batch that enters a space (which must hold at least ``nlist`` vectors)."""

    kind: str = "flat"
    metric: Metric = Metric.COSINE  # the models' default; vectors and queries are L2-normalised by the shard
    nlist: int = 1024
    nprobe: int = 16
    max_k: int = 10_000
    max_queries: int = 10_000
    use_gpu: bool = True  # only when faiss has GPU support AND the actor was given a GPU

    def __post_init__(self) -> None:
        if self.kind not in ("flat", "ivf"):
            raise ValueError(f"kind must be 'flat' or 'ivf', got {self.kind!r}")
        object.__setattr__(self, "metric", parse(Metric, self.metric))
        for name in ("nlist", "nprobe", "max_k", "max_queries"):
            if getattr(self, name) <= 0:
                raise ValueError(f"{name} must be positive, got {getattr(self, name)}")

    @property
    def needs_training(self) -> bool:
        """Whether a space must be trained (``IndexRouter.train``) before vectors are added. False for both kinds
        here: flat needs no training and IVF-Flat trains itself on the first batch a space receives."""
        return False


@dataclass(frozen=True)
class SpaceInfo:
    """Provenance of a space: the model version tag and dim of every vector in it."""

    version: str
    dim: int


@dataclass(frozen=True)
class ItemVectors:
    """Stored vectors of some items: ``old`` (None after promote), ``new`` (None before the first upsert;
    zero rows where ``states`` is old)."""

    ids: np.ndarray
    states: np.ndarray
    old: np.ndarray | None
    new: np.ndarray | None


def _check_version(version) -> str:
    if not isinstance(version, str) or not version:
        raise ValueError(f"version must be a non-empty model version tag, got {version!r}")
    return version


def _to_bytes(index: faiss.Index) -> memoryview:
    return faiss.serialize_index(index).data


def _from_bytes(data: bytes) -> faiss.Index:
    return faiss.deserialize_index(np.frombuffer(data, dtype=np.uint8))


@ray.remote(concurrency_groups={"light": 2, "snapshot": 1})  # type: ignore[call-overload]  # ray's overloads omit it
class IndexShard:
    def __init__(self, config: IndexConfig | None = None, snapshot_uri: str | None = None) -> None:
        configure_logging()
        self._config = config or IndexConfig()
        self._snapshot_uri = snapshot_uri
        self._lock = threading.Lock()
        cpus = ray.get_runtime_context().get_assigned_resources().get("CPU", 1.0)
        self._threads = max(1, int(cpus))
        self._gpu = self._gpu_resources()
        self._gpu_mirrors: dict[str, faiss.Index] = {}  # dropped by _touch whenever its index changes
        self._metrics = ShardMetrics(ray.get_runtime_context().get_actor_name() or "")
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
        self._pending: SlotIndex | None = None
        self._backfilled: SlotIndex | None = None
        self._new: SlotIndex | None = None
        self._promoted = False
        self._publish()

    def _publish(self) -> None:
        """Replace the immutable views that the light concurrency group reads without the lock."""
        per_state = np.bincount(self._state, minlength=len(Space))
        self._counts: dict[str, int] = {space: int(per_state[space.code]) for space in Space}
        self._description = {
            "counts": self._counts,
            "old_space": dataclasses.asdict(self._old_space) if self._old_space else None,
            "new_space": dataclasses.asdict(self._new_space) if self._new_space else None,
            "promoted": self._promoted,
            "config": dataclasses.asdict(self._config),
            "threads": self._threads,
            "gpu": self._gpu is not None,
            "snapshot_uri": self._snapshot_uri,
        }
        self._metrics.export_counts(self._counts)

    def _gpu_resources(self):
        has_gpu_faiss = hasattr(faiss, "StandardGpuResources") and faiss.get_num_gpus() > 0
        if self._config.use_gpu and self._config.kind == "flat" and has_gpu_faiss and ray.get_gpu_ids():
            return faiss.StandardGpuResources()
        return None

    def _empty_index(self, dim: int) -> SlotIndex:
        metric = faiss.METRIC_L2 if self._config.metric is Metric.L2 else faiss.METRIC_INNER_PRODUCT
        if self._config.kind == "flat":
            return slot_index(faiss.IndexFlat(dim, metric))
        index = faiss.IndexIVFFlat(faiss.IndexFlat(dim, metric), dim, self._config.nlist, metric)
        index.nprobe = self._config.nprobe
        # Hashtable direct map: reconstruct and remove by id (slot) without scanning the lists.
        index.set_direct_map_type(faiss.DirectMap.Hashtable)  # type: ignore[attr-defined]  # faiss's stubs omit DirectMap
        return slot_index(index)

    def _check_trainable(self, n: int, space: str) -> None:
        """An IVF space is trained on its first batch, which must hold at least nlist vectors."""
        if self._config.kind == "ivf" and n < self._config.nlist:
            raise ValueError(
                f"IVF index with nlist={self._config.nlist} is trained on the first batch of the {space} space "
                f"(per shard), which has only {n} vectors; send at least nlist vectors first, lower nlist, or "
                f"use kind='flat'"
            )

    def _trained_index(self, vectors: np.ndarray) -> SlotIndex:
        store = self._empty_index(vectors.shape[1])
        if not store.index.is_trained:
            store.index.train(vectors)
        return store

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

    # ----------------------------------------------------------------- mutations
    def load_old(self, ids, vectors, version: str, dry_run: bool = False) -> dict[str, int]:
        """Add gallery items with their old-model vectors (state old). Ids must be new to the shard.
        ``dry_run`` only validates (the router checks every shard before any shard applies a batch)."""
        version = _check_version(version)
        with self._lock:
            self._set_threads()
            if self._promoted:
                raise ValueError("index is promoted: the old space was dropped and takes no more items")
            if self._old_space and self._old_space.version != version:
                raise ValueError(
                    f"old space holds model version {self._old_space.version!r}; refusing "
                    f"vectors of version {version!r} (spaces never mix)"
                )
            ids, vectors = self._batch(ids, vectors, self._old_space)
            known = locate_sorted(self._sorted_ids, ids, missing="mask") >= 0
            if known.any():
                raise ValueError(f"ids already loaded in this shard: {show_ids(ids[known])}")
            if self._pending is None:
                self._check_trainable(len(ids), "old")
            if dry_run:
                return self._counts
            if self._pending is None:
                self._pending = self._trained_index(vectors)
                self._backfilled = slot_index(faiss.clone_index(self._pending.index))  # empty, same training
                self._old_space = SpaceInfo(version, vectors.shape[1])
            slots = np.arange(len(self._ids), len(self._ids) + len(ids), dtype=np.int64)
            self._pending.add(slots, vectors)
            self._ids = np.concatenate([self._ids, ids])
            self._state = np.concatenate([self._state, np.full(len(ids), Space.OLD.code, dtype=np.int8)])
            self._sort_ids()
            self._touch("pending")
            self._publish()
            self._metrics.observe_write("load_old", len(ids))
            return self._counts

    def upsert(self, ids, vectors, state: Space, version: str, dry_run: bool = False) -> dict[str, int]:
        """Put new-space vectors for gallery items: old items move to the new space, transformed ones are
        replaced. Idempotent: the same batch twice gives the same state. ``dry_run`` only validates."""
        with self._lock:
            self._set_threads()
            ids, vectors, slots, code = self._validated_upsert(ids, vectors, state, version)
            if dry_run:
                return self._counts
            if self._new is None:
                self._new = self._trained_index(vectors)
                self._new_space = SpaceInfo(version, vectors.shape[1])
            waiting = self._state[slots] == Space.OLD.code
            moving = slots[waiting]
            if len(moving):
                assert self._pending is not None and self._backfilled is not None  # old items exist: load_old ran
                old_vectors = self._pending.reconstruct(moving)
                self._pending.remove(moving)
                self._backfilled.add(moving, old_vectors)
                self._new.add(moving, vectors[waiting])
            replacing = ~waiting
            if replacing.any():
                self._new.replace(slots[replacing], vectors[replacing])
            self._state[slots] = code
            self._touch("pending", "backfilled", "new")
            self._publish()
            self._metrics.observe_write("upsert", len(ids))
            return self._counts

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
        if self._new is None:
            self._check_trainable(len(ids), "new")
        return ids, vectors, slots, state.code

    def _batch(self, ids, vectors, space: SpaceInfo | None) -> tuple[np.ndarray, np.ndarray]:
        """A validated batch, normalised when the metric is cosine (so the index stores unit vectors)."""
        ids, vectors = as_batch(ids, vectors, space.dim if space else None)
        return ids, (unit_rows(vectors, "vectors", ids) if self._config.metric is Metric.COSINE else vectors)

    def _queries(self, queries, dim: int | None, name: str) -> np.ndarray:
        q = as_queries(queries, dim, self._config.max_queries, name)
        return unit_rows(q, name) if self._config.metric is Metric.COSINE else q

    def promote(self) -> dict[str, int]:
        """Make the new space the only one (every item must be in it); the old vectors are dropped."""
        with self._lock:
            waiting = self._state == Space.OLD.code
            if waiting.any():
                raise ValueError(
                    f"cannot promote: {int(waiting.sum())} items are not in the new space yet "
                    f"(ids {show_ids(self._ids[waiting])})"
                )
            self._pending = self._backfilled = None
            self._promoted = True
            self._touch("pending", "backfilled")
            self._publish()
            return self._counts

    def rollback(self) -> dict[str, int]:
        """Return every item to the old space and forget the new space (its version may then change)."""
        with self._lock:
            self._set_threads()
            if self._promoted:
                raise ValueError("cannot roll back: the index was promoted and the old space dropped")
            moved = np.flatnonzero(self._state != Space.OLD.code).astype(np.int64)
            if len(moved):
                assert self._pending is not None and self._backfilled is not None  # not promoted, items loaded
                self._pending.add(moved, self._backfilled.reconstruct(moved))
                self._backfilled.reset()
            self._new = None
            self._new_space = None
            self._state[:] = Space.OLD.code
            self._touch("pending", "backfilled", "new")
            self._publish()
            return self._counts

    # ----------------------------------------------------------------- queries
    def search(self, queries_old, queries_new, k: int, strategy: Strategy) -> TopK:
        """Top-k per query under a strategy (see module docstring of raybackfill.index.router)."""
        strategy = parse(Strategy, strategy)
        k = check_k(k, self._config.max_k)
        started = time.perf_counter()
        with self._lock:
            self._set_threads()
            parts = self._plan(queries_old, queries_new, strategy)
            rows = {len(q) for _, q, _ in parts}
            if len(rows) > 1:
                raise ValueError(f"queries_old and queries_new must hold the same queries, got {sorted(rows)} rows")
            results = [self._search_part(name, q, k, code) for name, q, code in parts if self._size(name)]
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
            if self._promoted:
                raise ValueError("strategy 'old' is gone: the index was promoted and the old space dropped")
            q = self._queries(self._required(queries_old, "queries_old", strategy), old_dim, "queries_old")
            return [("pending", q, Space.OLD.code), ("backfilled", q, Space.OLD.code)]
        if strategy is Strategy.COMPATIBLE:
            q = self._queries(self._required(queries_new, "queries_new", strategy), new_dim or old_dim, "queries_new")
            if self._size("pending") and new_dim is not None and new_dim != old_dim:
                raise ValueError(
                    f"strategy 'compatible' compares new queries with old vectors, but the new space has dim "
                    f"{new_dim} and the old space dim {old_dim}, and {self._size('pending')} items are not in "
                    f"the new space yet: use 'rank_merge', or move every item to the new space first"
                )
            return [("new", q, None), ("pending", q, Space.OLD.code)]
        parts: list[tuple[str, np.ndarray, int | None]] = []
        if self._size("pending") or (queries_old is not None and not self._promoted):
            q = self._queries(self._required(queries_old, "queries_old", strategy), old_dim, "queries_old")
            parts.append(("pending", q, Space.OLD.code))
        if self._size("new") or queries_new is not None:
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
        return {"pending": self._pending, "backfilled": self._backfilled, "new": self._new}[name]

    def _size(self, name: str) -> int:
        index = self._index(name)
        return int(index.ntotal) if index is not None else 0

    def _search_part(self, name: str, queries: np.ndarray, k: int, code: int | None) -> TopK:
        store = self._index(name)
        assert store is not None  # only non-empty indexes are searched
        faiss.cvar.distance_compute_blas_threshold = BLAS_MIN_QUERIES * store.index.d  # per process; under the lock
        scores, labels = self._searchable(name, store.index, k).search(queries, min(k, store.ntotal))
        slots = store.slots_of(labels)
        hit = slots >= 0
        safe = np.where(hit, slots, 0)
        ids = np.where(hit, self._ids[safe], EMPTY_ID)
        spaces = self._state[safe] if code is None else np.full(slots.shape, code, dtype=np.int8)
        return TopK(ids, scores, spaces.astype(np.int8))

    def _touch(self, *names: str) -> None:
        for name in names:
            self._gpu_mirrors.pop(name, None)

    def _searchable(self, name: str, index: faiss.Index, k: int) -> faiss.Index:
        """The index itself, or its GPU copy (made on the first search after the index last changed)."""
        if self._gpu is None or k > GPU_MAX_K:
            return index
        if name not in self._gpu_mirrors:
            self._gpu_mirrors[name] = faiss.index_cpu_to_gpu(self._gpu, 0, index)
        return self._gpu_mirrors[name]

    def vectors(self, ids) -> ItemVectors:
        """The stored vectors of some items (e.g. to use an item as a query)."""
        ids = as_ids(ids)
        with self._lock:
            slots = self._lookup(ids)
            states = self._state[slots].copy()
            old = new = None
            if self._old_space is not None and not self._promoted:
                old = np.zeros((len(ids), self._old_space.dim), dtype=np.float32)
                assert self._pending is not None and self._backfilled is not None  # not promoted
                waiting = states == Space.OLD.code
                if waiting.any():
                    old[waiting] = self._pending.reconstruct(slots[waiting])
                if (~waiting).any():
                    old[~waiting] = self._backfilled.reconstruct(slots[~waiting])
            if self._new is not None:
                assert self._new_space is not None  # set with the new index
                new = np.zeros((len(ids), self._new_space.dim), dtype=np.float32)
                moved = states != Space.OLD.code
                if moved.any():
                    new[moved] = self._new.reconstruct(slots[moved])
            return ItemVectors(ids, states, old, new)

    # ----------------------------------------------------------------- light calls
    @ray.method(concurrency_group="light")
    def counts(self) -> dict[str, int]:
        return self._counts

    @ray.method(concurrency_group="light")
    def describe(self) -> dict:
        return self._description

    # ----------------------------------------------------------------- snapshots
    @ray.method(concurrency_group="snapshot")
    def snapshot(self) -> str:
        """Write the shard (indexes, ids, states, provenance) under its snapshot URI; return the version URI."""
        if not self._snapshot_uri:
            raise ValueError("this shard has no snapshot_uri; create it with one to take snapshots")
        with self._lock:
            self._set_threads()
            stores = {name: store for name in INDEXES if (store := self._index(name)) is not None}
            items = io.BytesIO()
            rows = {f"{name}_rows": store.row_slots() for name, store in stores.items()}
            np.savez(items, ids=self._ids, state=self._state, **rows)  # type: ignore[arg-type]  # mypy: **rows vs allow_pickle
            blobs: dict[str, bytes | memoryview] = {
                "meta.json": json.dumps(self._meta()).encode(),
                "items.npz": items.getvalue(),
            }
            blobs |= {f"{name}.faiss": _to_bytes(store.index) for name, store in stores.items()}
            items_held = len(self._ids)
        uri = write_snapshot(self._snapshot_uri, blobs)
        logger.info("snapshot of %d items written to %s", items_held, uri)
        return uri

    def _meta(self) -> dict:
        return {
            "format": SNAPSHOT_FORMAT,
            "config": dataclasses.asdict(self._config),
            "old_space": dataclasses.asdict(self._old_space) if self._old_space else None,
            "new_space": dataclasses.asdict(self._new_space) if self._new_space else None,
            "promoted": self._promoted,
        }

    def _restore(self, blobs: dict[str, bytes]) -> None:
        meta = json.loads(blobs["meta.json"])
        where = f"snapshot under {self._snapshot_uri}"
        if meta.get("format") != SNAPSHOT_FORMAT:
            raise ValueError(f"{where} has format {meta.get('format')!r}, expected {SNAPSHOT_FORMAT}")
        config = {key: value for key, value in meta["config"].items() if key != "use_gpu"}
        ours = {key: value for key, value in dataclasses.asdict(self._config).items() if key != "use_gpu"}
        if config != ours:
            raise ValueError(f"{where} was written with index config {config}, this shard has {ours}")
        with np.load(io.BytesIO(blobs["items.npz"])) as items:
            self._ids = items["ids"].astype(np.int64)
            self._state = items["state"].astype(np.int8)
            restored = {
                name: slot_index(_from_bytes(blobs[f"{name}.faiss"]), items[f"{name}_rows"])
                for name in INDEXES
                if f"{name}.faiss" in blobs
            }
        self._sort_ids()
        self._old_space = SpaceInfo(**meta["old_space"]) if meta["old_space"] else None
        self._new_space = SpaceInfo(**meta["new_space"]) if meta["new_space"] else None
        self._promoted = bool(meta["promoted"])
        for store in restored.values():
            if isinstance(store.index, faiss.IndexIVF):
                store.index.nprobe = self._config.nprobe
        self._pending = restored.get("pending")
        self._backfilled = restored.get("backfilled")
        self._new = restored.get("new")
        self._publish()
