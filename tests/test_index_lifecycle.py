"""Generations of a live index on the session's Ray cluster: v1 -> v2 promote -> rollback -> promote -> v3,
answered throughout with every id exactly once; lineage and provenance; retention and gc; snapshots of a
retired generation; export -> serve round trip; and a v3 backfill started while v2's backfill is at 50 %."""

from __future__ import annotations

import contextlib
import json
import threading
import time
import uuid

import numpy as np
import pytest
import torch
from index_testing import Gallery, assert_each_id_exactly_once, assert_matches, brute_force, unit

from raybackfill.backfill.run import BackfillConfig, run_backfill
from raybackfill.cli.main import main
from raybackfill.cli.transform import transform_table
from raybackfill.data.schema import EMBEDDING, GENERATION, ID, LINEAGE, MODEL, embedding_table, image_table
from raybackfill.data.storage import read_table, write_table
from raybackfill.data.synth import synthesize
from raybackfill.embed.pipeline import PoolConfig
from raybackfill.index.loading import load_old_table
from raybackfill.index.router import EXPORT_MANIFEST, RouterConfig, create_index, destroy_index, get
from raybackfill.index.serving import serving_strategy
from raybackfill.index.shard import IndexConfig
from raybackfill.models.artifacts import ModelSpec, save_model
from raybackfill.models.registry import build_model
from raybackfill.types import Phase, Space, Strategy

N, DIM = 96, 8


@pytest.fixture
def make_index(ray_cluster):
    names = []

    def make(**kwargs):
        options = {"shards": 2, "shard_num_cpus": 0.1} | kwargs
        config = RouterConfig(name=f"test-life-{uuid.uuid4().hex[:8]}", **options)
        names.append(config.name)
        return create_index(config), config

    yield make
    for name in names:
        with contextlib.suppress(ValueError):
            destroy_index(name)


class Client:
    """Queries the whole gallery (k = n) in a loop with the strategy each phase serves; every answer must
    hold every id exactly once."""

    def __init__(self, router, ids: np.ndarray) -> None:
        self.router, self.ids = router, ids
        self.q = np.random.default_rng(7).standard_normal((2, DIM)).astype(np.float32)
        self.stop, self.errors, self.answers = threading.Event(), [], 0
        self.thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self.stop.is_set():
            try:
                phase = get(self.router.progress.remote()).phase
                for strategy in {serving_strategy(phase, Strategy.RANK_MERGE), Strategy.COMPATIBLE}:
                    result = get(self.router.search.remote(self.q, self.q, len(self.ids), strategy), timeout=60)
                    assert_each_id_exactly_once(result, self.ids)
                    self.answers += 1
            except Exception as err:  # every failure is a finding
                self.errors.append(err)
            time.sleep(0.02)

    def __enter__(self) -> Client:
        self.thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.stop.set()
        self.thread.join(60)
        assert not self.errors, self.errors[:3]
        assert self.answers > 0


def test_a_count_read_that_overlapped_a_promote_is_not_recorded_over_the_promotes_counts(make_index):
    # progress() runs on the router's light thread while promote() runs on its default one: a read of the shards'
    # counts begun before (or during) a promote may see some shards before it and must not land after it.
    router, _ = make_index()

    def race(self) -> dict:
        before = [dict.fromkeys(Space, 0) | {Space.TRANSFORMED: 5} for _ in self._shard_counts]
        after = [dict.fromkeys(Space, 0) | {Space.OLD: 5} for _ in self._shard_counts]
        read_at = self._epoch()  # a progress() read begins
        self._bump_epoch()  # a promote begins, its shards promote, it records their counts
        self._record_counts(after)
        self._bump_epoch()
        self._record_counts(before, read_at=read_at)  # the read that began before it lands now: dropped
        stale = self._progress().counts
        self._record_counts(after, read_at=self._epoch())  # a read begun after it is recorded
        return {"stale": stale, "fresh": self._progress().counts}

    seen = get(router.__ray_call__.remote(race))
    assert seen["stale"][Space.OLD] == 10 and seen["stale"][Space.TRANSFORMED] == 0
    assert seen["fresh"][Space.OLD] == 10


