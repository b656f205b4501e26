"""Slot-addressed FAISS indexes: every add/remove/replace keeps search and reconstruct equal to a dict of
slot -> vector (the brute-force reference), and a flat remove copies only the rows it must."""

import faiss
import numpy as np
import pytest

from raybackfill.index import slots as slots_module
from raybackfill.index.slots import CodesSlots, GraphSlots, IVFSlots, slot_index

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
    scores, slots = store.search(queries, k)
    want_scores, want_slots = _reference_search(reference, queries, k)
    np.testing.assert_allclose(scores, want_scores, rtol=1e-5, atol=1e-5)
    np.testing.assert_array_equal(slots, want_slots)


def test_flat_slots_match_a_dict_reference_through_random_adds_removes_and_replaces():
    rng = np.random.default_rng(0)
    store = slot_index(faiss.IndexFlat(DIM, faiss.METRIC_INNER_PRODUCT))
    assert isinstance(store, CodesSlots)
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


def _random_ops(store, rng, steps: int, check) -> dict[int, np.ndarray]:
    """Random adds, removes and replaces on ``store``, mirrored in a dict reference; ``check`` after each."""
    reference: dict[int, np.ndarray] = {}
    next_slot = 0
    for _ in range(steps):
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
            check(store, reference)
    return reference


def test_compressed_code_rows_move_as_codes_and_decode_like_faiss():
    rng = np.random.default_rng(4)
    train = rng.standard_normal((500, DIM)).astype(np.float32)
    template = faiss.index_factory(DIM, "SQ8", faiss.METRIC_INNER_PRODUCT)
    template.train(train)
    a = slot_index(faiss.clone_index(template))
    b = slot_index(faiss.clone_index(template))
    assert isinstance(a, CodesSlots) and a.code_size == DIM
    decoded: dict[int, np.ndarray] = {}

    def check(store, reference):
        # What the store returns is exactly FAISS's decoding of the vectors the reference holds.
        slots = np.array(sorted(reference), dtype=np.int64)
        want = template.sa_decode(template.sa_encode(np.stack([reference[s] for s in slots])))
        np.testing.assert_array_equal(store.reconstruct(slots), want)
        decoded.update(zip(slots.tolist(), want, strict=True))
        _check_equal_scores(store, dict(zip(slots.tolist(), want, strict=True)), rng)

    reference = _random_ops(a, rng, 40, check)
    moving = np.array(sorted(reference)[::2], dtype=np.int64)
    codes_before = a.codes()[a._map.rows(moving)].copy()
    a.move_to(b, moving)
    np.testing.assert_array_equal(b.codes()[b._map.rows(moving)], codes_before)  # codes moved, not re-encoded
    assert a.ntotal + b.ntotal == len(reference)


def _check_equal_scores(store, reference: dict[int, np.ndarray], rng) -> None:
    queries = rng.standard_normal((5, DIM)).astype(np.float32)
    k = min(4, len(reference))
    scores, slots = store.search(queries, k)
    want_scores, want_slots = _reference_search(reference, queries, k)
    np.testing.assert_allclose(scores, want_scores, rtol=1e-4, atol=1e-4)
    np.testing.assert_array_equal(slots, want_slots)


@pytest.mark.parametrize("selector", [True, False], ids=["idselector", "overfetch"])
def test_graph_slots_filter_deleted_rows_and_refill_to_k(selector):
    rng = np.random.default_rng(5)
    index = faiss.index_factory(DIM, "HNSW16", faiss.METRIC_INNER_PRODUCT)
    index.hnsw.efSearch = 400  # small graph searched almost exhaustively: compare with an exact reference
    store = slot_index(index)
    assert isinstance(store, GraphSlots)
    store.takes_selector = selector

    def check(store, reference):
        assert store.size == len(reference)
        queries = rng.standard_normal((5, DIM)).astype(np.float32)
        k = min(4, len(reference))
        scores, slots = store.search(queries, k, {"efSearch": 400})
        want_scores, want_slots = _reference_search(reference, queries, k)
        np.testing.assert_array_equal(slots, want_slots)
        np.testing.assert_allclose(scores, want_scores, rtol=1e-4, atol=1e-4)

    reference = _random_ops(store, rng, 40, check)
    assert store.deleted > 0 and store.ntotal == store.size + store.deleted
    slots = np.array(sorted(reference), dtype=np.int64)
    np.testing.assert_array_equal(store.reconstruct(slots), np.stack([reference[s] for s in slots]))


