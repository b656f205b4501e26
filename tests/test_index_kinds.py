"""Index kinds from FAISS factory strings, on the shard's logic in this process (no actor: fast, and the GPU
plumbing can be faked): config validation, training, moves between spaces for every kind checked against a
brute-force reference of who is where, keep_old=False, snapshots written in chunks while the shard changes,
and GPU copies that follow the CPU index without a copy per upsert."""

from __future__ import annotations

import json

import faiss
import numpy as np
import pytest
from index_testing import NEW, OLD, Gallery, assert_matches, brute_force

from raybackfill.index import shard as shard_module
from raybackfill.index.shard import SNAPSHOT_FORMAT, IndexConfig, _IndexShard, train_index
from raybackfill.types import Space

D = 8
# Small codebooks (4-bit PQ, 8 lists) keep training fast on a shared 2-core box.
KINDS = {
    "Flat": {},
    "IVF8,Flat": {"nprobe": 8},  # every list: exact
    "IVF8,SQ8": {"nprobe": 8},
    "IVF8,PQ4x4": {"nprobe": 8},
    "OPQ4,IVF8,PQ4x4": {"nprobe": 8},
    "HNSW16": {"efSearch": 256},
    "PQ4x4": {},
    "SQ8": {},
    "IVF8,SQ8,RFlat": {"nprobe": 8},  # a refined index: no remove_ids, rows marked deleted
}
EXACT = {"Flat", "IVF8,Flat"}  # answers equal the brute-force reference


@pytest.fixture(autouse=True)
def one_thread():
    faiss.omp_set_num_threads(1)  # the box is shared: OpenMP spinning on busy cores is slower, not faster


def make(factory: str, params: dict | None = None, **options) -> tuple[_IndexShard, IndexConfig]:
    config = IndexConfig(factory=factory, search_params=params or {}, rebuild_deleted_fraction=0.2, **options)
    return _IndexShard(config), config


def trained(factory: str, params: dict | None = None, seed: int = 0, **options) -> tuple[_IndexShard, IndexConfig]:
    shard, config = make(factory, params, **options)
    rng = np.random.default_rng(seed)
    if config.needs_training:
        for space, version in ((Space.OLD, "v1"), (Space.NEW, "v2")):
            sample = rng.standard_normal((600, D)).astype(np.float32)
            shard.set_trained(space, train_index(config, sample), version)
    return shard, config


# --------------------------------------------------------------------------- config
def test_factory_strings_are_checked_up_front_with_the_field_named():
    assert IndexConfig().factory == "Flat" and not IndexConfig().needs_training
    assert IndexConfig(factory="IVF64,PQ8").needs_training and IndexConfig(factory="HNSW32").layout == "graph"
    assert IndexConfig(factory="OPQ16,IVF1024,PQ16").layout == "ivf" and IndexConfig(factory="PQ16").layout == "codes"
    with pytest.raises(ValueError, match="factory 'IVF12,Junk' is not an index FAISS can build"):
        IndexConfig(factory="IVF12,Junk")
    with pytest.raises(ValueError, match="leave out IDMap"):
        IndexConfig(factory="IDMap,Flat")
    with pytest.raises(ValueError, match="NSG index is built once"):
        IndexConfig(factory="NSG32")
    with pytest.raises(ValueError, match="factory must be a FAISS index_factory string"):
        IndexConfig(factory="")
    with pytest.raises(ValueError, match="search_params: 'efSearch' does not apply to index 'IVF64,Flat'"):
        IndexConfig(factory="IVF64,Flat", search_params={"efSearch": 10})
    with pytest.raises(ValueError, match="unknown search parameter 'nprob'"):
        IndexConfig(factory="IVF64,Flat", search_params={"nprob": 10})
    with pytest.raises(ValueError, match="nprobe must be at least 1"):
        IndexConfig(factory="IVF64,Flat", search_params={"nprobe": 0})
    config = IndexConfig(factory="IVF64,Flat", search_params={"nprobe": 4})
    assert config.query_params() == {"nprobe": 4}
    assert config.query_params({"nprobe": 32}) == {"nprobe": 32}
    assert IndexConfig(factory="HNSW32").query_params() == {"efSearch": 64}  # the default: FAISS's 16 is too low


