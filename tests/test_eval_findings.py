"""The papers' directions read off a report, against hand-computed z values."""

import math

import pytest

from raybackfill.eval.findings import Verdict, findings, random_sd, share_se


def _run(method, policy, auc_map, nfr=0.1, seeds=None):
    run = {"method": method, "policy": policy, "betas": [0.0, 0.5, 1.0], "nfr": [0.0, nfr, 0.0], "auc_map": auc_map}
    if seeds is not None:
        run["seed_aucs"] = {"seeds": list(range(len(seeds))), "auc_map": seeds, "auc_top1": seeds}
    return run


def _report(**anchor_overrides):
    anchors = {
        "old_old": {"top1": 0.4, "map": 0.3},
        "new_new": {"top1": 0.6, "map": 0.5},
        "bct_old": {"top1": 0.42, "map": 0.31},
    } | anchor_overrides
    runs = [
        _run("bct", "entropy", 0.4, nfr=0.2),
        _run("ract", "entropy", 0.4, nfr=0.1),
        _run("fct", "random", 0.50),
        _run("fct_side_info", "random", 0.51),
        _run("fastfill", "uncertainty", 0.53),
        _run("fastfill", "random", 0.50, seeds=[0.49, 0.50, 0.51]),  # sd 0.01
        _run("rank_merge", "random", 0.40, seeds=[0.39, 0.41]),  # sd sqrt(2) * 0.01
        _run("rank_merge_psi", "random", 0.44, seeds=[0.43, 0.45]),
    ]
    return {"anchors": anchors, "runs": runs, "queries": {"evaluated": 100, "dropped": 0}}


def test_random_sd_and_share_se_by_hand():
    assert random_sd(_run("x", "random", 0.5, seeds=[0.49, 0.50, 0.51]), "auc_map") == pytest.approx(0.01)
    assert random_sd(_run("x", "random", 0.5, seeds=[0.5]), "auc_map") is None
    assert share_se(0.5, 100) == pytest.approx(0.05)


def test_each_finding_by_hand():
    got = {f.claim.split(":")[0].split(" (")[0]: f for f in findings(_report())}
    new = got["the new model retrieves better than the old"]
    # top-1: (0.6 - 0.4) / (sqrt(2) * sqrt(0.5 * 0.5 / 100)) = 0.2 / 0.0707 = 2.83
    assert new.z == pytest.approx(0.2 / (math.sqrt(2) * 0.05)) and new.verdict is Verdict.HOLDS
    bct = got["BCT"]
    # (0.42 - 0.40) / (sqrt(2) * sqrt(0.41 * 0.59 / 100)) = 0.29: within noise
    assert bct.z == pytest.approx(0.02 / (math.sqrt(2) * math.sqrt(0.41 * 0.59 / 100)))
    assert bct.verdict is Verdict.NOISE
    ract = got["RACT flips fewer queries than BCT"]
    # (0.2 - 0.1) / sqrt(0.1 * 0.9 / 100 + 0.2 * 0.8 / 100) = 0.1 / 0.05 = 2.0
    assert ract.z == pytest.approx(2.0) and ract.verdict is Verdict.HOLDS and ract.lower_is_better
    by_claim = {f.claim: f for f in findings(_report())}
    order = by_claim["FastFill: the uncertainty order beats random orders (mAP area)"]
    assert order.z == pytest.approx(3.0) and order.verdict is Verdict.HOLDS  # (0.53 - 0.50) / 0.01
    side = by_claim["FCT: side-information helps (mAP area)"]
    assert side.z == pytest.approx(1.0) and side.verdict is Verdict.NOISE  # (0.51 - 0.50) / 0.01
    psi = by_claim["rank merge: psi (metric-compatible) beats the plain merge (mAP area)"]
    assert psi.z == pytest.approx(0.04 / 0.02) and psi.verdict is Verdict.HOLDS  # pooled sd sqrt(2e-4 + 2e-4)


def test_a_reversed_direction_and_missing_runs():
    report = _report(bct_old={"top1": 0.2, "map": 0.1})
    bct = next(f for f in findings(report) if f.claim.startswith("BCT"))
    assert bct.verdict is Verdict.REVERSED and bct.z < -2
    report["runs"] = [r for r in report["runs"] if r["method"] not in ("ract", "rank_merge_psi")]
    del report["anchors"]["bct_old"]
    verdicts = {f.claim.split(" ")[0]: f.verdict for f in findings(report)}
    assert verdicts["BCT:"] is Verdict.MISSING and verdicts["RACT"] is Verdict.MISSING
    assert verdicts["rank"] is Verdict.MISSING
