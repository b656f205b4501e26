"""Live quality of the serving index: top-1 and mAP@k of a labelled probe set against the partly backfilled index.

Why: during a backfill an operator sees counts rise; this shows whether *quality* rises with them. One
reading is one batched ``router.search`` over a fixed seeded sample of at most ``max_probes`` probes, so
it is cheap, and successive readings (same sample, same k, same strategy) are comparable.

Definitions (the pure part, :func:`score_topk`, numpy only):
- protocol "disjoint": the probes are not gallery items (no self-match is removed).
- Relevant item: a gallery item with the probe's label; R = how many the label lookup holds.
  Probes with R = 0 are dropped (AP undefined), as in raybackfill.eval.metrics.
- top-1: the first returned id is relevant.
- AP@k over the returned top-k list: (1 / min(k, R)) * sum_{i <= k} precision@i * rel(i). With k >= the
  gallery size the list is the whole ranking and AP@k equals AP@all of raybackfill.eval.metrics.
- Empty result slots (id -1) are not relevant; a returned id the lookup does not know is an error
  (the lookup must cover the served gallery, or the numbers would silently count it as a miss).
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass, field

import numpy as np
import pyarrow as pa

from raybackfill.data.schema import EMBEDDING, ID, LABEL, check_unique_ids, vectors_of
from raybackfill.data.storage import read_table
from raybackfill.index.merge import EMPTY_ID, TopK
from raybackfill.index.router import get
from raybackfill.types import Protocol, Space, Strategy, locate_ids, locate_sorted, parse

DEFAULT_MAX_PROBES = 1000
DEFAULT_K = 100


@dataclass(frozen=True)
class LabelLookup:
    """id -> label for the served gallery, as sorted arrays (binary-search lookups, no Python dicts)."""

    ids: np.ndarray  # sorted, unique int64
    labels: np.ndarray  # aligned with ids
    label_values: np.ndarray = field(repr=False)  # sorted distinct labels
    label_counts: np.ndarray = field(repr=False)  # gallery items per distinct label

    @classmethod
    def from_arrays(cls, ids: np.ndarray, labels: np.ndarray, source: str = "gallery labels") -> LabelLookup:
        ids, labels = np.asarray(ids, dtype=np.int64), np.asarray(labels)
        if ids.ndim != 1 or ids.shape != labels.shape:
            raise ValueError(f"{source}: need one label per id, got ids {ids.shape} and labels {labels.shape}")
        check_unique_ids(ids, source)
        order = np.argsort(ids, kind="stable")
        values, counts = np.unique(labels, return_counts=True)
        return cls(ids[order], labels[order], values, counts)

    @classmethod
    def from_table(cls, table: pa.Table, source: str = "gallery table") -> LabelLookup:
        """From any table with ``id`` and ``label`` columns (embedding or image table)."""
        for name in (ID, LABEL):
            if name not in table.schema.names:
                raise ValueError(f"{source}: missing column '{name}' (a label lookup needs id and label)")
        return cls.from_arrays(table.column(ID).to_numpy(), table.column(LABEL).to_numpy(), source)

    @classmethod
    def read(cls, uri: str) -> LabelLookup:
        """Reads only the id and label columns, so an image table costs no image bytes."""
        return cls.from_table(read_table(uri, columns=[ID, LABEL]), uri)

    def labels_of(self, ids: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(labels, known) for an array of ids of any shape; ``labels`` is meaningless where not known."""
        where = locate_sorted(self.ids, np.asarray(ids, dtype=np.int64), missing="mask")
        known = where >= 0
        if not len(self.ids):
            return np.zeros(where.shape, dtype=self.labels.dtype), known
        return self.labels[np.where(known, where, 0)], known

    def count_of(self, labels: np.ndarray) -> np.ndarray:
        """How many gallery items carry each label (0 for labels the gallery lacks)."""
        where = locate_sorted(self.label_values, np.asarray(labels), missing="mask")
        if not len(self.label_values):
            return np.zeros(where.shape, dtype=np.int64)
        return np.where(where >= 0, self.label_counts[np.where(where >= 0, where, 0)], 0)


@dataclass(frozen=True)
class ProbeScores:
    """Per probe: kept (has a relevant gallery item); per kept probe: top-1 hit and AP@k."""

    kept: np.ndarray
    correct_top1: np.ndarray
    ap_at_k: np.ndarray


def score_topk(ids: np.ndarray, probe_labels: np.ndarray, lookup: LabelLookup) -> ProbeScores:
    """Score (n_probes, k) returned ids against the probes' labels (definitions in the module docstring)."""
    ids = np.asarray(ids, dtype=np.int64)
    probe_labels = np.asarray(probe_labels)
    if ids.ndim != 2 or len(ids) != len(probe_labels) or ids.shape[1] == 0:
        raise ValueError(f"need (n_probes, k>=1) ids for {len(probe_labels)} probe labels, got {ids.shape}")
    filled = ids != EMPTY_ID
    labels, known = lookup.labels_of(ids)
    unknown = filled & ~known
    if unknown.any():
        raise ValueError(
            f"{int(unknown.sum())} returned ids are not in the gallery label lookup "
            f"(e.g. {np.unique(ids[unknown])[:5].tolist()}): build the lookup from the served gallery"
        )
    n_relevant = lookup.count_of(probe_labels)
    kept = n_relevant > 0
    rel = filled[kept] & (labels[kept] == probe_labels[kept, None])
    k = ids.shape[1]
    precision = np.cumsum(rel, axis=1) / np.arange(1, k + 1)
    ap = (precision * rel).sum(axis=1) / np.minimum(k, n_relevant[kept])
    return ProbeScores(kept=kept, correct_top1=rel[:, 0].copy(), ap_at_k=ap)


