"""How good an adapter is, measured on held-out pairs: pure numpy (the gate's figures).

The question a team asks before serving an adapter is "how much of what full re-embedding would give do I
get today?". So the main figure compares two searches over the same held-out items, with the same metric:

- old -> new (phi): new-model queries against the adapted gallery ``phi(old)`` versus against the truly
  re-embedded gallery ``new``;
- new -> old (psi): ``psi(new)`` queries against the old gallery versus the old model's own queries.

``recall@k`` is the share of the reference search's top-k that the adapted search also returns (each query is
one held-out item, which is left out of its own gallery, so the figure is about neighbours, not the item
itself): 1.0 means the adapter ranks like full re-embedding. ``pair_top1`` is the share of queries whose own
item comes first in the adapted search (the pair is found across the two spaces). Where the pairs have
labels, top-1 and mAP (leave-one-out, :mod:`raybackfill.eval.metrics`) of the adapted search and of the
old/old and new/new searches are added, so an adapter can be judged against not upgrading at all.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np

from raybackfill.eval.metrics import EvalConfig, evaluate, prepare, scores
from raybackfill.types import MODEL_METRICS, AdapterDirection, Metric, Protocol, parse

QUERY_BLOCK = 1024  # queries scored at once: a block holds QUERY_BLOCK x n float32 scores


@dataclass(frozen=True)
class AdapterScore:
    """The gate's figures for one adapter on one set of held-out pairs (see the module docstring)."""

    k: int
    recall: float  # mean recall@k of the adapted search against the reference search
    pair_top1: float
    pairs: int  # held-out pairs scored
    metric: str
    # With labels: top-1 / mAP of the adapted search ("adapted_*") and of old/old and new/new.
    labelled: dict[str, float] | None = None

    def to_dict(self) -> dict:
        return {k: v for k, v in asdict(self).items() if v is not None}


def top_k(queries: np.ndarray, gallery: np.ndarray, k: int, metric: Metric, *, exclude_self: bool) -> np.ndarray:
    """(n_queries, k) gallery positions of each query's k best items, best first; with ``exclude_self`` query i
    is gallery item i and never retrieves itself. Vectors must be prepared (:func:`raybackfill.eval.metrics.prepare`).
    Ties rank by gallery position."""
    n = len(gallery)
    k = min(k, n - 1 if exclude_self else n)
    if k < 1:
        raise ValueError(f"a gallery of {n} items has no top-k to compare")
    out = np.empty((len(queries), k), dtype=np.int64)
    for start in range(0, len(queries), QUERY_BLOCK):
        block = scores(queries[start : start + QUERY_BLOCK], gallery, metric).astype(np.float64)
        rows = np.arange(len(block))
        if exclude_self:
            block[rows, start + rows] = -np.inf
        # a stable sort of the negated scores: ties by position, exactly, at the price of a full sort per row
        out[start : start + len(block)] = np.argsort(-block, axis=1, kind="stable")[:, :k]
    return out


def neighbour_recall(adapted: np.ndarray, reference: np.ndarray) -> np.ndarray:
    """Per query, the share of ``reference``'s top-k positions that ``adapted``'s top-k also holds.

    Examples:
        >>> neighbour_recall(np.array([[1, 2], [3, 4]]), np.array([[2, 1], [3, 5]])).tolist()
        [1.0, 0.5]
    """
    if adapted.shape != reference.shape:
        raise ValueError(f"top-k lists of shapes {adapted.shape} and {reference.shape} differ")
    hits = (adapted[:, :, None] == reference[:, None, :]).any(axis=2).sum(axis=1)
    return hits / reference.shape[1]


def score_adapter(
    direction: AdapterDirection | str,
    old: np.ndarray,
    new: np.ndarray,
    mapped: np.ndarray,
    *,
    labels: np.ndarray | None = None,
    k: int = 10,
    metric: Metric | str = Metric.COSINE,
) -> AdapterScore:
    """Score an adapter on held-out pairs.

    Args:
        direction: ``old-to-new`` (``mapped`` = phi(old), compared in the new space) or ``new-to-old``
            (``mapped`` = psi(new), compared in the old space).
        old: (n, d_old) the old model's embeddings of the held-out items.
        new: (n, d_new) the new model's embeddings of the same items, row by row.
        mapped: the adapter's output for the held-out items (its input is ``old`` or ``new``).
        labels: (n,) labels, when the pairs have them: adds top-1 and mAP.
        k: the neighbours compared.
        metric: ``cosine`` or ``l2``, as the index serves.

    Returns:
        The :class:`AdapterScore`.

    Examples:
        >>> rng = np.random.default_rng(0)
        >>> old = rng.normal(size=(30, 4)); q, _ = np.linalg.qr(rng.normal(size=(4, 4)))
        >>> score_adapter("old-to-new", old, old @ q, old @ q, k=5).recall  # a perfect adapter
        1.0
    """
    direction = parse(AdapterDirection, direction, what="direction")
    metric = parse(Metric, metric, among=MODEL_METRICS)
    n = len(old)
    if not (len(new) == len(mapped) == n):
        raise ValueError(f"held-out rows differ in length: old {n}, new {len(new)}, mapped {len(mapped)}")
    if n < 2:
        raise ValueError(f"need at least 2 held-out pairs to score an adapter, got {n}")
    target = new if direction is AdapterDirection.OLD_TO_NEW else old
    if mapped.shape[1] != target.shape[1]:
        raise ValueError(f"the adapter outputs dim {mapped.shape[1]}, the {direction.value} target space has dim "
                         f"{target.shape[1]}")  # fmt: skip
    o, w, m = (prepare(v, metric, name) for v, name in ((old, "old"), (new, "new"), (mapped, "adapter output")))
    if direction is AdapterDirection.OLD_TO_NEW:
        queries_adapted, gallery_adapted, queries_ref, gallery_ref = w, m, w, w
    else:
        queries_adapted, gallery_adapted, queries_ref, gallery_ref = m, o, o, o
    adapted = top_k(queries_adapted, gallery_adapted, k, metric, exclude_self=True)
    reference = top_k(queries_ref, gallery_ref, k, metric, exclude_self=True)
    first = top_k(queries_adapted, gallery_adapted, 1, metric, exclude_self=False)[:, 0]
    labelled = None
    if labels is not None:
        labels = np.asarray(labels)
        config = EvalConfig(metric=metric, protocol=Protocol.LEAVE_ONE_OUT)
        labelled = {}
        for name, (q, g) in {
            "adapted": (queries_adapted, gallery_adapted),
            "old_old": (o, o),
            "new_new": (w, w),
        }.items():
            result = evaluate(q, g, labels, labels, config)
            labelled[f"{name}_top1"] = result.top1
            labelled[f"{name}_map"] = result.map
    return AdapterScore(
        k=adapted.shape[1],
        recall=float(neighbour_recall(adapted, reference).mean()),
        pair_top1=float((first == np.arange(n)).mean()),
        pairs=n,
        metric=metric.value,
        labelled=labelled,
    )