def test_build_params_are_checked_and_every_graph_of_a_space_is_built_with_them():
    with pytest.raises(ValueError, match="build_params: 'efConstruction' does not apply to index 'IVF64,Flat'"):
        IndexConfig(factory="IVF64,Flat", build_params={"efConstruction": 100})
    with pytest.raises(ValueError, match="unknown build parameter 'efConstruct'"):
        IndexConfig(factory="HNSW32", build_params={"efConstruct": 100})
    with pytest.raises(ValueError, match="efConstruction must be at least 1"):
        IndexConfig(factory="HNSW32", build_params={"efConstruction": 0})
    assert IndexConfig(factory="HNSW32").index_build_params() == {"efConstruction": 80}  # FAISS's 40 is too low
    assert IndexConfig(factory="IVF64,Flat").index_build_params() == {}
    assert IndexConfig(factory="HNSW16", build_params={"efConstruction": 120}).index_build_params() == {
        "efConstruction": 120
    }

    def ef_construction(shard: _IndexShard, name: str) -> int:
        store = shard._index(name)
        assert store is not None
        return int(store.index.hnsw.efConstruction)

    g = Gallery.random(300, D, seed=2)
    shard, _ = make("HNSW16")
    shard.load_old(g.ids, g.old, "v1")
    assert ef_construction(shard, "pending") == 80
    shard, _ = make("HNSW16", build_params={"efConstruction": 120})
    shard.load_old(g.ids, g.old, "v1")
    shard.upsert(g.ids[:200], g.old[:200] + 0.1, Space.NEW, "v2")
    assert ef_construction(shard, "new") == 120
    # 200 of 300 pending rows deleted, past the fraction: the rebuilt graph is built from the same template.
    assert shard.wait_for_rebuilds(timeout=60)
    pending = shard._index("pending")
    assert pending is not None and pending.ntotal == 100 and pending.deleted == 0
    assert ef_construction(shard, "pending") == 120


def test_a_factory_that_does_not_fit_the_data_dim_is_refused_when_the_dim_is_known():
    shard, config = make("PQ3")  # 3 sub-quantizers: dim 8 does not split
    with pytest.raises(ValueError, match="index factory 'PQ3' does not build an index of dim 8"):
        train_index(config, np.random.default_rng(0).standard_normal((300, D)))
    with pytest.raises(ValueError, match=r"train: 5 vectors cannot train index 'IVF8,Flat'.*"):
        train_index(IndexConfig(factory="IVF8,Flat"), np.random.default_rng(0).standard_normal((5, D)))


def test_per_query_search_params_change_the_answer_of_an_ivf_index():
    shard, _ = trained("IVF8,Flat", {"nprobe": 1})
    g = Gallery.random(400, D, seed=3)
    shard.load_old(g.ids, g.old, "v1")
    q = np.random.default_rng(1).standard_normal((20, D)).astype(np.float32)
    exact = brute_force(g, q, None, 10, "old")
    one = shard.search(q, None, 10, "old")
    every = shard.search(q, None, 10, "old", params={"nprobe": 8})
    assert_matches(every, exact, atol=1e-4)  # every list probed: the exact answer
    recall_one = np.mean([len(set(a) & set(b)) / 10 for a, b in zip(one.ids, exact[0], strict=True)])
    assert recall_one < 1.0  # one list of eight misses neighbours: the default nprobe=1 was used
    with pytest.raises(ValueError, match="'efSearch' does not apply"):
        shard.search(q, None, 10, "old", params={"efSearch": 10})


