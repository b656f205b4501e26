"""IndexShard actor on the session's Ray cluster: strategies vs brute force, atomic moves, provenance,
bad input, snapshots across restarts, promote/rollback."""

from __future__ import annotations

import threading

import numpy as np
import pytest
import ray
from index_testing import (
    Gallery,
    assert_each_id_exactly_once,
    assert_matches,
    brute_force,
    kill_and_wait_for_restart,
    unit,
)

from raybackfill.data.storage import join
from raybackfill.index.router import get
from raybackfill.index.shard import IndexConfig, IndexShard, train_index


@pytest.fixture
def make_shard(ray_cluster):
    made = []

    def make(config: IndexConfig | None = None, snapshot_uri: str | None = None, **options):
        shard = IndexShard.options(num_cpus=0.25, **options).remote(config or IndexConfig(), snapshot_uri)
        made.append(shard)
        return shard

    yield make
    for shard in made:
        ray.kill(shard, no_restart=True)


def train(shard, config: IndexConfig, space: str, vectors: np.ndarray, version: str) -> None:
    """What router.train does, for one shard: a no-op for a factory that needs no training."""
    if config.needs_training:
        get(shard.set_trained.remote(space, train_index(config, vectors), version))


def load(shard, g: Gallery, version: str = "v1") -> None:
    half = len(g.ids) // 2
    get(shard.load_old.remote(g.ids[:half], g.old[:half], version))
    get(shard.load_old.remote(g.ids[half:], g.old[half:], version))


