"""Retrieval metrics: hand-computed rankings, and a brute-force numpy reference (full sort per query).

Random data here is exact in float32 (small integers; cosine vectors with power-of-two norms), so every
score is computed without rounding and ties are real: results must match the reference bit for bit,
including the tie rule (equal scores: lower gallery position first).
"""

import numpy as np
import pytest

from raybackfill.eval.metrics import (
    BYTES_PER_CELL,
    BYTES_PER_RELEVANT,
    EvalConfig,
    GalleryPart,
    QueryPlan,
    cross_tests,
    evaluate,
    evaluate_parts,
    negative_flip_rate,
    negative_flips,
    rank_keys,
    ranking_keys,
)

# Integer vectors of squared norm 64: normalised entries are multiples of 1/8, dot products exact.
NORM8_PATTERNS = [(8,), (7, 3, 1, 1, 1, 1, 1, 1), (4, 4, 4, 4), (5, 5, 3, 1, 1, 1, 1, 1), (6, 4, 2, 2, 2)]


def exact_vectors(rng, n, metric, dim=8):
    if metric == "l2":
        return rng.integers(-3, 4, size=(n, dim)).astype(np.float32)
    out = np.zeros((n, dim), dtype=np.float32)
    for row in out:
        pattern = NORM8_PATTERNS[rng.integers(len(NORM8_PATTERNS))]
        row[rng.permutation(dim)[: len(pattern)]] = np.array(pattern) * rng.choice([-1, 1], len(pattern))
    return out * (2.0 ** rng.integers(-2, 3, size=(n, 1)))  # scales that normalise exactly


def brute_force(score_matrix, query_labels, gallery_labels, protocol):
    """Per query: full stable sort by (-score, position); drop queries with nothing relevant."""
    top1, top5, ap, ap_r, kept = [], [], [], [], []
    n_gallery = score_matrix.shape[1]
    for i, row in enumerate(score_matrix):
        positions = np.arange(n_gallery)
        if protocol == "leave_one_out":
            positions = positions[positions != i]
        order = positions[np.lexsort((positions, -row[positions]))]
        rel = gallery_labels[order] == query_labels[i]
        kept.append(rel.any())
        if not rel.any():
            continue
        hits = np.cumsum(rel)
        precision = hits / np.arange(1, len(rel) + 1)
        r = rel.sum()
        top1.append(rel[0])
        top5.append(rel[:5].any())
        ap.append(precision[rel].mean())
        ap_r.append((precision[:r] * rel[:r]).sum() / r)
    return dict(top1=np.array(top1), top5=np.array(top5), ap=np.array(ap), ap_r=np.array(ap_r), kept=np.array(kept))


def reference_scores(q, g, metric):
    q, g = q.astype(np.float64), g.astype(np.float64)
    if metric == "cosine":
        q = q / np.linalg.norm(q, axis=1, keepdims=True)
        g = g / np.linalg.norm(g, axis=1, keepdims=True)
        return q @ g.T
    return -((q[:, None, :] - g[None, :, :]) ** 2).sum(-1)


def assert_matches(result, ref):
    np.testing.assert_array_equal(result.kept, ref["kept"])
    np.testing.assert_array_equal(result.correct_top1, ref["top1"])
    np.testing.assert_allclose(result.average_precision, ref["ap"], rtol=1e-12)
    assert result.top1 == pytest.approx(ref["top1"].mean(), abs=1e-12)
    assert result.top5 == pytest.approx(ref["top5"].mean(), abs=1e-12)
    assert result.map == pytest.approx(ref["ap"].mean(), abs=1e-12)
    assert result.map_at_r == pytest.approx(ref["ap_r"].mean(), abs=1e-12)


