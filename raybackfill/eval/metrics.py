"""Retrieval metrics (CMC top-1/top-5, mAP@all, mAP@R, negative flips) over a gallery made of parts.

Why parts: during a backfill the gallery is a mix of items scored in different spaces (old query vs old
items, new query vs new items). Every serving strategy is "score each part with its own query/gallery
vectors, merge all scores into one ranking per query", so one evaluator covers them all: one part is the
plain case, two parts with old/new query vectors is distance rank merge.

Definitions (stated in every result):
- metric "cosine": score = inner product of L2-normalised vectors (normalised here);
  metric "l2": score = -squared Euclidean distance. Higher score ranks first; scores of different parts
  are compared as they are (that is what merging by distance does).
- Relevant gallery item: same label as the query.
- protocol "disjoint": queries and gallery are separate sets.
  protocol "leave_one_out": query i is gallery item i (one set); a query never retrieves itself.
  Under both protocols queries with no relevant gallery item (other than themselves) are dropped:
  AP is undefined for them. `RetrievalResult.n_dropped` says how many.
- Tie rule: equal scores rank by gallery position, lower position first. Positions are global to the
  whole gallery, so splitting a gallery into parts never changes a ranking.
- top-k: 1 if a relevant item is among the first k; AP@all: mean over the relevant items of the
  precision at their rank; AP@R: (1/R) * sum over ranks i <= R of precision@i * rel(i), R = #relevant.

Speed and memory: queries go in blocks; a block of B queries costs about BYTES_PER_CELL * B * N bytes
for a gallery of N items, plus BYTES_PER_RELEVANT per relevant (query, item) pair (default budget 2 GiB
per block, see EvalConfig), so peak memory follows the budget, not the gallery size. Each block is ranked by
a single SIMD sort of int64 keys (score bits, position, relevance bit packed together), several times faster
than a general-purpose sort of (score, position) pairs such as torch.sort; no per-row Python loops.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field

import numpy as np

from raybackfill.types import MODEL_METRICS, Metric, Protocol, locate_sorted, parse

# Working bytes per (query, gallery item) cell of one block: float32 score, int64 key, relevance, ranked bits,
# part scores; and per relevant pair: the sparse arrays (row, column, hit count, precision) of rank_keys.
BYTES_PER_CELL = 24
BYTES_PER_RELEVANT = 56


@dataclass(frozen=True)
class EvalConfig:
    """How to evaluate: similarity metric, query protocol and query-block size."""

    metric: Metric = Metric.COSINE
    protocol: Protocol = Protocol.DISJOINT
    # Query rows per block; None: as many as fit in memory_budget_mb.
    block_size: int | None = None
    memory_budget_mb: int = 2048

    def __post_init__(self) -> None:
        object.__setattr__(self, "metric", parse(Metric, self.metric, among=MODEL_METRICS))
        object.__setattr__(self, "protocol", parse(Protocol, self.protocol))
        if self.block_size is not None and self.block_size < 1:
            raise ValueError(f"block_size must be positive, got {self.block_size}")
        if self.memory_budget_mb < 1:
            raise ValueError(f"memory_budget_mb must be positive, got {self.memory_budget_mb}")

    def rows_per_block(self, n_gallery: int, bytes_per_cell: float) -> int:
        if self.block_size is not None:
            return self.block_size
        return max(1, int(self.memory_budget_mb * 2**20 // (bytes_per_cell * max(n_gallery, 1))))


DEFAULT_CONFIG = EvalConfig()


@dataclass(frozen=True)
class GalleryPart:
    """Gallery items at `positions` (global gallery positions) scored with these query vectors.

    `queries` has one row per query (all queries, in the caller's order); `gallery` one row per item.
    """

    queries: np.ndarray
    gallery: np.ndarray
    positions: np.ndarray

    def __post_init__(self) -> None:
        q, g = np.asarray(self.queries), np.asarray(self.gallery)
        pos = np.asarray(self.positions)
        if q.ndim != 2 or g.ndim != 2:
            raise ValueError(f"part vectors must be 2-D, got queries {q.shape} and gallery {g.shape}")
        if q.shape[1] != g.shape[1]:
            raise ValueError(f"part query dim {q.shape[1]} != gallery dim {g.shape[1]}")
        if pos.ndim != 1 or len(pos) != len(g) or not np.issubdtype(pos.dtype, np.integer):
            raise ValueError(f"part positions must be {len(g)} integers, got {pos.dtype} {pos.shape}")


@dataclass(frozen=True)
class RetrievalResult:
    """Mean metrics over the evaluated queries plus the per-query arrays (aligned with `kept`)."""

    metric: Metric
    protocol: Protocol
    top1: float
    top5: float
    map: float
    map_at_r: float
    kept: np.ndarray = field(repr=False)  # bool, one per input query: False = dropped (nothing relevant)
    correct_top1: np.ndarray = field(repr=False)  # bool, one per kept query
    average_precision: np.ndarray = field(repr=False)  # AP@all, one per kept query

    @property
    def n_queries(self) -> int:
        return int(self.kept.sum())

    @property
    def n_dropped(self) -> int:
        return int(len(self.kept) - self.kept.sum())


def prepare(vectors: np.ndarray, metric: Metric, name: str = "vectors") -> np.ndarray:
    """float32 copy ready for scoring: L2-normalised for cosine; checked finite (and non-zero for cosine)."""
    x = np.array(vectors, dtype=np.float32, copy=True)
    if x.ndim != 2:
        raise ValueError(f"{name} must be 2-D (N, d), got shape {x.shape}")
    if not np.isfinite(x).all():
        raise ValueError(f"{name} contain NaN/inf in {int((~np.isfinite(x).all(1)).sum())} rows")
    if metric == Metric.COSINE:
        norms = np.linalg.norm(x, axis=1)
        zero = np.flatnonzero(norms == 0)
        if len(zero):
            raise ValueError(f"{name}: zero vector(s) at rows {zero[:5].tolist()} have no cosine similarity")
        x /= norms[:, None]
    return x


def scores(queries: np.ndarray, gallery: np.ndarray, metric: Metric) -> np.ndarray:
    """(B, N) float32 scores of prepared vectors: cosine similarity or -squared L2 distance."""
    s = queries @ gallery.T
    if metric == Metric.L2:
        s *= 2
        s -= np.einsum("ij,ij->i", gallery, gallery)[None, :]
        s -= np.einsum("ij,ij->i", queries, queries)[:, None]
    return s


@dataclass(frozen=True)
class BlockStats:
    correct_top1: np.ndarray
    correct_top5: np.ndarray
    ap: np.ndarray
    ap_at_r: np.ndarray


def ranking_keys(block_scores: np.ndarray, relevant: np.ndarray) -> np.ndarray:
    """(B, N) int64 keys whose ascending order is the ranking: score descending, then position ascending.

    Key = order-reversed score bits (high 32 bits) | position << 1 | relevance bit. All keys of a row
    are distinct, so any sort gives the same order, and the ranked relevance is read off the low bit.
    `block_scores` (B, N) float32 is overwritten; `relevant` (B, N) bool. Excluded items (leave-one-out
    self) carry score -inf and relevant False, so they rank last and count for nothing.
    """
    n_items = block_scores.shape[1]
    if n_items >= 2**31:
        raise ValueError(f"gallery of {n_items} items exceeds the 2^31 positions a sort key can hold")
    block_scores += np.float32(0.0)  # -0.0 -> +0.0 so both zeros tie
    bits = block_scores.view(np.int32)
    # Order-reversing float -> int32 map: the bits of a negative float get their sign bit flipped,
    # those of a positive float are inverted.
    flip = bits >> 31
    np.invert(flip, out=flip)
    flip |= np.int32(-(2**31))
    bits ^= flip
    del flip
    keys = np.left_shift(bits, 32, dtype=np.int64)
    keys |= np.arange(n_items, dtype=np.int64)[None, :] << 1
    np.bitwise_or(keys, relevant, out=keys)
    return keys


def rank_keys(keys: np.ndarray) -> BlockStats:
    """Sort `ranking_keys` in place and score each row's ranking. Every row needs >= 1 relevant item."""
    n_rows, n_items = keys.shape
    keys.sort(axis=1)
    ranked = np.empty((n_rows, n_items), dtype=bool)
    np.bitwise_and(keys, 1, out=ranked, casting="unsafe")
    rows, cols = np.divmod(np.flatnonzero(ranked), n_items)
    n_rel = np.bincount(rows, minlength=n_rows)
    if (n_rel == 0).any():
        raise ValueError("ranking needs at least one relevant item per query")
    starts = np.concatenate(([0], np.cumsum(n_rel)[:-1]))
    hits = np.arange(len(rows)) - starts[rows] + 1  # how many relevant items up to and including this one
    precision = hits / (cols + 1.0)
    ap = np.bincount(rows, weights=precision, minlength=n_rows) / n_rel
    in_r = cols < n_rel[rows]
    ap_at_r = np.bincount(rows[in_r], weights=precision[in_r], minlength=n_rows) / n_rel
    return BlockStats(
        correct_top1=ranked[:, 0].copy(),
        correct_top5=np.asarray(ranked[:, :5].any(axis=1)),  # an array: numpy types any(axis) as bool | array
        ap=ap,
        ap_at_r=ap_at_r,
    )


@dataclass(frozen=True)
class QueryPlan:
    """Which queries are evaluated, what is relevant to each, and which item is its own (leave-one-out)."""

    protocol: Protocol
    query_labels: np.ndarray
    gallery_labels: np.ndarray
    n_relevant: np.ndarray  # per query, its own item not counted

    @classmethod
    def build(cls, query_labels: np.ndarray, gallery_labels: np.ndarray, protocol: Protocol) -> QueryPlan:
        q = np.asarray(query_labels)
        g = np.asarray(gallery_labels)
        if q.ndim != 1 or g.ndim != 1:
            raise ValueError("labels must be 1-D arrays")
        if protocol == Protocol.LEAVE_ONE_OUT and (len(q) != len(g) or not np.array_equal(q, g)):
            raise ValueError(
                "leave_one_out evaluates one set: query i must be gallery item i "
                f"(got {len(q)} query labels, {len(g)} gallery labels, not identical)"
            )
        uniq, counts = np.unique(g, return_counts=True)
        where = locate_sorted(uniq, q, missing="mask")
        n_rel = np.zeros(len(q), dtype=np.int64)
        n_rel[where >= 0] = counts[where[where >= 0]]
        if protocol == Protocol.LEAVE_ONE_OUT:
            n_rel = n_rel - 1
        return cls(protocol=protocol, query_labels=q, gallery_labels=g, n_relevant=n_rel)

    @property
    def kept(self) -> np.ndarray:
        return self.n_relevant > 0

    @property
    def n_kept(self) -> int:
        return int(self.kept.sum())

    @property
    def kept_indices(self) -> np.ndarray:
        return np.flatnonzero(self.kept)

    def bytes_per_cell(self, dense: float = BYTES_PER_CELL) -> float:
        """Working memory per (query, item) cell of a block, sized for the query with most relevant items."""
        most = int(self.n_relevant.max()) if len(self.n_relevant) else 0
        return dense + BYTES_PER_RELEVANT * most / max(len(self.gallery_labels), 1)

    def blocks(self, rows: int) -> Iterator[np.ndarray]:
        """Original indices of the kept queries, `rows` at a time."""
        idx = self.kept_indices
        for start in range(0, len(idx), rows):
            yield idx[start : start + rows]

    def relevance(self, idx: np.ndarray) -> np.ndarray:
        """(B, N) bool: same label, the query's own item excluded under leave-one-out."""
        rel = self.query_labels[idx, None] == self.gallery_labels[None, :]
        if self.protocol == Protocol.LEAVE_ONE_OUT:
            rel[np.arange(len(idx)), idx] = False
        return rel

    def exclude_self(self, block_scores: np.ndarray, idx: np.ndarray) -> None:
        if self.protocol == Protocol.LEAVE_ONE_OUT:
            block_scores[np.arange(len(idx)), idx] = -np.inf


def _result(plan: QueryPlan, metric: Metric, blocks: list[BlockStats]) -> RetrievalResult:
    if not blocks:
        raise ValueError("no query has a relevant gallery item: nothing to evaluate")
    top1 = np.concatenate([b.correct_top1 for b in blocks])
    ap = np.concatenate([b.ap for b in blocks])
    return RetrievalResult(
        metric=metric,
        protocol=plan.protocol,
        top1=float(top1.mean()),
        top5=float(np.concatenate([b.correct_top5 for b in blocks]).mean()),
        map=float(ap.mean()),
        map_at_r=float(np.concatenate([b.ap_at_r for b in blocks]).mean()),
        kept=plan.kept,
        correct_top1=top1,
        average_precision=ap,
    )


def check_partition(parts: Sequence[GalleryPart], n_gallery: int) -> None:
    """The parts' positions must cover every gallery position exactly once."""
    seen = np.zeros(n_gallery, dtype=np.int64)
    for part in parts:
        pos = np.asarray(part.positions)
        if len(pos) and (pos.min() < 0 or pos.max() >= n_gallery):
            raise ValueError(f"part positions must lie in [0, {n_gallery})")
        np.add.at(seen, pos, 1)
    if (seen != 1).any():
        raise ValueError(
            f"parts must cover each of the {n_gallery} gallery positions exactly once: "
            f"{int((seen == 0).sum())} missing, {int((seen > 1).sum())} repeated"
        )


def evaluate_parts(
    parts: Sequence[GalleryPart],
    query_labels: np.ndarray,
    gallery_labels: np.ndarray,
    config: EvalConfig = DEFAULT_CONFIG,
) -> RetrievalResult:
    """Evaluate queries against a gallery split into parts, each scored in its own space, merged by score."""
    if not parts:
        raise ValueError("need at least one gallery part")
    n_gallery, n_queries = len(gallery_labels), len(query_labels)
    check_partition(parts, n_gallery)
    for i, part in enumerate(parts):
        if len(part.queries) != n_queries:
            raise ValueError(f"part {i} has {len(part.queries)} query rows for {n_queries} query labels")
    plan = QueryPlan.build(query_labels, gallery_labels, config.protocol)
    galleries = [prepare(p.gallery, config.metric, f"part {i} gallery") for i, p in enumerate(parts)]
    queries = [prepare(p.queries, config.metric, f"part {i} queries") for i, p in enumerate(parts)]
    positions = [np.asarray(p.positions, dtype=np.int64) for p in parts]
    whole = len(parts) == 1 and np.array_equal(positions[0], np.arange(n_gallery))
    stats = []
    for idx in plan.blocks(config.rows_per_block(n_gallery, plan.bytes_per_cell())):
        if whole:
            block = scores(queries[0][idx], galleries[0], config.metric)
        else:
            block = np.empty((len(idx), n_gallery), dtype=np.float32)
            for q, g, pos in zip(queries, galleries, positions, strict=True):
                block[:, pos] = scores(q[idx], g, config.metric)
        plan.exclude_self(block, idx)
        stats.append(rank_keys(ranking_keys(block, plan.relevance(idx))))
    return _result(plan, config.metric, stats)


def evaluate(
    queries: np.ndarray,
    gallery: np.ndarray,
    query_labels: np.ndarray,
    gallery_labels: np.ndarray,
    config: EvalConfig = DEFAULT_CONFIG,
) -> RetrievalResult:
    """Plain evaluation: one query set against one gallery in one space."""
    part = GalleryPart(queries, gallery, np.arange(len(gallery)))
    return evaluate_parts([part], query_labels, gallery_labels, config)


def negative_flips(reference_top1: np.ndarray, current_top1: np.ndarray) -> np.ndarray:
    """Per query (last axis): top-1 was correct under the reference (old/old) and is wrong now.

    ``current_top1`` may stack several systems (e.g. one row per backfilled fraction) on leading axes.
    """
    ref, cur = np.asarray(reference_top1, dtype=bool), np.asarray(current_top1, dtype=bool)
    if ref.ndim != 1 or cur.shape[-1:] != ref.shape:
        raise ValueError(f"reference has {ref.shape} queries, current {cur.shape}: evaluate the same queries")
    return ref & ~cur


def negative_flip_rate(reference_top1: np.ndarray, current_top1: np.ndarray) -> float | np.ndarray:
    """Share of all evaluated queries that flipped from correct to wrong (one rate per stacked system)."""
    rate = negative_flips(reference_top1, current_top1).mean(axis=-1)
    return float(rate) if rate.ndim == 0 else rate


def cross_tests(
    query_labels: np.ndarray,
    gallery_labels: np.ndarray,
    *,
    old_queries: np.ndarray,
    new_queries: np.ndarray,
    old_gallery: np.ndarray,
    new_gallery: np.ndarray,
    transformed_gallery: np.ndarray | None = None,
    psi_queries: np.ndarray | None = None,
    config: EvalConfig = DEFAULT_CONFIG,
) -> dict[str, RetrievalResult]:
    """M(old,old), M(new,new), and every cross test the inputs allow: M(new Q, old G) when the two models
    share a dimension (BCT/RACT), M(new Q, h(old) G) given a transformed gallery, M(psi(new Q), old G)
    given psi queries."""
    pairs = {"old_old": (old_queries, old_gallery), "new_new": (new_queries, new_gallery)}
    if new_queries.shape[1] == old_gallery.shape[1]:
        pairs["new_old"] = (new_queries, old_gallery)
    if transformed_gallery is not None:
        pairs["new_transformed"] = (new_queries, transformed_gallery)
    if psi_queries is not None:
        pairs["psi_old"] = (psi_queries, old_gallery)
    return {name: evaluate(q, g, query_labels, gallery_labels, config) for name, (q, g) in pairs.items()}
