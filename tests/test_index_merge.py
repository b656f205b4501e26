"""Top-k merge: hand-computed cases, a brute-force reference, and every serving strategy split over shards."""

from __future__ import annotations

import numpy as np
import pytest

from raybackfill.index.merge import TopK, merge_results, merge_topk
from raybackfill.types import Space

OLD, TRANSFORMED, NEW = (space.code for space in Space)


def reference_merge(ids, scores, spaces, k, metric):
    """Per-row Python: best score per id (newer space on an exact tie), then better score, then lower id."""
    nq = ids.shape[0]
    out_ids = np.full((nq, k), -1, dtype=np.int64)
    out_scores = np.full((nq, k), -np.inf if metric == "ip" else np.inf, dtype=np.float32)
    out_spaces = np.zeros((nq, k), dtype=np.int8)
    for row in range(nq):
        best: dict[int, tuple[float, int, float]] = {}
        for i, s, sp in zip(ids[row], scores[row], spaces[row], strict=True):
            if i == -1:
                continue
            key = float(s) if metric == "ip" else -float(s)
            if i not in best or (key, sp) > best[i][:2]:
                best[int(i)] = (key, int(sp), float(s))
        ranked = sorted(best.items(), key=lambda item: (-item[1][0], item[0]))[:k]
        for col, (i, (_, sp, s)) in enumerate(ranked):
            out_ids[row, col], out_scores[row, col], out_spaces[row, col] = i, s, sp
    return out_ids, out_scores, out_spaces


def assert_same(result: TopK, expected) -> None:
    np.testing.assert_array_equal(result.ids, expected[0])
    np.testing.assert_array_equal(result.scores, expected[1])
    np.testing.assert_array_equal(result.spaces, expected[2])


def test_inner_product_dedups_by_id_and_breaks_ties_by_lower_id():
    ids = np.array([[7, 3, 7, 5, -1, 9]])
    scores = np.array([[0.5, 0.9, 0.8, 0.9, 100.0, 0.1]], dtype=np.float32)
    spaces = np.array([[OLD, NEW, TRANSFORMED, OLD, OLD, OLD]], dtype=np.int8)
    result = merge_topk(ids, scores, spaces, k=4, metric="ip")
    # 3 and 5 tie at 0.9 -> lower id first; id 7 keeps its best score 0.8 (transformed); -1 is padding.
    np.testing.assert_array_equal(result.ids, [[3, 5, 7, 9]])
    np.testing.assert_array_equal(result.scores, np.array([[0.9, 0.9, 0.8, 0.1]], dtype=np.float32))
    np.testing.assert_array_equal(result.spaces, [[NEW, OLD, TRANSFORMED, OLD]])
    np.testing.assert_array_equal(result.space_names(), [["new", "old", "transformed", "old"]])


def test_l2_keeps_the_smallest_distance_and_pads_short_rows():
    ids = np.array([[4, 2, 4, -1], [-1, -1, -1, -1]])
    scores = np.array([[3.0, 1.0, 0.5, -7.0], [1.0, 1.0, 1.0, 1.0]], dtype=np.float32)
    spaces = np.array([[OLD, OLD, NEW, OLD], [OLD] * 4], dtype=np.int8)
    result = merge_topk(ids, scores, spaces, k=5, metric="l2")
    np.testing.assert_array_equal(result.ids, [[4, 2, -1, -1, -1], [-1] * 5])
    np.testing.assert_array_equal(result.scores[0, :2], [0.5, 1.0])
    assert np.isposinf(result.scores[0, 2:]).all() and np.isposinf(result.scores[1]).all()
    assert result.spaces[0, 0] == NEW
    assert list(result.space_names()[0]) == ["new", "old", "", "", ""]


def test_exact_duplicate_prefers_the_newer_space():
    result = merge_topk(
        np.array([[1, 1, 1]]), np.array([[2.0, 2.0, 2.0]]), np.array([[OLD, NEW, TRANSFORMED]]), k=2, metric="ip"
    )
    np.testing.assert_array_equal(result.ids, [[1, -1]])
    assert result.spaces[0, 0] == NEW


@pytest.mark.parametrize("metric", ["ip", "l2"])
@pytest.mark.parametrize("seed", range(5))
def test_merge_matches_brute_force_reference_with_duplicates_and_ties(metric, seed):
    rng = np.random.default_rng(seed)
    nq, m = 6, 40
    ids = rng.integers(0, 15, size=(nq, m))  # many duplicate ids per row
    ids[rng.random((nq, m)) < 0.2] = -1
    scores = rng.integers(-5, 5, size=(nq, m)).astype(np.float32)  # many ties
    spaces = rng.integers(0, 3, size=(nq, m)).astype(np.int8)
    for k in (1, 5, 20):
        assert_same(merge_topk(ids, scores, spaces, k, metric), reference_merge(ids, scores, spaces, k, metric))