def test_v1_v2_promote_rollback_promote_then_v3_answers_every_id_once_and_tracks_lineage(make_index):
    router, _ = make_index()
    g = Gallery.random(N, DIM, seed=3)
    rng = np.random.default_rng(4)
    get(router.load_old.remote(g.ids, g.old, "v1"))
    with Client(router, g.ids):
        # v1 -> v2: everything transformed, then half re-embedded by v2.
        transformed = rng.standard_normal((N, DIM)).astype(np.float32)
        get(router.upsert.remote(g.ids, transformed, "transformed", "v2"))
        g.upsert(np.arange(N), transformed, "transformed")
        half = np.arange(N // 2)
        new = rng.standard_normal((len(half), DIM)).astype(np.float32)
        get(router.upsert.remote(g.ids[half], new, "new", "v2"))
        g.upsert(half, new, "new")
        get(router.set_phase.remote(Phase.DONE))
        q = rng.standard_normal((3, DIM)).astype(np.float32)
        before = get(router.search.remote(q, q, 20, "compatible"))
        assert_matches(before, brute_force(g, q, q, 20, "compatible"))

        assert get(router.promote.remote()) == {"old": N, "transformed": 0, "new": 0}
        provenance = get(router.provenance.remote())
        assert provenance["generation"] == 2
        assert provenance["old"] == {"version": "v2", "lineages": {"v2": N // 2, "v1>v2": N // 2}}
        assert provenance["retired"]["version"] == "v1" and provenance["retired"]["items"] == N
        v2 = g.promote()
        for strategy in ("old", "compatible", "rank_merge"):
            assert_matches(get(router.search.remote(q, q, 20, strategy)), brute_force(v2, q, q, 20, strategy))
        stored = get(router.vectors.remote(g.ids[[0, N - 1]]))
        assert stored.old_lineage == ["v2", "v1>v2"] and stored.new_lineage == [None, None]

        # Rollback after promote: v1 serves again with v2 as its upgrade, exactly as before the promote.
        assert get(router.rollback.remote()) == {"old": 0, "transformed": N // 2, "new": N // 2}
        assert get(router.progress.remote()).phase == Phase.DONE
        after = get(router.search.remote(q, q, 20, "compatible"))
        np.testing.assert_array_equal(after.ids, before.ids)
        np.testing.assert_allclose(after.scores, before.scores, rtol=1e-6)
        assert get(router.health.remote())["generation"] == 1

        assert get(router.promote.remote()) == {"old": N, "transformed": 0, "new": 0}
        # v2 -> v3 on top of the promoted v2: a third of the items transformed, a few re-embedded by v3.
        third = np.arange(0, N, 3)
        to_v3 = rng.standard_normal((len(third), DIM)).astype(np.float32)
        get(router.upsert.remote(v2.ids[third], to_v3, "transformed", "v3"))
        v2.upsert(third, to_v3, "transformed")
        fresh = third[:4]
        v3_new = rng.standard_normal((4, DIM)).astype(np.float32)
        get(router.upsert.remote(v2.ids[fresh], v3_new, "new", "v3"))
        v2.upsert(fresh, v3_new, "new")
        for strategy in ("old", "compatible", "rank_merge"):
            assert_matches(get(router.search.remote(q, q, 20, strategy)), brute_force(v2, q, q, 20, strategy))
        lineages = get(router.provenance.remote())["new"]["lineages"]
        carried = third[4:]
        expected = {"v3": {"new": 4}}
        for origin in ("v2", "v1>v2"):
            n = int(((carried < N // 2) if origin == "v2" else (carried >= N // 2)).sum())
            expected[f"{origin}>v3"] = {"transformed": n}
        assert lineages == expected

        # The promote of v2 cannot be undone while v3 is under way: rollback undoes v3 first.
        assert get(router.rollback.remote())["old"] == N
        assert get(router.progress.remote()).phase == Phase.ROLLED_BACK
        assert get(router.gc.remote())["version"] == "v1"
        assert get(router.gc.remote()) == {}
        with pytest.raises(ValueError, match="the generation it replaced is gone"):
            get(router.rollback.remote())


def test_retention_collects_the_retired_generation_and_a_snapshot_keeps_it_until_then(make_index, tmp_path):
    router, config = make_index(index=IndexConfig(retention_s=3600.0), snapshot_uri=str(tmp_path / "snap"))
    g = Gallery.random(40, DIM, seed=8)
    get(router.load_old.remote(g.ids, g.old, "v1"))
    get(router.upsert.remote(g.ids, g.old * 2 + 1, "new", "v2"))
    get(router.promote.remote())
    retired = get(router.health.remote())["retired"]
    assert retired["expires_at"] == pytest.approx(retired["promoted_at"] + 3600.0)
    get(router.snapshot.remote())
    import ray
    from index_testing import kill_and_wait_for_restart

    from raybackfill import NAMESPACE

    kill_and_wait_for_restart(ray.get_actor(config.shard_name(0), namespace=NAMESPACE))
    # The restarted shard came back with its retired generation: the promote can still be rolled back.
    assert get(router.rollback.remote()) == {"old": 0, "transformed": 0, "new": 40}
    q = np.random.default_rng(1).standard_normal((2, DIM)).astype(np.float32)
    assert_matches(get(router.search.remote(q, None, 10, "old")), brute_force(g, q, None, 10, "old"))

    short, _ = make_index(index=IndexConfig(retention_s=0.5))
    get(short.load_old.remote(g.ids, g.old, "v1"))
    get(short.upsert.remote(g.ids, g.old + 1, "new", "v2"))
    get(short.promote.remote())
    time.sleep(1.0)
    get(short.search.remote(q, None, 5, "old"))  # any call past the retention collects it
    assert get(short.health.remote())["retired"] is None
    with pytest.raises(ValueError, match="the generation it replaced is gone"):
        get(short.rollback.remote())


def test_export_then_serve_answers_like_the_live_index_and_keeps_lineage(make_index, tmp_path, capsys):
    router, config = make_index()
    g = Gallery.random(N, DIM, seed=11)
    get(router.load_old.remote(g.ids, g.old, "v1"))
    rng = np.random.default_rng(2)
    get(router.upsert.remote(g.ids, rng.standard_normal((N, DIM)), "transformed", "v2"))
    get(router.upsert.remote(g.ids[:30], rng.standard_normal((30, DIM)), "new", "v2"))
    get(router.promote.remote())
    out = str(tmp_path / "export")
    assert main(["export", "--name", config.name, "--out", out, "--part-rows", "20"]) == 0
    printed = capsys.readouterr().out
    assert f"export: {N:,} items of generation 'v2' (dim {DIM})" in printed and "v1>v2 66" in printed
    manifest = json.loads((tmp_path / "export" / EXPORT_MANIFEST).read_text())
    assert manifest["items"] == N and manifest["generation"] == "v2" and manifest["lineages"] == {"v2": 30, "v1>v2": 66}
    table = read_table(out)
    assert sorted(table.column(ID).to_pylist()) == sorted(g.ids.tolist())
    assert set(table.column(GENERATION).to_pylist()) == {"v2"}
    rows = dict(
        zip(
            table.column(ID).to_pylist(),
            zip(table.column(MODEL).to_pylist(), table.column(LINEAGE).to_pylist(), strict=True),
            strict=True,
        )
    )
    assert rows[int(g.ids[0])] == ("v2", "v2") and rows[int(g.ids[-1])] == ("v1", "v1>v2")
    with pytest.raises(ValueError, match="already holds an export"):
        get(router.export.remote(out, "old"))

    served, _ = make_index(shards=3)
    summary = load_old_table(served, out)
    assert summary.version == "v2" and summary.items == N
    q = rng.standard_normal((5, DIM)).astype(np.float32)
    live, copy = (get(r.search.remote(q, None, 25, "old")) for r in (router, served))
    np.testing.assert_array_equal(copy.ids, live.ids)
    np.testing.assert_allclose(copy.scores, live.scores, rtol=1e-6)
    assert get(served.provenance.remote())["old"]["lineages"] == {"v2": 30, "v1>v2": 66}

    assert main(["status", "--by-model", "--name", config.name]) == 0
    status = capsys.readouterr().out
    assert "serving 'v2': 96 items" in status and "retired 'v1': 96 items, kept for rollback until gc" in status
    item = int(g.ids[-1])  # never re-embedded by v2: a v1 embedding transformed into v2
    assert main(["status", "--by-model", "--item", str(item), "--name", config.name]) == 0
    assert [str(item), "old", "v1>v2", "-"] in [line.split() for line in capsys.readouterr().out.splitlines()]


# --------------------------------------------------------------------- a v3 backfill over an unfinished v2
def _save(uri, architecture: str, version: str, **kwargs) -> str:
    save_model(build_model(architecture, **kwargs), str(uri), ModelSpec(architecture, version, kwargs))
    return str(uri)


def test_a_v3_backfill_started_while_v2_is_at_half_skips_v2_and_serves_the_rest_through_h23_after_h12(
    make_index, tmp_path
):
    torch.manual_seed(0)
    n = 16
    synth = synthesize(classes=4, per_class=n // 4, size=16)
    ids = synth.column(ID).to_numpy()
    write_table(image_table(ids, synth.column("image").to_pylist(), labels=ids % 4), str(tmp_path / "gallery"))
    old = np.random.default_rng(0).standard_normal((n, DIM)).astype(np.float32)
    write_table(embedding_table(ids, old, model="v1"), str(tmp_path / "v1"))
    cnn = {"embedding_dim": DIM, "num_classes": 4, "width": 4}
    mlp = {"old_dim": DIM, "new_dim": DIM, "hidden_dim": 8, "mixer_dim": 8}
    models = {
        "v2": _save(tmp_path / "v2", "small_cnn", "v2", **cnn),
        "h12": _save(tmp_path / "h12", "fastfill_transformation", "v2", **mlp),
        "v3": _save(tmp_path / "v3", "small_cnn", "v3", **cnn),
        "h23": _save(tmp_path / "h23", "fastfill_transformation", "v3", **mlp),
    }
    router, config = make_index()
    load_old_table(router, str(tmp_path / "v1"))
    pool = PoolConfig(batch_size=4)

    def backfill(old_embeddings: str, upgrade: str, transformation: str, out: str, until: float | None):
        return run_backfill(BackfillConfig(
            gallery=str(tmp_path / "gallery"), old_embeddings=old_embeddings, upgrade=models[upgrade],
            transformation=models[transformation], method="fastfill", policy="uncertainty", tiers=2,
            until=until, out=str(tmp_path / out), index=config.name, pool=pool, progress=False,
        ))  # fmt: skip

    with Client(router, ids):
        v2 = backfill(str(tmp_path / "v1"), "v2", "h12", "bf-v2", until=0.5)
        assert not v2.complete
        assert get(router.progress.remote()).counts == {"old": 0, "transformed": n // 2, "new": n // 2}
        # v3 starts now: promote v2 as it is, export it, and backfill v3 from the export.
        get(router.promote.remote())
        assert main(["export", "--name", config.name, "--out", str(tmp_path / "gen-v2")]) == 0
        expected = transform_table(str(tmp_path / "gen-v2"), models["h23"], str(tmp_path / "h23-of-v2"))
        assert expected.rows == n
        exported = read_table(str(tmp_path / "gen-v2"))
        never_v2 = {
            i
            for i, lineage in zip(exported.column(ID).to_pylist(), exported.column(LINEAGE).to_pylist(), strict=True)
            if lineage == "v1>v2"
        }
        assert len(never_v2) == n // 2

        v3 = backfill(str(tmp_path / "gen-v2"), "v3", "h23", "bf-v3", until=0.25)
        assert not v3.complete
        provenance = get(router.provenance.remote())["new"]["lineages"]
        assert provenance["v3"] == {"new": n // 4}
        carried = {lineage: states["transformed"] for lineage, states in provenance.items() if lineage != "v3"}
        assert sum(carried.values()) == n - n // 4 and set(carried) <= {"v2>v3", "v1>v2>v3"}
        # Items never re-embedded by v2 are served through h23 after h12: the index holds h23(export row).
        stored = get(router.vectors.remote(np.array(sorted(never_v2), dtype=np.int64)))
        reference = read_table(str(tmp_path / "h23-of-v2"))
        by_id = dict(
            zip(
                reference.column(ID).to_pylist(),
                np.stack(reference.column(EMBEDDING).to_numpy(zero_copy_only=False)),
                strict=True,
            )
        )
        checked = 0
        for item, lineage, vector, state in zip(
            sorted(never_v2), stored.new_lineage, stored.new, stored.states, strict=True
        ):
            if state == 1:  # still transformed
                assert lineage == "v1>v2>v3"
                np.testing.assert_allclose(vector, unit(by_id[item][None])[0], atol=1e-5)
                checked += 1
        assert checked >= n // 2 - n // 4  # at most a quarter of the gallery was re-embedded by v3 so far

        finished = backfill(str(tmp_path / "gen-v2"), "v3", "h23", "bf-v3", until=None)
        assert finished.complete
        assert get(router.provenance.remote())["new"]["lineages"] == {"v3": {"new": n}}
    get(router.promote.remote())
    assert get(router.provenance.remote())["old"]["lineages"] == {"v3": n}
