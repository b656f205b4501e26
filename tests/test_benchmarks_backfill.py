"""benchmarks/bench_backfill.py --quick on the session Ray: it reuses that Ray, leaves Ray Data's resource limits
as it found them, and writes both ratios and every rate as finite positive numbers (no timing assertions:
the machine is shared)."""

from __future__ import annotations

import argparse
import importlib.util
import json
import math
from pathlib import Path

import numpy as np
import pytest
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
        [
            "--quick",
            "--images",
            "200",
            "--size",
            "16",
            "--embeddings",
            "4000",
            "--transform-batch-size",
            "1000",
            "--batch-size",
            "16",
            "--cpus",
            "2",
            "--repeats",
            "1",
            "--reembed-also",
            "resnet18:40",
            "--out",
            str(out),
        ]
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
    for key in ("pipeline_steady_items_per_s", "bare_steady_items_per_s", "ratio_steady", "pipeline_startup_seconds"):
        assert_positive(embed[key], key)
    assert math.isclose(embed["ratio_steady"], embed["pipeline_steady_items_per_s"] / embed["bare_steady_items_per_s"])
    assert embed["pipeline_startup_seconds"] < min(embed["pipeline_seconds_2x"])
    assert math.isclose(embed["ratio"], embed["pipeline_items_per_s"] / embed["bare_items_per_s"])

    transform = result["transform_vs_reembed"]
    assert set(transform["by_backbone"]) == {"small_cnn", "resnet18"}
    assert transform["by_backbone"]["resnet18"]["reembed_images"] == 40
    headline = transform["by_backbone"]["small_cnn"]  # the --backbone's figures are the top-level ones
    assert all(transform[key] == value for key, value in headline.items())
    for figures in transform["by_backbone"].values():
        for key in ("ratio", "transform_items_per_s", "reembed_items_per_s"):
            assert_positive(figures[key], key)
        assert math.isclose(figures["ratio"], figures["transform_items_per_s"] / figures["reembed_items_per_s"])
        assert len(figures["reembed_seconds_2x"]) == result["config"]["repeats"]
        if figures["ratio_steady"] is not None:
            assert math.isclose(
                figures["ratio_steady"], figures["transform_steady_items_per_s"] / figures["reembed_steady_items_per_s"]
            )
    assert_positive(transform["compute_bound_ratio"], "compute_bound_ratio")
    plan = result["plan_storage"]  # --quick: 1000 JPEGs of 64x64
    assert plan["planned_items"] == 1000 and plan["gallery_bytes_per_image"] > 500
    assert plan["former_plan_bytes"] > plan["gallery_bytes"] > 20 * plan["plan_bytes"] > 0
    assert math.isclose(
        transform["compute_bound_ratio"], transform["bare_transform_items_per_s"] / embed["bare_items_per_s"]
    )


def test_reembed_backbones_are_parsed_and_unknown_ones_refused():
    parse = load_benchmark().backbone_sizes
    assert parse("resnet18:1000, small_cnn:20") == [("resnet18", 1000), ("small_cnn", 20)]
    assert parse("") == []
    for bad in ("resnet18", "resnet18:0", "vgg:10", "resnet18:ten"):
        with pytest.raises(argparse.ArgumentTypeError, match=bad):
            parse(bad)


def test_steady_rate_is_the_slope_over_the_middle_of_the_rows_and_ignores_start_and_tail():
    middle_slope = load_benchmark().middle_slope
    # 10 batches of 100 rows: a 5 s start, then one batch every 0.5 s (200 rows/s), then a slow last batch.
    seconds = np.array([5.0 + 0.5 * i for i in range(9)] + [20.0])
    delivered = np.arange(1, 11) * 100
    assert middle_slope(seconds, delivered) == pytest.approx(200.0)
    with pytest.raises(ValueError, match="too few batches"):
        middle_slope(np.array([1.0, 2.0]), np.array([100, 200]))