def test_hand_computed_l2_disjoint_example():
    # Gallery on a line at 0..4 with labels A B A B C; queries at 0.1 (A), 3.9 (A), 1.2 (B).
    gallery = np.arange(5, dtype=np.float32)[:, None]
    queries = np.array([[0.1], [3.9], [1.2]], dtype=np.float32)
    result = evaluate(queries, gallery, np.array([0, 0, 1]), np.array([0, 1, 0, 1, 2]), EvalConfig(metric="l2"))
    # Rankings by distance: q0 -> A B A B C, q1 -> C B A B A, q2 -> B A A B C.
    np.testing.assert_array_equal(result.correct_top1, [True, False, True])
    np.testing.assert_allclose(result.average_precision, [(1 + 2 / 3) / 2, (1 / 3 + 2 / 5) / 2, (1 + 2 / 4) / 2])
    assert result.top1 == pytest.approx(2 / 3)
    assert result.top5 == 1.0
    assert result.map == pytest.approx((5 / 6 + 11 / 30 + 3 / 4) / 3)
    assert result.map_at_r == pytest.approx((1 / 2 + 0 + 1 / 2) / 3)  # R = 2 for both labels
    assert (result.metric, result.protocol, result.n_queries, result.n_dropped) == ("l2", "disjoint", 3, 0)


def test_cosine_normalises_and_breaks_ties_by_gallery_position():
    query = np.array([[3.0, 0.0]], dtype=np.float32)
    # Cosines 1, 1, 0, 0, 0.707: positions 0 and 1 tie at the top, position 0 (not relevant) wins.
    gallery = np.array([[2, 0], [1, 0], [0, 1], [0, -3], [1, 1]], dtype=np.float32)
    result = evaluate(query, gallery, np.array([1]), np.array([0, 1, 0, 0, 1]))
    assert not result.correct_top1[0]
    assert result.map == pytest.approx((1 / 2 + 2 / 3) / 2)
    swapped = evaluate(query, gallery[[1, 0, 2, 3, 4]], np.array([1]), np.array([1, 0, 0, 0, 1]))
    assert swapped.correct_top1[0]
    assert swapped.map == pytest.approx((1 + 2 / 3) / 2)


def test_leave_one_out_never_retrieves_itself_and_drops_lonely_queries():
    points = np.array([[0.0], [1.0], [1.5], [5.0], [9.0]], dtype=np.float32)
    labels = np.array([0, 1, 0, 1, 2])  # label 2 has a single item: nothing else relevant
    result = evaluate(points, points, labels, labels, EvalConfig(metric="l2", protocol="leave_one_out"))
    np.testing.assert_array_equal(result.kept, [True, True, True, True, False])
    assert (result.n_queries, result.n_dropped) == (4, 1)
    # Without the exclusion every query would find itself first; item 3 ties items 1 and 4 (distance 4).
    np.testing.assert_array_equal(result.correct_top1, [False] * 4)
    np.testing.assert_allclose(result.average_precision, [1 / 2, 1 / 3, 1 / 2, 1 / 2])
    assert result.top5 == 1.0


def test_disjoint_drops_queries_whose_label_is_absent_from_gallery():
    gallery = np.eye(3, dtype=np.float32)
    result = evaluate(np.eye(3, dtype=np.float32), gallery, np.array([0, 7, 2]), np.array([0, 1, 2]))
    np.testing.assert_array_equal(result.kept, [True, False, True])
    assert result.top1 == 1.0 and result.n_dropped == 1


def test_ranking_orders_signed_zeros_and_infinities_like_a_float_sort():
    rng = np.random.default_rng(3)
    row = np.array([0.5, -0.0, 0.0, -1e-30, 1e-30, -2.0, 2.0, -np.inf, 0.5, -2.0, 3e38, -3e38], dtype=np.float32)
    for _ in range(30):
        rel = rng.random(len(row)) < 0.4
        rel[rng.integers(len(row))] = True
        stats = rank_keys(ranking_keys(row[None, :].copy(), rel[None, :]))
        ref = brute_force(row[None, :].astype(np.float64), np.ones(1, int), rel.astype(int), "disjoint")
        assert stats.correct_top1[0] == ref["top1"][0]
        assert stats.ap[0] == pytest.approx(ref["ap"][0], abs=1e-12)
        assert stats.ap_at_r[0] == pytest.approx(ref["ap_r"][0], abs=1e-12)


