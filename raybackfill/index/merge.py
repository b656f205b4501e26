"""Merge per-shard / per-space top-k lists into one top-k per query (pure numpy, no Ray, no FAISS).

Every shard and every space answers a query with its own top-k; the final answer is the top-k of the
union. The same id may appear in several lists (e.g. a replayed result), so the union is de-duplicated
by id, keeping the id's best score. The order is deterministic, so two runs (or two routers) return
the same list: better score first, then lower id; on an exact duplicate (same id, same score) the hit
from the newer space wins (new > transformed > old), because it carries the fresher embedding.

Conventions: ``cosine`` and ``ip`` scores are inner products (higher is better), ``l2`` scores are squared
L2 distances (lower is better), as FAISS returns them. Empty slots carry id ``-1`` and the worst score
(``-inf`` for cosine/ip, ``+inf`` for l2), whatever score the input had there.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import NamedTuple

import numpy as np

from raybackfill.types import Metric, Space, parse

# The space a vector lives in is also the state of a gallery item: an int8 code per hit/item (Space.code).
# cosine = inner product of L2-normalised vectors (the shard normalises what it stores and what it is asked).
EMPTY_ID = -1


class TopK(NamedTuple):
    """(nq, k) arrays: item ids (-1 = empty), scores, and the space code of each hit (``Space.code``)."""

    ids: np.ndarray
    scores: np.ndarray
    spaces: np.ndarray

    def space_names(self) -> np.ndarray:
        """Space labels ("old"/"transformed"/"new"; "" for empty slots) for display."""
        names = np.asarray([s.value for s in Space] + [""], dtype=object)
        return names[np.where(self.ids == EMPTY_ID, len(Space), self.spaces)]


def higher_is_better(metric: str) -> bool:
    """Similarity metrics (cosine, ip) rank high scores first; l2 distances rank low ones first."""
    return parse(Metric, metric) is not Metric.L2


def worst_score(metric: str) -> float:
    return -np.inf if higher_is_better(metric) else np.inf


def empty_topk(nq: int, k: int, metric: str) -> TopK:
    return TopK(
        np.full((nq, k), EMPTY_ID, dtype=np.int64),
        np.full((nq, k), worst_score(metric), dtype=np.float32),
        np.zeros((nq, k), dtype=np.int8),
    )


def merge_topk(ids: np.ndarray, scores: np.ndarray, spaces: np.ndarray, k: int, metric: str) -> TopK:
    """Top-k of each row of (nq, m) candidate arrays, de-duplicated by id, in the documented order."""
    ids = np.asarray(ids, dtype=np.int64)
    scores = np.asarray(scores, dtype=np.float32)
    spaces = np.asarray(spaces, dtype=np.int8)
    if ids.ndim != 2 or ids.shape != scores.shape or ids.shape != spaces.shape:
        raise ValueError(
            f"ids, scores and spaces must be (nq, m) arrays of one shape, got "
            f"{ids.shape}, {scores.shape}, {spaces.shape}"
        )
    if k <= 0:
        raise ValueError(f"k must be positive, got {k}")
    valid = ids != EMPTY_ID
    if np.isnan(scores).any() and np.isnan(scores[valid]).any():
        raise ValueError("merge_topk: NaN score in a non-empty result slot")
    # "key" is higher-is-better in both conventions; empty slots sort last via the `invalid` key.
    key = scores if higher_is_better(metric) else -scores
    invalid = (~valid).astype(np.int8)
    rows = np.arange(ids.shape[0])[:, None]

    # Pass 1: group by id, best first within an id (then newer space); later copies are duplicates. Shards and
    # spaces hold disjoint items, so a row usually has no repeated id: one sort of the ids tells, and spares the
    # grouping sort.
    by_id = np.sort(np.where(valid, ids, EMPTY_ID), axis=1)
    if ((by_id[:, 1:] == by_id[:, :-1]) & (by_id[:, 1:] != EMPTY_ID)).any():
        order = np.lexsort((-spaces, -key, ids, invalid), axis=-1)
        ids, key, spaces, scores, invalid = (a[rows, order] for a in (ids, key, spaces, scores, invalid))
        dup = np.zeros_like(invalid)
        dup[:, 1:] = (ids[:, 1:] == ids[:, :-1]) & (invalid[:, 1:] == 0)
        invalid = invalid | dup

    # Pass 2: the final order - valid first, better key first, then lower id.
    order = _final_order(ids, key, invalid)[:, :k]
    out = TopK(ids[rows, order], scores[rows, order], spaces[rows, order])
    empty = invalid[rows, order].astype(bool)
    out.ids[empty] = EMPTY_ID
    out.scores[empty] = worst_score(metric)
    out.spaces[empty] = Space.OLD.code
    if out.ids.shape[1] < k:
        return _pad(out, k, metric)
    return out


def _final_order(ids: np.ndarray, key: np.ndarray, invalid: np.ndarray) -> np.ndarray:
    """Per row, the order valid first, higher key first, then lower id (empty slots in any order after the valid).

    One quicksort of the key settles it unless two valid slots of a row tie on their key (or a valid key is not
    finite), which the id breaks: only then the three-key sort, whose cost on short rows is several times more."""
    primary = np.where(invalid, np.inf, -key)
    order = np.argsort(primary, axis=1)
    ranked = np.take_along_axis(primary, order, axis=1)
    tied = (ranked[:, 1:] == ranked[:, :-1]) & np.isfinite(ranked[:, 1:])
    if tied.any() or (~np.isfinite(key) & (invalid == 0)).any():
        order = np.lexsort((ids, -key, invalid), axis=-1)
    return order


def merge_results(results: Sequence[TopK], k: int, metric: str) -> TopK:
    """Merge several answers to the same queries (one per shard or per space) into one top-k."""
    if not results:
        raise ValueError("merge_results needs at least one result")
    nq = results[0].ids.shape[0]
    if any(r.ids.shape[0] != nq for r in results):
        raise ValueError(f"results answer different numbers of queries: {[r.ids.shape[0] for r in results]}")
    return merge_topk(
        np.concatenate([r.ids for r in results], axis=1),
        np.concatenate([r.scores for r in results], axis=1),
        np.concatenate([r.spaces for r in results], axis=1),
        k,
        metric,
    )


def _pad(result: TopK, k: int, metric: str) -> TopK:
    nq, m = result.ids.shape
    pad = empty_topk(nq, k - m, metric)
    return TopK(*(np.concatenate([a, b], axis=1) for a, b in zip(result, pad, strict=True)))
