"""benchmarks/run.py (the suite behind ``raybackfill bench``) at tiny sizes on the session Ray: it writes one JSON
with every key of the issue, each figure finite, and leaves the session's Ray and Ray Data settings as it found
them (no timing assertions: the machine is shared)."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
import ray

from benchmarks import run as suite
from raybackfill import NAMESPACE
from raybackfill.cli.main import build_parser

KEYS = (
    "embed_pipeline_vs_bare",
    "transform_vs_reembed",
    "merged_query_vs_bare_faiss",
    "p99_live_vs_idle",
    "scale_1m",
    "growth",
)


def assert_positive(value, where: str) -> None:
    assert isinstance(value, (int, float)) and math.isfinite(value) and value > 0, f"{where} = {value!r}"


def test_quick_suite_writes_every_key_with_finite_figures(ray_cluster, tmp_path):
    out = tmp_path / "results.json"
    limits = ray.data.DataContext.get_current().execution_options.resource_limits
    returned = suite.main(
        [
            "--quick",
            "--cpus",
            "1",
            "--repeats",
            "1",
            "--images",
            "120",
            "--batch-size",
            "16",
            "--embeddings",
            "3000",
            "--index-n",
            "4000",
            "--sizes",
            "2000,5000",
            "--probes",
            "10",
            "--kinds-n",
            "3000",
            "--factories",
            "Flat;IVF16,SQ8",
            "--out",
            str(out),
        ]
    )

    assert ray.is_initialized(), "the suite must not shut down a Ray it did not start"
    assert ray.data.DataContext.get_current().execution_options.resource_limits == limits
    with pytest.raises(ValueError):
        ray.get_actor(suite.SCALE_INDEX, namespace=NAMESPACE)  # the scale index was destroyed
    result = json.loads(out.read_text())
    assert result == json.loads(json.dumps(returned))
    assert set(KEYS) <= set(result)

    machine = result["machine"]
    assert machine["torch"] and machine["faiss"] and machine["ray"] and machine["numpy_blas"]["name"]
    assert_positive(machine["cpus"], "machine.cpus")
    for key in ("loadavg_start", "loadavg_end"):
        assert len(machine[key]) == 3 and all(math.isfinite(x) for x in machine[key])

    for key in KEYS[:4]:
        assert_positive(result[key]["ratio"], f"{key}.ratio")
        assert len(result[key]["loadavg_start"]) == 3
    merged = result["merged_query_vs_bare_faiss"]
    assert merged["ratio"] == merged["ratio_by_strategy"]["rank_merge"]
    live = result["p99_live_vs_idle"]
    assert_positive(live["ratio_paced"], "p99_live_vs_idle.ratio_paced")
    assert live["ratio_paced"] == live["during_paced_upserts"]["p99_ms"] / live["idle"]["p99_ms"]

    scale = result["scale_1m"]
    assert scale["items"] == 5000 and scale["phases"]["instant"]["items"] == 5000
    for key in ("wall_seconds", "items_per_s", "peak_pss_bytes", "peak_rss_sum_bytes"):
        assert_positive(scale[key], f"scale_1m.{key}")
    assert scale["peak_processes"] > 1  # the driver and the Ray processes it started
    assert scale["query"]["p50_ms"] <= scale["query"]["p99_ms"]

    kinds = result["index_kinds"]
    assert list(kinds["by_factory"]) == ["Flat", "IVF16,SQ8"]
    assert (
        kinds["by_factory"]["Flat"]["recall_at_10"] == 1.0 and kinds["by_factory"]["Flat"]["bare_recall_at_10"] == 1.0
    )
    assert kinds["min_qps_ratio"] == min(k["qps_ratio"] for k in kinds["by_factory"].values())
    for k in kinds["by_factory"].values():  # served by one shard and by two; the faster is the headline
        assert k["qps_ratio"] == k["qps_ratio_by_shards"][str(k["shards"])] == max(k["qps_ratio_by_shards"].values())
        assert math.isfinite(k["one_space_qps_ratio"]) and k["one_space_qps_ratio"] > 0
        for key in ("qps_ratio", "serving_qps_ratio", "one_space_qps_ratio", "transform_qps_ratio"):
            rounds = k[f"{key}_rounds"]
            assert rounds == sorted(rounds) and min(rounds) * (1 - 1e-9) <= k[key] <= max(rounds) * (1 + 1e-9), key
        assert k["one_space_shards"] in (1, 2)
        assert math.isfinite(k["transform_qps_ratio"]) and k["transform_qps_ratio"] > 0
        assert 0.5 <= k["transform_recall_at_10"] <= 1.0
    assert kinds["by_factory"]["IVF16,SQ8"]["bare_bytes_per_item"] < kinds["by_factory"]["Flat"]["bare_bytes_per_item"]

    growth = result["growth"]
    assert growth["items"] == [2000, 5000] and len(growth["points"]) == 2
    for key in ("exponent_backfill_seconds", "exponent_query_p50"):
        assert math.isfinite(growth[key]), key


def test_loglog_exponent_recovers_a_power_law():
    sizes = [100_000, 300_000, 1_000_000]
    assert suite.loglog_exponent(sizes, [3.0 * n**0.5 for n in sizes]) == pytest.approx(0.5)
    assert suite.loglog_exponent(sizes, [7.0, 7.0, 7.0]) == pytest.approx(0.0, abs=1e-12)


def test_too_few_growth_sizes_are_refused():
    parser = build_parser("bench", complete=False)
    with pytest.raises(ValueError, match="at least two"):
        suite.resolve_defaults(parser.parse_args(["bench", "--sizes", "1000"]))


def test_bench_command_takes_the_suite_arguments():
    args = build_parser("bench", complete=False).parse_args(["bench", "--quick", "--out", "r.json", "--cpus", "1"])
    assert (args.quick, args.out, args.cpus) == (True, "r.json", 1)


def bench_console(*argv: str, cwd: Path) -> subprocess.CompletedProcess:
    """The installed console script, as a user runs it (pytest's sys.path does not reach it)."""
    script = Path(sys.executable).with_name("raybackfill")
    return subprocess.run([str(script), "bench", *argv], cwd=cwd, capture_output=True, text=True, timeout=120)


def test_the_bench_console_script_finds_the_suite_from_the_checkout_root():
    done = bench_console("--help", cwd=Path(__file__).resolve().parents[1])
    assert done.returncode == 0, done.stderr
    assert "--quick" in done.stdout and "--sizes" in done.stdout


def test_the_bench_console_script_outside_a_checkout_says_where_to_run_it(tmp_path):
    done = bench_console("--quick", "--out", "r.json", cwd=tmp_path)
    assert done.returncode == 2
    assert "run this command from the root of a source checkout" in done.stderr
