"""Backfill progress: counts per state, rate over a moving window, ETA, phase.

The math (``window_rate``, ``remaining_items``, ``eta_seconds``) is pure and takes the clock as an
argument, so it is unit-tested exactly. The rate is measured on the *progress counter* (items that
reached the phase's target state), not on upsert calls: replaying a batch (upserts are idempotent,
and a restarted job re-sends its last batches) must not inflate the rate. The router exports each
progress view as Prometheus gauges (raybackfill.index.metrics); nothing here imports Ray.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field

from raybackfill.types import Phase, Space, parse


def remaining_items(counts: dict[str, int], phase: Phase) -> int:
    """Items still to process in this phase: not yet in the new space ("instant"), not yet re-embedded
    by the new model ("backfill"/"paused"); nothing otherwise."""
    total = sum(counts.get(s, 0) for s in Space)
    phase = parse(Phase, phase)
    if phase is Phase.INSTANT:
        return counts.get(Space.OLD, 0)
    if phase in (Phase.BACKFILL, Phase.PAUSED):
        return total - counts.get(Space.NEW, 0)
    return 0


def window_rate(samples: list[tuple[float, float]], now: float, window: float) -> float:
    """Average growth per second of a counter over the last ``window`` seconds.

    ``samples`` are (time, counter value) in time order; the counter is a step function (its value at t
    is the last sample at or before t). The window starts at ``now - window``, or at the first sample if
    that is later. Returns 0.0 with fewer than one sample, an empty window, or a falling counter.
    """
    if window <= 0:
        raise ValueError(f"window must be positive, got {window}")
    if not samples:
        return 0.0
    start = max(now - window, samples[0][0])
    if now <= start:
        return 0.0
    at_start = samples[0][1]
    at_now = samples[0][1]
    for t, value in samples:
        if t <= start:
            at_start = value
        if t <= now:
            at_now = value
    return max(0.0, (at_now - at_start) / (now - start))


def eta_seconds(remaining: int, rate: float) -> float | None:
    """Seconds to finish at the current rate; 0 when nothing remains, None when the rate is zero."""
    if remaining <= 0:
        return 0.0
    if rate <= 0:
        return None
    return remaining / rate


@dataclass
class RateTracker:
    """Samples of the progress counter, trimmed to the window (plus one sample before it as baseline)."""

    window: float = 60.0
    samples: deque = field(default_factory=deque)

    def observe(self, now: float, value: float) -> None:
        self.samples.append((now, value))
        while len(self.samples) > 1 and self.samples[1][0] <= now - self.window:
            self.samples.popleft()

    def reset(self, now: float, value: float) -> None:
        """Start a new measurement (the counter changed meaning: new phase, rollback)."""
        self.samples.clear()
        self.observe(now, value)

    def rate(self, now: float) -> float:
        return window_rate(list(self.samples), now, self.window)


@dataclass(frozen=True)
class Progress:
    """What `progress()` returns: one consistent view of the backfill."""

    name: str
    phase: Phase
    counts: dict[str, int]
    per_shard: list[dict[str, int]]
    total: int
    remaining: int
    rate: float
    eta_seconds: float | None
    started_at: float | None
    updated_at: float
    last_error: str | None

    @property
    def fraction_new(self) -> float:
        """Share of the gallery carrying a true new-model embedding (the backfill fraction beta)."""
        return self.counts.get(Space.NEW, 0) / self.total if self.total else 0.0

    @property
    def fraction_in_new_space(self) -> float:
        done = self.counts.get(Space.TRANSFORMED, 0) + self.counts.get(Space.NEW, 0)
        return done / self.total if self.total else 0.0