# --------------------------------------------------------------------------- moves, every kind
def check_against_reference(shard: _IndexShard, g: Gallery, factory: str, rng) -> None:
    """Every strategy: each id at most once per answer, each hit labelled with its item's space as the reference
    has it and only from the parts the strategy searches, full answers; exact kinds equal brute force."""
    n_queries, k = 4, 12
    q_old, q_new = rng.standard_normal((2, n_queries, D)).astype(np.float32)
    state = dict(zip(g.ids.tolist(), g.state.tolist(), strict=True))
    strategies = ["compatible", "rank_merge"] + (
        ["old"] if shard._config.keep_old or not (g.state == NEW).any() else []
    )
    for strategy in strategies:
        result = shard.search(q_old, q_new, k, strategy)
        for row_ids, row_spaces in zip(result.ids, result.spaces, strict=True):
            hits = row_ids[row_ids >= 0]
            assert len(set(hits.tolist())) == len(hits), f"{factory} {strategy}: an id twice"
            assert len(hits) == min(k, len(g.ids)), f"{factory} {strategy}: {len(hits)} hits"
            for item, space in zip(hits.tolist(), row_spaces[row_ids >= 0].tolist(), strict=True):
                if strategy == "old":
                    assert space == OLD
                else:  # an old-space hit is an item still in the old space; a new-space hit carries its state
                    assert space == state[item], f"{factory} {strategy}: item {item} labelled {space}"
        if factory in EXACT:
            assert_matches(result, brute_force(g, q_old, q_new, k, strategy), atol=1e-4)
    # With k = every item, rank_merge returns every id exactly once (not for a graph: HNSW answers fewer).
    if shard._config.layout != "graph":
        everything = shard.search(q_old, q_new, len(g.ids), "rank_merge")
        for row in everything.ids:
            assert sorted(row.tolist()) == sorted(g.ids.tolist())


@pytest.mark.parametrize("factory", list(KINDS))
def test_moves_between_spaces_keep_every_id_exactly_once_for_every_kind(factory, monkeypatch):
    # small thresholds: indexes are compacted as they empty, the rollback moves items back in chunks and an
    # upsert applies its batch a few rows per hold of the lock (the counts are kept per chunk, not recounted)
    monkeypatch.setattr(shard_module, "COMPACT_MIN_ROWS", 8)
    monkeypatch.setattr(shard_module, "MOVE_CHUNK_ROWS", 7)
    monkeypatch.setattr(shard_module, "APPLY_FIRST_ROWS", 6)
    monkeypatch.setattr(shard_module, "APPLY_MIN_ROWS", 4)
    monkeypatch.setattr(shard_module, "WRITE_HOLD_S", 0.0)
    shard, _ = trained(factory, KINDS[factory])
    rng = np.random.default_rng(7)
    g = Gallery.random(160, D, seed=5)
    for part in np.array_split(np.arange(160), 3):  # small batches never fail once trained
        shard.load_old(g.ids[part], g.old[part], "v1")
    check_against_reference(shard, g, factory, rng)
    for step in range(8):
        state = ("transformed", "new")[step % 2]
        chosen = rng.choice(160, size=int(rng.integers(5, 40)), replace=False)
        vectors = rng.standard_normal((len(chosen), D)).astype(np.float32)
        shard.upsert(g.ids[chosen], vectors, state, "v2")
        g.upsert(chosen, vectors, state)
        shard.wait_for_rebuilds()
        check_against_reference(shard, g, factory, rng)
        if step == 4:  # a rollback in the middle: every item back in the old space
            shard.rollback()
            g.state[:] = OLD
            if shard._config.needs_training:
                sample = rng.standard_normal((600, D)).astype(np.float32)
                shard.set_trained(Space.NEW, train_index(shard._config, sample), "v2")
            check_against_reference(shard, g, factory, rng)
    counts = shard.counts()
    assert counts == {s: int((g.state == s.code).sum()) for s in Space}
    described = shard.describe()["indexes"]
    if shard._config.layout == "graph":  # rows were deleted, and past 20% the index was rebuilt
        assert sum(part["stored"] - part["live"] for part in described.values()) < 0.2 * 3 * 160


