"""report.json: schema, JSON round trip, tables, merging and side-by-side comparison."""

import json

import numpy as np
import pytest

from raybackfill.eval.curves import BackfillCurve
from raybackfill.eval.metrics import RetrievalResult
from raybackfill.eval.report import (
    Run,
    adapter_section,
    build_report,
    compare_reports,
    load_report,
    merge_reports,
    save_report,
    summary_table,
    validate_report,
    versus_random,
)


def anchor(top1, map_, metric="cosine", n=4):
    kept = np.ones(n + 1, bool)
    kept[-1] = False  # one dropped query
    return RetrievalResult(
        metric, "leave_one_out", top1, top1 + 0.1, map_, map_ / 2, kept, np.ones(n, bool), np.ones(n)
    )


def curve(top1, map_, nfr=(0.0, 0.1, 0.05)):
    return BackfillCurve(
        np.array([0.0, 0.5, 1.0]), np.array(top1), np.array(top1) + 0.05, np.array(map_), np.array(nfr)
    )


def runs():
    return [
        Run("fct", "random", "compatible", curve([0.4, 0.5, 0.8], [0.2, 0.3, 0.5])),
        Run("fastfill", "uncertainty", "compatible", curve([0.4, 0.7, 0.8], [0.2, 0.4, 0.5])),
    ]


ANCHORS = {"old_old": anchor(0.4, 0.2), "new_new": anchor(0.8, 0.5), "new_old": anchor(0.3, 0.1)}


def test_report_follows_the_schema_with_summaries_per_run():
    report = build_report(ANCHORS, runs(), online={"query_errors": 0})
    assert (report["metric"], report["protocol"], report["auc"]) == ("cosine", "leave_one_out", "mean over even grid")
    assert report["queries"] == {"evaluated": 4, "dropped": 1}
    assert report["anchors"]["old_old"] == {"top1": 0.4, "top5": 0.5, "map": 0.2, "map_at_r": 0.1}
    assert set(report["anchors"]) == {"old_old", "new_new", "new_old"}
    assert report["online"] == {"query_errors": 0}
    ff = report["runs"][1]
    assert (ff["method"], ff["policy"], ff["strategy"]) == ("fastfill", "uncertainty", "compatible")
    assert ff["betas"] == [0.0, 0.5, 1.0] and ff["top1"] == [0.4, 0.7, 0.8]
    assert ff["auc_top1"] == pytest.approx(1.9 / 3)
    assert ff["auc_top1_trapezoid"] == pytest.approx(0.25 * 1.1 + 0.25 * 1.5)
    assert ff["relative_gain_top1"] == pytest.approx((1.9 / 3 - 0.4) / 0.4)
    assert ff["relative_gain_map"] == pytest.approx((1.1 / 3 - 0.2) / 0.3)
    assert (ff["max_nfr"], ff["final_top1"], ff["final_map"]) == (0.1, 0.8, 0.5)
    assert "online" not in build_report(ANCHORS, runs())


def test_undefined_gain_is_null_and_report_is_strict_json(tmp_path):
    report = build_report({"old_old": anchor(0.5, 0.3), "new_new": anchor(0.5, 0.3)}, runs())
    assert report["runs"][0]["relative_gain_top1"] is None
    path = save_report(report, str(tmp_path / "out" / "report.json"))
    assert load_report(path) == report
    json.loads((tmp_path / "out" / "report.json").read_text())


def test_anchors_must_share_metric_and_be_complete():
    with pytest.raises(ValueError, match="anchors need 'new_new'"):
        build_report({"old_old": anchor(0.4, 0.2)}, runs())
    with pytest.raises(ValueError, match="anchor new_new was evaluated with l2"):
        build_report({"old_old": anchor(0.4, 0.2), "new_new": anchor(0.8, 0.5, metric="l2")}, runs())


