"""Where every finished batch of a backfill phase goes: quarantine, durable write, upsert, progress.

The order inside a batch is what makes a kill at any point safe: the batch (good rows, and the bad rows'
ids and reasons in its footer) is committed to its ledger track with its quarantine rows and marker
(raybackfill.backfill.ledger), and only then upserted into the index (so the index never holds a vector the
ledger lacks). A batch whose rows are all bad is committed too (an empty file): its positions are done.
The bad-row limit is checked after the batch is complete, so a job that fails on it leaves only whole
batches behind.

One upsert is in flight while the next batch is written: the driver's Parquet write and the shards'
index update take comparable time, so overlapping them hides most of one behind the other. A batch is still committed
before its own upsert is sent; a kill leaves the ledger at most two batches ahead of the index, which
the end-of-run replay (and any later run) closes. Call :meth:`BatchSink.flush` when the stream ends.

A shard that dies mid-upsert restarts from its snapshot, which may predate many batches: the sink then
waits for the index and replays the ledger into it (:meth:`Ledger.replay`, idempotent), which re-sends
this batch and everything the shard lost, instead of failing the job.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import numpy as np
from tqdm import tqdm

from raybackfill.backfill.ledger import BadRows, Ledger, TrackState
from raybackfill.backfill.rows import POSITION
from raybackfill.data.schema import BAD_REASON, EMBEDDING, ID, UNCERTAINTY, embedding_table
from raybackfill.index.router import IndexUnavailableError, get
from raybackfill.types import Space, Stage

# Column set by the decode step: "" for a good row, the reason for a row that could not be decoded.
FINITE = "finite"  # set by the embedding actors (raybackfill.embed.actors)
# How long a batch waits for a restarting shard before the job gives up (the ledger keeps the batch).
RECOVERY_TIMEOUT_S = 120.0


class TooManyBadRows(ValueError):
    """More than the allowed share of rows was quarantined: the job stops (what is written stays valid)."""


@dataclass
class PhaseStats:
    """What one phase did in this run (rows skipped because an earlier run did them are not counted)."""

    name: str
    items: int = 0
    quarantined: int = 0
    seconds: float = 0.0
    replayed: int = 0  # ledger rows re-sent to the index after a shard restart during the phase

    @property
    def rate(self) -> float:
        return (self.items + self.quarantined) / self.seconds if self.seconds > 0 else 0.0


class BatchSink:
    """Consumes the output batches of one phase (driver side, one batch at a time, in arrival order)."""

    def __init__(
        self,
        ledger: Ledger,
        router,
        *,
        state: Space,
        version: str,
        stats: PhaseStats,
        max_bad_fraction: float,
        bar: tqdm,
        max_rate: float | None = None,
    ) -> None:
        self.ledger, self.router, self.state, self.version = ledger, router, state, version
        self.stats, self.max_bad_fraction, self.bar = stats, max_bad_fraction, bar
        self.max_rate = max_rate  # items/s; the sink waits after a batch that got ahead of it
        self.stage = Stage.EMBED if state is Space.NEW else Stage.TRANSFORM
        self.started = time.monotonic()
        self._in_flight = None  # the ObjectRef of the last upsert sent, not yet confirmed
        self._tracks: dict[str, TrackState] = {}  # committed state of each track this sink wrote to

    def consume(self, batch: dict[str, np.ndarray], directory: str) -> None:
        """Commit one batch of a track (``directory``): its rows carry their track ``position``, ascending and
        past everything committed there; the batch covers the positions up to its last row's."""
        ids = batch[ID]
        if not len(ids):
            return
        positions = batch[POSITION]
        state = self._tracks.get(directory)
        if state is None:
            state = self._tracks[directory] = self.ledger.track(directory)
        if positions[0] < state.position:
            raise RuntimeError(
                f"{directory}: the stream re-sent position {int(positions[0])}, but positions up to "
                f"{state.position} are committed (the stream lost its order)"
            )
        why = batch[BAD_REASON] if BAD_REASON in batch else np.full(len(ids), "", dtype=object)
        undecoded = why != ""
        nonfinite = ~batch[FINITE] & ~undecoded
        bad = [
            BadRows(ids[undecoded], [str(r) for r in why[undecoded]], Stage.DECODE),
            BadRows(ids[nonfinite], ["non-finite embedding"] * int(nonfinite.sum()), self.stage),
        ]
        good = ~(undecoded | nonfinite)
        vectors = batch[EMBEDDING][good]
        uncertainty = batch[UNCERTAINTY][good] if UNCERTAINTY in batch else None
        table = embedding_table(ids[good], vectors, uncertainty=uncertainty, model=self.version)
        self._tracks[directory] = self.ledger.commit(directory, state, table, int(positions[-1]) + 1, bad)
        if good.any() and self.router is not None:
            self._confirm_upsert()
            self._in_flight = self.router.upsert.remote(ids[good], vectors, self.state, self.version)
        self.stats.items += int(good.sum())
        self.stats.quarantined += int((~good).sum())
        self.stats.seconds = time.monotonic() - self.started
        self.bar.update(len(ids))
        self._check_bad_fraction()
        self._pace()

    def flush(self) -> None:
        """Wait for the last upsert: after this every consumed batch is in the index."""
        self._confirm_upsert()
        self.stats.seconds = time.monotonic() - self.started

    def _confirm_upsert(self) -> None:
        """Wait for the upsert in flight; if a shard is down, wait for it and replay the ledger instead."""
        if self._in_flight is None:
            return
        ref, self._in_flight = self._in_flight, None
        try:
            counts = get(ref)
        except IndexUnavailableError:
            counts = self._recover()
        self.bar.set_postfix(counts, refresh=False)

    def _recover(self) -> dict[str, int]:
        deadline, delay = time.monotonic() + RECOVERY_TIMEOUT_S, 0.2
        while True:
            time.sleep(delay)
            try:
                self.stats.replayed += self.ledger.replay(self.router, self.version)
                return get(self.router.progress.remote()).counts
            except IndexUnavailableError:
                if time.monotonic() > deadline:
                    raise
                delay = min(2 * delay, 5.0)

    def _pace(self) -> None:
        """Hold the stream back until the rows consumed so far are due at ``max_rate`` (the upstream pipeline
        waits on its backpressure meanwhile)."""
        if self.max_rate is None:
            return
        due = self.started + (self.stats.items + self.stats.quarantined) / self.max_rate
        time.sleep(max(0.0, due - time.monotonic()))

    def _check_bad_fraction(self) -> None:
        processed = self.stats.items + self.stats.quarantined
        if processed and self.stats.quarantined / processed > self.max_bad_fraction:
            raise TooManyBadRows(
                f"{self.stats.name}: {self.stats.quarantined} of {processed} rows quarantined "
                f"({self.stats.quarantined / processed:.1%} > --max-bad-fraction {self.max_bad_fraction:.1%}); "
                f"reasons in {self.ledger.quarantine_uri}. Written batches are complete: fix the input and re-run."
            )