@pytest.mark.parametrize("metric", ["cosine", "l2"])
@pytest.mark.parametrize("protocol", ["disjoint", "leave_one_out"])
def test_matches_brute_force_full_sort_on_random_data_with_ties(metric, protocol):
    rng = np.random.default_rng([len(metric), len(protocol)])
    n_gallery = 120
    gallery = exact_vectors(rng, n_gallery, metric)
    gallery_labels = rng.integers(0, 6, n_gallery)
    gallery_labels[0] = 99  # a singleton: dropped under leave-one-out
    if protocol == "leave_one_out":
        queries, query_labels = exact_vectors(rng, n_gallery, metric), gallery_labels
    else:
        queries, query_labels = exact_vectors(rng, 70, metric), rng.integers(0, 7, 70)  # label 6: absent
    config = EvalConfig(metric=metric, protocol=protocol, block_size=16)
    result = evaluate(queries, gallery, query_labels, gallery_labels, config)
    ref = brute_force(reference_scores(queries, gallery, metric), query_labels, gallery_labels, protocol)
    assert result.n_dropped > 0
    assert_matches(result, ref)


def test_block_size_does_not_change_results():
    rng = np.random.default_rng(5)
    queries, gallery = exact_vectors(rng, 53, "cosine"), exact_vectors(rng, 90, "cosine")
    q_labels, g_labels = rng.integers(0, 5, 53), rng.integers(0, 5, 90)
    results = [evaluate(queries, gallery, q_labels, g_labels, EvalConfig(block_size=b)) for b in (1, 7, 53, 1000, None)]
    for other in results[1:]:
        np.testing.assert_array_equal(other.correct_top1, results[0].correct_top1)
        np.testing.assert_array_equal(other.average_precision, results[0].average_precision)
        assert (other.top5, other.map_at_r) == (results[0].top5, results[0].map_at_r)


def test_memory_budget_sets_block_rows_from_gallery_size_and_relevant_share():
    config = EvalConfig(memory_budget_mb=1)
    assert config.rows_per_block(1000, bytes_per_cell=24) == 2**20 // (24 * 1000)
    assert config.rows_per_block(10**9, bytes_per_cell=24) == 1
    assert EvalConfig(block_size=5).rows_per_block(10**9, bytes_per_cell=24) == 5
    labels = np.array([0, 0, 0, 1])  # under leave-one-out a label-0 query has 2 of 4 items relevant
    plan = QueryPlan.build(labels, labels, "leave_one_out")
    assert plan.bytes_per_cell() == BYTES_PER_CELL + BYTES_PER_RELEVANT * 2 / 4
    np.testing.assert_array_equal(plan.kept, [True, True, True, False])


@pytest.mark.parametrize("metric", ["cosine", "l2"])
@pytest.mark.parametrize("protocol", ["disjoint", "leave_one_out"])
def test_parts_merge_by_score_equals_brute_force_merged_ranking(metric, protocol):
    rng = np.random.default_rng(11)
    n_gallery, n_queries = 80, 80 if protocol == "leave_one_out" else 45
    g_labels = rng.integers(0, 4, n_gallery)
    q_labels = g_labels if protocol == "leave_one_out" else rng.integers(0, 4, n_queries)
    # Three parts in three spaces (different dims), interleaved positions.
    assignment = rng.integers(0, 3, n_gallery)
    parts, merged = [], np.empty((n_queries, n_gallery))
    for p, dim in enumerate((8, 12, 8)):
        pos = np.flatnonzero(assignment == p)
        q, g = exact_vectors(rng, n_queries, metric, dim), exact_vectors(rng, len(pos), metric, dim)
        parts.append(GalleryPart(q, g, pos))
        merged[:, pos] = reference_scores(q, g, metric)
    config = EvalConfig(metric=metric, protocol=protocol, block_size=32)
    result = evaluate_parts(parts, q_labels, g_labels, config)
    assert_matches(result, brute_force(merged, q_labels, g_labels, protocol))


def test_single_part_listing_all_positions_in_any_order_is_the_plain_evaluation():
    rng = np.random.default_rng(2)
    queries, gallery = exact_vectors(rng, 20, "l2"), exact_vectors(rng, 30, "l2")
    q_labels, g_labels = rng.integers(0, 3, 20), rng.integers(0, 3, 30)
    perm = rng.permutation(30)
    config = EvalConfig(metric="l2")
    shuffled = evaluate_parts([GalleryPart(queries, gallery[perm], perm)], q_labels, g_labels, config)
    plain = evaluate(queries, gallery, q_labels, g_labels, config)
    np.testing.assert_array_equal(shuffled.average_precision, plain.average_precision)
    np.testing.assert_array_equal(shuffled.correct_top1, plain.correct_top1)