@pytest.mark.parametrize("deleted_fraction", [0.2, 0.7])
def test_a_graph_searched_for_twice_k_and_filtered_answers_as_with_an_id_selector(deleted_fraction, monkeypatch):
    # Approximate search (small efSearch over 4000 rows), so any difference in the visited nodes would show; at
    # 70% deleted many queries find fewer than k live rows in the first 2k and are searched again.
    rng = np.random.default_rng(11)
    index = faiss.index_factory(16, "HNSW8", faiss.METRIC_INNER_PRODUCT)
    store = slot_index(index)
    store.add(np.arange(4000), rng.standard_normal((4000, 16)).astype(np.float32))
    store.remove(rng.permutation(4000)[: int(deleted_fraction * 4000)])
    queries = rng.standard_normal((300, 16)).astype(np.float32)
    calls: list[int] = []
    search = faiss.IndexHNSW.search

    def counted(self, x, k, *args, **kwargs):
        calls.append(k)
        return search(self, x, k, *args, **kwargs)

    monkeypatch.setattr(faiss.IndexHNSWFlat, "search", counted)
    twice = store.search(queries, 10, {"efSearch": 24})
    assert calls[0] == 20 and (deleted_fraction < 0.5 or len(calls) == 2)  # 2k first, then the short queries
    monkeypatch.setattr(GraphSlots, "_fetch_twice_is_same", lambda *args: False)
    with_selector = store.search(queries, 10, {"efSearch": 24})
    np.testing.assert_array_equal(twice[1], with_selector[1])
    np.testing.assert_array_equal(twice[0], with_selector[0])
    assert (twice[1] >= 0).all() and not np.isin(twice[1], np.flatnonzero(~store.alive)).any()
    # efSearch below 2k: a search for 2k rows would visit more nodes, so the selector is used.
    calls.clear()
    monkeypatch.undo()
    monkeypatch.setattr(faiss.IndexHNSWFlat, "search", counted)
    store.search(queries, 10, {"efSearch": 16})
    assert calls == [10]


def test_graph_rebuild_replays_the_moves_made_while_it_was_built():
    rng = np.random.default_rng(6)
    template = faiss.index_factory(DIM, "HNSW16", faiss.METRIC_INNER_PRODUCT)
    store = slot_index(faiss.clone_index(template))
    vectors = rng.standard_normal((60, DIM)).astype(np.float32)
    store.add(np.arange(60), vectors)
    store.remove(np.arange(0, 30))
    slots, live = store.begin_rebuild()
    np.testing.assert_array_equal(np.sort(slots), np.arange(30, 60))
    # Moves while the new index is being built (outside the shard lock in the shard).
    store.remove(np.array([30, 31]))
    fresh = rng.standard_normal((2, DIM)).astype(np.float32)
    store.add(np.array([100, 101]), fresh)
    store.replace(np.array([40]), fresh[:1])
    rebuilt = faiss.clone_index(template)
    rebuilt.add(live)
    assert store.finish_rebuild(rebuilt, slots) == 4  # remove, add, and the replace's remove + add
    assert store.deleted == 3 and store.size == 30  # 30, 31 and the old row of 40 are marked in the new index
    want = {s: vectors[s] for s in range(32, 60)} | {100: fresh[0], 101: fresh[1], 40: fresh[0]}
    keys = np.array(sorted(want), dtype=np.int64)
    np.testing.assert_array_equal(store.reconstruct(keys), np.stack([want[s] for s in keys]))
    # A reset while a rebuild runs voids it.
    store.begin_rebuild()
    store.reset()
    assert store.finish_rebuild(faiss.clone_index(template), np.zeros(0, np.int64)) is None