def test_graph_index_rebuilds_in_the_background_and_serves_meanwhile():
    shard, _ = trained("HNSW16", {"efSearch": 256})
    g = Gallery.random(200, D, seed=9)
    shard.load_old(g.ids, g.old, "v1")
    rng = np.random.default_rng(2)
    vectors = rng.standard_normal((100, D)).astype(np.float32)
    shard.upsert(g.ids[:100], vectors, "transformed", "v2")  # half of pending deleted: a rebuild starts
    g.upsert(np.arange(100), vectors, "transformed")
    check_against_reference(shard, g, "HNSW16", rng)  # answered while the rebuild may still run
    assert shard.wait_for_rebuilds(timeout=120)
    pending = shard.describe()["indexes"]["pending"]
    assert pending == {"stored": 100, "live": 100, "layout": "graph"}
    check_against_reference(shard, g, "HNSW16", rng)


def test_keep_old_false_drops_old_vectors_of_new_items_and_refuses_old_and_rollback():
    shard, config = trained("Flat", keep_old=False)
    g = Gallery.random(50, D, seed=4)
    shard.load_old(g.ids, g.old, "v1")
    rng = np.random.default_rng(3)
    t = rng.standard_normal((20, D)).astype(np.float32)
    shard.upsert(g.ids[:20], t, "transformed", "v2")
    g.upsert(np.arange(20), t, "transformed")
    q = rng.standard_normal((3, D)).astype(np.float32)
    assert_matches(shard.search(q, None, 10, "old"), brute_force(g, q, None, 10, "old"), atol=1e-4)  # all kept
    new = rng.standard_normal((15, D)).astype(np.float32)
    shard.upsert(g.ids[10:25], new, "new", "v2")  # 10 transformed and 5 old items become new
    g.upsert(np.arange(10, 25), new, "new")
    indexes = shard.describe()["indexes"]
    assert indexes["pending"]["stored"] == 25 and indexes["backfilled"]["stored"] == 10  # 15 old vectors dropped
    check_against_reference(shard, g, "Flat", rng)
    with pytest.raises(ValueError, match="strategy 'old' is unavailable: .*keep_old=False.* 15 re-embedded"):
        shard.search(q, None, 10, "old")
    with pytest.raises(ValueError, match="rollback is unavailable"):
        shard.rollback()
    with pytest.raises(ValueError, match="old vectors were dropped"):
        shard.upsert(g.ids[10:12], new[:2], "transformed", "v2")
    stored = shard.vectors(g.ids[[0, 12, 40]])
    assert np.isnan(stored.old[1]).all() and np.isfinite(stored.old[[0, 2]]).all()
    assert config.keep_old is False


# --------------------------------------------------------------------------- snapshots
@pytest.mark.parametrize("factory", ["Flat", "IVF8,PQ4x4", "HNSW16", "OPQ4,PQ4x4"])
def test_snapshot_restores_every_kind(tmp_path, factory):
    uri = str(tmp_path / "snap")
    shard, config = trained(factory, KINDS.get(factory, {}))
    shard._snapshot_uri = uri
    g = Gallery.random(120, D, seed=1)
    shard.load_old(g.ids, g.old, "v1")
    moved = np.random.default_rng(0).standard_normal((50, D)).astype(np.float32)
    shard.upsert(g.ids[:50], moved, "transformed", "v2")
    shard.wait_for_rebuilds()
    shard.snapshot()
    restored = _IndexShard(config, uri)
    assert restored.counts() == shard.counts() and restored.describe()["indexes"] == shard.describe()["indexes"]
    q = np.random.default_rng(2).standard_normal((5, D)).astype(np.float32)
    for strategy in ("old", "compatible", "rank_merge"):
        a, b = shard.search(q, q, 10, strategy), restored.search(q, q, 10, strategy)
        np.testing.assert_array_equal(a.ids, b.ids)
        np.testing.assert_allclose(a.scores, b.scores, rtol=1e-5)