@pytest.mark.parametrize("metric", ["ip", "l2"])
@pytest.mark.parametrize("case", ["distinct", "distinct_ties", "infinite_scores"])
def test_merge_of_distinct_ids_matches_the_reference(metric, case):
    # Disjoint shards and spaces: no id repeats in a row, which skips the grouping sort, and without a tie on a
    # valid score one sort of the scores gives the order; ties and infinite scores take the three-key sort.
    rng = np.random.default_rng(7)
    nq, m = 50, 30
    ids = np.stack([rng.permutation(1000)[:m] for _ in range(nq)]).astype(np.int64)
    ids[rng.random((nq, m)) < 0.15] = -1
    scores = rng.standard_normal((nq, m)).astype(np.float32)
    if case == "distinct_ties":
        scores = np.round(scores, 1)
    if case == "infinite_scores":
        scores[:, 0] = -np.inf if metric == "ip" else np.inf
        scores[:, 1] = np.inf if metric == "ip" else -np.inf
    spaces = rng.integers(0, 3, size=(nq, m)).astype(np.int8)
    for k in (1, 10, 40):
        assert_same(merge_topk(ids, scores, spaces, k, metric), reference_merge(ids, scores, spaces, k, metric))


def _brute_topk(scores: np.ndarray, item_ids: np.ndarray, spaces: np.ndarray, k: int, metric: str):
    """Global top-k over a (nq, N) score matrix, ordered like the merge (score, then lower id)."""
    key = scores if metric == "ip" else -scores
    order = np.lexsort((np.broadcast_to(item_ids, scores.shape), -key), axis=-1)[:, :k]
    rows = np.arange(scores.shape[0])[:, None]
    return item_ids[order], scores[rows, order], np.broadcast_to(spaces, scores.shape)[rows, order]


def _shard_lists(scores, item_ids, spaces, parts, owner, k, metric):
    """What the shards return: per shard and per space, that part's own top-k."""
    lists = []
    for shard in np.unique(owner):
        for part in parts:
            cols = np.flatnonzero((owner == shard) & part)
            if len(cols):
                lists.append(TopK(*_brute_topk(scores[:, cols], item_ids[cols], spaces[cols], k, metric)))
    return lists


@pytest.mark.parametrize("metric", ["ip", "l2"])
@pytest.mark.parametrize("strategy", ["old", "compatible", "rank_merge"])
def test_merged_shard_lists_equal_the_global_answer_of_every_strategy(strategy, metric):
    rng = np.random.default_rng(3)
    n, d, nq, k = 60, 4, 5, 7
    item_ids = rng.permutation(1000)[:n].astype(np.int64)
    old = rng.integers(-3, 4, size=(n, d)).astype(np.float32)  # integer vectors: exact ties happen
    new = rng.integers(-3, 4, size=(n, d)).astype(np.float32)
    state = rng.choice([OLD, TRANSFORMED, NEW], size=n).astype(np.int8)
    q_old = rng.integers(-3, 4, size=(nq, d)).astype(np.float32)
    q_new = rng.integers(-3, 4, size=(nq, d)).astype(np.float32)
    moved = state != OLD

    def score(q, x):
        return q @ x.T if metric == "ip" else ((q[:, None, :] - x[None]) ** 2).sum(-1)

    if strategy == "old":
        scores, spaces, parts = score(q_old, old), np.full(n, OLD, np.int8), [~moved, moved]
    elif strategy == "compatible":
        scores = np.where(moved, score(q_new, new), score(q_new, old))
        spaces, parts = np.where(moved, state, OLD).astype(np.int8), [~moved, moved]
    else:
        scores = np.where(moved, score(q_new, new), score(q_old, old))
        spaces, parts = np.where(moved, state, OLD).astype(np.int8), [~moved, moved]
    scores = scores.astype(np.float32)
    owner = rng.integers(0, 3, size=n)
    merged = merge_results(_shard_lists(scores, item_ids, spaces, parts, owner, k, metric), k, metric)
    expected = _brute_topk(scores, item_ids, spaces, k, metric)
    assert_same(merged, expected)


def test_bad_inputs_are_refused_clearly():
    ids, scores, spaces = np.array([[1, 2]]), np.array([[1.0, np.nan]]), np.zeros((1, 2), np.int8)
    with pytest.raises(ValueError, match="NaN score"):
        merge_topk(ids, scores, spaces, 1, "ip")
    with pytest.raises(ValueError, match="unknown metric"):
        merge_topk(ids, np.ones((1, 2)), spaces, 1, "hamming")
    with pytest.raises(ValueError, match="k must be positive"):
        merge_topk(ids, np.ones((1, 2)), spaces, 0, "ip")
    with pytest.raises(ValueError, match="one shape"):
        merge_topk(ids, np.ones((1, 3)), spaces, 1, "ip")
    with pytest.raises(ValueError, match="different numbers of queries"):
        merge_results([TopK(ids, np.ones((1, 2)), spaces), TopK(ids[[0, 0]], np.ones((2, 2)), spaces[[0, 0]])], 1, "ip")
