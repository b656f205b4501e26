"""Slot-addressed FAISS indexes: every add/remove/replace keeps search and reconstruct equal to a dict of
slot -> vector (the brute-force reference), and a flat remove copies only the rows it must."""

import faiss
import numpy as np
import pytest

from raybackfill.index.slots import FlatSlots, IVFSlots, slot_index

DIM = 8


def _reference_search(reference: dict[int, np.ndarray], queries: np.ndarray, k: int):
    slots = np.array(sorted(reference), dtype=np.int64)
    matrix = np.stack([reference[s] for s in slots])
    scores = queries @ matrix.T
    order = np.argsort(-scores, axis=1, kind="stable")[:, :k]
    return np.take_along_axis(scores, order, 1), slots[order]


def _check_equal(store, reference: dict[int, np.ndarray], rng) -> None:
    assert store.ntotal == len(reference)
    slots = np.array(sorted(reference), dtype=np.int64)
    np.testing.assert_array_equal(store.reconstruct(slots), np.stack([reference[s] for s in slots]))
    queries = rng.standard_normal((5, DIM)).astype(np.float32)
    k = min(4, len(reference))
    scores, labels = store.index.search(queries, k)
    want_scores, want_slots = _reference_search(reference, queries, k)
    np.testing.assert_allclose(scores, want_scores, rtol=1e-5, atol=1e-5)
    np.testing.assert_array_equal(store.slots_of(labels), want_slots)


def test_flat_slots_match_a_dict_reference_through_random_adds_removes_and_replaces():
    rng = np.random.default_rng(0)
    store = slot_index(faiss.IndexFlat(DIM, faiss.METRIC_INNER_PRODUCT))
    assert isinstance(store, FlatSlots)
    reference: dict[int, np.ndarray] = {}
    next_slot = 0
    for _ in range(60):
        op = rng.integers(3) if reference else 0
        if op == 0:
            n = int(rng.integers(1, 12))
            slots = np.arange(next_slot, next_slot + n, dtype=np.int64)[rng.permutation(n)]
            next_slot += n
            vectors = rng.standard_normal((n, DIM)).astype(np.float32)
            store.add(slots, vectors)
            reference.update(zip(slots.tolist(), vectors, strict=True))
        else:
            have = np.array(sorted(reference), dtype=np.int64)
            slots = rng.choice(have, size=int(rng.integers(1, len(have) + 1)), replace=False)
            if op == 1:
                store.remove(slots)
                for s in slots.tolist():
                    del reference[s]
            else:
                vectors = rng.standard_normal((len(slots), DIM)).astype(np.float32)
                store.replace(slots, vectors)
                reference.update(zip(slots.tolist(), vectors, strict=True))
        if reference:
            _check_equal(store, reference, rng)


def test_flat_remove_of_the_whole_index_and_of_the_tail_leaves_the_rest_searchable():
    rng = np.random.default_rng(1)
    store = slot_index(faiss.IndexFlat(DIM, faiss.METRIC_INNER_PRODUCT))
    vectors = rng.standard_normal((10, DIM)).astype(np.float32)
    store.add(np.arange(10), vectors)
    store.remove(np.array([9, 8, 7]))  # exactly the tail: nothing moves
    _check_equal(store, {s: vectors[s] for s in range(7)}, rng)
    store.remove(np.arange(7))
    assert store.ntotal == 0
    store.add(np.array([3]), vectors[:1])
    _check_equal(store, {3: vectors[0]}, rng)


def test_flat_remove_moves_only_as_many_rows_as_it_removes():
    store = slot_index(faiss.IndexFlat(DIM, faiss.METRIC_INNER_PRODUCT))
    vectors = np.arange(100 * DIM, dtype=np.float32).reshape(100, DIM)
    store.add(np.arange(100), vectors)
    store.remove(np.array([0, 1]))
    rows = faiss.rev_swig_ptr(store.index.get_xb(), store.ntotal * DIM).reshape(-1, DIM)
    # The two holes take the last two rows; every other row stays where it was.
    np.testing.assert_array_equal(rows[2:98], vectors[2:98])
    assert sorted(store.row_slots()[:2].tolist()) == [98, 99]


def test_unknown_slot_is_an_inconsistency_not_a_silent_no_op():
    store = slot_index(faiss.IndexFlat(DIM, faiss.METRIC_INNER_PRODUCT))
    store.add(np.array([0, 1]), np.ones((2, DIM), np.float32))
    with pytest.raises(RuntimeError, match="not in this index"):
        store.remove(np.array([5]))
    with pytest.raises(RuntimeError, match="not in this index"):
        store.reconstruct(np.array([1, 2]))
    assert store.ntotal == 2


def test_flat_slots_survive_serialisation_with_their_row_map():
    rng = np.random.default_rng(2)
    store = slot_index(faiss.IndexFlat(DIM, faiss.METRIC_L2))
    vectors = rng.standard_normal((20, DIM)).astype(np.float32)
    store.add(np.arange(20) * 3, vectors)
    store.remove(np.array([0, 30]))
    copy = slot_index(faiss.deserialize_index(faiss.serialize_index(store.index)), store.row_slots())
    slots = np.array([3, 57, 12])
    np.testing.assert_array_equal(copy.reconstruct(slots), vectors[slots // 3])


def test_ivf_slots_keep_faiss_ids_as_slots():
    rng = np.random.default_rng(3)
    ivf = faiss.IndexIVFFlat(faiss.IndexFlatIP(DIM), DIM, 4, faiss.METRIC_INNER_PRODUCT)
    ivf.set_direct_map_type(faiss.DirectMap.Hashtable)
    vectors = rng.standard_normal((64, DIM)).astype(np.float32)
    ivf.train(vectors)
    ivf.nprobe = 4  # every list: exact
    store = slot_index(ivf)
    assert isinstance(store, IVFSlots)
    slots = np.arange(64, dtype=np.int64) + 100
    store.add(slots, vectors)
    store.remove(slots[:10])
    replaced = rng.standard_normal((5, DIM)).astype(np.float32)
    store.replace(slots[10:15], replaced)
    reference = {int(s): v for s, v in zip(slots[10:], vectors[10:], strict=True)}
    reference.update(zip(slots[10:15].tolist(), replaced, strict=True))
    _check_equal(store, reference, rng)
