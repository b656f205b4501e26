"""The plan's layout (pure numpy, against a brute-force reference), and a plan built and read on S3."""

from __future__ import annotations

import numpy as np
import pyarrow as pa

from raybackfill.backfill.plan import (
    FILE,
    PLAN_COLUMNS,
    RANK,
    ROW,
    ROW_GROUP,
    PlanConfig,
    ensure_plan,
    locate_gallery,
    plan_layout,
    read_plan,
    read_tier,
    tier_units,
)
from raybackfill.backfill.reads import read_unit
from raybackfill.data import storage
from raybackfill.data.schema import ID, IMAGE, embedding_table
from raybackfill.data.synth import synthesize


def _locations(ids, files, groups, rows) -> pa.Table:
    return pa.table(
        {
            ID: pa.array(ids, pa.int64()),
            FILE: pa.array(files, pa.int32()),
            ROW_GROUP: pa.array(groups, pa.int32()),
            ROW: pa.array(rows, pa.int32()),
        }
    )


def test_a_small_layout_by_hand():
    # ids 10..15 in two row groups of file 0 (10,11,12 | 13,14,15); scores make the priority 13, 10, 15, 11, 14, 12.
    ids = np.array([10, 11, 12, 13, 14, 15])
    scores = np.array([5.0, 2.0, 0.0, 6.0, 1.0, 3.0])
    located = _locations(ids, [0] * 6, [0, 0, 0, 1, 1, 1], [0, 1, 2, 0, 1, 2])
    layout = plan_layout(ids, scores, located, tiers=2, quarantine_uri=None)
    # Tier 0 = ranks 0..2 = ids 13, 10, 15: group 1 holds ranks 0 and 2, group 0 rank 1 -> group 1 first.
    # Tier 1 = ranks 3..5 = ids 11 (group 0), 14 (group 1), 12 (group 0): group 0 (best rank 3) first.
    assert layout.column(ID).to_pylist() == [13, 15, 10, 11, 12, 14]
    assert layout.column(RANK).to_pylist() == [0, 2, 1, 3, 5, 4]
    assert layout.column("tier").to_pylist() == [0, 0, 0, 1, 1, 1]
    assert layout.column(ROW_GROUP).to_pylist() == [1, 1, 0, 0, 0, 1]
    assert layout.column(ROW).to_pylist() == [0, 2, 0, 1, 2, 1]


def _brute_force(ids, scores, files, groups, tiers):
    """The layout rule written the slow way: rank by (-score, id), equal tiers, then per tier the row groups by
    their best rank and the rows of a group by rank."""
    order = sorted(range(len(ids)), key=lambda i: (-scores[i], ids[i]))
    rank = {ids[i]: r for r, i in enumerate(order)}
    size = -(-len(ids) // tiers)
    out = []
    for t in range(tiers):
        mine = [i for i in range(len(ids)) if rank[ids[i]] // size == t]
        best: dict[tuple, int] = {}
        for i in mine:
            key = (files[i], groups[i])
            best[key] = min(best.get(key, len(ids)), rank[ids[i]])
        out += sorted(mine, key=lambda i: (best[(files[i], groups[i])], rank[ids[i]]))
    return [int(ids[i]) for i in out], [rank[ids[i]] for i in out]


def test_the_layout_matches_a_brute_force_reference_and_quarantines_nothing_planned():
    rng = np.random.default_rng(0)
    n = 500
    ids = rng.permutation(10 * n)[:n].astype(np.int64)
    scores = rng.integers(0, 20, n).astype(np.float64)  # ties, broken by id
    files, groups = rng.integers(0, 3, n), rng.integers(0, 4, n)
    rows = np.arange(n)
    layout = plan_layout(ids, scores, _locations(ids, files, groups, rows), tiers=7, quarantine_uri=None)
    expected_ids, expected_ranks = _brute_force(ids, scores, files, groups, 7)
    assert layout.column(ID).to_pylist() == expected_ids
    assert layout.column(RANK).to_pylist() == expected_ranks
    assert layout.column_names == [*PLAN_COLUMNS, "tier"]


def test_unknown_and_missing_ids_are_quarantined_and_ranks_stay_dense(tmp_path):
    ids = np.array([1, 2, 3, 4])
    located = _locations([2, 3, 4, 9], [0] * 4, [0] * 4, [0, 1, 2, 3])  # 9: no score; 1: no image
    quarantine = str(tmp_path / "q")
    layout = plan_layout(ids, np.array([4.0, 3.0, 2.0, 1.0]), located, tiers=1, quarantine_uri=quarantine)
    assert layout.column(ID).to_pylist() == [2, 3, 4] and layout.column(RANK).to_pylist() == [0, 1, 2]
    table = storage.read_table(quarantine)
    reasons = dict(zip(table.column(ID).to_pylist(), table.column("reason").to_pylist(), strict=True))
    assert reasons == {9: "unknown id: no stored old embedding", 1: "no image in the gallery"}


def test_a_plan_on_s3_locates_rows_in_an_s3_gallery_and_reads_them_back(ray_cluster, s3_bucket):
    images = synthesize(classes=2, per_class=10, size=8)
    gallery, old = f"{s3_bucket}/gallery", f"{s3_bucket}/old"
    storage.write_table(images, gallery, rows_per_shard=7)
    ids = images.column(ID).to_numpy()
    storage.write_table(embedding_table(ids, np.ones((len(ids), 4), np.float32), model="v1"), old)
    plan = ensure_plan(PlanConfig(gallery, old, policy="id", tiers=3), f"{s3_bucket}/out/plan", f"{s3_bucket}/q")
    assert read_plan(f"{s3_bucket}/out/plan") == plan and plan.total == 20
    assert [t.rows for t in plan.tiers] == [7, 7, 6]
    assert len(locate_gallery(gallery)) == 20
    tier = plan.tiers[1]
    locations = read_tier(tier, start=2)
    assert locations.column(ID).to_pylist() == [9, 10, 11, 12, 13]  # policy id: tier 1 = ids 7..13, from position 2
    units = tier_units(plan, tier, locations, 2, [100.0] * len(plan.gallery_files))
    read = pa.concat_tables([b for u in units for b in read_unit(u, [ID, IMAGE], 2)])
    assert read.column(ID).to_pylist() == [9, 10, 11, 12, 13]
    assert read.column("position").to_pylist() == [2, 3, 4, 5, 6]
    by_id = dict(zip(ids.tolist(), images.column(IMAGE).to_pylist(), strict=True))
    assert read.column(IMAGE).to_pylist() == [by_id[i] for i in range(9, 14)]  # the gallery's own bytes
