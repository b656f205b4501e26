"""docs/benchmarks.md is what docs/make_benchmarks.py makes of the results in docs/benchmarks/ (never edited by
hand), and it covers every key the suite writes."""

import importlib.util
import sys
from pathlib import Path

from benchmarks.run import TARGETS

DOCS = Path(__file__).resolve().parent.parent / "docs"


def _script():
    spec = importlib.util.spec_from_file_location("make_benchmarks", DOCS / "make_benchmarks.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


def test_the_benchmarks_page_is_regenerated_from_the_kept_results():
    assert (DOCS / "benchmarks.md").read_text() == _script().render(), "run: python docs/make_benchmarks.py"


def test_the_page_has_a_row_for_every_key_of_the_suite_with_its_target():
    script = _script()
    latest = script.load_runs()[-1]
    assert set(TARGETS) <= set(script.KEYS), "describe the new key in docs/make_benchmarks.py KEYS"
    page = script.render()
    for key in script.KEYS:
        row = next(line for line in page.splitlines() if line.startswith(f"| `{key}` |"))
        assert latest["targets"].get(key, "-") in row.replace("\\|", "|")


def test_the_page_states_the_machine_and_load_of_the_run_it_shows():
    script = _script()
    latest = script.load_runs()[-1]
    page = script.render()
    assert f"{latest['machine']['loadavg_start'][0]:.1f}" in page
    assert f"{latest['machine']['cpus']} cores" in page and latest["machine"]["faiss"] in page


def test_the_scale_section_shows_each_size_and_judges_the_largest_against_its_targets():
    script = _script()
    point = {
        "items": 0, "load_seconds": 10.0, "backfill_items_per_s": 25_000.0, "peak_pss_gb": 17.5,
        "recall_at_10": 0.93, "idle": {"p50_ms": 4.0, "p99_ms": 10.0},
        "during_backfill": {"p50_ms": 6.0, "p99_ms": 25.0}, "p99_ratio": 2.5,
        "loadavg_start": [1.0], "loadavg_end": [2.0],
    }  # fmt: skip
    points = [{**point, "items": 1_000_000}, {**point, "items": 10_000_000}]
    run = {
        "_file": "scale/x.json", "date_utc": "2026-12-04T20:00:00Z", "seconds": 600.0, "points": points,
        "largest": points[-1], "targets": {"peak_pss_gb": "< 16", "recall_at_10": ">= 0.90",
        "backfill_items_per_s": ">= 20000", "p99_ratio": "<= 2.0"},
        "config": {"dim": 128, "clusters": 4096, "shards": 4, "index": "IVF1024,SQ8", "nprobe": 32,
                   "train_sample": 100_000, "strategy": "compatible", "k": 10, "sizes": [1_000_000, 10_000_000]},
        "growth": {"items": [1_000_000, 10_000_000], "exponent_load_seconds": 1.0, "exponent_backfill_seconds": 0.9,
                   "exponent_peak_pss": 0.8, "exponent_idle_p50": 0.5},
    }  # fmt: skip
    lines = script._scale([run])
    rows = [line for line in lines if line.startswith("| 1") and "," in line.split("|")[1]]
    assert [row.split("|")[1].strip() for row in rows] == ["1,000,000", "10,000,000"]
    verdicts = {line.split("`")[1]: line.rsplit("(", 1)[1] for line in lines if line.startswith("- `")}
    assert verdicts == {
        "peak_pss_gb": "misses)",
        "recall_at_10": "meets)",
        "backfill_items_per_s": "meets)",
        "p99_ratio": "misses)",
    }
    assert script._scale([]) == []


def test_each_index_kind_is_judged_against_the_qps_target_per_query():
    script = _script()
    assert script._verdict(0.93, [0.85, 0.95], 0.9) == "meets"
    assert script._verdict(0.86, [0.84, 0.91], 0.9) == "within the spread"
    assert script._verdict(0.86, [0.84, 0.88], 0.9) == "misses"
    assert script._verdict(0.86, None, 0.9) == "misses"
    kind = {
        "one_space_qps_ratio": 0.95, "one_space_qps_ratio_rounds": [0.9, 0.96],
        "transform_qps_ratio": 0.88, "transform_qps_ratio_rounds": [0.85, 0.92],
        "qps_ratio": 0.6, "qps_ratio_rounds": [0.55, 0.62], "split_qps_ratio": 0.65,
        "serving_qps_ratio": 0.92, "serving_qps_ratio_rounds": [0.9, 0.93],
    }  # fmt: skip
    lines = script._kinds_verdicts({"target_qps_ratio": 0.9, "by_factory": {"IVF1024,PQ32": kind}})
    assert lines[-1] == (
        "- `IVF1024,PQ32`: one space 0.950 (meets), transform path 0.880 (within the spread), two spaces 0.600 "
        "(misses) = split 0.65 x serving 0.920 (meets)"
    )
    # A graph kind's transform path also against bare FAISS with the same replaced rows.
    graph = {**kind, "transform_replaced_qps_ratio": 0.85, "transform_serving_qps_ratio": 0.93}
    lines = script._kinds_verdicts({"target_qps_ratio": 0.9, "by_factory": {"HNSW32": graph}})
    assert "transform path 0.880 (within the spread) = replaced rows 0.85 x serving 0.930 (meets)," in lines[-1]


def test_the_reproduce_block_states_how_long_the_newest_kept_run_of_each_size_took():
    duration = _script()._duration
    runs = [
        {"config": {"quick": False}, "seconds": 3000},
        {"config": {"quick": True}, "seconds": 20},
        {"config": {"quick": False}, "seconds": 3330},
    ]
    assert duration(runs, quick=False) == "~56 min on this page's machine"
    assert duration(runs, quick=True) == "~1 min on this page's machine"  # under a minute still reads as one
    assert duration(runs[:1], quick=True) == "not run yet"


def _plan_run(plan_bytes: int) -> dict:
    return {
        "_file": "plan/bench_backfill_plan.json",
        "date_utc": "2026-01-01T00:00:00Z",
        "config": {"plan_images": 1000, "plan_size": 64, "repeats": 3},
        "machine": {"loadavg_start": [0.5, 0, 0], "loadavg_end": [1.0, 0, 0]},
        "plan_storage": {
            "what": "policy random",
            "planned_items": 1000,
            "gallery_bytes": 2_000_000,
            "plan_bytes": plan_bytes,
            "plan_fraction": plan_bytes / 2_000_000,
            "former_plan_bytes": 2_010_000,
            "former_plan_fraction": 1.005,
            "target_fraction": 0.02,
            "plan_seconds": [3.0, 1.0, 2.0],
            "former_plan_seconds": [4.0, 6.0, 5.0],
        },
    }


def test_the_plan_section_shows_the_latest_plan_run_against_the_gallery_and_judges_the_target():
    script = _script()
    lines = script._plan([_plan_run(90_000), _plan_run(12_000)])  # oldest first: the second is shown
    text = "\n".join(lines)
    assert "| plan: ids, ranks and where each row lives | 12,000 | 12.0 | 0.60 % |" in text
    assert "| former plan: the rows copied into tiers | 2,010,000 | 2,010.0 | 100.50 % |" in text
    assert "| the gallery | 2,000,000 | 2,000.0 | 100.00 % |" in text
    assert "< 2 % of the gallery's bytes: 0.60 % (meets)" in text
    assert "images average more than 600 bytes meets it" in text  # 12 bytes per item / 2 %
    assert "the plan 2.0 s, the former copy 5.0 s" in text  # medians
    assert "--plan-images 1000 --plan-size 64 --repeats 3" in text
    assert "(misses)" in "\n".join(script._plan([_plan_run(40_000)]))  # 2.00 % is not under 2 %
    assert script._plan([]) == []
