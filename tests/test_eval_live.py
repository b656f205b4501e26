"""Live quality: top-1 / AP@k from returned ids (by hand and against the offline metrics), probe sampling and
tables, and a real router whose quality rises as better vectors are upserted and matches the offline numbers."""

from __future__ import annotations

import uuid

import numpy as np
import pytest

from raybackfill.data import storage
from raybackfill.data.schema import embedding_table
from raybackfill.eval.curves import BackfillSpaces, parts_at
from raybackfill.eval.live import LabelLookup, ProbeSet, live_quality, score_topk, summarize_scores
from raybackfill.eval.metrics import EvalConfig, evaluate, evaluate_parts
from raybackfill.index.router import RouterConfig, create_index, destroy_index, get

LOOKUP = LabelLookup.from_arrays(np.array([13, 10, 14, 12, 11]), np.array([1, 0, 2, 1, 0]))


def test_label_lookup_is_vectorised_over_any_id_order_and_counts_labels():
    labels, known = LOOKUP.labels_of(np.array([[12, 99], [10, 14]]))
    np.testing.assert_array_equal(known, [[True, False], [True, True]])
    np.testing.assert_array_equal(labels[known], [1, 0, 2])
    np.testing.assert_array_equal(LOOKUP.count_of(np.array([0, 1, 2, 3, -1])), [2, 2, 1, 0, 0])
    with pytest.raises(ValueError, match="duplicate ids: 4"):
        LabelLookup.from_arrays(np.array([4, 4]), np.array([0, 1]))


def test_top1_and_ap_at_k_by_hand():
    ids = np.array([[10, 12, 11], [14, 13, -1], [-1, -1, -1], [10, 11, 12]])
    scores = score_topk(ids, np.array([0, 1, 2, 3]), LOOKUP)
    np.testing.assert_array_equal(scores.kept, [True, True, True, False])  # label 3: nothing relevant
    np.testing.assert_array_equal(scores.correct_top1, [True, False, False])
    # probe 0: hits at ranks 1 and 3, R=2: (1 + 2/3) / min(3, 2); probe 1: hit at rank 2: (1/2) / 2; probe 2: none.
    np.testing.assert_allclose(scores.ap_at_k, [5 / 6, 0.25, 0.0])
    # k=1 < R=2: normalised by min(k, R) = 1, so a perfect top-1 list has AP@1 = 1.
    np.testing.assert_allclose(score_topk(ids[:1, :1], np.array([0]), LOOKUP).ap_at_k, [1.0])
    quality = summarize_scores(scores, "rank_merge", 3, 0.01)
    assert (quality.top1, quality.probes, quality.dropped) == (pytest.approx(1 / 3), 3, 1)
    assert quality.map_at_k == pytest.approx((5 / 6 + 0.25) / 3)


def test_unknown_returned_ids_are_an_error_not_a_silent_miss():
    with pytest.raises(ValueError, match="1 returned ids are not in the gallery label lookup .*\\[99\\]"):
        score_topk(np.array([[10, 99]]), np.array([0]), LOOKUP)


def test_ap_over_a_list_covering_the_gallery_equals_offline_ap_at_all():
    rng = np.random.default_rng(3)
    gallery, queries = rng.standard_normal((40, 5)), rng.standard_normal((12, 5))
    g_labels, q_labels = rng.integers(0, 4, 40), rng.integers(0, 5, 12)  # label 4: no relevant item
    g_ids = 1000 + rng.permutation(40)
    offline = evaluate(queries, gallery, q_labels, g_labels, EvalConfig(metric="l2"))
    distances = ((queries[:, None, :] - gallery[None]) ** 2).sum(-1)
    ranked_ids = g_ids[np.argsort(distances, axis=1, kind="stable")]
    live = score_topk(ranked_ids, q_labels, LabelLookup.from_arrays(g_ids, g_labels))
    np.testing.assert_array_equal(live.kept, offline.kept)
    np.testing.assert_array_equal(live.correct_top1, offline.correct_top1)
    np.testing.assert_allclose(live.ap_at_k, offline.average_precision)