@pytest.mark.parametrize("factory", ["Flat", "IVF8,SQ8", "OPQ4,IVF8,PQ4x4"])
def test_snapshot_copied_in_chunks_is_the_state_at_its_end_while_upserts_go_on(tmp_path, monkeypatch, factory):
    monkeypatch.setattr(shard_module, "SNAPSHOT_CHUNK_ROWS", 16)
    uri = str(tmp_path / "snap")
    shard, config = trained(factory, KINDS[factory])
    shard._snapshot_uri = uri
    g = Gallery.random(100, D, seed=6)
    shard.load_old(g.ids, g.old, "v1")
    shard.upsert(g.ids[:40], g.old[:40] + 1, "transformed", "v2")
    g.upsert(np.arange(40), g.old[:40] + 1, "transformed")
    rng = np.random.default_rng(8)
    writes = []
    original = shard_module.SnapshotWriter.write

    def write_and_change(self, name, data):
        original(self, name, data)
        writes.append(name)
        if name.startswith("pending.chunk.") and len(writes) == 2:  # between two chunks, without the lock
            chosen = rng.choice(np.flatnonzero(g.state == OLD), 30, replace=False)
            vectors = rng.standard_normal((30, D)).astype(np.float32)
            shard.upsert(g.ids[chosen], vectors, "new", "v2")  # removes from pending: holes filled from the tail
            g.upsert(chosen, vectors, "new")
            shard.load_old(np.array([5]), rng.standard_normal((1, D)), "v1")

    monkeypatch.setattr(shard_module.SnapshotWriter, "write", write_and_change)
    shard.snapshot()
    assert sum(name.startswith("pending.chunk.") for name in writes) >= 2  # written in chunks, changed between
    restored = _IndexShard(config, uri)
    assert restored.counts() == shard.counts() == {s: int((g.state == s.code).sum()) + (s is Space.OLD) for s in Space}
    q = rng.standard_normal((6, D)).astype(np.float32)
    for strategy in ("old", "compatible", "rank_merge"):
        a, b = shard.search(q, q, 101, strategy), restored.search(q, q, 101, strategy)
        np.testing.assert_array_equal(a.ids, b.ids)
        np.testing.assert_allclose(a.scores, b.scores, rtol=1e-6)


def test_a_snapshot_of_an_older_format_is_a_clear_error(tmp_path):
    uri = str(tmp_path / "snap")
    shard = _IndexShard(IndexConfig(), uri)
    shard.load_old(np.arange(3), np.eye(3, D), "v1")
    shard.snapshot()
    pointer = json.loads((tmp_path / "snap" / "LATEST").read_text())
    meta = tmp_path / "snap" / pointer["version"] / "meta.json"
    meta.write_text(json.dumps(json.loads(meta.read_text()) | {"format": 2}))
    with pytest.raises(ValueError, match=f"has format 2, this raybackfill reads format {SNAPSHOT_FORMAT}"):
        _IndexShard(IndexConfig(), uri)
    with pytest.raises(ValueError, match="written with index config"):
        meta.write_text(json.dumps(json.loads(meta.read_text()) | {"format": SNAPSHOT_FORMAT}))
        _IndexShard(IndexConfig(factory="SQ8"), uri)


# --------------------------------------------------------------------------- GPU plumbing, without a GPU
class FakeGpu:
    """Stands in for faiss GPU support: a 'GPU copy' is a CPU clone, and every copy is counted."""

    def __init__(self, monkeypatch):
        self.copies = 0
        self.searched: list[int] = []
        fake = self

        class Resources:
            pass

        def cpu_to_gpu(resources, device, index):
            assert isinstance(resources, Resources) and device == 0
            fake.copies += 1
            clone = faiss.clone_index(index)
            original_search = clone.search

            def search(*args, **kwargs):
                fake.searched.append(id(clone))
                return original_search(*args, **kwargs)

            clone.search = search
            return clone

        monkeypatch.setattr(faiss, "StandardGpuResources", Resources, raising=False)
        monkeypatch.setattr(faiss, "get_num_gpus", lambda: 1)
        monkeypatch.setattr(faiss, "index_cpu_to_gpu", cpu_to_gpu, raising=False)
        monkeypatch.setattr(shard_module.ray, "get_gpu_ids", lambda: [0])


