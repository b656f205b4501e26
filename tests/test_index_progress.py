"""Progress math: moving-window rate, remaining items per phase, ETA (hand-computed values)."""

from __future__ import annotations

import pytest

from raybackfill.index.progress import (
    Progress,
    RateTracker,
    eta_seconds,
    remaining_items,
    window_rate,
)


def test_window_rate_averages_the_counter_over_the_window():
    samples = [(0.0, 0), (10.0, 100), (20.0, 300)]
    # Window [10, 30]: counter 100 at t=10, 300 now -> 200 items / 20 s.
    assert window_rate(samples, now=30.0, window=20.0) == pytest.approx(10.0)
    # Window [15, 25]: value at 15 is 100 (step function), at 25 it is 300 -> 200 / 10 s.
    assert window_rate(samples, now=25.0, window=10.0) == pytest.approx(20.0)
    # Window longer than the history starts at the first sample: 300 / 20 s.
    assert window_rate(samples, now=20.0, window=100.0) == pytest.approx(15.0)
    # No progress inside the window: the rate decays to zero.
    assert window_rate(samples, now=100.0, window=10.0) == 0.0


def test_window_rate_edge_cases():
    assert window_rate([], now=5.0, window=10.0) == 0.0
    assert window_rate([(5.0, 10)], now=5.0, window=10.0) == 0.0
    assert window_rate([(0.0, 10), (1.0, 5)], now=2.0, window=10.0) == 0.0  # a falling counter
    with pytest.raises(ValueError, match="window must be positive"):
        window_rate([], now=0.0, window=0.0)


def test_remaining_items_depends_on_the_phase():
    counts = {"old": 50, "transformed": 30, "new": 20}
    assert remaining_items(counts, "instant") == 50
    assert remaining_items(counts, "backfill") == 80
    assert remaining_items(counts, "paused") == 80
    assert remaining_items(counts, "done") == 0
    assert remaining_items(counts, "idle") == 0
    with pytest.raises(ValueError, match="unknown phase .running.; valid: idle, instant"):
        remaining_items(counts, "running")


def test_eta_is_remaining_over_rate():
    assert eta_seconds(100, 4.0) == 25.0
    assert eta_seconds(0, 0.0) == 0.0
    assert eta_seconds(10, 0.0) is None


def test_rate_tracker_trims_old_samples_but_keeps_a_baseline():
    tracker = RateTracker(window=10.0)
    for t, value in [(0.0, 0), (5.0, 50), (12.0, 120), (20.0, 200)]:
        tracker.observe(t, value)
    assert [t for t, _ in tracker.samples] == [5.0, 12.0, 20.0]  # 5.0 is the baseline before t=10
    assert tracker.rate(20.0) == pytest.approx((200 - 50) / 10.0)
    tracker.reset(21.0, 0)
    assert list(tracker.samples) == [(21.0, 0)]
    assert tracker.rate(22.0) == 0.0


def test_progress_fractions():
    progress = Progress("x", "backfill", {"old": 2, "transformed": 5, "new": 3}, [], 10, 7, 1.0, 7.0, None, 0.0, None)
    assert progress.fraction_new == pytest.approx(0.3)
    assert progress.fraction_in_new_space == pytest.approx(0.8)