@pytest.mark.parametrize("factory", ["Flat", "SQ8", "IVF4,Flat", "OPQ4,IVF4,SQ8"])
def test_an_index_that_lost_half_its_vectors_is_compacted_with_the_same_content(factory):
    rng = np.random.default_rng(5)
    template = faiss.index_factory(DIM, factory, faiss.METRIC_INNER_PRODUCT)
    vectors = rng.standard_normal((400, DIM)).astype(np.float32)
    template.train(vectors)
    store = slot_index(template)
    store.add(np.arange(400, dtype=np.int64), vectors)
    assert store.high_water == 400
    store.remove(np.arange(0, 150, dtype=np.int64))
    assert not store.maybe_compact(min_rows=10)  # 250 of 400 left: more than half
    store.remove(np.arange(150, 250, dtype=np.int64))
    assert not store.maybe_compact(min_rows=1000)  # 250 left the index: fewer than min_rows
    before_index = store.index
    kept = np.arange(250, 400, dtype=np.int64)
    decoded = store.reconstruct(kept)
    queries = rng.standard_normal((6, DIM)).astype(np.float32)
    scores, slots = store.search(queries, 5)
    assert store.maybe_compact(min_rows=10)
    assert store.index is not before_index and store.high_water == store.ntotal == 150
    np.testing.assert_array_equal(store.reconstruct(kept), decoded)
    got_scores, got_slots = store.search(queries, 5)
    np.testing.assert_array_equal(got_slots, slots)
    np.testing.assert_allclose(got_scores, scores, rtol=1e-6)
    store.remove(kept[:10])  # the compacted copy keeps working (ids / row map and direct map included)
    store.add(np.arange(400, 410, dtype=np.int64), vectors[:10])
    assert store.ntotal == 150 and store.high_water == 150
    everything = store.search(queries[:1], 150, {"nprobe": 4} if "IVF" in factory else {})[1][0]
    assert sorted(everything.tolist()) == list(range(260, 410))


def test_graph_indexes_are_compacted_by_their_rebuild_not_by_maybe_compact():
    store = slot_index(faiss.IndexHNSWFlat(DIM, 8, faiss.METRIC_INNER_PRODUCT))
    store.add(np.arange(50, dtype=np.int64), np.random.default_rng(0).standard_normal((50, DIM)).astype(np.float32))
    store.remove(np.arange(40, dtype=np.int64))
    assert not store.maybe_compact(min_rows=1)


def test_reset_leaves_an_empty_index_that_takes_vectors_again():
    rng = np.random.default_rng(6)
    template = faiss.index_factory(DIM, "IVF4,SQ8", faiss.METRIC_INNER_PRODUCT)
    vectors = rng.standard_normal((200, DIM)).astype(np.float32)
    template.train(vectors)
    store = slot_index(template)
    store.add(np.arange(200, dtype=np.int64), vectors)
    store.reset()
    assert store.ntotal == 0 and store.high_water == 0
    store.add(np.arange(5, dtype=np.int64), vectors[:5])
    assert store.ntotal == 5 and store.search(vectors[:1], 1)[1][0, 0] in range(5)