@pytest.mark.parametrize("factory", ["Flat", "IVF8,Flat"])
def test_gpu_copies_follow_upserts_in_place_and_answer_like_the_cpu_index(monkeypatch, factory):
    cpu, _ = trained(factory, KINDS[factory])
    fake = FakeGpu(monkeypatch)
    gpu, _ = trained(factory, KINDS[factory], gpu_sync_rows=45, gpu_sync_seconds=3600)
    assert gpu.describe()["gpu"] and not cpu.describe()["gpu"]
    g = Gallery.random(200, D, seed=2)
    rng = np.random.default_rng(5)
    q = rng.standard_normal((5, D)).astype(np.float32)
    for shard in (cpu, gpu):
        shard.load_old(g.ids, g.old, "v1")

    def same_answers():
        for strategy in ("old", "compatible", "rank_merge"):
            a, b = cpu.search(q, q, 20, strategy), gpu.search(q, q, 20, strategy)
            np.testing.assert_array_equal(a.ids, b.ids)
            np.testing.assert_allclose(a.scores, b.scores, rtol=1e-5)

    same_answers()
    assert fake.copies == 1 and fake.searched  # pending copied once (backfilled is empty); searches ran on the copy
    for step in range(4):  # 4 upserts of 10 items: moves and replacements, no copy
        chosen = rng.choice(200, 10, replace=False)
        vectors = rng.standard_normal((10, D)).astype(np.float32)
        for shard in (cpu, gpu):
            shard.upsert(g.ids[chosen], vectors, ("transformed", "new")[step % 2], "v2")
        same_answers()
    mirrors = gpu.describe()["gpu_mirrors"]
    assert fake.copies == 3  # backfilled and new got their first copy once they held vectors; then followed in place
    assert mirrors["new"]["in_place"] > 0 and mirrors["pending"]["stale"] > 0
    # Past gpu_sync_rows stale rows, the next search copies that index again (once), then answers the same.
    waiting = g.ids[cpu.vectors(g.ids).states == OLD]
    chosen, vectors = waiting[:45], rng.standard_normal((45, D)).astype(np.float32)
    for shard in (cpu, gpu):
        shard.upsert(chosen, vectors, "new", "v2")
    before = fake.copies
    same_answers()
    assert fake.copies > before and gpu.describe()["gpu_mirrors"]["pending"]["stale"] == 0
    # The copies hold what the CPU indexes hold: every item, searched with k = everything.
    a, b = cpu.search(q, q, 200, "rank_merge"), gpu.search(q, q, 200, "rank_merge")
    np.testing.assert_array_equal(a.ids, b.ids)


def test_a_large_k_or_a_kind_without_gpu_search_stays_on_the_cpu(monkeypatch):
    fake = FakeGpu(monkeypatch)
    hnsw, _ = trained("HNSW16")
    g = Gallery.random(60, D, seed=2)
    hnsw.load_old(g.ids, g.old, "v1")
    hnsw.search(g.old[:2], None, 5, "old")
    assert fake.copies == 0 and hnsw.describe()["gpu_mirrors"] == {}
    flat, _ = trained("Flat")
    big = Gallery.random(2500, D, seed=3)
    flat.load_old(big.ids, big.old, "v1")
    flat.search(g.old[:2], None, 2500, "old")  # beyond what a GPU search takes
    assert fake.copies == 0
    flat.search(g.old[:2], None, 5, "old")
    assert fake.copies == 1


