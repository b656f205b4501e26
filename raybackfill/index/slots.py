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
  removed row is marked deleted. A search filters deleted rows with an IDSelector when the index takes one
  (HNSW does), else over-fetches and refills until every query has k live rows or none are left. Past a
  deleted fraction the shard rebuilds the index from the live rows in the background
  (:meth:`GraphSlots.begin_rebuild` / :meth:`GraphSlots.finish_rebuild`), replaying the moves made meanwhile.

Every class has the same interface (add, replace, remove, reconstruct, move_to, search, reset), so the shard
never looks at the layout.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, cast

import faiss
import numpy as np

from raybackfill.index.kinds import layout_of, search_parameters, unwrap
from raybackfill.types import Layout

NO_ROW = -1
NO_PARAMS: Mapping[str, Any] = {}


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


class CodesSlots:
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

    def add(self, slots: np.ndarray, vectors: np.ndarray) -> None:
        self.index.add(vectors)
        self._written(self._map.append(slots))

    def add_codes(self, slots: np.ndarray, codes: np.ndarray) -> None:
        self._codes_index.add_sa_codes(np.ascontiguousarray(codes, dtype=np.uint8))
        self.index.ntotal = self._codes_index.ntotal  # a transform in front counts its own ntotal
        self._written(self._map.append(slots))

    def replace(self, slots: np.ndarray, vectors: np.ndarray) -> None:
        rows = self._map.rows(slots)
        self.codes()[rows] = self.index.sa_encode(vectors)
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


class IVFSlots:
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
        total = int(self.list_sizes().sum())
        self._ivf.ntotal = total
        self.index.ntotal = total  # a transform in front counts its own ntotal
        self._ivf.set_direct_map_type(faiss.DirectMap.NoMap)  # type: ignore[attr-defined]
        self._ivf.set_direct_map_type(faiss.DirectMap.Hashtable)  # type: ignore[attr-defined]  # rebuilt from lists

    @property
    def ntotal(self) -> int:
        return int(self.index.ntotal)

    size = ntotal

    def row_slots(self) -> np.ndarray:
        return np.zeros(0, np.int64)  # the ids live inside the IVF index itself

    def add(self, slots: np.ndarray, vectors: np.ndarray) -> None:
        self.index.add_with_ids(vectors, _ids(slots))
        self._changed()

    def replace(self, slots: np.ndarray, vectors: np.ndarray) -> None:
        self.remove(slots)
        self.add(slots, vectors)

    def remove(self, slots: np.ndarray) -> None:
        slots = _ids(slots)
        removed = self.index.remove_ids(faiss.IDSelectorArray(len(slots), faiss.swig_ptr(slots)))
        self._changed()
        if removed != len(slots):
            raise RuntimeError(f"index inconsistency: removed {removed} of {len(slots)} vectors")

    def reconstruct(self, slots: np.ndarray) -> np.ndarray:
        return self.index.reconstruct_batch(_ids(slots))

    def move_to(self, other: SlotIndex, slots: np.ndarray) -> None:
        other.add(slots, self.reconstruct(slots))
        self.remove(slots)

    def search(self, queries: np.ndarray, k: int, params: Mapping[str, Any] = NO_PARAMS, index=None):
        keep: list = []
        scores, labels = _search(index or self.index, queries, k, search_parameters(self.index, params, None, keep))
        return scores, labels

    def reset(self) -> None:
        self.index.reset()
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

    def add(self, slots: np.ndarray, vectors: np.ndarray) -> None:
        self.index.add(vectors)
        self._map.append(slots)
        self.alive = np.concatenate([self.alive, np.ones(len(slots), bool)])
        if self._journal is not None:
            self._journal.append(("add", np.array(slots, np.int64), np.array(vectors, np.float32)))

    def replace(self, slots: np.ndarray, vectors: np.ndarray) -> None:
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

    def search(self, queries: np.ndarray, k: int, params: Mapping[str, Any] = NO_PARAMS, index=None):
        index = index or self.index
        k = min(k, self.size)
        if not self._deleted:
            keep: list = []
            scores, labels = _search(index, queries, k, search_parameters(self.index, params, None, keep))
            return scores, self._map.slots_of(labels)
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
