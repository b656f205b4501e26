"""benchmarks/bench_http.py for a few seconds on the session's Ray: through the backfill and the shard it kills,
every answer is whole and right, and the only errors are typed 503s inside the outage (no timing assertions)."""

from __future__ import annotations

import json

import numpy as np

from benchmarks import bench_http


def test_the_answer_check_flags_short_wrong_and_reordered_answers():
    work = bench_http.Workload.make(n=300, d=16, n_queries=5, seed=1)
    scores = work.score_of[int(work.queries[0])]
    order = np.argsort(-scores)[: bench_http.K]
    ids, best = (work.ids[order]).tolist(), scores[order].tolist()
    assert work.check(0, ids, best) == "ok"
    assert work.check(0, ids[:-1], best[:-1]) == "short"
    assert work.check(0, ids[:-1] + [ids[0]], best) == "wrong"  # an id twice
    assert work.check(0, [ids[1], ids[0], *ids[2:]], best) == "wrong"  # ids swapped against their scores
    outsider = int(work.ids[np.argsort(-scores)[bench_http.K + 5]])
    assert work.check(0, ids[:-1] + [outsider], best) == "wrong"  # an item that does not score that


def test_a_short_run_through_a_backfill_and_a_shard_kill_has_no_wrong_or_short_answers(ray_cluster, tmp_path):
    out = tmp_path / "bench_http.json"
    result = bench_http.main(
        ["--duration", "3", "--idle", "1.5", "--n", "2000", "--d", "16", "--clients", "3", "--out", str(out)]
    )
    assert json.loads(out.read_text()) == json.loads(json.dumps(result))
    for segment in ("idle_http", "idle_direct", "during_backfill_http"):
        assert result[segment]["answers"] > 0 and result[segment]["wrong"] == result[segment]["short"] == 0
    assert result["wrong_or_short"] == 0
    outage = result["outage"]
    assert outage["shard_down_s"] is not None  # the shard was killed and came back
    assert outage["errors_outside_window"] == outage["other_errors_inside_window"] == 0
    assert outage["retry_after_missing"] == 0
    assert result["backfill"]["items_moved"] > 0
    assert result["ratios"]["http_qps_vs_direct"] > 0
