"""FAISS indexes addressed by slot, where moving a batch of items costs O(batch), not O(index size).

A shard moves every gallery item between its indexes during a backfill (pending -> backfilled, a
transformed vector replaced by a true new one). FAISS's own id-keyed flat index (IndexIDMap2 over
IndexFlat) removes ids by testing every stored id and compacting the whole array: O(index size) per
batch, time during which the shard answers no query. Each layout (raybackfill.index.kinds) gets its own
O(batch) way:

- :class:`CodesSlots` (Flat, PQ, SQ, RQ, also behind an OPQ/PCA transform): the codes are one fixed-size row
  per vector in any order, plus two numpy maps (row -> slot, slot -> row). Remove fills the holes with the
  rows from the end of the array, then drops the tail (``remove_ids(IDSelectorRange)`` over a tail moves no
  memory); replace overwrites code rows in place (``sa_encode``); a move between two indexes of the same
  training copies code rows, so a compressed vector is never decoded and re-encoded.
- :class:`IVFSlots` (any IVF, also behind a transform): FAISS's ids are the slots, and a hashtable direct
  map removes and reconstructs by id without scanning the lists.
- :class:`GraphSlots` (HNSW, NSG, refined indexes: FAISS cannot remove from them): rows are appended and a
  removed row is marked deleted. An HNSW search whose efSearch is at least 2k asks for 2k rows and drops the
  deleted ones (the graph visits the same nodes for any k up to efSearch, so this is the answer an IDSelector
  gives, without the selector's test of every visited node), and searches the few queries left short again
  with the selector; another kind that takes an IDSelector is searched with one, and one that takes none is
  over-fetched and refilled until every query has k live rows or none are left. Past a
  deleted fraction the shard rebuilds the index from the live rows in the background
  (:meth:`GraphSlots.begin_rebuild` / :meth:`GraphSlots.finish_rebuild`), replaying the moves made meanwhile.

Every class has the same interface (add, replace, remove, reconstruct, move_to, search, reset, maybe_compact), so
the shard never looks at the layout.

Memory. FAISS never gives back the capacity of its storage when vectors leave it (a ``std::vector`` keeps its
capacity when it shrinks), and a backfill empties the pending index while it fills two others. So
:meth:`CodesSlots.maybe_compact` and :meth:`IVFSlots.maybe_compact` copy an index that has lost half of its
largest size into exact-size storage (``faiss.clone_index``: same rows, same order, same ids), drop the old
one and ask the C allocator to hand the freed pages back to the system (:func:`release_free_memory`). Each
compaction halves the size it compares against, so the copying costs O(1) per removed vector. A shard process
also has glibc map every large block on its own (:func:`map_large_blocks`): lists that grow by reallocation then
leave no holes in the heap.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import hashlib
import logging
from collections.abc import Mapping
from typing import Any, cast

import faiss
import numpy as np

from raybackfill.index.kinds import layout_of, search_parameters, unwrap
from raybackfill.types import Layout

NO_ROW = -1
NO_PARAMS: Mapping[str, Any] = {}

logger = logging.getLogger(__name__)


M_MMAP_THRESHOLD = -3  # glibc's mallopt parameter number
MMAP_THRESHOLD_BYTES = 256 * 1024  # blocks this large or larger get pages of their own (see map_large_blocks)


def _glibc(function: str):
    name = ctypes.util.find_library("c")
    try:
        return getattr(ctypes.CDLL(name), function) if name else None
    except (OSError, AttributeError):  # not glibc (musl, macOS): the allocator is left as it is
        return None


_MALLOC_TRIM = _glibc("malloc_trim")
_MALLOPT = _glibc("mallopt")


def map_large_blocks(threshold: int = MMAP_THRESHOLD_BYTES) -> bool:
    """Have glibc give every block of at least ``threshold`` bytes pages of its own (``mmap``), for the rest of the
    process's life; False where there is no glibc.

    Inverted lists and code arrays grow by reallocation while a backfill fills them. By default glibc raises its
    mmap threshold to the size of the largest mapped block freed so far (up to 32 MB), so after the first
    reallocations those blocks come from the heap instead: freed blocks leave holes there, and a reused block's
    spare capacity is resident. Mapped blocks give their pages back on free and keep untouched capacity out of
    the resident set. Setting the threshold also turns the raising off. Past glibc's limit on mapped blocks
    (``M_MMAP_MAX``, 65,536) blocks come from the heap again, so the setting never makes an allocation fail."""
    if _MALLOPT is None:
        return False
    return bool(_MALLOPT(M_MMAP_THRESHOLD, int(threshold)))


def release_free_memory() -> bool:
    """Ask glibc to return the free pages of its heap to the system (``malloc_trim(0)``); False where there is
    no glibc. After FAISS frees a large index the pages are free but still counted against the process."""
    if _MALLOC_TRIM is None:
        return False
    _MALLOC_TRIM(0)
    return True


class _Compacting:
    """Largest size since the last compaction, and the compaction rule shared by the code and IVF layouts."""

    high_water: int = 0

    def _grew(self, ntotal: int) -> None:
        self.high_water = max(self.high_water, ntotal)

    def maybe_compact(self, min_rows: int) -> bool:
        """Copy the index into exact-size storage when it holds less than half of its largest size and at least
        ``min_rows`` vectors left it since; True when it did."""
        ntotal = int(self.index.ntotal)  # type: ignore[attr-defined]
        if 2 * ntotal >= self.high_water or self.high_water - ntotal < min_rows:
            return False
        self._swap_index(faiss.clone_index(self.index))  # type: ignore[attr-defined]
        logger.debug("compacted an index from %d to %d vectors", self.high_water, ntotal)
        self.high_water = ntotal
        release_free_memory()
        return True

    def _swap_index(self, index: faiss.Index) -> None:
        raise NotImplementedError


def _ids(slots: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(slots, dtype=np.int64)


class RowMap:
    """Row -> slot and slot -> row maps of an index whose FAISS labels are row numbers."""

    def __init__(self, row_slots: np.ndarray | None = None) -> None:
        self.row_slot = np.zeros(0, np.int64) if row_slots is None else np.asarray(row_slots, np.int64).copy()
        self.slot_row = np.full(0, NO_ROW, np.int64)
        self.map_rows(np.arange(len(self.row_slot), dtype=np.int64))

    def map_rows(self, rows: np.ndarray) -> None:
        slots = self.row_slot[rows]
        if len(slots) and slots.max() >= len(self.slot_row):
            grown = np.full(max(int(slots.max()) + 1, 2 * len(self.slot_row)), NO_ROW, np.int64)
            grown[: len(self.slot_row)] = self.slot_row
            self.slot_row = grown
        self.slot_row[slots] = rows

    def append(self, slots: np.ndarray) -> np.ndarray:
        start = len(self.row_slot)
        self.row_slot = np.concatenate([self.row_slot, slots.astype(np.int64)])
        rows = np.arange(start, len(self.row_slot), dtype=np.int64)
        self.map_rows(rows)
        return rows

    def rows(self, slots: np.ndarray) -> np.ndarray:
        slots = np.asarray(slots, np.int64)
        inside = slots < len(self.slot_row)
        rows = np.full(len(slots), NO_ROW, np.int64)
        rows[inside] = self.slot_row[slots[inside]]
        if (rows == NO_ROW).any():
            raise RuntimeError(f"index inconsistency: {int((rows == NO_ROW).sum())} slots are not in this index")
        return rows

    def slots_of(self, labels: np.ndarray) -> np.ndarray:
        """Search labels (rows, -1 for an empty result) -> slots (-1 kept)."""
        if not len(self.row_slot):
            return np.full(labels.shape, NO_ROW, np.int64)
        return np.where(labels >= 0, self.row_slot[np.maximum(labels, 0)], NO_ROW)


class CodesSlots(_Compacting):
    """An index of fixed-size code rows (IndexFlatCodes, possibly behind transforms) over slots; rows are kept
    dense, so a flat index is always searched by a plain BLAS scan."""

    layout = Layout.CODES

    def __init__(self, index: faiss.Index, row_slots: np.ndarray | None = None) -> None:
        self.index = index
        self._codes_index: Any = cast(Any, unwrap(index))  # the IndexFlatCodes owning the code rows
        self.code_size = int(self._codes_index.code_size)
        self._map = RowMap(row_slots)
        if len(self._map.row_slot) != index.ntotal:
            raise ValueError(f"{len(self._map.row_slot)} slots for an index of {index.ntotal} rows")
        self._dirty: np.ndarray | None = None  # rows written since track() (a snapshot in progress)
        self.high_water = int(index.ntotal)

    @property
    def ntotal(self) -> int:
        return int(self.index.ntotal)

    size = ntotal

    def row_slots(self) -> np.ndarray:
        """Row -> slot (saved next to the index in a snapshot)."""
        return self._map.row_slot

    # ------------------------------------------------------------- snapshot support
    def track(self) -> None:
        """Start recording which rows are written (for a snapshot copied in chunks)."""
        self._dirty = np.zeros(self.ntotal, bool)

    def untrack(self) -> np.ndarray:
        """Stop recording; the rows written since :meth:`track` that still exist."""
        dirty, self._dirty = self._dirty, None
        if dirty is None:
            return np.zeros(0, np.int64)
        return np.flatnonzero(dirty[: self.ntotal]).astype(np.int64)

    def _written(self, rows: np.ndarray) -> None:
        if self._dirty is None or not len(rows):
            return
        top = int(rows.max()) + 1
        if top > len(self._dirty):
            grown = np.zeros(max(top, 2 * len(self._dirty)), bool)
            grown[: len(self._dirty)] = self._dirty
            self._dirty = grown
        self._dirty[rows] = True

    def codes(self) -> np.ndarray:
        """A writable (ntotal, code_size) uint8 view of the code rows. Taken afresh after every add or remove:
        both may reallocate the storage."""
        n = self.ntotal * self.code_size
        if n == 0:
            return np.zeros((0, self.code_size), np.uint8)
        return faiss.rev_swig_ptr(self._codes_index.codes.data(), n).reshape(self.ntotal, self.code_size)

    def prepare(self, vectors: np.ndarray) -> np.ndarray:
        """The code rows of ``vectors``: the encoding a later :meth:`add` or :meth:`replace` of them would do,
        computed without touching the stored rows (so outside the shard lock)."""
        return self.index.sa_encode(np.ascontiguousarray(vectors, np.float32))

    def add(self, slots: np.ndarray, vectors: np.ndarray, prepared: np.ndarray | None = None) -> None:
        if prepared is not None:
            self.add_codes(slots, prepared)
            return
        self.index.add(vectors)
        self._written(self._map.append(slots))
        self._grew(self.ntotal)

    def add_codes(self, slots: np.ndarray, codes: np.ndarray) -> None:
        self._codes_index.add_sa_codes(np.ascontiguousarray(codes, dtype=np.uint8))
        self.index.ntotal = self._codes_index.ntotal  # a transform in front counts its own ntotal
        self._written(self._map.append(slots))
        self._grew(self.ntotal)

    def _swap_index(self, index: faiss.Index) -> None:
        self.index = index
        self._codes_index = cast(Any, unwrap(index))

    def replace(self, slots: np.ndarray, vectors: np.ndarray, prepared: np.ndarray | None = None) -> None:
        rows = self._map.rows(slots)
        self.codes()[rows] = self.prepare(vectors) if prepared is None else prepared
        self._written(rows)

    def remove(self, slots: np.ndarray) -> None:
        rows = self._map.rows(slots)
        n, cut = self.ntotal, self.ntotal - len(rows)
        gone = np.zeros(n - cut, dtype=bool)  # which tail rows are themselves removed
        gone[rows[rows >= cut] - cut] = True
        holes = np.sort(rows[rows < cut])  # removed rows that the kept tail rows fill
        movers = cut + np.flatnonzero(~gone)
        row_slot, slot_row = self._map.row_slot, self._map.slot_row
        if len(holes):
            view = self.codes()
            view[holes] = view[movers]
            row_slot[holes] = row_slot[movers]
            slot_row[row_slot[holes]] = holes
            self._written(holes)
        slot_row[np.asarray(slots, np.int64)] = NO_ROW
        self._map.row_slot = row_slot[:cut].copy()
        removed = self.index.remove_ids(faiss.IDSelectorRange(cut, n))
        if removed != n - cut:
            raise RuntimeError(f"index inconsistency: removed {removed} of {n - cut} tail rows")

    def reconstruct(self, slots: np.ndarray) -> np.ndarray:
        codes = self.codes()[self._map.rows(slots)]
        if isinstance(self.index, faiss.IndexFlat):
            return codes.view(np.float32).copy()
        return self.index.sa_decode(np.ascontiguousarray(codes))

    def move_to(self, other: SlotIndex, slots: np.ndarray) -> None:
        """Move ``slots`` from this index to ``other``; between indexes of the same kind the code rows move
        as they are (no decode/encode round trip)."""
        if isinstance(other, CodesSlots) and other.code_size == self.code_size:
            other.add_codes(slots, self.codes()[self._map.rows(slots)])
        else:
            other.add(slots, self.reconstruct(slots))
        self.remove(slots)

    def search(self, queries: np.ndarray, k: int, params: Mapping[str, Any] = NO_PARAMS, index=None):
        """(scores, slots) of the top ``k`` of each query; ``index`` searches a copy (a GPU mirror) instead."""
        keep: list = []
        scores, labels = _search(index or self.index, queries, k, search_parameters(self.index, params, None, keep))
        return scores, self._map.slots_of(labels)

    def reset(self) -> None:
        self.index.reset()
        self._map = RowMap()
        self._swap_index(faiss.clone_index(self.index))  # reset keeps the capacity; an empty copy has none
        self.high_water = 0
        release_free_memory()


class IVFSlots(_Compacting):
    """An IVF index (possibly behind transforms) whose FAISS ids are the slots (hashtable direct map: remove
    and reconstruct by id)."""

    layout = Layout.IVF

    def __init__(self, index: faiss.Index) -> None:
        self.index = index
        self._ivf: Any = faiss.extract_index_ivf(index)
        if self._ivf.direct_map.type != faiss.DirectMap.Hashtable:  # type: ignore[attr-defined]  # stubs omit it
            self._ivf.set_direct_map_type(faiss.DirectMap.Hashtable)  # type: ignore[attr-defined]
        self._dirty: np.ndarray | None = None  # lists changed since track() (a snapshot in progress)
        self._sizes = np.zeros(0, np.int64)
        self.high_water = int(index.ntotal)
        # Coarse assignment (the costly part of an add) done here rather than inside FAISS's add, so that
        # prepare() can run it outside the shard lock and a move between indexes of one training skips it:
        # only for an IVF alone or behind plain transforms (other wrappers add through FAISS).
        self._chain = _transform_chain(index, self._ivf)
        self._list_of = np.full(0, NO_ROW, np.int64)  # slot -> inverted list (when _chain is not None)
        self._quantizer_key: bytes | None = None
        if self._chain is not None and index.ntotal:
            self._map_lists(np.arange(self.nlist, dtype=np.int64))

    # ------------------------------------------------------------- snapshot support
    @property
    def nlist(self) -> int:
        return int(self._ivf.nlist)

    def list_sizes(self) -> np.ndarray:
        invlists = self._ivf.invlists
        return np.fromiter((invlists.list_size(i) for i in range(self.nlist)), np.int64, self.nlist)

    def track(self) -> None:
        """Start recording which inverted lists change (for a snapshot copied list range by list range). A
        change to a list changes its size (an add appends; a remove moves the list's last entry into the hole),
        so comparing sizes after each change finds every changed list."""
        self._dirty = np.zeros(self.nlist, bool)
        self._sizes = self.list_sizes()

    def untrack(self) -> np.ndarray:
        """Stop recording; the lists changed since :meth:`track`."""
        dirty, self._dirty = self._dirty, None
        return np.zeros(0, np.int64) if dirty is None else np.flatnonzero(dirty).astype(np.int64)

    def _changed(self) -> None:
        if self._dirty is not None:
            sizes = self.list_sizes()
            self._dirty |= sizes != self._sizes
            self._sizes = sizes

    def copy_lists(self, lists: np.ndarray) -> dict[str, np.ndarray]:
        """The content of some inverted lists: list numbers, sizes, and their ids and codes concatenated."""
        invlists, code_size = self._ivf.invlists, int(self._ivf.code_size)
        sizes = np.array([invlists.list_size(int(i)) for i in lists], np.int64)
        ids = [
            faiss.rev_swig_ptr(invlists.get_ids(int(i)), int(n)).copy() for i, n in zip(lists, sizes, strict=True) if n
        ]
        codes = [
            faiss.rev_swig_ptr(invlists.get_codes(int(i)), int(n) * code_size).copy()
            for i, n in zip(lists, sizes, strict=True)
            if n
        ]
        return {
            "lists": np.asarray(lists, np.int64),
            "sizes": sizes,
            "ids": np.concatenate(ids) if ids else np.zeros(0, np.int64),
            "codes": np.concatenate(codes) if codes else np.zeros(0, np.uint8),
        }

    def set_lists(self, content: Mapping[str, np.ndarray]) -> None:
        """Replace the given lists with ``content`` (from :meth:`copy_lists`); call :meth:`finish_restore` after
        the last one."""
        invlists, code_size = self._ivf.invlists, int(self._ivf.code_size)
        start = 0
        for i, n in zip(content["lists"].tolist(), content["sizes"].tolist(), strict=True):
            invlists.resize(i, 0)
            if n:
                ids = np.ascontiguousarray(content["ids"][start : start + n], np.int64)
                codes = np.ascontiguousarray(content["codes"][start * code_size : (start + n) * code_size], np.uint8)
                invlists.add_entries(i, n, faiss.swig_ptr(ids), faiss.swig_ptr(codes))
            start += n

    def finish_restore(self) -> None:
        """Count the restored entries and rebuild the id -> (list, offset) map."""
        if self._chain is not None:
            self._list_of = np.full(0, NO_ROW, np.int64)
            self._map_lists(np.arange(self.nlist, dtype=np.int64))
        total = int(self.list_sizes().sum())
        self._ivf.ntotal = total
        self.index.ntotal = total  # a transform in front counts its own ntotal
        self.high_water = total
        self._ivf.set_direct_map_type(faiss.DirectMap.NoMap)  # type: ignore[attr-defined]
        self._ivf.set_direct_map_type(faiss.DirectMap.Hashtable)  # type: ignore[attr-defined]  # rebuilt from lists

    @property
    def ntotal(self) -> int:
        return int(self.index.ntotal)

    size = ntotal

    def row_slots(self) -> np.ndarray:
        return np.zeros(0, np.int64)  # the ids live inside the IVF index itself

    @property
    def quantizer_key(self) -> bytes:
        """A fingerprint of the coarse centroids: two indexes with the same key assign a vector to the same list."""
        if self._quantizer_key is None:
            quantizer = self._ivf.quantizer
            centroids = quantizer.reconstruct_n(0, quantizer.ntotal)
            self._quantizer_key = hashlib.blake2b(centroids.tobytes(), digest_size=16).digest()
        return self._quantizer_key

    def _map_lists(self, lists: np.ndarray) -> None:
        invlists = self._ivf.invlists
        for i in lists.tolist():
            n = invlists.list_size(i)
            if n:
                self._set_lists(faiss.rev_swig_ptr(invlists.get_ids(i), n).copy(), np.full(n, i, np.int64))

    def _set_lists(self, slots: np.ndarray, lists: np.ndarray) -> None:
        if len(slots) and int(slots.max()) >= len(self._list_of):
            grown = np.full(max(int(slots.max()) + 1, 2 * len(self._list_of)), NO_ROW, np.int64)
            grown[: len(self._list_of)] = self._list_of
            self._list_of = grown
        self._list_of[slots] = lists

    def prepare(self, vectors: np.ndarray) -> tuple[np.ndarray, np.ndarray] | None:
        """(vectors after the index's transforms, their inverted lists): the coarse assignment an :meth:`add`
        would do, computed without touching the lists (so outside the shard lock); None when this index adds
        through FAISS."""
        if self._chain is None:
            return None
        x = np.ascontiguousarray(vectors, np.float32)
        for transform in self._chain:
            x = transform.apply(x)
        _, lists = self._ivf.quantizer.search(x, 1)
        return np.ascontiguousarray(x, np.float32), lists.ravel().astype(np.int64)

    def add(
        self, slots: np.ndarray, vectors: np.ndarray, prepared: tuple[np.ndarray, np.ndarray] | None = None
    ) -> None:
        if prepared is None:
            prepared = self.prepare(vectors)
        if prepared is None:
            self.index.add_with_ids(vectors, _ids(slots))
        else:
            self._add_assigned(_ids(slots), *prepared)
        self._changed()
        self._grew(self.ntotal)

    def _add_assigned(self, ids: np.ndarray, x: np.ndarray, lists: np.ndarray) -> None:
        """Add transformed vectors to given lists (FAISS encodes them; the direct map follows)."""
        if (lists < 0).any():
            raise RuntimeError("index inconsistency: a vector without an inverted list")
        self._ivf.add_core(len(ids), faiss.swig_ptr(x), faiss.swig_ptr(ids), faiss.swig_ptr(lists))
        self.index.ntotal = self._ivf.ntotal  # a transform in front counts its own ntotal
        self._set_lists(ids, lists)

    def _swap_index(self, index: faiss.Index) -> None:
        self.index = index
        self._ivf = faiss.extract_index_ivf(index)
        self._chain = _transform_chain(index, self._ivf)

    def replace(
        self, slots: np.ndarray, vectors: np.ndarray, prepared: tuple[np.ndarray, np.ndarray] | None = None
    ) -> None:
        self.remove(slots)
        self.add(slots, vectors, prepared)

    def remove(self, slots: np.ndarray) -> None:
        slots = _ids(slots)
        removed = self.index.remove_ids(faiss.IDSelectorArray(len(slots), faiss.swig_ptr(slots)))
        self._changed()
        if removed != len(slots):
            raise RuntimeError(f"index inconsistency: removed {removed} of {len(slots)} vectors")

    def reconstruct(self, slots: np.ndarray) -> np.ndarray:
        return self.index.reconstruct_batch(_ids(slots))

    def move_to(self, other: SlotIndex, slots: np.ndarray) -> None:
        """Move ``slots`` to ``other``; into an index of the same coarse centroids each vector keeps its list,
        so the move decodes and re-encodes but searches no centroid."""
        if (
            isinstance(other, IVFSlots)
            and self._chain is not None
            and other._chain is not None
            and other.quantizer_key == self.quantizer_key
        ):
            ids = _ids(slots)
            other._add_assigned(ids, np.ascontiguousarray(self._ivf.reconstruct_batch(ids)), self._list_of[ids])
            other._changed()
            other._grew(other.ntotal)
        else:
            other.add(slots, self.reconstruct(slots))
        self.remove(slots)

    def search(self, queries: np.ndarray, k: int, params: Mapping[str, Any] = NO_PARAMS, index=None):
        keep: list = []
        scores, labels = _search(index or self.index, queries, k, search_parameters(self.index, params, None, keep))
        return scores, labels

    def reset(self) -> None:
        self.index.reset()
        self._swap_index(faiss.clone_index(self.index))  # reset keeps the lists' capacity; an empty copy has none
        self.high_water = 0
        release_free_memory()
        if self._dirty is not None:
            self._dirty[:] = True


class GraphSlots:
    """An index FAISS cannot remove from (HNSW, NSG, refined): removed rows are marked deleted and filtered at
    search time; the shard rebuilds it from the live rows past a deleted fraction."""

    layout = Layout.GRAPH

    def __init__(self, index: faiss.Index, row_slots: np.ndarray | None = None, alive: np.ndarray | None = None):
        self.index = index
        self._map = RowMap(row_slots)
        if len(self._map.row_slot) != index.ntotal:
            raise ValueError(f"{len(self._map.row_slot)} slots for an index of {index.ntotal} rows")
        self.alive = np.ones(index.ntotal, bool) if alive is None else np.asarray(alive, bool).copy()
        if len(self.alive) != index.ntotal:
            raise ValueError(f"{len(self.alive)} alive flags for an index of {index.ntotal} rows")
        self._map.slot_row[self._map.row_slot[~self.alive]] = NO_ROW
        self._deleted = int((~self.alive).sum())
        self._journal: list[tuple[str, np.ndarray, np.ndarray | None]] | None = None  # moves during a rebuild
        self.takes_selector = True  # False once the index refused a search with an IDSelector

    @property
    def ntotal(self) -> int:
        return int(self.index.ntotal)

    @property
    def size(self) -> int:
        """Live rows (searchable items)."""
        return self.ntotal - self._deleted

    @property
    def deleted(self) -> int:
        return self._deleted

    def row_slots(self) -> np.ndarray:
        return self._map.row_slot

    def prepare(self, vectors: np.ndarray) -> None:
        """Nothing: a graph insertion cannot be computed apart from the graph."""
        return None

    def add(self, slots: np.ndarray, vectors: np.ndarray, prepared: None = None) -> None:
        self.index.add(vectors)
        self._map.append(slots)
        self.alive = np.concatenate([self.alive, np.ones(len(slots), bool)])
        if self._journal is not None:
            self._journal.append(("add", np.array(slots, np.int64), np.array(vectors, np.float32)))

    def replace(self, slots: np.ndarray, vectors: np.ndarray, prepared: None = None) -> None:
        self.remove(slots)
        self.add(slots, vectors)

    def remove(self, slots: np.ndarray) -> None:
        rows = self._map.rows(slots)
        self.alive[rows] = False
        self._map.slot_row[np.asarray(slots, np.int64)] = NO_ROW
        self._deleted += len(rows)
        if self._journal is not None:
            self._journal.append(("remove", np.array(slots, np.int64), None))

    def reconstruct(self, slots: np.ndarray) -> np.ndarray:
        return self.index.reconstruct_batch(self._map.rows(slots))

    def move_to(self, other: SlotIndex, slots: np.ndarray) -> None:
        other.add(slots, self.reconstruct(slots))
        self.remove(slots)

    def maybe_compact(self, min_rows: int) -> bool:
        """A graph keeps deleted rows until its background rebuild (:meth:`begin_rebuild`), which compacts it."""
        return False

    def search(self, queries: np.ndarray, k: int, params: Mapping[str, Any] = NO_PARAMS, index=None):
        index = index or self.index
        k = min(k, self.size)
        if not self._deleted:
            keep: list = []
            scores, labels = _search(index, queries, k, search_parameters(self.index, params, None, keep))
            return scores, self._map.slots_of(labels)
        if self._fetch_twice_is_same(index, k, params):
            return self._search_fetch_twice(index, queries, k, params)
        if self.takes_selector:
            keep = []
            bitmap = np.packbits(self.alive, bitorder="little")
            selector = faiss.IDSelectorBitmap(self.ntotal, faiss.swig_ptr(bitmap))
            keep += [bitmap, selector]
            try:
                scores, labels = _search(index, queries, k, search_parameters(self.index, params, selector, keep))
                return scores, self._map.slots_of(labels)
            except RuntimeError:  # this kind takes no selector (e.g. NSG): filter below from now on
                self.takes_selector = False
        return self._search_filtered(index, queries, k, params)

    def _fetch_twice_is_same(self, index, k: int, params: Mapping[str, Any]) -> bool:
        """Whether a plain search for 2k rows, filtered, answers as a search with an IDSelector does: an HNSW graph
        visits the same nodes for any k up to efSearch, and a selector only keeps deleted nodes out of the k
        results, so the live top k of the visited nodes are among the first 2k whenever those hold k live rows.
        The plain search skips the selector's test of every visited node."""
        if not isinstance(index, faiss.IndexHNSW) or not self.takes_selector:
            return False
        return 2 * k <= int(params.get("efSearch", index.hnsw.efSearch))

    def _search_fetch_twice(self, index, queries: np.ndarray, k: int, params: Mapping[str, Any]):
        """See :meth:`_fetch_twice_is_same`; the queries whose first 2k rows hold fewer than k live ones are searched
        again with the selector."""
        keep: list = []
        scores, labels = _search(
            index, queries, min(2 * k, self.ntotal), search_parameters(self.index, params, None, keep)
        )
        live = (labels >= 0) & self.alive[np.maximum(labels, 0)]
        first_live = np.argsort(~live, axis=1, kind="stable")[:, :k]  # live rows first, in the search's order
        out_scores = np.take_along_axis(scores, first_live, axis=1)
        out_labels = np.where(
            np.take_along_axis(live, first_live, axis=1), np.take_along_axis(labels, first_live, axis=1), NO_ROW
        )
        short = np.flatnonzero(live.sum(axis=1) < k)
        if len(short):
            bitmap = np.packbits(self.alive, bitorder="little")
            selector = faiss.IDSelectorBitmap(self.ntotal, faiss.swig_ptr(bitmap))
            keep += [bitmap, selector]
            again = _search(index, queries[short], k, search_parameters(self.index, params, selector, keep))
            out_scores[short], out_labels[short] = again
        return out_scores, self._map.slots_of(out_labels)

    def _search_filtered(self, index, queries: np.ndarray, k: int, params: Mapping[str, Any]):
        """Over-fetch and drop deleted rows; queries left with fewer than k live rows are searched again with a
        doubled fetch until they have k or the fetch covers every stored row."""
        nq = len(queries)
        out_scores = np.zeros((nq, k), np.float32)
        out_labels = np.full((nq, k), NO_ROW, np.int64)
        todo = np.arange(nq)
        fetch = min(self.ntotal, 2 * k)
        keep: list = []
        sp = search_parameters(self.index, params, None, keep)
        while len(todo):
            scores, labels = _search(index, queries[todo], fetch, sp)
            live = (labels >= 0) & self.alive[np.maximum(labels, 0)]
            enough = (live.sum(axis=1) >= k) | (fetch >= self.ntotal)
            for j in np.flatnonzero(enough):  # per finished query: its live hits, best first, first k
                hits = np.flatnonzero(live[j])[:k]
                out_scores[todo[j], : len(hits)] = scores[j, hits]
                out_labels[todo[j], : len(hits)] = labels[j, hits]
                if len(hits) < k:
                    out_scores[todo[j], len(hits) :] = scores[j, -1] if scores.shape[1] else 0.0
            todo = todo[~enough]
            fetch = min(self.ntotal, 2 * fetch)
        return out_scores, self._map.slots_of(out_labels)

    def reset(self) -> None:
        self.index.reset()
        self._map = RowMap()
        self.alive = np.zeros(0, bool)
        self._deleted = 0
        self._journal = None  # a rebuild in progress is void

    # ------------------------------------------------------------- background rebuild
    def begin_rebuild(self) -> tuple[np.ndarray, np.ndarray]:
        """(slots, vectors) of the live rows; from now on every move is journalled for :meth:`finish_rebuild`.
        Called under the shard lock; the new index is built from these outside it."""
        live = np.flatnonzero(self.alive)
        self._journal = []
        vectors = self.index.reconstruct_batch(live) if len(live) else np.zeros((0, self.index.d), np.float32)
        return self._map.row_slot[live].copy(), vectors

    def finish_rebuild(self, index: faiss.Index, slots: np.ndarray) -> int | None:
        """Swap in ``index`` (built from :meth:`begin_rebuild`'s rows, in that order) after replaying the moves
        journalled meanwhile; returns how many were replayed, or None when a reset voided the rebuild. Called
        under the shard lock."""
        if self._journal is None:
            return None
        journal, self._journal = self._journal, None
        rebuilt = GraphSlots(index, slots)
        for _op, op_slots, vectors in journal:
            if vectors is not None:  # an add
                rebuilt.add(op_slots, vectors)
            else:
                rebuilt.remove(op_slots)
        self.index, self._map, self.alive, self._deleted = rebuilt.index, rebuilt._map, rebuilt.alive, rebuilt._deleted
        return len(journal)

    def abort_rebuild(self) -> None:
        self._journal = None

    @property
    def rebuilding(self) -> bool:
        return self._journal is not None


SlotIndex = CodesSlots | IVFSlots | GraphSlots


def _transform_chain(index: faiss.Index, ivf: faiss.Index) -> list | None:
    """The vector transforms in front of ``ivf`` (empty for a bare IVF), or None when ``index`` wraps it in
    anything else (then adds go through FAISS's own ``add_with_ids``)."""
    if isinstance(index, faiss.IndexIVF):
        return []
    if isinstance(index, faiss.IndexPreTransform) and isinstance(faiss.downcast_index(index.index), faiss.IndexIVF):
        chain: Any = index.chain  # a SWIG std::vector (the stubs say list)
        return [faiss.downcast_VectorTransform(chain.at(i)) for i in range(chain.size())]
    return None


def _search(index: faiss.Index, queries: np.ndarray, k: int, params):
    if params is None:
        return index.search(queries, k)
    return index.search(queries, k, params=params)


def slot_index(index: faiss.Index, row_slots: np.ndarray | None = None, alive: np.ndarray | None = None) -> SlotIndex:
    """Wrap an empty (or deserialised) FAISS index in the slot class of its layout."""
    layout = layout_of(index)
    if layout is Layout.CODES:
        return CodesSlots(index, row_slots)
    if layout is Layout.IVF:
        return IVFSlots(index)
    return GraphSlots(index, row_slots, alive)
