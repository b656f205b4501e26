"""The backfill phase's single Ray Data run: rows arrive in the order of the planned row groups (one actor pool for
every tier), and the consumer writes each tier's rows to that tier's ledger directory, flushing between tiers."""

from __future__ import annotations

import time

import numpy as np
import pytest
import ray
import torch
from tqdm import tqdm

from raybackfill.backfill.ledger import Ledger
from raybackfill.backfill.reads import RowGroupRead
from raybackfill.backfill.rows import POSITION, TIER
from raybackfill.backfill.run import backfill_stream, consume_in_tier_order, tier_runs
from raybackfill.backfill.sink import FINITE, BatchSink, PhaseStats
from raybackfill.data import storage
from raybackfill.data.schema import EMBEDDING, ID
from raybackfill.data.synth import synthesize
from raybackfill.embed.pipeline import PoolConfig, plan_inputs
from raybackfill.models.artifacts import ModelSpec, save_model
from raybackfill.models.registry import build_model


def test_tier_runs_split_a_batch_at_each_tier_change():
    assert tier_runs(np.array([0, 0, 1, 1, 1, 3])) == [(0, 0, 2), (1, 2, 5), (3, 5, 6)]
    assert tier_runs(np.array([2])) == [(2, 0, 1)]
    assert tier_runs(np.array([], dtype=np.int64)) == []


class RecordingSink:
    """Stands in for BatchSink: records what was consumed where, and each flush."""

    def __init__(self) -> None:
        self.events: list[tuple] = []

    def consume(self, batch: dict[str, np.ndarray], directory: str) -> None:
        self.events.append(("consume", directory.rsplit("/", 1)[-1], batch[ID].tolist()))

    def flush(self) -> None:
        self.events.append(("flush",))


def _batch(ids: list[int], tiers: list[int]) -> dict[str, np.ndarray]:
    return {ID: np.array(ids), TIER: np.array(tiers), POSITION: np.array(ids), EMBEDDING: np.zeros((len(ids), 2))}


def test_consumer_routes_rows_to_their_tier_and_flushes_before_each_new_tier(tmp_path):
    sink, seen = RecordingSink(), []
    batches = [_batch([1, 2], [0, 0]), _batch([3, 4, 5], [0, 2, 2]), _batch([6], [2])]
    consume_in_tier_order(iter(batches), sink, Ledger(str(tmp_path)), seen.append)
    assert seen == [0, 2]
    assert sink.events == [
        ("flush",), ("consume", "tier-00000", [1, 2]), ("consume", "tier-00000", [3]),
        ("flush",), ("consume", "tier-00002", [4, 5]), ("consume", "tier-00002", [6]), ("flush",),
    ]  # fmt: skip


def test_consumer_refuses_a_stream_whose_tiers_go_down(tmp_path):
    sink = RecordingSink()
    with pytest.raises(RuntimeError, match="tier 0 after tier 1"):
        consume_in_tier_order(iter([_batch([1, 2], [0, 1]), _batch([3], [0])]), sink, Ledger(str(tmp_path)), print)
    assert ("consume", "tier-00000", [3]) not in sink.events  # nothing of the late row was written


def test_stream_reads_planned_rows_from_the_gallery_in_unit_order_and_leaves_the_global_context_alone(
    ray_cluster, tmp_path
):
    """A big first unit and small later ones: unordered, the small units' rows overtake the big one's tail (they
    are read and cut into blocks first). preserve_order on the dataset keeps the listed order; each unit reads
    only its rows of its row group, in the order the unit lists them."""
    torch.manual_seed(0)
    images = synthesize(classes=2, per_class=120, size=8)
    uri = str(tmp_path / "g" / "part-00000.parquet")
    storage.write_shard(images.slice(0, 40), str(tmp_path / "g"), "part-00000.parquet")
    big = storage.write_shard(images.slice(40, 200), str(tmp_path / "g"), "part-00001.parquet")
    kwargs = {"embedding_dim": 4, "num_classes": 2, "width": 4}
    model = str(tmp_path / "model")
    save_model(build_model("small_cnn", **kwargs), model, ModelSpec("small_cnn", "v", kwargs))
    gallery_ids = images.column(ID).to_numpy()
    big_rows = np.arange(199, -1, -1, dtype=np.int32)  # the whole big file, last row first
    small = [np.array([5 * i + 3, 5 * i], dtype=np.int32) for i in range(5)]  # two rows of the small file each
    units = [RowGroupRead(big, 0, big_rows, 0, tier=0, ids=gallery_ids[40 + big_rows])]
    units += [RowGroupRead(uri, 0, rows, 2 * i, tier=1, ids=gallery_ids[rows]) for i, rows in enumerate(small)]
    before = ray.data.DataContext.get_current().execution_options.preserve_order

    pool = PoolConfig(actors=2, cpus_per_actor=0.25, batch_size=4, gpus_per_actor=0.0)
    table = storage.open_table(str(tmp_path / "g"))
    inputs = plan_inputs({EMBEDDING: model}, table)
    ds = backfill_stream(units, table.schema, inputs, pool)
    batches = list(ds.iter_batches(batch_format="numpy", batch_size=None))

    assert ray.data.DataContext.get_current().execution_options.preserve_order == before
    got = np.concatenate([b[ID] for b in batches])
    assert got.tolist() == gallery_ids[40 + big_rows].tolist() + gallery_ids[np.concatenate(small)].tolist()
    assert np.concatenate([b[TIER] for b in batches]).tolist() == [0] * 200 + [1] * 10
    assert np.concatenate([b[POSITION] for b in batches]).tolist() == list(range(200)) + list(range(10))
    assert all(b[EMBEDDING].shape[1] == 4 for b in batches)
    # Each batch is at most the pool's batch size: a unit (a whole row group) is cut for the actors and the ledger.
    assert max(len(b[ID]) for b in batches) <= pool.batch_size

    # A gallery rewritten after the plan (other ids at the planned rows) fails loudly instead of embedding them.
    wrong = [RowGroupRead(uri, 0, np.array([0, 1], np.int32), 0, ids=gallery_ids[[1, 0]])]
    with pytest.raises(Exception, match="changed after the plan"):
        list(backfill_stream(wrong, table.schema, inputs, pool).iter_batches(batch_format="numpy"))


def test_a_sink_with_max_rate_holds_each_batch_until_its_rows_are_due(tmp_path):
    ledger = Ledger(str(tmp_path / "out"))
    stats = PhaseStats("backfill")
    sink = BatchSink(ledger, None, state="new", version="v2", stats=stats, max_bad_fraction=0.0,
                     bar=tqdm(disable=True), max_rate=100.0)  # fmt: skip
    start = time.monotonic()
    for first in range(0, 40, 10):
        ids = np.arange(first, first + 10)
        batch = {ID: ids, POSITION: ids, EMBEDDING: np.ones((10, 4), np.float32), FINITE: np.ones(10, bool)}
        sink.consume(batch, ledger.tier_uri(0))
    sink.flush()
    assert time.monotonic() - start >= 40 / 100.0  # 40 rows at 100 rows/s
    assert stats.items == 40 and sorted(ledger.ids(ledger.new_uri).tolist()) == list(range(40))