def test_validation_names_what_is_missing():
    report = build_report(ANCHORS, runs())
    del report["runs"][0]["auc_map"]
    with pytest.raises(ValueError, match=r"run 0 lacks \['auc_map'\]"):
        validate_report(report)
    report = build_report(ANCHORS, runs())
    report["runs"][1]["nfr"].pop()
    with pytest.raises(ValueError, match="fastfill/uncertainty.*curve lengths differ"):
        validate_report(report)


def test_summary_table_as_text_and_markdown():
    report = build_report(ANCHORS, runs())
    text = summary_table(report)
    assert "metric cosine, protocol leave_one_out, 4 queries (1 dropped" in text
    lines = text.splitlines()
    ff_line = next(line for line in lines if line.startswith("fastfill"))
    assert ff_line.split()[:3] == ["fastfill", "uncertainty", "compatible"]
    assert "0.633" in ff_line  # AUC top1
    md = summary_table(report, markdown=True)
    table = [line for line in md.splitlines() if line.startswith("|")]
    # anchors: header, rule, 3 rows; runs: header, rule, 2 rows; then the 8 papers' findings
    assert len(table) == 2 + 3 + 2 + 2 + 2 + 8
    assert len({line.count("|") for line in table[5:9]}) == 1
    assert md.rstrip().splitlines()[-1].startswith("| rank merge: psi")
    assert "| the new model retrieves better than the old (top1) | new/new " in md


def test_summary_table_has_the_diagnostics_before_the_findings_when_the_report_has_them():
    report = build_report(ANCHORS, runs())
    assert "diagnostic" not in summary_table(report)
    report["diagnostics"] = {"fastfill_uncertainty_spearman": 0.4461, "fastfill_uncertainty_spearman_norm": 0.7006}
    text = summary_table(report)
    last = text[: text.index("the papers' directions")].rstrip().splitlines()[-2:]
    assert [line.split() for line in last] == [
        ["fastfill_uncertainty_spearman", "0.446"],
        ["fastfill_uncertainty_spearman_norm", "0.701"],
    ]


def test_merge_concatenates_runs_of_the_same_evaluation():
    all_runs = runs()
    first = build_report(ANCHORS, all_runs[:1], online={"query_errors": 0})
    second = build_report(ANCHORS, all_runs[1:])
    merged = merge_reports([first, second])
    assert [r["method"] for r in merged["runs"]] == ["fct", "fastfill"]
    assert merged["online"] == {"query_errors": 0}
    assert merged == build_report(ANCHORS, all_runs, online={"query_errors": 0})
    with pytest.raises(ValueError, match="fct/random/compatible appears twice"):
        merge_reports([first, first])
    other = build_report({"old_old": anchor(0.4, 0.2, "l2"), "new_new": anchor(0.8, 0.5, "l2")}, all_runs[1:])
    with pytest.raises(ValueError, match="metric='l2'"):
        merge_reports([first, other])


def test_merge_keeps_every_reports_diagnostics_and_refuses_conflicting_ones():
    all_runs = runs()
    first, second = build_report(ANCHORS, all_runs[:1]), build_report(ANCHORS, all_runs[1:])
    first["diagnostics"], second["diagnostics"] = {"a": 0.5}, {"a": 0.5, "b": -0.25}
    assert merge_reports([first, second])["diagnostics"] == {"a": 0.5, "b": -0.25}
    assert "diagnostics" not in merge_reports([build_report(ANCHORS, all_runs[:1])])
    second["diagnostics"]["a"] = 0.75
    with pytest.raises(ValueError, match="report 1: diagnostic a differs"):
        merge_reports([first, second])


def test_compare_puts_reports_side_by_side_and_marks_missing_runs():
    a = build_report(ANCHORS, runs())
    b = build_report(ANCHORS, runs()[1:])
    text = compare_reports({"cifar": a, "tiny": b}, keys=("auc_top1", "max_nfr"))
    assert "cifar: metric cosine" in text and "tiny: metric cosine" in text
    header = next(line for line in text.splitlines() if line.startswith("method"))
    assert "cifar: AUC top1" in header and "tiny: max NFR" in header
    fct = next(line for line in text.splitlines() if line.startswith("fct"))
    assert fct.split()[-2:] == ["-", "-"]
    with pytest.raises(ValueError, match="unknown summary keys"):
        compare_reports({"a": a}, keys=("auc",))


