"""IndexRouter on the session's Ray cluster: merged answers vs brute force, all-or-nothing batches,
exactly-once visibility, progress, lifecycle, restarts, and attaching from a second process."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import subprocess
import sys
import threading
import time
import uuid
from pathlib import Path

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

from raybackfill import NAMESPACE
from raybackfill.index.router import (
    IndexSearcher,
    IndexUnavailableError,
    RouterConfig,
    connect,
    create_index,
    destroy_index,
    get,
)
from raybackfill.index.shard import IndexConfig
from raybackfill.index.sharding import shard_of

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture
def make_index(ray_cluster):
    names = []

    def make(**kwargs):
        config = RouterConfig(name=f"test-router-{uuid.uuid4().hex[:8]}", **kwargs)
        names.append(config.name)
        return create_index(config), config

    yield make
    for name in names:
        with contextlib.suppress(ValueError):  # a test that destroyed its index already
            destroy_index(name)


@pytest.mark.parametrize("bad", [-1, 20, True, 1.5, "0"])
def test_serving_nice_is_a_nice_value_a_process_may_start_at(bad):
    with pytest.raises(ValueError, match="serving_nice"):
        RouterConfig(serving_nice=bad)
    assert RouterConfig(serving_nice=7).actor_runtime_env() == {"env_vars": {"RAY_worker_niceness": "7"}}


def test_the_router_and_its_shards_start_at_the_serving_nice_value(make_index):
    def nice(_) -> int:
        return os.getpriority(os.PRIO_PROCESS, os.getpid())

    router, config = make_index(shards=2, serving_nice=7)  # neither Ray's worker default (15) nor the raylet's (0)
    shards = [ray.get_actor(config.shard_name(i), namespace=NAMESPACE) for i in range(2)]
    assert ray.get(router.__ray_call__.remote(nice)) == 7
    assert [ray.get(shard.__ray_call__.remote(nice)) for shard in shards] == [7, 7]
    g = Gallery.random(40, 8, seed=3)
    get(router.load_old.remote(g.ids, g.old, "v1"))
    found = get(router.search.remote(g.old[:2], None, 3, "old"))
    assert found.ids[:, 0].tolist() == g.ids[:2].tolist()  # each query's own vector first


def test_merged_answers_match_brute_force_and_batches_are_all_or_nothing(make_index):
    router, config = make_index(shards=3)
    g = Gallery.random(200, 8, seed=21)
    get(router.load_old.remote(g.ids, g.old, "v1"))
    per_shard = [c["old"] for c in get(router.progress.remote()).per_shard]
    assert per_shard == np.bincount(shard_of(g.ids, 3), minlength=3).tolist()

    rng = np.random.default_rng(0)
    first = rng.permutation(200)[:120]
    g.upsert(first, rng.standard_normal((120, 8)).astype(np.float32), "transformed")
    get(router.upsert.remote(g.ids[first], g.new[first], "transformed", "v2"))
    second = first[:50]
    g.upsert(second, rng.standard_normal((50, 8)).astype(np.float32), "new")
    get(router.upsert.remote(g.ids[second], g.new[second], "new", "v2"))

    q_old, q_new = rng.standard_normal((2, 7, 8)).astype(np.float32)
    for strategy in ("old", "compatible", "rank_merge"):
        for k in (1, 10, 200):
            result = get(router.search.remote(q_old, q_new, k, strategy))
            assert_matches(result, brute_force(g, q_old, q_new, k, strategy), atol=1e-3)

    # One unknown id in a batch spread over every shard: no shard applies anything.
    counts = get(router.progress.remote()).counts
    untouched = np.flatnonzero(g.state == 0)[:30]
    bad_ids = np.append(g.ids[untouched], 7)
    with pytest.raises(ValueError, match="unknown ids .*: 7$"):
        get(router.upsert.remote(bad_ids, np.ones((31, 8)), "new", "v2"))
    progress = get(router.progress.remote())
    assert progress.counts == counts == {"old": 80, "transformed": 70, "new": 50}
    assert "unknown ids" in progress.last_error
    with pytest.raises(ValueError, match="new space holds model version 'v2'"):
        get(router.upsert.remote(g.ids[untouched], np.ones((30, 8)), "new", "v9"))

    # Lifecycle through the router.
    with pytest.raises(ValueError, match="cannot promote: 80 items"):
        get(router.promote.remote())
    assert get(router.rollback.remote()) == {"old": 200, "transformed": 0, "new": 0}
    assert get(router.progress.remote()).phase == "rolled_back"
    get(router.upsert.remote(g.ids, g.old * 2, "new", "v3"))
    assert get(router.promote.remote()) == {"old": 200, "transformed": 0, "new": 0}  # v3 serves, as the old space
    stored = get(router.vectors.remote(g.ids[[5, 0, 150]]))
    np.testing.assert_array_equal(stored.states, [0, 0, 0])
    np.testing.assert_allclose(stored.old, unit(g.old[[5, 0, 150]]), rtol=1e-5)  # cosine: stored at unit length
    assert stored.new is None and stored.old_lineage == ["v3"] * 3


@pytest.mark.parametrize("shards", [1, 3])
def test_a_searcher_answers_what_the_router_answers_without_its_hop(make_index, shards):
    router, config = make_index(shards=shards)
    g = Gallery.random(120, 8, seed=5)
    get(router.load_old.remote(g.ids, g.old, "v1"))
    rng = np.random.default_rng(1)
    moved = rng.permutation(120)[:70]
    g.upsert(moved, rng.standard_normal((70, 8)).astype(np.float32), "new")
    get(router.upsert.remote(g.ids[moved], g.new[moved], "new", "v2"))

    searcher = IndexSearcher.connect(config.name)
    assert searcher.name == config.name and len(searcher.targets.shards) == shards
    q_old, q_new = rng.standard_normal((2, 5, 8)).astype(np.float32)
    for strategy in ("old", "compatible", "rank_merge"):
        for k in (1, 10, 120):
            expected = brute_force(g, q_old, q_new, k, strategy)
            assert_matches(searcher.search(q_old, q_new, k, strategy), expected, atol=1e-3)
            routed = get(router.search.remote(q_old, q_new, k, strategy))
            for ours, theirs in zip(searcher.search(q_old, q_new, k, strategy), routed, strict=True):
                np.testing.assert_array_equal(ours, theirs)
    answer = asyncio.run(searcher.search_async(q_old, q_new, 10, "rank_merge"))
    assert_matches(answer, brute_force(g, q_old, q_new, 10, "rank_merge"), atol=1e-3)

    # Refused by name in this process, before any shard, as the router refuses them.
    with pytest.raises(ValueError, match="k must be between 1 and"):
        searcher.search(q_old, q_new, 0, "rank_merge")
    with pytest.raises(ValueError, match="queries_new"):
        searcher.search(q_old, None, 10, "compatible")
    with pytest.raises(ValueError, match="have dim 3, expected 8"):
        searcher.search(q_old[:, :3], q_new, 10, "rank_merge")
    with pytest.raises(ValueError, match="'nprobe' does not apply to index 'Flat'"):
        searcher.search(q_old, q_new, 10, "rank_merge", {"nprobe": 1})
    # No answer within the timeout (none can come back in zero seconds): an error, and the searcher goes on. The
    # shards keep answering: a shard call cancelled while queued would stall its shard for Ray's 30 s reorder wait.
    for _ in range(5):
        with pytest.raises(ray.exceptions.GetTimeoutError):
            searcher.search(q_old, q_new, 10, "rank_merge", timeout=0)
    answer = searcher.search(q_old, q_new, 10, "old", timeout=20)
    assert_matches(answer, brute_force(g, q_old, q_new, 10, "old"), atol=1e-3)

    # A destroyed index (ray.kill returns before the processes end): once its shards are gone, every search is
    # an outage, never a partial or stale answer.
    destroy_index(config.name)
    deadline = time.monotonic() + 60
    while True:
        try:
            searcher.search(q_old, q_new, 10, "rank_merge")
        except IndexUnavailableError as err:
            assert "shard unavailable" in str(err)
            break
        assert time.monotonic() < deadline, "a destroyed index still answers"
        time.sleep(0.1)
    with pytest.raises(IndexUnavailableError):
        asyncio.run(searcher.search_async(q_old, q_new, 10, "rank_merge"))


def test_each_id_is_seen_exactly_once_across_shards_and_progress_tracks_the_backfill(make_index):
    router, _ = make_index(shards=2, rate_window_s=30.0)
    g = Gallery.random(240, 8, seed=5)
    get(router.load_old.remote(g.ids, g.old, "v1"))
    assert get(router.set_phase.remote("backfill")).remaining == 240
    with pytest.raises(ValueError, match="unknown phase .running.; valid: idle, instant"):
        get(router.set_phase.remote("running"))
    rng = np.random.default_rng(1)
    errors: list[BaseException] = []

    def backfill() -> None:
        try:
            for start in range(0, 240, 24):
                batch = g.ids[start : start + 24]
                get(router.upsert.remote(batch, rng.standard_normal((24, 8)), "new", "v2"))
        except BaseException as err:  # surfaced by the main thread
            errors.append(err)

    writer = threading.Thread(target=backfill)
    writer.start()
    q = np.random.default_rng(2).standard_normal((2, 8)).astype(np.float32)
    searches = 0
    while writer.is_alive() or searches < 3:
        for strategy in ("compatible", "rank_merge"):
            assert_each_id_exactly_once(get(router.search.remote(q, q, 240, strategy)), g.ids)
            searches += 1
    writer.join()
    assert not errors, errors

    progress = get(router.progress.remote())
    assert progress.phase == "backfill" and progress.started_at is not None
    assert progress.counts == {"old": 0, "transformed": 0, "new": 240} and progress.total == 240
    assert [sum(c.values()) for c in progress.per_shard] == np.bincount(shard_of(g.ids, 2)).tolist()
    assert progress.remaining == 0 and progress.eta_seconds == 0.0
    assert progress.rate > 0 and progress.fraction_new == 1.0
    get(router.report_error.remote("embedding actor lost"))
    assert get(router.progress.remote()).last_error == "embedding actor lost"


def test_progress_answers_while_a_heavy_search_runs(make_index):
    router, _ = make_index(shards=2)
    rng = np.random.default_rng(0)
    n, d = 60_000, 32
    get(router.load_old.remote(np.arange(n), rng.standard_normal((n, d), dtype=np.float32), "v1"))
    queries = rng.standard_normal((4000, d), dtype=np.float32)
    search = router.search.remote(queries, None, 50, "old")
    time.sleep(0.2)  # let the search reach the shards
    progress = router.progress.remote()
    assert get(progress, timeout=60).counts["old"] == n
    # The check means something only if the search was still running when progress answered.
    finished, _ = ray.wait([search], timeout=0)
    assert finished == [], "the search finished first: make it heavier"
    assert get(search).ids.shape == (4000, 50)


def test_index_is_found_by_name_from_another_process_and_survives_restarts(make_index, tmp_path):
    router, config = make_index(
        shards=2,
        snapshot_uri=str(tmp_path / "index"),
        index=IndexConfig(factory="IVF2,Flat", search_params={"nprobe": 2}),
    )
    assert create_index(config)._actor_id == router._actor_id  # get_if_exists: the same actor
    with pytest.raises(ValueError, match="already runs with another configuration"):
        create_index(RouterConfig(name=config.name, shards=3))
    with pytest.raises(ValueError, match="no index named 'nobody'"):
        connect("nobody")

    g = Gallery.random(40, 4, seed=8)
    get(router.train.remote("old", g.old, "v1"))
    get(router.train.remote("new", g.old + 1, "v2"))
    get(router.load_old.remote(g.ids, g.old, "v1"))
    get(router.set_phase.remote("instant"))
    get(router.upsert.remote(g.ids[:20], g.old[:20] + 1, "transformed", "v2"))
    get(router.snapshot.remote())

    # A second driver attaches to the session cluster and queries the router by name.
    address = ray.get_runtime_context().gcs_address
    script = (
        "import json, numpy as np, ray\n"
        "from raybackfill import NAMESPACE\n"
        "from raybackfill.index.router import connect, get\n"
        f"ray.init(address={address!r}, namespace=NAMESPACE, log_to_driver=False)\n"
        f"router = connect({config.name!r})\n"
        f"result = get(router.search.remote(np.array({g.old[:2].tolist()}, dtype=np.float32), None, 3, 'old'))\n"
        "print(json.dumps(result.ids.tolist()))\n"
    )
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    out = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=180)
    assert out.returncode == 0, out.stderr[-2000:]
    expected = get(router.search.remote(g.old[:2], None, 3, "old")).ids.tolist()
    assert json.loads(out.stdout.strip().splitlines()[-1]) == expected

    # The router restarts (max_restarts=-1), finds its shards by name and restores its phase.
    kill_and_wait_for_restart(router)
    progress = get(router.progress.remote())
    assert progress.phase == "instant" and progress.counts == {"old": 20, "transformed": 20, "new": 0}
    # A shard restarts from its snapshot.
    shard = ray.get_actor(config.shard_name(0), namespace=NAMESPACE)
    before = get(shard.counts.remote())
    kill_and_wait_for_restart(shard)
    assert get(shard.counts.remote()) == before
    q = g.old[:3]
    assert_matches(
        get(router.search.remote(q, q + 1, 10, "rank_merge")),
        brute_force(_moved(g, 20), q, q + 1, 10, "rank_merge"),
        atol=1e-3,
    )
    # Search parameters per query: a kind's own are taken, others are refused by name before any shard runs.
    one_list = get(router.search.remote(q, q + 1, 10, "rank_merge", {"nprobe": 1}))
    assert one_list.ids.shape == (3, 10) and set(one_list.ids[0]) <= set(g.ids.tolist()) | {-1}
    with pytest.raises(ValueError, match="'efSearch' does not apply to index 'IVF2,Flat'"):
        get(router.search.remote(q, q + 1, 10, "rank_merge", {"efSearch": 16}))


def _moved(g: Gallery, n: int) -> Gallery:
    g.upsert(np.arange(n), g.old[:n] + 1, "transformed")
    return g