def backfill_some(shard, g: Gallery, seed: int = 1) -> None:
    """Transform 60% of the items, then re-embed a third of those (and some untouched items) as new."""
    rng = np.random.default_rng(seed)
    n, d = g.old.shape
    transformed = rng.permutation(n)[: int(0.6 * n)]
    vectors = rng.standard_normal((len(transformed), d)).astype(np.float32)
    get(shard.upsert.remote(g.ids[transformed], vectors, "transformed", "v2"))
    g.upsert(transformed, vectors, "transformed")
    new = np.concatenate([transformed[: len(transformed) // 3], np.setdiff1d(np.arange(n), transformed)[:10]])
    vectors = rng.standard_normal((len(new), d)).astype(np.float32)
    get(shard.upsert.remote(g.ids[new], vectors, "new", "v2"))
    g.upsert(new, vectors, "new")


CONFIGS = {
    "flat-cosine": IndexConfig(),
    "flat-ip": IndexConfig(metric="ip"),
    "flat-l2": IndexConfig(metric="l2"),
    "ivf-cosine-exhaustive": IndexConfig(factory="IVF4,Flat", search_params={"nprobe": 4}),  # every list: exact
}


@pytest.mark.parametrize("name", list(CONFIGS))
def test_every_strategy_matches_brute_force(make_shard, name):
    config = CONFIGS[name]
    shard = make_shard(config)
    g = Gallery.random(150, 8, seed=7)
    train(shard, config, "old", g.old, "v1")
    train(shard, config, "new", np.random.default_rng(11).standard_normal((150, 8)).astype(np.float32), "v2")
    load(shard, g)
    backfill_some(shard, g)
    rng = np.random.default_rng(2)
    q_old, q_new = rng.standard_normal((2, 6, 8)).astype(np.float32)
    for strategy in ("old", "compatible", "rank_merge"):
        for k in (1, 10, 150, 200):
            result = get(shard.search.remote(q_old, q_new, k, strategy))
            assert result.ids.shape == (6, k)
            assert_matches(result, brute_force(g, q_old, q_new, min(k, 150), strategy, config.metric), atol=1e-3)
    assert get(shard.counts.remote()) == {
        s: int((g.state == code).sum()) for code, s in enumerate(("old", "transformed", "new"))
    }


def test_a_space_that_needs_training_refuses_vectors_until_trained_then_takes_any_batch(make_shard):
    config = IndexConfig(factory="IVF16,Flat")
    shard = make_shard(config)
    g = Gallery.random(40, 4)
    with pytest.raises(ValueError, match=r"old space of index 'IVF16,Flat' is not trained: .*router.train\(Space.OLD"):
        get(shard.load_old.remote(g.ids[:8], g.old[:8], "v1"))
    sample = np.random.default_rng(1).standard_normal((400, 4)).astype(np.float32)
    train(shard, config, "old", sample, "v1")
    get(shard.load_old.remote(g.ids[:3], g.old[:3], "v1"))  # a batch smaller than nlist is fine once trained
    get(shard.load_old.remote(g.ids[3:], g.old[3:], "v1"))
    with pytest.raises(ValueError, match=r"new space of index 'IVF16,Flat' is not trained"):
        get(shard.upsert.remote(g.ids[:3], g.old[:3], "new", "v2"))
    train(shard, config, "new", sample, "v2")
    get(shard.upsert.remote(g.ids[:3], g.old[:3], "new", "v2"))
    # Training again with the same version keeps the codebooks; another version is refused.
    train(shard, config, "new", sample[:100], "v2")
    with pytest.raises(ValueError, match="holds 3 vectors of model version 'v2'; refusing a training for version 'v3'"):
        train(shard, config, "new", sample, "v3")
    assert get(shard.counts.remote()) == {"old": 37, "transformed": 0, "new": 3}


def test_upserts_are_idempotent_and_new_replaces_transformed(make_shard):
    shard = make_shard()
    g = Gallery.random(60, 4, seed=3)
    load(shard, g)
    vectors = np.random.default_rng(0).standard_normal((20, 4))  # float64: cast to float32
    first = get(shard.upsert.remote(g.ids[:20], vectors, "transformed", "v2"))
    q = np.random.default_rng(1).standard_normal((3, 4)).astype(np.float32)
    before = get(shard.search.remote(q, q, 60, "rank_merge"))
    assert get(shard.upsert.remote(g.ids[:20], vectors, "transformed", "v2")) == first
    again = get(shard.search.remote(q, q, 60, "rank_merge"))
    np.testing.assert_array_equal(again.ids, before.ids)
    np.testing.assert_array_equal(again.scores, before.scores)
    assert first == {"old": 40, "transformed": 20, "new": 0}
    assert get(shard.upsert.remote(g.ids[:5], vectors[:5], "new", "v2")) == {"old": 40, "transformed": 15, "new": 5}
    stored = get(shard.vectors.remote(g.ids[[0, 10, 30]]))
    np.testing.assert_array_equal(stored.states, [2, 1, 0])
    np.testing.assert_allclose(stored.old, unit(g.old[[0, 10, 30]]), rtol=1e-5)  # cosine: stored at unit length
    np.testing.assert_allclose(stored.new[:2], unit(vectors[[0, 10]]), rtol=1e-5)
    assert not stored.new[2].any()


def test_spaces_never_mix_and_bad_input_leaves_the_shard_serving(make_shard):
    shard = make_shard(IndexConfig(max_k=50, max_queries=8))
    g = Gallery.random(30, 4, seed=5)
    load(shard, g)
    get(shard.upsert.remote(g.ids[:5], g.old[:5], "transformed", "v2"))
    q = np.ones((2, 4), dtype=np.float32)
    refused = [
        (shard.load_old.remote(g.ids[:1] + 10_000, g.old[:1], "v0"), "old space holds model version 'v1'"),
        (shard.load_old.remote(g.ids[:2], g.old[:2], "v1"), "ids already loaded in this shard"),
        (shard.upsert.remote(g.ids[5:7], g.old[5:7], "new", "v3"), "new space holds model version 'v2'"),
        (shard.upsert.remote(g.ids[5:7], np.ones((2, 6)), "new", "v2"), "dim 6, expected 4"),
        (shard.upsert.remote(np.array([g.ids[5], 7]), g.old[5:7], "new", "v2"), "unknown ids .*: 7$"),
        (shard.upsert.remote(g.ids[[5, 5]], g.old[5:7], "new", "v2"), "duplicate ids within one batch"),
        (shard.upsert.remote(g.ids[5:7], np.full((2, 4), np.nan), "new", "v2"), "NaN/inf in 2 rows"),
        (shard.upsert.remote(g.ids[5:7], g.old[5:7], "fresh", "v2"), "upsert state 'fresh'; valid: transformed, new"),
        (shard.upsert.remote(g.ids[5:7], g.old[5:7], "new", ""), "non-empty model version tag"),
        (shard.search.remote(np.ones((2, 3)), q, 5, "old"), "queries_old have dim 3, expected 4"),
        (shard.search.remote(q, q, 0, "old"), "k must be between 1 and 50"),
        (shard.search.remote(q, q, 51, "old"), "k must be between 1 and 50"),
        (shard.search.remote(np.full((1, 4), np.nan), q, 5, "old"), "NaN/inf"),
        (shard.search.remote(np.ones((0, 4)), q, 5, "old"), "queries_old is empty"),
        (shard.search.remote(np.ones((9, 4)), q, 5, "old"), "more than the limit of 8"),
        (shard.search.remote(None, q, 5, "old"), "strategy 'old' needs queries_old"),
        (shard.search.remote(q, q, 5, "nearest"), "unknown strategy 'nearest'"),
        (shard.search.remote(q, np.ones((3, 4)), 5, "rank_merge"), "same queries"),
    ]
    for ref, message in refused:
        with pytest.raises(ValueError, match=message):
            get(ref)
    assert get(shard.counts.remote()) == {"old": 25, "transformed": 5, "new": 0}
    assert get(shard.search.remote(q, q, 30, "rank_merge")).ids.shape == (2, 30)


def test_compatible_refuses_mixed_dims_while_items_wait(make_shard):
    shard = make_shard()
    g = Gallery.random(20, 4)
    load(shard, g)
    get(shard.upsert.remote(g.ids[:5], np.ones((5, 6)), "transformed", "v2"))  # new space may change dim
    with pytest.raises(ValueError, match="new space has dim 6 and the old space dim 4, and 15 items"):
        get(shard.search.remote(None, np.ones((1, 6)), 5, "compatible"))
    result = get(shard.search.remote(np.ones((1, 4)), np.ones((1, 6)), 20, "rank_merge"))
    assert_each_id_exactly_once(result, g.ids)


def test_each_id_is_seen_exactly_once_while_upserts_run(make_shard):
    shard = make_shard()
    g = Gallery.random(300, 8, seed=11)
    load(shard, g)
    rng = np.random.default_rng(0)
    order = rng.permutation(300)
    errors: list[BaseException] = []

    def backfill() -> None:
        try:
            for start in range(0, 300, 20):
                batch = order[start : start + 20]
                get(shard.upsert.remote(g.ids[batch], rng.standard_normal((20, 8)), "transformed", "v2"))
            for start in range(0, 300, 50):
                batch = order[start : start + 50]
                get(shard.upsert.remote(g.ids[batch], rng.standard_normal((50, 8)), "new", "v2"))
        except BaseException as err:  # surfaced by the main thread
            errors.append(err)

    writer = threading.Thread(target=backfill)
    writer.start()
    q = np.random.default_rng(1).standard_normal((3, 8)).astype(np.float32)
    searches = 0
    while writer.is_alive() or searches < 3:
        for strategy in ("compatible", "rank_merge", "old"):
            assert_each_id_exactly_once(get(shard.search.remote(q, q, 300, strategy)), g.ids)
            searches += 1
    writer.join()
    assert not errors, errors
    assert get(shard.counts.remote()) == {"old": 0, "transformed": 0, "new": 300}


@pytest.mark.parametrize("where", ["local", "s3"])
def test_a_restarted_shard_restores_its_last_snapshot(make_shard, tmp_path, where, request):
    root = str(tmp_path / "snap") if where == "local" else join(request.getfixturevalue("s3_bucket"), "snap")
    config = IndexConfig(factory="IVF4,Flat", search_params={"nprobe": 4}) if where == "s3" else IndexConfig()
    shard = make_shard(config, join(root, "shard-000"), max_restarts=1)
    g = Gallery.random(80, 8, seed=13)
    train(shard, config, "old", g.old, "v1")
    train(shard, config, "new", np.random.default_rng(2).standard_normal((80, 8)).astype(np.float32), "v2")
    load(shard, g)
    backfill_some(shard, g)
    get(shard.snapshot.remote())
    extra = np.random.default_rng(9).standard_normal((1, 8)).astype(np.float32)
    get(shard.upsert.remote(g.ids[g.state == 0][:1], extra, "new", "v2"))  # after the snapshot: lost
    before = get(shard.describe.remote())

    kill_and_wait_for_restart(shard)
    after = get(shard.describe.remote())
    assert after["counts"] != before["counts"]
    assert after["counts"] == {s: int((g.state == c).sum()) for c, s in enumerate(("old", "transformed", "new"))}
    assert after["old_space"] == {"version": "v1", "dim": 8} and after["new_space"] == {"version": "v2", "dim": 8}
    q_old, q_new = np.random.default_rng(4).standard_normal((2, 5, 8)).astype(np.float32)
    for strategy in ("old", "compatible", "rank_merge"):
        assert_matches(
            get(shard.search.remote(q_old, q_new, 12, strategy)), brute_force(g, q_old, q_new, 12, strategy), atol=1e-3
        )


def test_promote_requires_every_item_and_rollback_restores_the_old_answer(make_shard):
    shard = make_shard()
    g = Gallery.random(50, 4, seed=17)
    load(shard, g)
    q = np.random.default_rng(3).standard_normal((4, 4)).astype(np.float32)
    old_answer = get(shard.search.remote(q, None, 10, "old"))
    get(shard.upsert.remote(g.ids[:30], np.ones((30, 4)), "transformed", "v2"))
    with pytest.raises(ValueError, match="cannot promote: 20 items are not in the new space"):
        get(shard.promote.remote())
    np.testing.assert_array_equal(get(shard.search.remote(q, None, 10, "old")).ids, old_answer.ids)

    assert get(shard.rollback.remote()) == {"old": 50, "transformed": 0, "new": 0}
    np.testing.assert_array_equal(get(shard.search.remote(q, q, 10, "rank_merge")).ids, old_answer.ids)
    # After a rollback the new space is free for another model version.
    vectors = np.random.default_rng(5).standard_normal((50, 4)).astype(np.float32)
    get(shard.upsert.remote(g.ids, vectors, "new", "v3"))
    g.upsert(np.arange(50), vectors, "new")
    before = get(shard.search.remote(None, q, 10, "compatible"))
    assert_matches(before, brute_force(g, None, q, 10, "compatible"))
    # Promote: the v3 vectors become the serving generation (the old space of the next upgrade).
    assert get(shard.promote.remote()) == {"old": 50, "transformed": 0, "new": 0}
    promoted = g.promote()
    assert_matches(get(shard.search.remote(q, None, 10, "old")), brute_force(promoted, q, None, 10, "old"))
    assert_matches(
        get(shard.search.remote(None, q, 10, "compatible")), brute_force(promoted, None, q, 10, "compatible")
    )
    assert get(shard.describe.remote())["old_space"]["version"] == "v3"
    # Rollback of the promote brings back the generation it replaced, as it was.
    assert get(shard.rollback.remote(undo_promote=True)) == {"old": 0, "transformed": 0, "new": 50}
    assert_matches(get(shard.search.remote(None, q, 10, "compatible")), brute_force(g, None, q, 10, "compatible"))
    np.testing.assert_array_equal(get(shard.search.remote(q, None, 10, "old")).ids, old_answer.ids)
    with pytest.raises(ValueError, match="an upgrade of the current generation has begun"):
        get(shard.rollback.remote(undo_promote=True))
    assert get(shard.rollback.remote()) == {"old": 50, "transformed": 0, "new": 0}
    np.testing.assert_array_equal(get(shard.search.remote(q, q, 10, "rank_merge")).ids, old_answer.ids)
    with pytest.raises(ValueError, match="cannot roll back the promote: the generation it replaced is gone"):
        get(shard.rollback.remote(undo_promote=True))
