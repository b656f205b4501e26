"""The backfill's outputs are its ledger: what is written is done, and a small marker per track says how far.

Layout under the output URI (local or s3://)::

    plan/                           ranks, tiers and gallery locations (raybackfill.backfill.plan)
    transformed/batch-*.parquet     instant phase: forward-transformed old embeddings
    transformed/_ledger.json        its marker
    new/tier-NNNNN/batch-*.parquet  re-embedded items, one directory per priority tier
    new/tier-NNNNN/_ledger.json     the tier's marker
    quarantine/*.parquet            bad rows (id, reason, stage)

Tracks. Each output directory is a *track*: a fixed sequence of positions (the instant phase: the rows of the
old-embedding table in file order; a tier: its rows in plan order) consumed strictly in order
(``preserve_order``), so what is done is always a prefix of the track. A batch covers the positions
``[start, stop)`` (its good rows are in the file; the bad ones were quarantined) and is named after its start
(``batch-000000001234.parquet``), so a track's batches never overlap.

Commit of one batch, in this order: (1) the batch file, written atomically, its footer holding the range, the
counts, the previous batch's start and the bad rows with their reasons; (2) the quarantine rows (named after
their ids, so a second write is a no-op); (3) the marker ``_ledger.json`` (position, items, quarantined, last
batch), replaced atomically. A kill after (1) leaves an *orphan* batch that the next run finds by name at the
marker's position (it restores its quarantine rows from the footer and moves the marker past it), so every
position is committed exactly once.

Why markers instead of reading the batches back: a resume reads one small file per track and probes one name,
whatever the number of batches (a billion-item gallery at 8k items per batch writes 125k of them), where
listing and reading the id column of every batch costs a request per file. The batch files stay an ordinary
embedding table (``OUT/new`` reads as one table; names starting with ``_`` are not shards).

Because each batch is written *before* it is upserted, the index holds a subset of the ledger, and
:meth:`Ledger.replay` closes the gap left by a kill between the two steps, walking the newest batches back
through their footers' ``prev`` links.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass

import numpy as np
import pyarrow as pa
import pyarrow.fs as pafs

from raybackfill.data import storage
from raybackfill.data.loading import quarantined_ids, write_quarantine
from raybackfill.data.schema import EMBEDDING, ID, vectors_of
from raybackfill.index.router import get
from raybackfill.types import Space, Stage, parse

logger = logging.getLogger(__name__)

MARKER = "_ledger.json"
METADATA_KEY = b"raybackfill.ledger"
TIER_PREFIX = "tier-"


def batch_name(start: int) -> str:
    """The file name of the batch that starts at track position ``start``."""
    return f"batch-{start:012d}.parquet"


@dataclass(frozen=True)
class TrackState:
    """How far a track is committed: positions ``[0, position)``; ``items`` written, ``quarantined`` bad rows;
    ``last``: start position of the newest batch (None before the first)."""

    position: int = 0
    items: int = 0
    quarantined: int = 0
    last: int | None = None


@dataclass(frozen=True)
class BadRows:
    """Rows of a batch that were quarantined instead of written, with their reasons and stage."""

    ids: np.ndarray
    reasons: list[str]
    stage: Stage


@dataclass(frozen=True)
class Ledger:
    """The output directory of one backfill: where each phase writes, and what is already done."""

    uri: str

    @property
    def plan_uri(self) -> str:
        return storage.join(self.uri, "plan")

    @property
    def transformed_uri(self) -> str:
        return storage.join(self.uri, "transformed")

    @property
    def new_uri(self) -> str:
        return storage.join(self.uri, "new")

    @property
    def quarantine_uri(self) -> str:
        return storage.join(self.uri, "quarantine")

    def tier_uri(self, tier: int) -> str:
        return storage.join(self.new_uri, f"{TIER_PREFIX}{tier:05d}")

    # ----------------------------------------------------------------- tracks
    def track(self, directory: str) -> TrackState:
        """The committed state of a track: its marker, moved past any orphan batch a kill left behind (whose
        quarantine rows are restored from its footer). Reads one small file and probes one name per orphan."""
        marker = storage.join(directory, MARKER)
        state = TrackState(**json.loads(storage.read_bytes(marker))) if storage.exists(marker) else TrackState()
        while storage.exists(uri := storage.join(directory, batch_name(state.position))):
            meta = batch_metadata(uri)
            for bad in _bad_rows(meta):
                write_quarantine(self.quarantine_uri, bad.ids, bad.reasons, stage=bad.stage)
            state = _advanced(state, meta)
            self._write_marker(directory, state)
            logger.info("%s: adopted the batch a stopped run wrote last (positions %d..%d)", directory, *meta["range"])
        return state

    def commit(
        self, directory: str, state: TrackState, table: pa.Table, stop: int, bad: Sequence[BadRows] = ()
    ) -> TrackState:
        """Commit the batch ``[state.position, stop)`` of a track: ``table`` its good rows, ``bad`` its
        quarantined rows. Returns the track's new state."""
        start = state.position
        if stop <= start:
            raise ValueError(f"{directory}: a batch must cover positions after {start}, got stop {stop}")
        meta = {
            "range": [start, stop],
            "prev": state.last,
            "items": table.num_rows,
            "bad": [[b.ids.tolist(), list(b.reasons), str(b.stage)] for b in bad if len(b.ids)],
        }
        meta["quarantined"] = sum(len(ids) for ids, _, _ in meta["bad"])
        schema = table.schema.with_metadata({**(table.schema.metadata or {}), METADATA_KEY: json.dumps(meta).encode()})
        storage.write_shard(table.replace_schema_metadata(schema.metadata), directory, batch_name(start))
        for b in bad:
            if len(b.ids):
                write_quarantine(self.quarantine_uri, b.ids, b.reasons, stage=b.stage)
        new_state = _advanced(state, meta)
        self._write_marker(directory, new_state)
        return new_state

    def _write_marker(self, directory: str, state: TrackState) -> None:
        storage.write_bytes(storage.join(directory, MARKER), json.dumps(asdict(state)).encode())

    def batches(self, directory: str, state: TrackState | None = None) -> Iterator[tuple[str, dict]]:
        """(URI, footer metadata) of a track's batches, newest first (one footer read per step)."""
        start = (state or self.track(directory)).last
        while start is not None:
            uri = storage.join(directory, batch_name(start))
            meta = batch_metadata(uri)
            yield uri, meta
            start = meta["prev"]

    def tier_tracks(self) -> dict[int, TrackState]:
        """The state of every tier track that has a directory (lists ``OUT/new`` itself, not its batches)."""
        fs, path = storage.resolve(self.new_uri)
        try:
            infos = fs.get_file_info(pafs.FileSelector(path, allow_not_found=True))
        except OSError as err:
            raise storage.StorageError(f"{self.new_uri}: cannot list ({err})") from err
        tiers = sorted(
            int(i.base_name[len(TIER_PREFIX) :])
            for i in infos
            if i.type == pafs.FileType.Directory and i.base_name.startswith(TIER_PREFIX)
        )
        return {t: self.track(self.tier_uri(t)) for t in tiers}

    # ----------------------------------------------------------------- reading back (tools and tests)
    def files(self, directory: str) -> list[str]:
        """Committed batch files under ``directory``, oldest first. Lists the directory: for tools and tests;
        a resume reads the markers instead."""
        root = len(storage.resolve(directory)[1]) + 1
        return [storage.join(directory, i.path[root:]) for i in storage.committed_files(directory)]

    def ids(self, directory: str) -> np.ndarray:
        """Ids of every committed batch under ``directory`` (reads every batch's id column: tools and tests)."""
        return storage.committed_ids(directory)

    def quarantined(self, *stages: Stage) -> np.ndarray:
        """Ids quarantined at any of ``stages`` (the quarantine table holds bad rows only)."""
        return quarantined_ids(self.quarantine_uri, stages)

    # ----------------------------------------------------------------- index
    def replay(self, router, version: str) -> int:
        """Re-upsert committed batches that did not reach the index (killed between write and upsert, or a
        shard restored from an older snapshot).

        New space: the index must hold as many new vectors as the tier markers count; while it holds fewer,
        batches are re-sent newest first (tiers from the last). Transformed: the newest transformed batches are
        re-sent, only for items the index still has in the old space (a transformed vector never replaces a new
        one), until a batch has none left. Upserts are idempotent. Returns the number of rows re-sent.
        """
        tracks = self.tier_tracks()
        expected_new = sum(s.items for s in tracks.values())
        counts = get(router.progress.remote()).counts
        sent = 0
        for tier in sorted(tracks, reverse=True):
            for uri, _ in self.batches(self.tier_uri(tier), tracks[tier]):
                if counts[Space.NEW] >= expected_new:
                    break
                table = storage.read_shard(uri, [ID, EMBEDDING])
                if table.num_rows:
                    ids = table.column(ID).to_numpy()
                    counts = get(router.upsert.remote(ids, vectors_of(table), Space.NEW, version))
                    sent += table.num_rows
        for uri, _ in self.batches(self.transformed_uri):
            table = storage.read_shard(uri, [ID, EMBEDDING])
            if not table.num_rows:
                continue
            ids = table.column(ID).to_numpy()
            waiting = get(router.vectors.remote(ids)).states == Space.OLD.code
            if not waiting.any():
                break
            get(router.upsert.remote(ids[waiting], vectors_of(table)[waiting], Space.TRANSFORMED, version))
            sent += int(waiting.sum())
        return sent


def batch_metadata(uri: str) -> dict:
    """The ledger metadata in a batch file's footer (range, prev, items, quarantined, bad rows)."""
    metadata = storage.read_footer(uri).metadata or {}
    if METADATA_KEY not in metadata:
        raise storage.StorageError(f"{uri}: not a ledger batch (no {METADATA_KEY.decode()} footer metadata)")
    return json.loads(metadata[METADATA_KEY])


def _bad_rows(meta: dict) -> list[BadRows]:
    return [BadRows(np.asarray(ids, np.int64), reasons, parse(Stage, stage)) for ids, reasons, stage in meta["bad"]]


def _advanced(state: TrackState, meta: dict) -> TrackState:
    start, stop = meta["range"]
    return TrackState(stop, state.items + meta["items"], state.quarantined + meta["quarantined"], start)
