"""benchmarks/bench_index.py --quick on the session Ray: it reuses that Ray, cleans up its index, and writes
every QPS and latency figure as a finite number (no timing assertions: the machine is shared)."""

from __future__ import annotations

import importlib.util
import json
import math
from pathlib import Path

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
