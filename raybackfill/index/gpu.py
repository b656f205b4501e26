"""A GPU copy of a shard's index that follows the CPU index without a full copy per change.

The CPU index (raybackfill.index.slots) is the source of truth; the mirror is a ``faiss.index_cpu_to_gpu``
copy taken once, then kept in step:

- an added vector is added to the copy in place (flat: ``add``, IVF: ``add_with_ids``);
- a removed vector cannot be removed from a GPU index (FAISS GPU indexes have no ``remove_ids``), so its label
  is marked *stale*: a search over-fetches by the number of stale labels and drops them, which gives exactly
  the top-k of the live vectors (any live vector outside the top k + stale is beaten by k live ones);
- a replaced vector is a removal plus an addition.

The copy is taken again (a re-sync) when the stale labels pass ``sync_rows``, when stale labels have waited
more than ``sync_seconds``, or when k + stale exceeds what the GPU searches (``max_k``): at most one full
copy per ``sync_rows`` removals, not one per upsert.

Labels. The copy's labels are its own keys: at a re-sync, a flat copy's labels are the CPU rows (mapped to
slots by the CPU's row -> slot map) and an IVF copy's labels are the slots; labels added since count on from
there. ``label_slot`` maps a key to its slot and ``slot_label`` a slot to its live key.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Mapping
from typing import Any

import faiss
import numpy as np

from raybackfill.index.kinds import search_parameters
from raybackfill.index.slots import NO_ROW, SlotIndex
from raybackfill.types import Layout

logger = logging.getLogger(__name__)

# GPU flat/IVF search handles at most this k; larger k searches the CPU index.
GPU_MAX_K = 2048


def gpu_supported(store: SlotIndex) -> bool:
    """Layouts whose GPU copy can follow in place: plain flat and IVF (graph indexes have no GPU form here,
    and other code layouts (PQ, SQ without IVF) have no GPU search in FAISS)."""
    if store.layout is Layout.IVF:
        return True
    return store.layout is Layout.CODES and isinstance(store.index, faiss.IndexFlat)


class GpuMirror:
    """The GPU copy of one slot index (see the module docstring).

    Args:
        to_gpu: copies a CPU index to the GPU (``faiss.index_cpu_to_gpu`` with the shard's resources).
        sync_rows: re-sync once this many stale labels have accumulated.
        sync_seconds: re-sync when stale labels are older than this.
        clock: time source (monotonic seconds).
    """

    def __init__(
        self,
        to_gpu: Callable[[faiss.Index], faiss.Index],
        sync_rows: int,
        sync_seconds: float,
        max_k: int = GPU_MAX_K,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._to_gpu, self._sync_rows, self._sync_seconds, self._max_k, self._clock = (
            to_gpu,
            sync_rows,
            sync_seconds,
            max_k,
            clock,
        )
        self.index: faiss.Index | None = None
        self.copies = 0  # full copies made (the first one included)
        self.in_place = 0  # vectors added in place since the first copy
        self.stale = 0
        self._stale_since: float | None = None
        self._label_slot = np.zeros(0, np.int64)
        self._is_stale = np.zeros(0, bool)
        self._slot_label = np.zeros(0, np.int64)

    # ------------------------------------------------------------- sync
    def resync(self, store: SlotIndex, n_slots: int) -> None:
        """Copy the CPU index to the GPU again; every label is live afterwards."""
        self.index = self._to_gpu(store.index)
        self.copies += 1
        if store.layout is Layout.IVF:
            self._label_slot = np.arange(n_slots, dtype=np.int64)  # labels are slots
            self._slot_label = np.arange(n_slots, dtype=np.int64)
        else:
            self._label_slot = store.row_slots().copy()  # labels are CPU rows
            self._slot_label = np.full(n_slots, NO_ROW, np.int64)
            self._slot_label[self._label_slot] = np.arange(len(self._label_slot), dtype=np.int64)
        self._is_stale = np.zeros(len(self._label_slot), bool)
        self.stale, self._stale_since = 0, None

    def due(self, k: int) -> bool:
        """Whether the next search of top-``k`` re-syncs first."""
        if self.index is None:
            return True
        if not self.stale:
            return False
        waited = self._clock() - (self._stale_since or self._clock())
        return self.stale >= self._sync_rows or k + self.stale > self._max_k or waited >= self._sync_seconds

    # ------------------------------------------------------------- changes
    def add(self, slots: np.ndarray, vectors: np.ndarray, layout: Layout) -> None:
        if self.index is None:
            return  # nothing copied yet: the first search copies the whole index
        slots = np.asarray(slots, np.int64)
        labels = np.arange(len(self._label_slot), len(self._label_slot) + len(slots), dtype=np.int64)
        if layout is Layout.IVF:
            self.index.add_with_ids(vectors, labels)
        else:
            self.index.add(vectors)  # a flat index numbers added rows on from its size: the same labels
        self._label_slot = np.concatenate([self._label_slot, slots])
        self._is_stale = np.concatenate([self._is_stale, np.zeros(len(slots), bool)])
        if len(slots) and slots.max() >= len(self._slot_label):
            grown = np.full(max(int(slots.max()) + 1, 2 * len(self._slot_label)), NO_ROW, np.int64)
            grown[: len(self._slot_label)] = self._slot_label
            self._slot_label = grown
        self._slot_label[slots] = labels
        self.in_place += len(slots)

    def remove(self, slots: np.ndarray) -> None:
        if self.index is None:
            return
        slots = np.asarray(slots, np.int64)
        labels = self._slot_label[slots]
        labels = labels[labels >= 0]
        self._is_stale[labels] = True
        self._slot_label[slots] = NO_ROW
        if len(labels) and not self.stale:
            self._stale_since = self._clock()
        self.stale += len(labels)

    # ------------------------------------------------------------- search
    def search(self, store: SlotIndex, n_slots: int, queries: np.ndarray, k: int, params: Mapping[str, Any]):
        """(scores, slots) of the top ``k`` live vectors, searched on the GPU copy (re-synced first if due)."""
        if self.due(k):
            self.resync(store, n_slots)
        assert self.index is not None  # resync made it
        live = len(self._label_slot) - self.stale
        fetch = min(k + self.stale, int(self.index.ntotal))
        keep: list = []
        sp = search_parameters(store.index, params, None, keep)
        if sp is None:
            scores, labels = self.index.search(queries, fetch)
        else:
            scores, labels = self.index.search(queries, fetch, params=sp)
        valid = labels >= 0
        valid[valid] = ~self._is_stale[labels[valid]]
        order = np.argsort(~valid, axis=1, kind="stable")[:, : min(k, max(live, 0))]
        top_labels = np.take_along_axis(labels, order, axis=1)
        top_valid = np.take_along_axis(valid, order, axis=1)
        slots = np.where(top_valid, self._label_slot[np.maximum(top_labels, 0)], NO_ROW)
        return np.take_along_axis(scores, order, axis=1), slots