def test_orders_are_judged_against_the_band_of_random_seeds():
    seed_aucs = {0: (0.55, 0.33), 1: (0.60, 0.35), 2: (0.65, 0.37)}  # top-1 mean 0.60, sd 0.05; mAP 0.35, 0.02
    with_band = [
        Run("fastfill", "random", "compatible", curve([0.4, 0.5, 0.8], [0.2, 0.3, 0.5]), seed_aucs),
        Run("fastfill", "uncertainty", "compatible", curve([0.4, 0.7, 0.8], [0.2, 0.4, 0.5])),
        Run("fct", "entropy", "compatible", curve([0.4, 0.7, 0.8], [0.2, 0.4, 0.5])),  # no random band: skipped
    ]
    report = build_report(ANCHORS, with_band)
    assert report["runs"][0]["seed_aucs"] == {
        "seeds": [0, 1, 2],
        "auc_top1": [0.55, 0.6, 0.65],
        "auc_map": [0.33, 0.35, 0.37],
    }
    assert "seed_aucs" not in report["runs"][1]
    (row,) = versus_random(report)
    assert (row["method"], row["policy"], row["random_seeds"]) == ("fastfill", "uncertainty", 3)
    assert row["auc_top1"] == pytest.approx(1.9 / 3)
    assert (row["auc_top1_random_mean"], row["auc_top1_random_sd"]) == (pytest.approx(0.6), pytest.approx(0.05))
    assert row["auc_top1_z"] == pytest.approx((1.9 / 3 - 0.6) / 0.05)
    assert row["auc_map_z"] == pytest.approx((1.1 / 3 - 0.35) / 0.02)
    table = summary_table(report)
    assert "orders against 3 random orders" in table and "0.600 ± 0.050" in table and "+0.7" in table
    # One seed is no band: nothing to judge against.
    assert versus_random(build_report(ANCHORS, runs())) == []


def test_adapter_section_judges_each_map_against_old_old_by_hand():
    gate = {"score": {"k": 10, "recall": 0.9, "pairs": 20}, "fit": {}}
    section = adapter_section(
        anchor(0.4, 0.2),
        anchor(0.8, 0.5),
        {"procrustes": (anchor(0.6, 0.35), gate), "affine": (anchor(0.4, 0.25), gate)},
        {"fct": anchor(0.7, 0.4)},
    )
    rows = {r["name"]: r for r in section["rows"]}
    assert rows["procrustes"]["gain_top1"] == pytest.approx((0.6 - 0.4) / (0.8 - 0.4))
    assert rows["procrustes"]["gain_map"] == pytest.approx((0.35 - 0.2) / (0.5 - 0.2))
    assert rows["procrustes"]["top1_vs_old_old"] == pytest.approx(0.2) and rows["procrustes"]["above_old_old"]
    assert not rows["affine"]["above_old_old"], "equal to old/old is not above it"
    assert section["below_old_old"] == ["affine"]
    assert rows["procrustes"]["label_free"] and not rows["fct"]["label_free"] and "gate" not in rows["fct"]
    report = build_report(ANCHORS, runs()) | {"adapters": section}
    validate_report(report)
    text = summary_table(report)
    assert "adapters (label-free) vs FCT with classifier" in text and "BELOW old/old" in text
    with pytest.raises(ValueError, match="evaluated differently"):
        adapter_section(anchor(0.4, 0.2), anchor(0.8, 0.5), {}, {"fct": anchor(0.7, 0.4, metric="l2")})
    broken = report | {"adapters": {**section, "rows": [{"name": "x"}]}}
    with pytest.raises(ValueError, match="adapters row 0 lacks"):
        validate_report(broken)
