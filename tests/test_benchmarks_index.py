"""benchmarks/bench_index.py --quick on the session Ray: it reuses that Ray, cleans up its index, and writes
every QPS and latency figure as a finite number (no timing assertions: the machine is shared)."""

from __future__ import annotations

import importlib.util
import json
import math
from pathlib import Path

import numpy as np
import pytest
import ray

from raybackfill import NAMESPACE

REPO = Path(__file__).resolve().parents[1]


def load_benchmark():
    spec = importlib.util.spec_from_file_location("bench_index", REPO / "benchmarks" / "bench_index.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def assert_finite(value, where: str) -> None:
    assert isinstance(value, (int, float)) and math.isfinite(value), f"{where} = {value!r}"


def test_quick_run_reuses_the_session_ray_and_reports_latency_idle_and_during_upserts(ray_cluster, tmp_path):
    out = tmp_path / "bench.json"
    # One CPU in total (0.5 per shard) leaves room on the 2-CPU session cluster; explicit flags beat --quick.
    returned = load_benchmark().main(["--quick", "--cpus", "1", "--repeats", "1", "--out", str(out)])

    assert ray.is_initialized(), "the benchmark must not shut down a Ray it did not start"
    with pytest.raises(ValueError):
        ray.get_actor("bench-index", namespace=NAMESPACE)  # its index was destroyed
    result = json.loads(out.read_text())
    assert result == json.loads(json.dumps(returned))
    config = result["config"]
    assert (config["n"], config["queries"], config["latency_probes"]) == (50_000, 200, 100)
    assert (config["cpus"], config["repeats"]) == (1, 1)

    machine = result["machine"]
    assert machine["faiss"] and machine["numpy"] and machine["numpy_blas"]["name"]
    assert any("blas" in name for name in machine["blas_libraries_loaded"])  # Linux: read from /proc/self/maps
    assert_finite(machine["cpus"], "machine.cpus")
    for key in ("loadavg_start", "loadavg_end"):
        assert len(machine[key]) == 3
        for x in machine[key]:
            assert_finite(x, f"machine.{key}")

    assert_finite(result["baseline"]["qps"], "baseline.qps")
    assert result["index"]["beta0_old_ids_equal_to_bare"] >= 0.99  # float ties may swap a pair
    for strategy in ("old", "compatible", "rank_merge"):
        assert_finite(result["index"]["strategies_at_beta"][strategy]["ratio_to_bare"], strategy)

    latency = result["latency"]
    for phase in ("idle", "during_upserts", "during_paced_upserts"):
        p50, p99 = latency[phase]["p50_ms"], latency[phase]["p99_ms"]
        assert_finite(p50, f"{phase}.p50_ms")
        assert_finite(p99, f"{phase}.p99_ms")
        assert 0 < p50 <= p99
    during = latency["during_upserts"]
    assert_finite(during["upserts_per_s"], "upserts_per_s")
    assert during["upsert_calls"] >= 1 and during["upsert_items"] >= during["upsert_calls"]
    assert during["upserts_per_s"] > 0 and during["items_still_old_before"] == 25_000
    assert_finite(latency["p99_ratio"], "p99_ratio")
    assert latency["p99_ratio"] == pytest.approx(during["p99_ms"] / latency["idle"]["p99_ms"])
    paced = latency["during_paced_upserts"]
    assert paced["paced_rate"] == 20_000 and paced["upsert_calls"] >= 1
    # the pace holds: the thread sleeps off any lead, so it never runs ahead by more than one batch
    assert paced["upsert_items"] <= paced["paced_rate"] * paced["upsert_seconds"] + 10_000
    assert latency["p99_ratio_paced"] == pytest.approx(paced["p99_ms"] / latency["idle"]["p99_ms"])


def test_kinds_run_compares_each_factory_with_bare_faiss_on_the_session_ray(ray_cluster, tmp_path):
    out = tmp_path / "kinds.json"
    bench = load_benchmark()
    argv = ["--n", "2000", "--queries", "40", "--train-size", "2000", "--clusters", "20", "--cpus", "1"]
    returned = bench.kinds_main(
        [*argv, "--repeats", "2", "--shards", "2,1", "--factories", "Flat;IVF8,SQ8;HNSW16", "--out", str(out)]
    )

    assert ray.is_initialized(), "the benchmark must not shut down a Ray it did not start"
    with pytest.raises(ValueError):
        ray.get_actor(bench.KINDS_INDEX, namespace=NAMESPACE)  # its index was destroyed
    result = json.loads(out.read_text())
    assert result == json.loads(json.dumps(returned))
    kinds = result["kinds"]
    assert list(kinds) == ["Flat", "IVF8,SQ8", "HNSW16"]
    # Exact search through the router finds exactly what exact search finds; the same vectors, moved or not.
    assert kinds["Flat"]["index"]["recall_at_10"] == 1.0 and kinds["Flat"]["bare"]["recall_at_10"] == 1.0
    assert kinds["Flat"]["bare"]["bytes_per_item"] == pytest.approx(128 * 4, rel=0.01)
    assert kinds["IVF8,SQ8"]["bare"]["bytes_per_item"] < kinds["Flat"]["bare"]["bytes_per_item"] / 2  # 8-bit codes
    assert kinds["IVF8,SQ8"]["search_params"] == {"nprobe": 16} and kinds["HNSW16"]["search_params"] == {"efSearch": 64}
    for name, k in kinds.items():
        assert_finite(k["bare"]["qps"], f"{name}.bare.qps")
        # Served by 1 shard and by 2; the headline is the better ratio of the two.
        assert sorted(k["by_shards"]) == ["1", "2"]
        fastest = max(k["by_shards"], key=lambda s: k["by_shards"][s]["qps_ratio"])
        assert k["shards"] == int(fastest) and k["qps_ratio"] == k["by_shards"][fastest]["qps_ratio"]
        assert k["bare"]["qps"] == k["by_shards"][fastest]["bare"]["qps"]
        ratios = {s: run["one_space_qps_ratio"] for s, run in k["by_shards"].items()}
        assert k["one_space_qps_ratio"] == max(ratios.values()) == ratios[str(k["one_space_shards"])]
        ratios = {s: run["transform_qps_ratio"] for s, run in k["by_shards"].items()}
        assert k["transform_qps_ratio"] == max(ratios.values()) == ratios[str(k["transform_shards"])]
        for shards, run in k["by_shards"].items():
            assert run["index"]["shards"] == int(shards) and run["index"]["moved"] == 1000
            assert 0.5 <= run["index"]["recall_at_10"] <= 1.0 and 0.5 <= k["bare"]["recall_at_10"] <= 1.0, name
            assert_finite(run["index"]["qps"], f"{name}.{shards}.qps")
            # Each ratio divides by the bare index timed in the same interleaved rounds.
            assert run["qps_ratio"] == pytest.approx(run["index"]["qps"] / run["bare"]["qps"])
            assert run["bare"]["qps"] == max(run["bare"]["qps_by_threads"].values())
            # The same FAISS work without the serving system: shards x (old, new) bare parts, merged with numpy.
            assert run["bare_parts"]["parts"] == 2 * int(shards)
            assert_finite(run["bare_parts"]["qps"], f"{name}.{shards}.bare_parts.qps")
            assert run["split_qps_ratio"] * run["serving_qps_ratio"] == pytest.approx(run["qps_ratio"])
            # Each ratio paired within each of the 2 rounds, sorted; best against best lies between the two.
            for key in ("qps_ratio", "serving_qps_ratio", "one_space_qps_ratio", "transform_qps_ratio"):
                rounds = run[f"{key}_rounds"]
                assert len(rounds) == 2 and rounds == sorted(rounds), key
                assert rounds[0] * (1 - 1e-9) <= run[key] <= rounds[1] * (1 + 1e-9), key
            # Before the moves: the old space alone, merged across the shards, against the bare index.
            assert_finite(run["index"]["one_space_qps"], f"{name}.{shards}.one_space_qps")
            assert run["one_space_qps_ratio"] == pytest.approx(
                run["index"]["one_space_qps"] / run["one_space_bare"]["qps"]
            )
            assert 0.5 <= run["index"]["one_space_recall_at_10"] <= 1.0, name
            # The same searches through the router (the benchmark checks that both paths answer the same).
            assert run["router_qps_ratio"] == pytest.approx(run["index"]["router_qps"] / run["bare"]["qps"])
            assert_finite(run["router_one_space_qps_ratio"], f"{name}.{shards}.router_one_space_qps_ratio")
            # The transform path: the 1000 items still old are transformed, every other one of them re-embedded in
            # place; every item then answers from the new space, against the bare index of the same rounds.
            assert run["index"]["transformed"] == 1000 and run["index"]["reembedded_in_place"] == 500
            assert run["transform_qps_ratio"] == pytest.approx(
                run["index"]["transform_qps"] / run["transform_bare"]["qps"]
            )
            assert 0.5 <= run["index"]["transform_recall_at_10"] <= 1.0, name
            assert_finite(run["router_transform_qps_ratio"], f"{name}.{shards}.router_transform_qps_ratio")
            # Half the items moved with keep_old: the router holds their old vectors too.
            assert run["index"]["bytes_per_item_held"] > run["index"]["bytes_per_item_served"]
    for run in kinds["Flat"]["by_shards"].values():
        assert run["bare_parts"]["recall_at_10"] == 1.0 and run["index"]["recall_at_10"] == 1.0
        assert run["index"]["one_space_recall_at_10"] == 1.0 and run["index"]["transform_recall_at_10"] == 1.0
        assert run["index"]["deleted_rows_new_space"] == 0  # a flat index removes its replaced rows
    # A graph cannot remove: the replaced rows stay as deleted rows (below the rebuild fraction) and are filtered.
    for run in kinds["HNSW16"]["by_shards"].values():
        assert run["index"]["deleted_rows_new_space"] == 500
        # Bare FAISS with the same rows: the same adds, the 500 replaced rows excluded by a selector.
        replaced = run["transform_bare_replaced"]
        assert replaced["rows"] == 2500 and replaced["replaced_rows"] == 500
        assert 0.5 <= replaced["recall_at_10"] <= 1.0
        assert run["transform_replaced_qps_ratio"] * run["transform_serving_qps_ratio"] == pytest.approx(
            run["transform_qps_ratio"]
        )
        assert len(run["transform_serving_qps_ratio_rounds"]) == 2
    hnsw = kinds["HNSW16"]
    assert (
        hnsw["transform_serving_qps_ratio"]
        == hnsw["by_shards"][str(hnsw["transform_shards"])]["transform_serving_qps_ratio"]
    )
    # A kind that removes rows has no such side: its bare index after the replacements is the bare index.
    assert not any(key.startswith("transform_serving") for run in kinds["Flat"]["by_shards"].values() for key in run)
    # One training, one partition: the router and its bare parts probe the same lists.
    for run in kinds["IVF8,SQ8"]["by_shards"].values():
        assert run["bare_parts"]["recall_at_10"] == pytest.approx(run["index"]["recall_at_10"], abs=0.02)


def test_clustered_rows_are_unit_vectors_around_their_centres():
    rows = load_benchmark().clustered_rows(np.random.default_rng(0), 5000, 16, clusters=5)
    np.testing.assert_allclose(np.linalg.norm(rows, axis=1), 1.0, rtol=1e-5)
    # Five tight clusters: every row is far closer to some other row than random unit vectors would be.
    sims = rows[:200] @ rows.T
    np.fill_diagonal(sims[:, :200], -1)
    assert np.median(sims.max(axis=1)) > 0.9


def test_interleaved_rounds_rotate_the_order_and_keep_each_sides_best_run():
    bench = load_benchmark()
    calls: list[str] = []

    def side(name: str, result: int):
        def run() -> int:
            calls.append(name)
            return result

        return run

    best = bench.interleaved(3, {"a": side("a", 1), "b": side("b", 2), "c": side("c", 3)})
    assert calls == ["a", "b", "c", "b", "c", "a", "c", "a", "b"]  # each side leads one round
    assert {name: out for name, (_, out) in best.items()} == {"a": 1, "b": 2, "c": 3}
    assert all(np.isfinite(seconds) for seconds, _ in best.values())
    times: dict[str, list[float]] = {}
    bench.interleaved(2, {"a": side("a", 1), "b": side("b", 2)}, times)
    assert sorted(times) == ["a", "b"] and all(len(t) == 2 and min(t) > 0 for t in times.values())
    # warm: each timed run right after an untimed run of the same side; only the timed runs are recorded.
    calls.clear()
    warm_times: dict[str, list[float]] = {}
    bench.interleaved(2, {"a": side("a", 1), "b": side("b", 2)}, warm_times, warm=True)
    assert calls == ["a", "a", "b", "b", "b", "b", "a", "a"]
    assert all(len(t) == 2 for t in warm_times.values())
    # Paired within a round: the fastest bare thread count of that round over the side's seconds, sorted.
    paired = {"bare@1": [4.0, 3.0, 6.0], "bare@2": [2.0, 5.0, 3.0], "searcher": [4.0, 4.0, 2.0], "router": [9, 9, 9]}
    assert bench.paired_ratios(paired, "searcher", "bare") == [0.5, 0.75, 1.5]
    # The fastest thread count of one side; other contenders are not its own.
    fast = bench.fastest({"bare@1": (2.0, "one"), "bare@2": (0.5, "two"), "other": (0.1, None)}, "bare", 100)
    assert fast == {
        "threads": 2,
        "search_seconds": 0.5,
        "qps": 200.0,
        "qps_by_threads": {1: 50.0, 2: 200.0},
        "ids": "two",
    }
