"""Prometheus metrics of the live index: what the router and the shards export through ``ray.util.metrics``.

Every Ray node runs a metrics agent that serves the metrics of the processes on that node in the Prometheus
text format (``ray start --metrics-export-port=PORT``, ``ray.init(_metrics_export_port=PORT)``; KubeRay pods
expose it on port 8080). Processes push their values to the agent every ``metrics_report_interval_ms``
(10 s by default), so a value shows up on the endpoint some seconds after it was recorded. Ray prefixes
every application metric with ``ray_``, appends ``_total`` to counters and ``_bucket``/``_sum``/``_count``
to histograms: :func:`exported_names` gives the names a Prometheus query or a Grafana panel uses.

What is exported (``index`` is the router's name on every series):

- router, progress (set whenever the router computes its progress: every write and every ``progress`` call):
  ``raybackfill_items{state}``, ``raybackfill_remaining_items``, ``raybackfill_rate`` (items/s over the
  moving window), ``raybackfill_eta_seconds`` (-1 when unknown), ``raybackfill_phase{phase}`` (1 for the
  current phase, 0 for the others);
- router, traffic: ``raybackfill_written_items{operation,state}`` and ``raybackfill_write_seconds{operation}``
  for ``load_old``/``upsert`` batches (so ``rate(ray_raybackfill_written_items_total[5m])`` is the upsert rate;
  replayed batches count again, unlike ``raybackfill_rate``, which follows the progress counter),
  ``raybackfill_queries{strategy}`` (query rows) and ``raybackfill_query_seconds{strategy}`` (a search call,
  fan-out and merge included), ``raybackfill_errors{operation,error}`` (refused or failed calls, by exception
  type);
- shards: ``raybackfill_shard_items{shard,state}``, ``raybackfill_shard_search_seconds{shard}`` and
  ``raybackfill_shard_written_items{shard,operation}``, to spot a slow or unbalanced shard.

The metric objects live in the actor that records them; nothing here blocks (a record is a local call).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Literal

from ray.util.metrics import Counter, Gauge, Histogram

from raybackfill.index.progress import Progress
from raybackfill.types import Phase, Space

logger = logging.getLogger(__name__)

# What Ray puts in front of an application metric's name on its Prometheus endpoint.
EXPORT_PREFIX = "ray_"
# Seconds; a search of a few queries on a small shard takes a millisecond, a large batch on a big flat
# index seconds: buckets from 1 ms to 1 min.
LATENCY_BOUNDARIES = [0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0]


@dataclass(frozen=True)
class MetricSpec:
    """One exported metric: its name (as given to ray.util.metrics), kind, help text and tag keys."""

    name: str
    kind: Literal["counter", "gauge", "histogram"]
    description: str
    tag_keys: tuple[str, ...]


ITEMS = MetricSpec("raybackfill_items", "gauge", "gallery items per state", ("index", "state"))
REMAINING = MetricSpec(
    "raybackfill_remaining_items", "gauge", "items still to process in the current phase", ("index",)
)
RATE = MetricSpec("raybackfill_rate", "gauge", "backfill rate over the moving window, items/s", ("index",))
ETA = MetricSpec("raybackfill_eta_seconds", "gauge", "estimated seconds to finish the phase (-1 = unknown)", ("index",))
PHASE = MetricSpec(
    "raybackfill_phase", "gauge", "1 for the index's current phase, 0 for the others", ("index", "phase")
)
WRITTEN = MetricSpec(
    "raybackfill_written_items",
    "counter",
    "items written by load_old/upsert batches (replays included)",
    ("index", "operation", "state"),
)
WRITE_SECONDS = MetricSpec(
    "raybackfill_write_seconds", "histogram", "seconds per load_old/upsert batch, all shards", ("index", "operation")
)
QUERIES = MetricSpec("raybackfill_queries", "counter", "query rows answered, per strategy", ("index", "strategy"))
QUERY_SECONDS = MetricSpec(
    "raybackfill_query_seconds", "histogram", "seconds per search call (fan-out and merge)", ("index", "strategy")
)
ERRORS = MetricSpec(
    "raybackfill_errors",
    "counter",
    "refused or failed router calls, by exception type",
    ("index", "operation", "error"),
)
SHARD_ITEMS = MetricSpec(
    "raybackfill_shard_items", "gauge", "items per state on one shard", ("index", "shard", "state")
)
SHARD_SEARCH_SECONDS = MetricSpec(
    "raybackfill_shard_search_seconds", "histogram", "seconds per search on one shard", ("index", "shard")
)
SHARD_WRITTEN = MetricSpec(
    "raybackfill_shard_written_items", "counter", "items written on one shard", ("index", "shard", "operation")
)

ROUTER_METRICS = (ITEMS, REMAINING, RATE, ETA, PHASE, WRITTEN, WRITE_SECONDS, QUERIES, QUERY_SECONDS, ERRORS)
SHARD_METRICS = (SHARD_ITEMS, SHARD_SEARCH_SECONDS, SHARD_WRITTEN)
METRICS = ROUTER_METRICS + SHARD_METRICS


def exported_names(spec: MetricSpec) -> tuple[str, ...]:
    """The series names Ray's Prometheus endpoint shows for a metric (what PromQL and Grafana use).

    Args:
        spec: one of :data:`METRICS`.

    Returns:
        ``ray_NAME`` for a gauge, ``ray_NAME_total`` for a counter, ``ray_NAME_bucket``/``_sum``/``_count``
        for a histogram.

    Example:
        >>> exported_names(WRITTEN)
        ('ray_raybackfill_written_items_total',)
    """
    base = EXPORT_PREFIX + spec.name
    if spec.kind == "counter":
        return (f"{base}_total",)
    if spec.kind == "histogram":
        return (f"{base}_bucket", f"{base}_sum", f"{base}_count")
    if spec.kind == "gauge":
        return (base,)
    raise ValueError(f"unknown metric kind {spec.kind!r} of {spec.name}")


def phase_values(phase: Phase) -> dict[str, float]:
    """One-hot of the phase over every :class:`~raybackfill.types.Phase` (a gauge per phase value).

    Example:
        >>> phase_values(Phase.BACKFILL)["backfill"], phase_values(Phase.BACKFILL)["idle"]
        (1.0, 0.0)
    """
    return {member.value: float(member == phase) for member in Phase}


def eta_value(eta_seconds: float | None) -> float:
    """The ETA as a gauge value: -1 stands for "unknown" (no progress in the window)."""
    return -1.0 if eta_seconds is None else float(eta_seconds)


def shard_labels(actor_name: str) -> tuple[str, str]:
    """(index, shard) tags of a shard actor named ``{index}-shard-NNN`` (RouterConfig.shard_name).

    An unnamed shard (made directly, as unit tests do) is tagged ("", "unnamed").

    Example:
        >>> shard_labels("raybackfill-router-shard-003")
        ('raybackfill-router', 'raybackfill-router-shard-003')
    """
    if not actor_name:
        return "", "unnamed"
    index, sep, _ = actor_name.rpartition("-shard-")
    return (index if sep else actor_name), actor_name


def _make(spec: MetricSpec):
    if spec.kind == "counter":
        return Counter(spec.name, spec.description, tag_keys=spec.tag_keys)
    if spec.kind == "gauge":
        return Gauge(spec.name, spec.description, tag_keys=spec.tag_keys)
    return Histogram(spec.name, spec.description, boundaries=LATENCY_BOUNDARIES, tag_keys=spec.tag_keys)


class IndexMetrics:
    """The router's metrics, tagged with the index name. Create it inside the router actor.

    Args:
        index: the router's name (the ``index`` tag of every series).
    """

    def __init__(self, index: str) -> None:
        self._index = index
        self._metrics = {spec.name: _make(spec) for spec in ROUTER_METRICS}
        for metric in self._metrics.values():
            metric.set_default_tags({"index": index})

    def export_progress(self, progress: Progress) -> None:
        """Items per state, remaining items, rate, ETA and phase of one progress view."""
        for state in Space:
            self._metrics[ITEMS.name].set(progress.counts.get(state, 0), tags={"state": state.value})
        self._metrics[REMAINING.name].set(progress.remaining)
        self._metrics[RATE.name].set(progress.rate)
        self._metrics[ETA.name].set(eta_value(progress.eta_seconds))
        for phase, value in phase_values(progress.phase).items():
            self._metrics[PHASE.name].set(value, tags={"phase": phase})

    def observe_write(self, operation: str, state: Space, items: int, seconds: float) -> None:
        """A load_old (state old) or upsert (state transformed/new) batch of ``items`` applied on every shard."""
        if items > 0:
            self._metrics[WRITTEN.name].inc(items, tags={"operation": operation, "state": str(state)})
        self._metrics[WRITE_SECONDS.name].observe(seconds, tags={"operation": operation})

    def observe_query(self, strategy: str, queries: int, seconds: float) -> None:
        """One search call of ``queries`` query rows with ``strategy``, answered in ``seconds``."""
        if queries > 0:
            self._metrics[QUERIES.name].inc(queries, tags={"strategy": str(strategy)})
        self._metrics[QUERY_SECONDS.name].observe(seconds, tags={"strategy": str(strategy)})

    def count_error(self, operation: str, error: BaseException) -> None:
        """A refused or failed router call (``error`` tag: the exception's type name)."""
        self._metrics[ERRORS.name].inc(1, tags={"operation": operation, "error": type(error).__name__})


class ShardMetrics:
    """One shard's metrics, tagged with its index and its actor name. Create it inside the shard actor.

    Args:
        actor_name: the shard actor's name (``{index}-shard-NNN``), or "" for an unnamed shard.
    """

    def __init__(self, actor_name: str) -> None:
        index, shard = shard_labels(actor_name)
        self._metrics = {spec.name: _make(spec) for spec in SHARD_METRICS}
        for metric in self._metrics.values():
            metric.set_default_tags({"index": index, "shard": shard})

    def export_counts(self, counts: dict[str, int]) -> None:
        for state in Space:
            self._metrics[SHARD_ITEMS.name].set(counts.get(state, 0), tags={"state": state.value})

    def observe_write(self, operation: str, items: int) -> None:
        if items > 0:
            self._metrics[SHARD_WRITTEN.name].inc(items, tags={"operation": operation})

    def observe_search(self, seconds: float) -> None:
        self._metrics[SHARD_SEARCH_SECONDS.name].observe(seconds)
