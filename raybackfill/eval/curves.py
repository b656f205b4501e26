"""Offline backfill simulation: metric M(beta) while a fraction beta of the gallery carries new embeddings.

For a priority order (a permutation of gallery positions, highest priority first) and fraction beta, the
first floor(beta * N) items of the order are backfilled (scored with the "after" query/gallery vectors),
the rest are not (scored with the "before" vectors); both parts are merged by score into one ranking
(see metrics.py: the curve at any beta equals `evaluate_parts(parts_at(...))`). Strategies:
- old:         old query vs old gallery at every beta (the system before the upgrade; constant);
- compatible:  new query vs a mixed gallery: not-backfilled items carry old (BCT/RACT) or transformed
               (FCT/FastFill) vectors, backfilled items new ones;
- rank_merge:  old query vs the not-backfilled part, new query vs the backfilled part, merged by score;
               the old query is the real old embedding or psi(new query), as the caller passes it.

Per query block the two score matrices (as sort keys) are computed once and reused for every beta; per
beta only the merge and sort are redone. AUC is the mean over an even beta grid (as the FastFill
reference code computes it); the trapezoid rule is reported beside it under its own name.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from raybackfill.eval.metrics import (
    BYTES_PER_CELL,
    DEFAULT_CONFIG,
    EvalConfig,
    GalleryPart,
    QueryPlan,
    RetrievalResult,
    negative_flip_rate,
    prepare,
    rank_keys,
    ranking_keys,
    scores,
)
from raybackfill.types import Metric, Strategy, parse

DEFAULT_POINTS = 21


def even_betas(n_points: int = DEFAULT_POINTS) -> np.ndarray:
    """The default grid 0, 1/(n-1), ..., 1."""
    if n_points < 2:
        raise ValueError(f"a beta grid needs at least 2 points, got {n_points}")
    return np.linspace(0.0, 1.0, n_points)


@dataclass(frozen=True)
class BackfillSpaces:
    """Vectors that score the not-yet-backfilled items (before) and the backfilled ones (after)."""

    strategy: Strategy
    before_queries: np.ndarray
    before_gallery: np.ndarray
    after_queries: np.ndarray
    after_gallery: np.ndarray

    def __post_init__(self) -> None:
        object.__setattr__(self, "strategy", parse(Strategy, self.strategy))
        if len(self.before_queries) != len(self.after_queries):
            raise ValueError(f"{len(self.before_queries)} before-queries but {len(self.after_queries)} after-queries")
        if len(self.before_gallery) != len(self.after_gallery):
            raise ValueError(
                f"{len(self.before_gallery)} before-gallery items but {len(self.after_gallery)} after-gallery items"
            )

    @classmethod
    def old(cls, old_queries: np.ndarray, old_gallery: np.ndarray) -> BackfillSpaces:
        return cls(Strategy.OLD, old_queries, old_gallery, old_queries, old_gallery)

    @classmethod
    def compatible(cls, new_queries: np.ndarray, before_gallery: np.ndarray, new_gallery: np.ndarray) -> BackfillSpaces:
        """`before_gallery`: the old vectors (BCT/RACT) or the transformed ones (FCT/FastFill)."""
        return cls(Strategy.COMPATIBLE, new_queries, before_gallery, new_queries, new_gallery)

    @classmethod
    def rank_merge(
        cls, old_queries: np.ndarray, old_gallery: np.ndarray, new_queries: np.ndarray, new_gallery: np.ndarray
    ) -> BackfillSpaces:
        """`old_queries`: the old model's query embeddings or psi(new query embeddings)."""
        return cls(Strategy.RANK_MERGE, old_queries, old_gallery, new_queries, new_gallery)

    @property
    def constant(self) -> bool:
        return self.before_queries is self.after_queries and self.before_gallery is self.after_gallery


