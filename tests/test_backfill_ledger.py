"""The ledger: batches named by their track position, a marker per track, orphans adopted after a kill, the
state read without touching the batch files, on local disk and S3."""

from __future__ import annotations

import numpy as np
import pytest

from raybackfill.backfill.ledger import MARKER, BadRows, Ledger, TrackState, batch_metadata, batch_name
from raybackfill.data import storage
from raybackfill.data.loading import write_quarantine
from raybackfill.data.schema import embedding_table
from raybackfill.types import Stage


def _table(ids: list[int], dim: int = 3):
    return embedding_table(np.array(ids, dtype=np.int64), np.ones((len(ids), dim), np.float32), model="v")


def test_batch_names_follow_the_track_position():
    assert batch_name(0) == "batch-000000000000.parquet"
    assert batch_name(1234) == "batch-000000001234.parquet"


def test_commits_advance_the_marker_and_link_each_batch_to_the_previous_one(tmp_path):
    ledger = Ledger(str(tmp_path))
    tier = ledger.tier_uri(0)
    assert ledger.track(tier) == TrackState()
    state = ledger.commit(tier, TrackState(), _table([4, 2]), 3, [BadRows(np.array([7]), ["corrupt"], Stage.DECODE)])
    assert state == TrackState(position=3, items=2, quarantined=1, last=0)
    state = ledger.commit(tier, state, _table([]), 5, [BadRows(np.array([8, 9]), ["nan", "nan"], Stage.EMBED)])
    assert state == TrackState(position=5, items=2, quarantined=3, last=3)  # an all-bad batch is committed too
    assert ledger.track(tier) == state  # the marker on disk
    assert [meta["range"] for _, meta in ledger.batches(tier)] == [[3, 5], [0, 3]]  # newest first
    assert sorted(ledger.ids(ledger.new_uri)) == [2, 4]
    assert sorted(ledger.quarantined(Stage.DECODE, Stage.EMBED)) == [7, 8, 9]
    with pytest.raises(ValueError, match="positions after 5"):
        ledger.commit(tier, state, _table([1]), 5)
    with pytest.raises(storage.ShardExistsError):  # a committed batch is never overwritten
        ledger.commit(tier, TrackState(), _table([1]), 1)


def test_a_batch_written_before_a_kill_is_adopted_with_its_quarantine_rows(tmp_path):
    ledger = Ledger(str(tmp_path))
    tier = ledger.tier_uri(1)
    first = ledger.commit(tier, TrackState(), _table([1, 2]), 2)
    marker = storage.read_bytes(storage.join(tier, MARKER))
    ledger.commit(tier, first, _table([3]), 5, [BadRows(np.array([4, 5]), ["corrupt", "corrupt"], Stage.DECODE)])
    # The kill: the batch file was written, but neither its quarantine rows nor the marker.
    for f in storage.committed_files(ledger.quarantine_uri):
        storage.resolve(ledger.quarantine_uri)[0].delete_file(f.path)
    storage.write_bytes(storage.join(tier, MARKER), marker)
    assert len(ledger.quarantined(Stage.DECODE)) == 0

    state = ledger.track(tier)
    assert state == TrackState(position=5, items=3, quarantined=2, last=2)
    assert sorted(ledger.quarantined(Stage.DECODE)) == [4, 5]
    assert ledger.track(tier) == state  # adopted once: the marker moved past it


def test_the_state_of_a_track_is_read_without_reading_its_batches(tmp_path):
    ledger = Ledger(str(tmp_path))
    tier = ledger.tier_uri(0)
    state = TrackState()
    for start in range(0, 40, 10):
        state = ledger.commit(tier, state, _table(list(range(start, start + 10))), start + 10)
    for path in ledger.files(tier):  # every batch file unreadable: a resume must not need them
        with open(path, "wb") as f:
            f.write(b"garbage")
    assert ledger.track(tier) == TrackState(position=40, items=40, quarantined=0, last=30)
    assert ledger.tier_tracks() == {0: state}
    with pytest.raises(storage.StorageError):
        batch_metadata(ledger.files(tier)[0])


@pytest.fixture(params=["local", "s3"])
def ledger_uri(request, tmp_path) -> str:
    return request.getfixturevalue("s3_bucket") + "/run" if request.param == "s3" else str(tmp_path / "run")


def test_ledger_tracks_phases_and_tiers_and_reads_quarantine_by_stage(ledger_uri):
    ledger = Ledger(ledger_uri)
    ledger.commit(ledger.transformed_uri, TrackState(), _table([1, 2, 3], 2), 3)
    ledger.commit(ledger.tier_uri(2), TrackState(), _table([9], 2), 1)
    write_quarantine(ledger.quarantine_uri, np.array([5]), ["corrupt"], stage="decode")
    write_quarantine(ledger.quarantine_uri, np.array([6]), ["nan"], stage="transform")
    assert sorted(ledger.ids(ledger.transformed_uri)) == [1, 2, 3]
    assert list(ledger.ids(ledger.new_uri)) == [9]
    assert ledger.files(ledger.new_uri) == [ledger.tier_uri(2) + "/" + batch_name(0)]
    assert ledger.track(ledger.transformed_uri) == TrackState(3, 3, 0, 0)
    assert ledger.tier_tracks() == {2: TrackState(1, 1, 0, 0)}
    assert list(ledger.quarantined(("decode", "embed"))) == [5]
    assert list(ledger.quarantined(("transform",))) == [6]
    # OUT/new reads as one embedding table: the markers are not shards.
    assert storage.read_table(ledger.new_uri).column("id").to_pylist() == [9]