@dataclass(frozen=True)
class ProbeSet:
    """Labelled probe queries with their old- and/or new-space vectors (rows aligned with ``labels``)."""

    labels: np.ndarray
    old: np.ndarray | None = None
    new: np.ndarray | None = None

    def __post_init__(self) -> None:
        if self.old is None and self.new is None:
            raise ValueError("a probe set needs old-space or new-space vectors (or both)")
        for name in ("old", "new"):
            vectors = getattr(self, name)
            if vectors is not None and (np.ndim(vectors) != 2 or len(vectors) != len(self.labels)):
                raise ValueError(f"probe {name} vectors must be ({len(self.labels)}, d), got {np.shape(vectors)}")

    @classmethod
    def read(cls, old_uri: str | None = None, new_uri: str | None = None) -> ProbeSet:
        """From embedding tables (the first given carries ``label``); with both, rows are matched by id."""
        uris = [u for u in (old_uri, new_uri) if u]
        if not uris:
            raise ValueError("give a probe table in the old space, the new space, or both")
        # Labels come from the first table; the other one only needs ids and vectors.
        tables = {u: read_table(u, columns=[ID, LABEL, EMBEDDING] if u == uris[0] else [ID, EMBEDDING]) for u in uris}
        first = tables[uris[0]]
        ids = first.column(ID).to_numpy()
        check_unique_ids(ids, uris[0])
        vectors = {}
        for space, uri in ((Space.OLD, old_uri), (Space.NEW, new_uri)):
            if uri:
                table = tables[uri]
                if table.num_rows != len(ids):
                    raise ValueError(f"{uri} has {table.num_rows} probes, {uris[0]} {len(ids)}: give the same probes")
                rows = locate_ids(table.column(ID).to_numpy(), ids, missing="mask")
                if (rows < 0).any():
                    missing = ids[rows < 0]
                    raise ValueError(f"{uri}: {len(missing)} ids are missing (e.g. {missing[:5].tolist()})")
                vectors[space.value] = vectors_of(table)[rows]
        return cls(first.column(LABEL).to_numpy(), **vectors)

    def sample(self, max_probes: int, seed: int = 0) -> ProbeSet:
        """The same at most ``max_probes`` probes for a given seed, in their original row order."""
        if max_probes <= 0:
            raise ValueError(f"max_probes must be positive, got {max_probes}")
        if len(self.labels) <= max_probes:
            return self
        rows = np.sort(np.random.default_rng(seed).permutation(len(self.labels))[:max_probes])
        return ProbeSet(
            self.labels[rows],
            None if self.old is None else self.old[rows],
            None if self.new is None else self.new[rows],
        )

    def queries_for(self, strategy: Strategy) -> tuple[np.ndarray | None, np.ndarray | None]:
        """(queries_old, queries_new) that a router search with ``strategy`` needs."""
        strategy = parse(Strategy, strategy)
        need_old = strategy in (Strategy.OLD, Strategy.RANK_MERGE)
        need_new = strategy in (Strategy.COMPATIBLE, Strategy.RANK_MERGE)
        for space, needed, vectors in ((Space.OLD, need_old, self.old), (Space.NEW, need_new, self.new)):
            if needed and vectors is None:
                raise ValueError(f"strategy {strategy.value!r} needs {space}-space probe vectors")
        return (self.old if need_old else None), (self.new if need_new else None)


@dataclass(frozen=True)
class LiveQuality:
    """One reading of the live index's quality; ``map_at_k`` is the mean AP over the returned top-k lists."""

    strategy: Strategy
    k: int
    top1: float
    map_at_k: float
    probes: int  # evaluated
    dropped: int  # sampled probes with no relevant gallery item
    latency_s: float  # wall time of the one batched search
    protocol: Protocol = Protocol.DISJOINT

    def as_dict(self) -> dict:
        return asdict(self)


def summarize_scores(scores: ProbeScores, strategy: Strategy, k: int, latency_s: float) -> LiveQuality:
    n = int(scores.kept.sum())
    if n == 0:
        raise ValueError("no sampled probe has a relevant gallery item: nothing to measure")
    return LiveQuality(
        strategy=strategy,
        k=k,
        top1=float(scores.correct_top1.mean()),
        map_at_k=float(scores.ap_at_k.mean()),
        probes=n,
        dropped=int(len(scores.kept) - n),
        latency_s=latency_s,
    )


def live_quality(
    router,
    probes: ProbeSet,
    lookup: LabelLookup,
    *,
    strategy: Strategy = Strategy.RANK_MERGE,
    k: int = DEFAULT_K,
    max_probes: int = DEFAULT_MAX_PROBES,
    seed: int = 0,
) -> LiveQuality:
    """Query the router once with the seeded probe sample and score what it returns.

    ``router`` is the router's actor handle, or a client of the HTTP search service
    (:class:`raybackfill.service.client.ServiceClient`): then the probes go through HTTP, so the reading is what
    the service's clients see.
    """
    strategy = parse(Strategy, strategy)
    sample = probes.sample(max_probes, seed)
    queries_old, queries_new = sample.queries_for(strategy)
    started = time.perf_counter()
    result = search_topk(router, queries_old, queries_new, k, strategy)
    latency = time.perf_counter() - started
    return summarize_scores(score_topk(result.ids, sample.labels, lookup), strategy, k, latency)


def search_topk(target, queries_old, queries_new, k: int, strategy: Strategy) -> TopK:
    """One search of the router (an actor handle) or of the HTTP search service (anything with ``search_topk``)."""
    over_http = getattr(target, "search_topk", None)
    if callable(over_http):
        return over_http(queries_old, queries_new, k, strategy)
    return get(target.search.remote(queries_old, queries_new, k, strategy))
