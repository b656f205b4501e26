"""FAISS indexes addressed by slot, where moving a batch of items costs O(batch), not O(index size).

A shard moves every gallery item between its indexes during a backfill (pending -> backfilled, a
transformed vector replaced by a true new one). FAISS's own id-keyed flat index (IndexIDMap2 over
IndexFlat) removes ids by testing every stored id and compacting the whole array: O(index size) per
batch, time during which the shard answers no query, so live-query tail latency grows with the gallery
while a backfill runs. A flat index here is a plain IndexFlat whose rows are in any order, plus two numpy maps
(row -> slot, slot -> row):

- remove: fill the holes with the rows from the end of the array, then drop the tail
  (``remove_ids(IDSelectorRange)`` over a tail moves no memory), so only O(batch) rows are copied;
- replace: overwrite the rows in place through a numpy view of the codes.

IVF indexes keep FAISS's own slot ids (a hashtable direct map removes by id without a scan).
"""

from __future__ import annotations

import faiss
import numpy as np

NO_ROW = -1


def _rows_view(index: faiss.IndexFlat) -> np.ndarray:
    """A writable (ntotal, d) view of a flat index's vectors. Taken afresh after every add or remove:
    both may reallocate the storage."""
    return faiss.rev_swig_ptr(index.get_xb(), index.ntotal * index.d).reshape(index.ntotal, index.d)


class FlatSlots:
    """An exact flat index over slots; rows are kept dense (no holes) so every search is a plain BLAS scan."""

    def __init__(self, index: faiss.IndexFlat, row_slots: np.ndarray | None = None) -> None:
        self.index = index
        self._row_slot = np.zeros(0, np.int64) if row_slots is None else np.asarray(row_slots, np.int64)
        if len(self._row_slot) != index.ntotal:
            raise ValueError(f"{len(self._row_slot)} slots for a flat index of {index.ntotal} rows")
        self._slot_row = np.full(0, NO_ROW, np.int64)
        self._map_rows(np.arange(index.ntotal, dtype=np.int64))

    @property
    def ntotal(self) -> int:
        return int(self.index.ntotal)

    def row_slots(self) -> np.ndarray:
        """Row -> slot (saved next to the index in a snapshot)."""
        return self._row_slot

    def _map_rows(self, rows: np.ndarray) -> None:
        slots = self._row_slot[rows]
        if len(slots) and slots.max() >= len(self._slot_row):
            grown = np.full(max(int(slots.max()) + 1, 2 * len(self._slot_row)), NO_ROW, np.int64)
            grown[: len(self._slot_row)] = self._slot_row
            self._slot_row = grown
        self._slot_row[slots] = rows

    def _rows(self, slots: np.ndarray) -> np.ndarray:
        inside = slots < len(self._slot_row)
        rows = np.full(len(slots), NO_ROW, np.int64)
        rows[inside] = self._slot_row[slots[inside]]
        if (rows == NO_ROW).any():
            raise RuntimeError(f"index inconsistency: {int((rows == NO_ROW).sum())} slots are not in this index")
        return rows

    def add(self, slots: np.ndarray, vectors: np.ndarray) -> None:
        start = self.ntotal
        self.index.add(vectors)
        self._row_slot = np.concatenate([self._row_slot, slots.astype(np.int64)])
        self._map_rows(np.arange(start, self.ntotal, dtype=np.int64))

    def replace(self, slots: np.ndarray, vectors: np.ndarray) -> None:
        _rows_view(self.index)[self._rows(slots)] = vectors

    def remove(self, slots: np.ndarray) -> None:
        rows = self._rows(slots)
        n, cut = self.ntotal, self.ntotal - len(rows)
        gone = np.zeros(n - cut, dtype=bool)  # which tail rows are themselves removed
        gone[rows[rows >= cut] - cut] = True
        holes = np.sort(rows[rows < cut])  # removed rows that the kept tail rows fill
        movers = cut + np.flatnonzero(~gone)
        if len(holes):
            view = _rows_view(self.index)
            view[holes] = view[movers]
            self._row_slot[holes] = self._row_slot[movers]
            self._slot_row[self._row_slot[holes]] = holes
        self._slot_row[slots] = NO_ROW
        self._row_slot = self._row_slot[:cut].copy()
        removed = self.index.remove_ids(faiss.IDSelectorRange(cut, n))
        if removed != n - cut:
            raise RuntimeError(f"index inconsistency: removed {removed} of {n - cut} tail rows")

    def reconstruct(self, slots: np.ndarray) -> np.ndarray:
        return _rows_view(self.index)[self._rows(slots)].copy()

    def slots_of(self, labels: np.ndarray) -> np.ndarray:
        """Search labels (rows, -1 for an empty result) -> slots (-1 kept)."""
        return np.where(labels >= 0, self._row_slot[np.maximum(labels, 0)], -1) if len(self._row_slot) else labels

    def reset(self) -> None:
        self.index.reset()
        self._row_slot = np.zeros(0, np.int64)
        self._slot_row = np.full(0, NO_ROW, np.int64)


class IVFSlots:
    """An IVF index whose FAISS ids are the slots (hashtable direct map: remove and reconstruct by id)."""

    def __init__(self, index: faiss.IndexIVF) -> None:
        self.index = index

    @property
    def ntotal(self) -> int:
        return int(self.index.ntotal)

    def row_slots(self) -> np.ndarray:
        return np.zeros(0, np.int64)  # the ids live inside the IVF index itself

    def add(self, slots: np.ndarray, vectors: np.ndarray) -> None:
        self.index.add_with_ids(vectors, np.ascontiguousarray(slots, dtype=np.int64))

    def replace(self, slots: np.ndarray, vectors: np.ndarray) -> None:
        self.remove(slots)
        self.add(slots, vectors)

    def remove(self, slots: np.ndarray) -> None:
        slots = np.ascontiguousarray(slots, dtype=np.int64)
        removed = self.index.remove_ids(faiss.IDSelectorArray(len(slots), faiss.swig_ptr(slots)))
        if removed != len(slots):
            raise RuntimeError(f"index inconsistency: removed {removed} of {len(slots)} vectors")

    def reconstruct(self, slots: np.ndarray) -> np.ndarray:
        return self.index.reconstruct_batch(np.ascontiguousarray(slots, dtype=np.int64))

    def slots_of(self, labels: np.ndarray) -> np.ndarray:
        return labels

    def reset(self) -> None:
        self.index.reset()


SlotIndex = FlatSlots | IVFSlots


def slot_index(index: faiss.Index, row_slots: np.ndarray | None = None) -> SlotIndex:
    """Wrap an empty (or deserialised) FAISS index: flat -> FlatSlots, IVF -> IVFSlots."""
    if isinstance(index, faiss.IndexFlat):
        return FlatSlots(index, row_slots)
    if isinstance(index, faiss.IndexIVF):
        return IVFSlots(index)
    raise TypeError(f"unsupported index type {type(index).__name__}")
