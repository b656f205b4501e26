"""The backfill's outputs are its ledger: what is written is done, and nothing else records progress.

Layout under the output URI (local or s3://)::

    plan/                        tiers of gallery rows in priority order (raybackfill.backfill.plan)
    transformed/batch-*.parquet  instant phase: forward-transformed old embeddings
    new/tier-NNNNN/batch-*.parquet  re-embedded items, one directory per priority tier
    quarantine/*.parquet         bad rows (id, reason, stage)

A batch file is named after a hash of its sorted ids, so writing the same batch twice (a retry) is a
no-op, and a batch is committed atomically (raybackfill.data.storage.write_shard). A restarted job reads the
ids of every committed batch and skips them; it never re-emits a written id, so every id is in the
outputs exactly once. Because each batch is written *before* it is upserted, the index holds a subset
of the ledger, and :meth:`Ledger.replay` closes the gap left by a kill between the two steps.

The skip lists (``storage.committed_ids``, ``loading.quarantined_ids``) live in the data layer: the embed job
(raybackfill.embed.pipeline) resumes with them too.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

import numpy as np
import pyarrow as pa

from raybackfill.data import storage
from raybackfill.data.loading import quarantined_ids
from raybackfill.data.schema import EMBEDDING, ID, vectors_of
from raybackfill.index.router import get
from raybackfill.types import Space, Stage


def batch_name(ids: np.ndarray) -> str:
    """A deterministic file name for a batch: the same ids always give the same name."""
    digest = hashlib.sha1(np.sort(np.asarray(ids, dtype=np.int64)).tobytes()).hexdigest()[:20]
    return f"batch-{digest}.parquet"


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
        return storage.join(self.new_uri, f"tier-{tier:05d}")

    def write(self, directory: str, table: pa.Table) -> str:
        """Commit one batch under ``directory`` (a retried batch is skipped, never duplicated)."""
        return storage.write_shard(table, directory, batch_name(table.column(ID).to_numpy()), if_exists="skip")

    def files(self, directory: str) -> list[str]:
        """Committed batch files under ``directory``, oldest first (the order they were written)."""
        root = len(storage.resolve(directory)[1]) + 1
        return [storage.join(directory, i.path[root:]) for i in storage.committed_files(directory)]

    def ids(self, directory: str) -> np.ndarray:
        """Ids of every committed batch under ``directory`` (id column only: cheap)."""
        return storage.committed_ids(directory)

    def quarantined(self, *stages: Stage) -> np.ndarray:
        """Ids quarantined at any of ``stages``."""
        return quarantined_ids(self.quarantine_uri, stages)

    def replay(self, router, version: str) -> int:
        """Re-upsert committed batches that did not reach the index (killed between write and upsert).

        Cheap in the usual case: the index's counts are compared with the ledger's first, and files are
        replayed newest first only until they match (a kill leaves at most the last batch behind; an
        index restored from an older snapshot needs more). New batches go before transformed ones, and a
        transformed vector never replaces a new one. Returns the number of rows re-sent.
        """
        new_ids = self.ids(self.new_uri)
        moved_ids = np.union1d(self.ids(self.transformed_uri), new_ids)
        counts = get(router.progress.remote()).counts
        sent = 0
        for path in reversed(self.files(self.new_uri)):
            if counts[Space.NEW] == len(new_ids):
                break
            table = storage.read_shard(path, [ID, EMBEDDING])
            counts = get(router.upsert.remote(table.column(ID).to_numpy(), vectors_of(table), Space.NEW, version))
            sent += table.num_rows
        for path in reversed(self.files(self.transformed_uri)):
            if counts[Space.TRANSFORMED] + counts[Space.NEW] == len(moved_ids):
                break
            table = storage.read_shard(path, [ID, EMBEDDING])
            ids = table.column(ID).to_numpy()
            keep = ~np.isin(ids, new_ids)
            if keep.any():
                counts = get(router.upsert.remote(ids[keep], vectors_of(table)[keep], Space.TRANSFORMED, version))
                sent += int(keep.sum())
        return sent
