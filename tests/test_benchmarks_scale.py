"""benchmarks/bench_scale.py at tiny sizes on the session Ray: the gallery is streamed in, backfilled through the
transform path under live queries, and the JSON carries every figure of the scale targets, finite and in range
(no timing assertions: the machine is shared)."""

from __future__ import annotations

import json
import math

import numpy as np

from benchmarks import bench_scale


def test_bench_scale_writes_every_figure_for_each_size(ray_cluster, tmp_path):
    out = tmp_path / "scale.json"
    argv = ["--sizes", "3000,6000", "--index", "IVF16,SQ8", "--probes", "8", "--paced-rate", "4000"]
    argv += ["--recall-queries", "8", "--train-sample", "2000", "--out", str(out)]
    result = bench_scale.main(argv)
    assert json.loads(out.read_text()) == json.loads(json.dumps(result, default=str))
    assert [p["items"] for p in result["points"]] == [3000, 6000] and result["largest"]["items"] == 6000
    for point in result["points"]:
        assert 0.0 <= point["recall_at_10"] <= 1.0 and point["recall_queries"] == 8
        assert point["trained_on"] == 2000 and point["phases"]["instant"]["items"] == point["items"]
        assert point["idle"]["queries"] == 8 and point["during_backfill"]["queries"] >= 1
        keys = ("load_seconds", "backfill_items_per_s", "backfill_alone_items_per_s", "peak_pss_gb", "p99_ratio")
        for key in (*keys, "p99_ratio_paced"):
            assert math.isfinite(point[key]) and point[key] > 0, key
        # nprobe chosen on validation queries: the smallest candidate reaching the goal, or the largest tried
        tried = {int(k): v for k, v in point["nprobe_validation_recall"].items()}
        assert point["nprobe"] in tried and all(n <= 16 for n in tried)
        goal = bench_scale.RECALL_TARGET + bench_scale.VALIDATION_MARGIN
        reached = [n for n, r in tried.items() if r >= goal]
        best = max(tried.values())
        fallback = min(n for n, r in tried.items() if r >= best - bench_scale.RECALL_TIE)
        assert point["nprobe"] == (min(reached) if reached else fallback)
        assert point["paced"]["max_rate"] == 4000 and point["paced"]["during_backfill"]["queries"] >= 1
        assert point["phases_alone"]["instant"]["items"] == point["items"]  # the third run, alone, moved them all
    assert set(result["targets"]) <= set(result["largest"])
    assert all(math.isfinite(v) for k, v in result["growth"].items() if k.startswith("exponent"))


def test_exact_top_k_scans_row_groups_and_matches_a_brute_force_reference(tmp_path):
    import pyarrow.parquet as pq

    from raybackfill.data.schema import embedding_table

    rng = np.random.default_rng(0)
    vectors = rng.standard_normal((500, 8)).astype(np.float32)
    vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
    (tmp_path / "t").mkdir()
    for part, lo in enumerate(range(0, 500, 200)):
        table = embedding_table(np.arange(lo, min(lo + 200, 500)), vectors[lo : lo + 200], model="m")
        pq.write_table(table, tmp_path / "t" / f"part-{part:05d}.parquet", row_group_size=64)
    queries = vectors[:5] + 0.1 * rng.standard_normal((5, 8)).astype(np.float32)
    expected = np.argsort(-(queries @ vectors.T), axis=1, kind="stable")[:, :7]
    assert (bench_scale.exact_topk(str(tmp_path / "t"), queries, 7) == expected).all()
    assert bench_scale.recall_at(expected[:, ::-1], expected) == 1.0
    assert bench_scale.recall_at(expected[:, :1], expected[:, :2]) == 0.5
