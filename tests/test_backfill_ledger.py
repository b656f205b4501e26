"""The ledger: deterministic batch names, write-once batches, ids read back, on local disk and S3."""

from __future__ import annotations

import numpy as np
import pytest

from raybackfill.backfill.ledger import Ledger, batch_name
from raybackfill.data.loading import write_quarantine
from raybackfill.data.schema import embedding_table


def test_batch_names_depend_only_on_the_set_of_ids():
    assert batch_name(np.array([3, 1, 2])) == batch_name(np.array([1, 2, 3]))
    assert batch_name(np.array([1, 2])) != batch_name(np.array([1, 2, 3]))


def test_ledger_writes_a_batch_once_and_reads_back_its_ids(tmp_path):
    ledger = Ledger(str(tmp_path))
    table = embedding_table(np.array([4, 2]), np.ones((2, 3), np.float32), model="v")
    first = ledger.write(ledger.tier_uri(0), table)
    assert ledger.write(ledger.tier_uri(0), table) == first  # a retried batch is a no-op
    ledger.write(ledger.tier_uri(1), embedding_table(np.array([7]), np.ones((1, 3), np.float32), model="v"))
    assert sorted(ledger.ids(ledger.new_uri)) == [2, 4, 7]
    assert ledger.files(ledger.new_uri)[0] == first  # oldest first
    assert len(ledger.ids(ledger.transformed_uri)) == 0 and len(ledger.quarantined(("decode",))) == 0


@pytest.fixture(params=["local", "s3"])
def ledger_uri(request, tmp_path) -> str:
    return request.getfixturevalue("s3_bucket") + "/run" if request.param == "s3" else str(tmp_path / "run")


def test_ledger_reads_ids_by_phase_and_quarantine_by_stage(ledger_uri):
    ledger = Ledger(ledger_uri)
    ledger.write(ledger.transformed_uri, embedding_table(np.array([1, 2, 3]), np.zeros((3, 2), np.float32)))
    ledger.write(ledger.tier_uri(2), embedding_table(np.array([9]), np.zeros((1, 2), np.float32)))
    write_quarantine(ledger.quarantine_uri, np.array([5]), ["corrupt"], stage="decode")
    write_quarantine(ledger.quarantine_uri, np.array([6]), ["nan"], stage="transform")
    assert sorted(ledger.ids(ledger.transformed_uri)) == [1, 2, 3]
    assert list(ledger.ids(ledger.new_uri)) == [9]
    assert ledger.files(ledger.new_uri) == [ledger.tier_uri(2) + "/" + batch_name(np.array([9]))]
    assert list(ledger.quarantined(("decode", "embed"))) == [5]
    assert list(ledger.quarantined(("transform",))) == [6]