def test_probe_sample_is_fixed_per_seed_and_strategies_need_their_spaces():
    probes = ProbeSet(np.arange(50), old=np.arange(100.0).reshape(50, 2))
    a, b = probes.sample(7, seed=1), probes.sample(7, seed=1)
    np.testing.assert_array_equal(a.labels, b.labels)
    assert len(a.labels) == 7 and (np.diff(a.labels) > 0).all()
    np.testing.assert_array_equal(a.old[:, 0], 2 * a.labels)  # rows stay aligned with labels
    assert not np.array_equal(probes.sample(7, seed=2).labels, a.labels)
    assert probes.sample(50) is probes
    assert probes.queries_for("old") == (probes.old, None)
    with pytest.raises(ValueError, match="strategy 'rank_merge' needs new-space probe vectors"):
        probes.queries_for("rank_merge")


def test_probe_tables_are_matched_by_id(tmp_path):
    old = embedding_table(np.array([5, 6, 7]), np.eye(3), extra={"label": np.array([0, 1, 1], np.int32)})
    new = embedding_table(np.array([7, 5, 6]), 10 * np.eye(3)[[2, 0, 1]])
    storage.write_table(old, str(tmp_path / "old"))
    storage.write_table(new, str(tmp_path / "new"))
    probes = ProbeSet.read(str(tmp_path / "old"), str(tmp_path / "new"))
    np.testing.assert_array_equal(probes.labels, [0, 1, 1])
    np.testing.assert_array_equal(probes.new, 10 * np.eye(3))
    storage.write_table(new.slice(0, 2), str(tmp_path / "short"))
    with pytest.raises(ValueError, match="give the same probes"):
        ProbeSet.read(str(tmp_path / "old"), str(tmp_path / "short"))


def unit(x: np.ndarray) -> np.ndarray:
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)


@pytest.fixture
def index(ray_cluster):
    config = RouterConfig(name=f"test-live-{uuid.uuid4().hex[:8]}", shards=2)
    yield create_index(config)
    destroy_index(config.name)


def test_live_quality_rises_with_better_vectors_and_equals_the_offline_metrics(index):
    rng = np.random.default_rng(7)
    n, d, classes = 48, 8, 4
    g_ids = 500 + rng.permutation(200)[:n].astype(np.int64)
    g_labels, q_labels = np.arange(n) % classes, rng.integers(0, classes, 30)
    # Old space: no class structure (weak). New space: tight clusters around orthogonal class centres, so a
    # backfilled item of the probe's class outscores every old item (cosine ~1 vs < 1): quality must rise.
    centres = np.eye(d)[:classes] * 5
    g_old, q_old = unit(rng.standard_normal((n, d))), unit(rng.standard_normal((30, d)))
    g_new = unit(centres[g_labels] + 0.3 * rng.standard_normal((n, d)))
    q_new = unit(centres[q_labels] + 0.3 * rng.standard_normal((30, d)))
    lookup = LabelLookup.from_arrays(g_ids, g_labels)
    probes = ProbeSet(q_labels, old=q_old, new=q_new)
    spaces = BackfillSpaces.rank_merge(q_old, g_old, q_new, g_new)
    order = rng.permutation(n)
    config = EvalConfig(metric="cosine")
    get(index.load_old.remote(g_ids, g_old, "v1"))

    readings = []
    for beta in (0.0, 0.5, 1.0):
        done = order[: int(beta * n)]
        if len(done):
            get(index.upsert.remote(g_ids[done], g_new[done], "new", "v2"))
        live = live_quality(index, probes, lookup, strategy="rank_merge", k=64, max_probes=1000)
        offline = evaluate_parts(parts_at(spaces, order, beta), q_labels, g_labels, config)
        assert (live.probes, live.dropped, live.k) == (30, 0, 64)
        assert live.top1 == pytest.approx(offline.top1)
        assert live.map_at_k == pytest.approx(offline.map, rel=1e-6)
        assert live.latency_s > 0
        readings.append(live)
    assert readings[0].top1 < 0.6 and readings[1].top1 == readings[2].top1 == 1.0
    assert readings[0].map_at_k < readings[1].map_at_k < readings[2].map_at_k == pytest.approx(1.0)

    sampled = [live_quality(index, probes, lookup, strategy="compatible", k=5, max_probes=10, seed=3) for _ in "ab"]
    assert sampled[0].probes == 10 and sampled[0].top1 == sampled[1].top1 == 1.0
    assert sampled[0].map_at_k == sampled[1].map_at_k
