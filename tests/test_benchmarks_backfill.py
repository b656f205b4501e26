"""benchmarks/bench_backfill.py --quick on the session Ray: it reuses that Ray, leaves Ray Data's resource limits
as it found them, and writes both ratios and every rate as finite positive numbers (no timing assertions:
the machine is shared)."""

from __future__ import annotations

import importlib.util
import json
import math
from pathlib import Path

import ray

REPO = Path(__file__).resolve().parents[1]


def load_benchmark():
    spec = importlib.util.spec_from_file_location("bench_backfill", REPO / "benchmarks" / "bench_backfill.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def assert_positive(value, where: str) -> None:
    assert isinstance(value, (int, float)) and math.isfinite(value) and value > 0, f"{where} = {value!r}"


def test_quick_run_reports_both_ratios_against_the_best_bare_baseline(ray_cluster, tmp_path):
    out = tmp_path / "bench.json"
    limits = ray.data.DataContext.get_current().execution_options.resource_limits
    # Tiny sizes keep the test to seconds; explicit flags beat --quick. Two CPUs: both bare baselines run.
    returned = load_benchmark().main(
        ["--quick", "--images", "200", "--size", "16", "--embeddings", "4000", "--transform-batch-size", "1000",
         "--batch-size", "64", "--cpus", "2", "--repeats", "1", "--out", str(out)]
    )

    assert ray.is_initialized(), "the benchmark must not shut down a Ray it did not start"
    assert ray.data.DataContext.get_current().execution_options.resource_limits == limits
    result = json.loads(out.read_text())
    assert result == json.loads(json.dumps(returned))
    assert (result["config"]["images"], result["config"]["embeddings"]) == (200, 4000)

    machine = result["machine"]
    assert machine["torch"] and machine["faiss"] and machine["numpy"]
    assert_positive(machine["cpus"], "machine.cpus")
    for key in ("loadavg_start", "loadavg_end"):
        assert len(machine[key]) == 3 and all(math.isfinite(x) for x in machine[key])

    embed = result["embed_pipeline_vs_bare"]
    assert set(embed["bare_items_per_s_by_config"]) == {"1 process x 2 threads", "2 processes x 1 thread"}
    assert embed["baseline"] == max(embed["bare_items_per_s_by_config"], key=embed["bare_items_per_s_by_config"].get)
    for key in ("ratio", "pipeline_items_per_s", "bare_items_per_s"):
        assert_positive(embed[key], key)
    assert len(embed["pipeline_seconds_2x"]) == len(embed["bare_seconds_2x"]) == result["config"]["repeats"]
    if embed["ratio_steady"] is not None:  # None when noise made the 2N run no slower than the N run
        for key in ("pipeline_steady_items_per_s", "bare_steady_items_per_s", "ratio_steady"):
            assert_positive(embed[key], key)
        assert math.isclose(embed["ratio_steady"],
                            embed["pipeline_steady_items_per_s"] / embed["bare_steady_items_per_s"])
    assert math.isclose(embed["ratio"], embed["pipeline_items_per_s"] / embed["bare_items_per_s"])

    transform = result["transform_vs_reembed"]
    for key in ("ratio", "transform_items_per_s", "reembed_items_per_s"):
        assert_positive(transform[key], key)
    assert math.isclose(transform["ratio"], transform["transform_items_per_s"] / transform["reembed_items_per_s"])