def test_an_upsert_encodes_outside_the_lock_and_a_rollback_meanwhile_makes_it_encode_again(monkeypatch):
    shard, config = trained("IVF8,SQ8", {"nprobe": 8})
    g = Gallery.random(60, D, seed=9)
    shard.load_old(g.ids, g.old, "v1")
    rng = np.random.default_rng(3)
    vectors = rng.standard_normal((20, D)).astype(np.float32)
    first = rng.standard_normal((10, D)).astype(np.float32)
    shard.upsert(g.ids[:10], first, "transformed", "v2")
    store = shard._new
    prepare = store.prepare
    seen = []

    def prepare_then_roll_back(batch):
        seen.append(shard._lock.locked())  # encoded without the lock held
        prepared = prepare(batch)
        shard.rollback()  # a lifecycle call between the two holds: the new index is gone
        shard.set_trained(Space.NEW, train_index(config, rng.standard_normal((600, D)).astype(np.float32)), "v2")
        return prepared

    monkeypatch.setattr(store, "prepare", prepare_then_roll_back)
    shard.upsert(g.ids[20:40], vectors, "new", "v2")
    assert seen == [False] and shard._new is not store
    assert shard.counts() == {Space.OLD: 40, Space.TRANSFORMED: 0, Space.NEW: 20}  # the rollback undid the first
    g.upsert(np.arange(20, 40), vectors, "new")
    check_against_reference(shard, g, "IVF8,SQ8", rng)


def test_an_upsert_applies_in_chunks_and_a_rollback_between_two_of_them_leaves_the_rest_applied(monkeypatch):
    monkeypatch.setattr(shard_module, "APPLY_FIRST_ROWS", 5)
    monkeypatch.setattr(shard_module, "APPLY_MIN_ROWS", 5)
    monkeypatch.setattr(shard_module, "WRITE_HOLD_S", 0.0)
    shard, config = trained("IVF8,SQ8", {"nprobe": 8})
    g = Gallery.random(60, D, seed=11)
    shard.load_old(g.ids, g.old, "v1")
    rng = np.random.default_rng(4)
    vectors = rng.standard_normal((20, D)).astype(np.float32)
    store = shard._new
    holds: list[tuple[int, bool]] = []
    apply = shard._apply_upsert

    def recorded(ids, *args):
        holds.append((len(ids), shard._new is store))
        return apply(ids, *args)

    yields = 0
    yield_to_searches = shard._yield_to_searches

    def roll_back_after_the_first_chunk() -> None:
        nonlocal yields
        yields += 1
        if yields == 3:  # before the first hold, before chunk 1, then here: chunk 1 is in
            shard.rollback()
            shard.set_trained(Space.NEW, train_index(config, rng.standard_normal((600, D)).astype(np.float32)), "v2")
        yield_to_searches()

    monkeypatch.setattr(shard, "_apply_upsert", recorded)
    monkeypatch.setattr(shard, "_yield_to_searches", roll_back_after_the_first_chunk)
    shard.upsert(g.ids[:20], vectors, "new", "v2")
    # one hold per 5 rows; after the rollback the rest is validated and encoded again for the new index
    assert holds == [(5, True), (5, False), (5, False), (5, False)]
    assert shard.counts() == {Space.OLD: 45, Space.TRANSFORMED: 0, Space.NEW: 15}
    g.upsert(np.arange(5, 20), vectors[5:], "new")
    check_against_reference(shard, g, "IVF8,SQ8", rng)