def n_backfilled(beta: float, n_items: int) -> int:
    """floor(beta * N), rounded first so that e.g. 0.29 * 100 counts 29 items, not 28."""
    if not 0.0 <= beta <= 1.0:
        raise ValueError(f"backfill fraction must lie in [0, 1], got {beta}")
    return int(np.floor(round(beta * n_items, 6)))


def check_order(order: np.ndarray, n_items: int) -> np.ndarray:
    """The order must be a permutation of 0..N-1."""
    order = np.asarray(order)
    if order.shape != (n_items,) or not np.issubdtype(order.dtype, np.integer):
        raise ValueError(f"order must be {n_items} integer positions, got {order.dtype} {order.shape}")
    if not np.array_equal(np.sort(order), np.arange(n_items)):
        raise ValueError(f"order must be a permutation of the {n_items} gallery positions")
    return order.astype(np.int64)


def parts_at(spaces: BackfillSpaces, order: np.ndarray, beta: float) -> list[GalleryPart]:
    """The gallery at fraction beta as two parts: not-backfilled (before vectors), backfilled (after)."""
    order = check_order(order, len(spaces.before_gallery))
    k = n_backfilled(beta, len(order))
    done, rest = np.sort(order[:k]), np.sort(order[k:])
    return [
        GalleryPart(spaces.before_queries, np.asarray(spaces.before_gallery)[rest], rest),
        GalleryPart(spaces.after_queries, np.asarray(spaces.after_gallery)[done], done),
    ]


@dataclass(frozen=True)
class BackfillCurve:
    """Metrics at each backfilled fraction; nfr against the old/old per-query top-1."""

    betas: np.ndarray
    top1: np.ndarray
    top5: np.ndarray
    map: np.ndarray
    nfr: np.ndarray


def _check_betas(betas: np.ndarray) -> np.ndarray:
    betas = np.asarray(betas, dtype=np.float64)
    if betas.ndim != 1 or len(betas) < 2:
        raise ValueError("betas must be a 1-D grid of at least 2 fractions")
    if betas.min() < 0 or betas.max() > 1 or (np.diff(betas) <= 0).any():
        raise ValueError("betas must be strictly increasing fractions in [0, 1]")
    return betas


def _block_keys(
    queries: np.ndarray, gallery: np.ndarray, idx: np.ndarray, relevant: np.ndarray, plan: QueryPlan, metric: Metric
) -> np.ndarray:
    block = scores(queries, gallery, metric)
    plan.exclude_self(block, idx)
    return ranking_keys(block, relevant)