def test_parts_must_cover_each_gallery_position_once():
    q, g = np.ones((2, 3), np.float32), np.ones((2, 3), np.float32)
    labels = np.array([0, 0])
    with pytest.raises(ValueError, match="exactly once: 1 missing, 1 repeated"):
        evaluate_parts([GalleryPart(q, g, np.array([0, 0]))], labels, np.array([0, 1]))
    with pytest.raises(ValueError, match="1 missing"):
        evaluate_parts([GalleryPart(q, g[:1], np.array([1]))], labels, np.array([0, 1]))
    with pytest.raises(ValueError, match="query dim"):
        GalleryPart(q, np.ones((2, 4)), np.array([0, 1]))


def test_bad_inputs_get_clear_errors():
    ok = np.ones((2, 3), np.float32)
    labels = np.array([0, 0])
    with pytest.raises(ValueError, match="NaN/inf in 1 rows"):
        evaluate(np.array([[1, np.nan, 0], [1, 0, 0]], np.float32), ok, labels, labels)
    with pytest.raises(ValueError, match=r"zero vector\(s\) at rows \[1\]"):
        evaluate(ok, np.array([[1, 0, 0], [0, 0, 0]], np.float32), labels, labels)
    with pytest.raises(ValueError, match="query i must be gallery item i"):
        evaluate(ok, ok, labels, np.array([0, 1]), EvalConfig(protocol="leave_one_out"))
    with pytest.raises(ValueError, match="no query has a relevant gallery item"):
        evaluate(ok, ok, labels, np.array([1, 1]))
    with pytest.raises(ValueError, match="unknown metric 'dot'; valid: cosine, l2$"):
        EvalConfig(metric="dot")
    with pytest.raises(ValueError, match="unknown metric 'ip'; valid: cosine, l2$"):
        EvalConfig(metric="ip")


def test_negative_flips_are_correct_before_and_wrong_now():
    reference = np.array([True, True, False, False])
    current = np.array([True, False, True, False])
    np.testing.assert_array_equal(negative_flips(reference, current), [False, True, False, False])
    assert negative_flip_rate(reference, current) == 0.25
    assert negative_flip_rate(reference, reference) == 0.0
    with pytest.raises(ValueError, match="evaluate the same queries"):
        negative_flips(reference, current[:3])


def test_negative_flip_rate_of_stacked_systems_is_one_rate_per_system():
    reference = np.array([True, True, False, False])
    stacked = np.array([[True, False, True, False], [False, False, False, False], [True, True, True, True]])
    np.testing.assert_array_equal(negative_flip_rate(reference, stacked), [0.25, 0.5, 0.0])


def test_cross_tests_evaluate_each_query_gallery_pairing():
    rng = np.random.default_rng(8)
    labels = rng.integers(0, 4, 40)
    old, new, transformed = (exact_vectors(rng, 40, "cosine") for _ in range(3))
    config = EvalConfig(protocol="leave_one_out")
    results = cross_tests(
        labels,
        labels,
        old_queries=old,
        new_queries=new,
        old_gallery=old,
        new_gallery=new,
        transformed_gallery=transformed,
        config=config,
    )
    assert list(results) == ["old_old", "new_new", "new_old", "new_transformed"]
    expected = evaluate(new, transformed, labels, labels, config)
    np.testing.assert_array_equal(results["new_transformed"].average_precision, expected.average_precision)
    assert results["new_old"].map == evaluate(new, old, labels, labels, config).map
    no_transform = cross_tests(
        labels, labels, old_queries=old, new_queries=new, old_gallery=old, new_gallery=new, config=config
    )
    assert "new_transformed" not in no_transform


def test_cross_tests_skip_new_on_old_across_dimensions_and_add_psi_on_old():
    rng = np.random.default_rng(9)
    labels = rng.integers(0, 4, 30)
    old, psi = exact_vectors(rng, 30, "cosine"), exact_vectors(rng, 30, "cosine")
    new = rng.standard_normal((30, 5)).astype(np.float32)
    results = cross_tests(
        labels, labels, old_queries=old, new_queries=new, old_gallery=old, new_gallery=new, psi_queries=psi
    )
    assert list(results) == ["old_old", "new_new", "psi_old"]
    assert results["psi_old"].top1 == evaluate(psi, old, labels, labels).top1