@pytest.mark.parametrize("factory, holds", [("Flat", 1), ("SQ8", 1), ("IVF8,Flat", 4), ("HNSW16", 4)])
def test_only_indexes_that_remove_in_o_of_the_batch_apply_an_upsert_in_chunks(factory, holds, monkeypatch):
    # a code-row index compacts its rows on every removal (O(rows held) per call): one hold for the whole batch
    monkeypatch.setattr(shard_module, "APPLY_FIRST_ROWS", 5)
    monkeypatch.setattr(shard_module, "APPLY_MIN_ROWS", 5)
    monkeypatch.setattr(shard_module, "WRITE_HOLD_S", 0.0)
    shard, _ = trained(factory, KINDS[factory])
    g = Gallery.random(40, D, seed=2)
    shard.load_old(g.ids, g.old, "v1")
    sizes: list[int] = []
    apply = shard._apply_upsert
    monkeypatch.setattr(shard, "_apply_upsert", lambda ids, *args: (sizes.append(len(ids)), apply(ids, *args))[1])
    vectors = np.random.default_rng(1).standard_normal((20, D)).astype(np.float32)
    shard.upsert(g.ids[:20], vectors, "transformed", "v2")
    assert len(sizes) == holds and sum(sizes) == 20
    assert shard.counts() == {Space.OLD: 20, Space.TRANSFORMED: 20, Space.NEW: 0}


def test_the_chunk_of_an_upsert_follows_how_fast_the_shard_applied_lately(monkeypatch):
    monkeypatch.setattr(shard_module, "WRITE_HOLD_S", 0.01)
    shard, _ = make("Flat")
    assert shard._apply_chunk_rows() == shard_module.APPLY_FIRST_ROWS  # nothing measured yet
    shard._observe_apply(1000, 0.1)  # 10k rows/s: 100 rows fill the hold
    assert shard._apply_chunk_rows() == 100
    shard._observe_apply(2000, 0.1)  # a faster chunk moves the estimate 30% of the way: 13k rows/s
    assert shard._apply_chunk_rows() == 130
    shard._observe_apply(1, 1.0)  # two stalled chunks: 0.7 * (0.7 * 13k + 0.3) + 0.3 = 6370 rows/s, 63 rows ...
    shard._observe_apply(1, 1.0)
    assert shard._apply_chunk_rows() == shard_module.APPLY_MIN_ROWS == 64  # ... are below the floor


def test_writes_run_some_nice_steps_below_the_process_on_their_own_thread(ray_cluster):
    """A real shard actor: after an upsert, the one thread of its write group runs 3 steps below the worker's
    main thread; the thread that serves searches keeps the worker's priority."""
    import os

    import ray

    from raybackfill.index.shard import IndexShard

    def nices(_) -> dict:
        tasks = os.listdir("/proc/self/task")
        return {
            "main": os.getpriority(os.PRIO_PROCESS, os.getpid()),
            "all": [os.getpriority(os.PRIO_PROCESS, int(t)) for t in tasks],
        }

    shard = IndexShard.options(num_cpus=0).remote(IndexConfig(write_nice_increment=3))
    try:
        vectors = np.eye(4, dtype=np.float32)
        ray.get(shard.load_old.remote(np.arange(4), vectors, "v1"))
        ray.get(shard.upsert.remote(np.arange(2), vectors[:2], Space.NEW, "v2"))
        seen = ray.get(shard.__ray_call__.remote(nices))
    finally:
        ray.kill(shard)
    target = min(19, seen["main"] + 3)
    assert seen["all"].count(target) == 1  # the write thread only (load_old and upsert share it)
    assert seen["all"].count(seen["main"]) >= 1


def test_a_write_lets_searches_waiting_for_the_lock_go_first(monkeypatch):
    import threading

    monkeypatch.setattr(shard_module, "WRITE_YIELD_S", 30.0)
    shard, _ = make("Flat")
    order: list[str] = []
    shard._lock.acquire()  # a long hold (a search or a write) in progress

    def search() -> None:
        with shard._search_waiting():
            shard._lock.acquire()
        order.append("search")
        shard._lock.release()

    def write() -> None:
        shard._yield_to_searches()
        with shard._lock:
            order.append("write")

    searcher = threading.Thread(target=search)
    searcher.start()
    while shard._searches_waiting != 1:
        threading.Event().wait(0.001)
    writer = threading.Thread(target=write)
    writer.start()
    shard._lock.release()
    searcher.join(10)
    writer.join(10)
    assert order == ["search", "write"] and shard._searches_waiting == 0
    shard._yield_to_searches()  # none waiting: returns at once