@pytest.mark.parametrize("factory", ["IVF8,SQ8", "IVF8,PQ4x4", "OPQ4,IVF8,SQ8", "PCA6,IVF8,Flat"])
def test_ivf_prepared_adds_and_moves_store_what_faiss_add_stores(factory):
    """prepare() (transforms + coarse assignment, outside the lock) then add, and a move between two indexes of
    one training (lists kept, no centroid search), give the codes and lists of FAISS's own add_with_ids."""
    rng = np.random.default_rng(7)
    template = faiss.index_factory(DIM, factory, faiss.METRIC_INNER_PRODUCT)
    vectors = rng.standard_normal((600, DIM)).astype(np.float32)
    template.train(vectors)
    blob = faiss.serialize_index(template)
    reference = faiss.deserialize_index(blob)
    faiss.extract_index_ivf(reference).set_direct_map_type(faiss.DirectMap.Hashtable)
    reference.add_with_ids(vectors, np.arange(600, dtype=np.int64))
    pending, backfilled = (slot_index(faiss.deserialize_index(blob)) for _ in range(2))
    assert isinstance(pending, IVFSlots) and pending.prepare(vectors[:3]) is not None
    pending.add(np.arange(300, dtype=np.int64), vectors[:300], pending.prepare(vectors[:300]))
    pending.add(np.arange(300, 600, dtype=np.int64), vectors[300:])
    pending.move_to(backfilled, np.arange(0, 600, 2, dtype=np.int64))
    assert pending.quantizer_key == backfilled.quantizer_key
    assert (pending.ntotal, backfilled.ntotal, pending.index.ntotal) == (300, 300, 300)

    def lists_of(index):
        ivf = faiss.extract_index_ivf(index)
        return {
            int(i): int(lst)
            for lst in range(ivf.nlist)
            for i in faiss.rev_swig_ptr(ivf.invlists.get_ids(lst), ivf.invlists.list_size(lst))
        }

    want = lists_of(reference)
    got = lists_of(pending.index) | lists_of(backfilled.index)
    assert got == want
    for store, slots in ((pending, np.arange(1, 600, 2)), (backfilled, np.arange(0, 600, 2))):
        np.testing.assert_allclose(store.reconstruct(slots), reference.reconstruct_batch(slots), atol=1e-5)
    pending.remove(np.arange(1, 600, 4, dtype=np.int64))  # the direct map followed the prepared adds
    assert pending.ntotal == 150


def test_a_move_between_ivf_indexes_of_different_trainings_searches_the_centroids_again():
    rng = np.random.default_rng(8)
    vectors = rng.standard_normal((300, DIM)).astype(np.float32)
    stores = []
    for seed in (1, 2):
        template = faiss.index_factory(DIM, "IVF4,Flat", faiss.METRIC_INNER_PRODUCT)
        template.cp.seed = seed
        template.train(rng.standard_normal((300, DIM)).astype(np.float32))
        stores.append(slot_index(template))
    source, target = stores
    assert source.quantizer_key != target.quantizer_key
    source.add(np.arange(300, dtype=np.int64), vectors)
    source.move_to(target, np.arange(300, dtype=np.int64))
    reference = faiss.clone_index(target.index)
    reference.reset()
    reference.add_with_ids(vectors, np.arange(300, dtype=np.int64))
    np.testing.assert_array_equal(target.search(vectors[:5], 3, {"nprobe": 1})[1], reference.search(vectors[:5], 3)[1])


MAPPED_BLOCK_SCRIPT = """
import ctypes, ctypes.util, json, sys
from raybackfill.index.slots import map_large_blocks
pinned = map_large_blocks() if sys.argv[1] == "pinned" else None
libc = ctypes.CDLL(ctypes.util.find_library("c"))
libc.malloc.restype = ctypes.c_void_p
libc.malloc.argtypes = [ctypes.c_size_t]
libc.free.argtypes = [ctypes.c_void_p]
libc.free(libc.malloc(8 << 20))  # a freed 8 MB mapped block: by default glibc raises its threshold to 8 MB
block = libc.malloc(1 << 20)  # a 1 MB block, like a list that grew
heap = next(line.split()[0] for line in open("/proc/self/maps") if line.rstrip().endswith("[heap]"))
low, high = (int(x, 16) for x in heap.split("-"))
print(json.dumps({"pinned": pinned, "in_heap": low <= block < high}))
"""


@pytest.mark.skipif(slots_module._MALLOPT is None, reason="glibc only")
def test_large_blocks_keep_pages_of_their_own_once_the_threshold_is_pinned():
    import json
    import subprocess
    import sys

    def run(mode: str) -> dict:
        done = subprocess.run(
            [sys.executable, "-c", MAPPED_BLOCK_SCRIPT, mode], capture_output=True, text=True, timeout=60, check=True
        )
        return json.loads(done.stdout)

    assert run("default") == {"pinned": None, "in_heap": True}  # glibc's own rule puts it in the heap
    assert run("pinned") == {"pinned": True, "in_heap": False}  # mapped on its own: freed pages go back