def backfill_curve(
    spaces: BackfillSpaces,
    order: np.ndarray,
    query_labels: np.ndarray,
    gallery_labels: np.ndarray,
    reference_top1: np.ndarray,
    *,
    betas: np.ndarray | None = None,
    config: EvalConfig = DEFAULT_CONFIG,
) -> BackfillCurve:
    """M(beta) for one strategy and order. `reference_top1`: old/old `RetrievalResult.correct_top1`."""
    betas = even_betas() if betas is None else _check_betas(betas)
    n_gallery = len(gallery_labels)
    if len(spaces.before_gallery) != n_gallery or len(spaces.before_queries) != len(query_labels):
        raise ValueError("spaces must hold one vector per query label and per gallery label")
    order = check_order(order, n_gallery)
    priority = np.empty(n_gallery, dtype=np.int64)
    priority[order] = np.arange(n_gallery)
    counts = np.array([n_backfilled(b, n_gallery) for b in betas])
    # The old strategy ranks the same way at every beta; otherwise betas with equal counts share a ranking.
    if spaces.constant:
        unique_counts, which = np.zeros(1, np.int64), np.zeros(len(betas), np.int64)
    else:
        unique_counts, which = np.unique(counts, return_inverse=True)
    plan = QueryPlan.build(query_labels, gallery_labels, config.protocol)
    reference = np.asarray(reference_top1, dtype=bool)
    if reference.shape != (plan.n_kept,):
        raise ValueError(
            f"reference_top1 has {reference.shape} entries; the {plan.n_kept} evaluated queries need one each"
        )
    before_q = prepare(spaces.before_queries, config.metric, "before queries")
    before_g = prepare(spaces.before_gallery, config.metric, "before gallery")
    after_q = before_q if spaces.constant else prepare(spaces.after_queries, config.metric, "after queries")
    after_g = before_g if spaces.constant else prepare(spaces.after_gallery, config.metric, "after gallery")

    shape = (len(unique_counts), plan.n_kept)
    top1, top5, ap = np.zeros(shape, bool), np.zeros(shape, bool), np.zeros(shape)
    offset = 0
    # Two key matrices live across betas (16 more bytes per cell than a single evaluation).
    for idx in plan.blocks(config.rows_per_block(n_gallery, plan.bytes_per_cell(BYTES_PER_CELL + 16))):
        relevant = plan.relevance(idx)
        keys_before = _block_keys(before_q[idx], before_g, idx, relevant, plan, config.metric)
        keys_after = (
            keys_before if spaces.constant else _block_keys(after_q[idx], after_g, idx, relevant, plan, config.metric)
        )
        rows = slice(offset, offset + len(idx))
        for slot, count in enumerate(unique_counts):
            stats = rank_keys(np.where(priority < count, keys_after, keys_before))
            top1[slot, rows], top5[slot, rows], ap[slot, rows] = stats.correct_top1, stats.correct_top5, stats.ap
        offset += len(idx)
    return BackfillCurve(
        betas=betas,
        top1=top1.mean(axis=1)[which],
        top5=top5.mean(axis=1)[which],
        map=ap.mean(axis=1)[which],
        nfr=np.asarray(negative_flip_rate(reference, top1))[which],  # one rate per slot: an array
    )


def auc_mean(betas: np.ndarray, values: np.ndarray) -> float:
    """AUC as the mean of M over an even beta grid (the FastFill reference definition)."""
    betas = _check_betas(betas)
    if not np.allclose(np.diff(betas), (betas[-1] - betas[0]) / (len(betas) - 1)):
        raise ValueError("the mean-over-grid AUC needs an evenly spaced beta grid; use auc_trapezoid")
    return float(np.mean(values))


def auc_trapezoid(betas: np.ndarray, values: np.ndarray) -> float:
    """Trapezoid-rule area under M(beta), divided by the beta span (= the area for a 0..1 grid)."""
    betas = _check_betas(betas)
    return float(np.trapezoid(np.asarray(values, dtype=np.float64), betas) / (betas[-1] - betas[0]))


def relative_gain(value: float, old_old: float, new_new: float) -> float:
    """(value - M_oldold) / (M_newnew - M_oldold); NaN when the two anchors are equal."""
    gap = new_new - old_old
    return float((value - old_old) / gap) if gap != 0 else float("nan")


@dataclass(frozen=True)
class CurveSummary:
    auc_top1: float
    auc_map: float
    auc_top1_trapezoid: float
    auc_map_trapezoid: float
    relative_gain_top1: float  # of auc_top1 (mean over grid)
    relative_gain_map: float  # of auc_map (mean over grid)
    max_nfr: float
    final_top1: float
    final_map: float


def summarize(curve: BackfillCurve, old_old: RetrievalResult, new_new: RetrievalResult) -> CurveSummary:
    auc_top1, auc_map = auc_mean(curve.betas, curve.top1), auc_mean(curve.betas, curve.map)
    return CurveSummary(
        auc_top1=auc_top1,
        auc_map=auc_map,
        auc_top1_trapezoid=auc_trapezoid(curve.betas, curve.top1),
        auc_map_trapezoid=auc_trapezoid(curve.betas, curve.map),
        relative_gain_top1=relative_gain(auc_top1, old_old.top1, new_new.top1),
        relative_gain_map=relative_gain(auc_map, old_old.map, new_new.map),
        max_nfr=float(np.max(curve.nfr)),
        final_top1=float(curve.top1[-1]),
        final_map=float(curve.map[-1]),
    )
