"""The offline demo end to end on tiny data (numbers are noise at this size: only structure and invariants)."""

import json
import os

import numpy as np
import pytest
import torch

from raybackfill.data.schema import embedding_table
from raybackfill.demo.pipeline import (
    METHOD_POLICIES,
    TRANSFORMATIONS,
    DemoConfig,
    DemoScale,
    Fit,
    _with_oracle_loss,
    run_offline,
    uncertainty_agreement,
)
from raybackfill.eval.offline import Embeddings
from raybackfill.eval.report import load_report

ONE_EPOCH = Fit(epochs=1, batch_size=32, lr=1e-3)
TINY = DemoScale(
    classes=6,
    per_class=10,
    image_size=16,
    width=4,
    embedding_dim=8,
    side_info_dim=4,
    old=ONE_EPOCH,
    new=ONE_EPOCH,
    side_info=ONE_EPOCH,
    transformation=ONE_EPOCH,
    reverse=ONE_EPOCH,
    hidden_dim=8,
    mixer_dim=16,
    beta_points=5,
    backbone_lrs=(1e-3,),
)
ONLINE = {"items": 18, "seconds": 1.5, "items_per_s": 12.0, "queries": 7, "query_errors": 0}


@pytest.fixture(scope="module")
def demo(ray_cluster, tmp_path_factory):
    out = str(tmp_path_factory.mktemp("demo") / "out")
    seen = []

    def online(artifacts):
        seen.append(artifacts)
        return ONLINE

    config = DemoConfig(out=out, scale=TINY, old_classes="0-2", seed=3, require_learning=False)
    report = run_offline(config, online=online, log=lambda line: None)
    return config, report, seen


def _runs(report):
    return {(r["method"], r["policy"]): r for r in report["runs"]}


def test_report_has_every_method_and_policy_with_full_curves(demo):
    config, report, _ = demo
    runs = _runs(report)
    assert set(runs) == {(m, p) for m, policies in METHOD_POLICIES.items() for p in policies}
    for run in report["runs"]:
        assert run["betas"] == pytest.approx(np.linspace(0, 1, TINY.beta_points))
        assert len(run["top1"]) == len(run["map"]) == len(run["nfr"]) == TINY.beta_points
        for key in ("auc_top1", "auc_map", "relative_gain_top1"):
            assert key in run
    for anchor in ("old_old", "new_new"):
        assert 0 <= report["anchors"][anchor]["top1"] <= 1 and 0 <= report["anchors"][anchor]["map"] <= 1
    assert report["queries"]["evaluated"] == 12  # 6 classes x 10 images x 0.2 query fraction
    # Methods with a priority order get a band of random orders (seeds 3, 4, ...) to be judged against.
    for (method, policy), run in runs.items():
        banded = policy == "random" and len(METHOD_POLICIES[method]) > 1
        assert ("seed_aucs" in run) == banded, (method, policy)
        if banded:
            assert run["seed_aucs"]["seeds"] == list(range(3, 3 + TINY.random_seeds))
            assert run["seed_aucs"]["auc_top1"][0] == pytest.approx(run["auc_top1"])
    methods, kinds = ("fastfill", "fastfill_side_info"), ("", "_angular", "_norm")
    assert set(report["diagnostics"]) == {f"{m}_uncertainty_spearman{k}" for m in methods for k in kinds}
    assert load_report(os.path.join(config.out, "report.json")) == json.loads(json.dumps(report))
    with open(os.path.join(config.out, "backfill_curves.png"), "rb") as f:
        assert f.read(8) == b"\x89PNG\r\n\x1a\n"


def test_report_records_how_each_backbone_trained(demo):
    _, report, _ = demo
    training = report["training"]
    assert training["backbone_lr"] == 1e-3 and list(training["lr_search"]) == ["0.001"]
    for name in ("old", "new", "bct", "ract"):
        kept = training["backbones"][name]
        assert kept["epochs"] == 1 and kept["best_epoch"] == 0 and 0.0 <= kept["train_accuracy"] <= 1.0


def test_curves_start_and_end_at_their_anchors(demo):
    _, report, _ = demo
    anchors, runs = report["anchors"], _runs(report)
    for (method, _policy), run in runs.items():
        if method in TRANSFORMATIONS:
            start, end = anchors[f"new_{method}"], anchors["new_new"]  # transformed gallery -> new gallery
        elif method in ("bct", "ract"):
            start, end = anchors[f"{method}_old"], anchors[f"{method}_{method}"]  # old gallery -> new gallery
        elif method == "rank_merge":
            start, end = anchors["old_old"], anchors["new_new"]
        else:  # rank_merge_psi: psi(new query) on the old gallery -> new/new
            start, end = anchors["psi_old"], anchors["new_new"]
        for key in ("top1", "map"):
            assert run[key][0] == pytest.approx(start[key]), (method, key)
            assert run[key][-1] == pytest.approx(end[key]), (method, key)
    assert runs[("rank_merge", "random")]["nfr"][0] == 0.0  # beta = 0 is the old system itself


def test_policies_change_only_the_order_not_the_endpoints(demo):
    _, report, _ = demo
    runs = _runs(report)
    unc, rand = runs[("fastfill", "uncertainty")], runs[("fastfill", "random")]
    assert unc["top1"][0] == rand["top1"][0] and unc["top1"][-1] == rand["top1"][-1]


def test_online_hook_gets_the_artifacts_and_fills_the_online_section(demo):
    config, report, seen = demo
    assert report["online"] == ONLINE
    (artifacts,) = seen
    assert artifacts.layout.out == config.out
    for uri in (artifacts.images, artifacts.embeddings, artifacts.gallery_old, *artifacts.splits.values()):
        assert os.path.isdir(uri), uri
    for name in ("old", "new", "bct", "ract", "side_info", *TRANSFORMATIONS, "psi"):
        assert os.path.isfile(os.path.join(artifacts.models[name], "model.json")), name


def test_a_second_demo_in_the_same_directory_is_refused(demo):
    config, _, _ = demo
    with pytest.raises(FileExistsError, match="choose a new --out"):
        run_offline(config, log=lambda line: None)


def test_uncertainty_agreement_tells_norm_error_from_angular_error():
    # Item 0 is only too short (MSE 2, angle 0), item 1 points elsewhere (MSE 0.4, 1 - cos 0.4), item 2 is
    # almost right (MSE 0.02, 1 - cos 0.005). Scores that follow the norm error rank MSE perfectly, but the
    # angular ranks (0, 2, 1) against the score ranks (2, 1, 0) give Spearman -0.5, and so do the ranks of
    # |h| (2, 1, 2.01: ranks 1, 0, 2).
    new = np.array([[4.0, 0.0], [1.0, 0.0], [2.0, 0.0]])
    transformed = np.array([[2.0, 0.0], [0.6, 0.8], [2.0, 0.2]])
    agreement = uncertainty_agreement(np.array([3.0, 2.0, 1.0]), transformed, new)
    assert agreement == pytest.approx({"": 1.0, "_angular": -0.5, "_norm": -0.5})


def test_uncertainty_agreement_sees_scores_that_follow_the_norm_of_h():
    # Same directions as the new vectors, so every angular error is 0; the scores rank exactly by |h|.
    new = np.array([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0]])
    transformed = new * np.array([[0.5], [3.0], [1.0]])
    agreement = uncertainty_agreement(np.array([0.1, 0.9, 0.4]), transformed, new)
    assert agreement["_norm"] == pytest.approx(1.0)


def test_oracle_loss_column_is_each_items_true_fastfill_error():
    rng = np.random.default_rng(0)
    ids = np.arange(10, 16)
    old, transformed, new = (rng.normal(size=(6, 3)).astype(np.float32) for _ in range(3))
    labels = rng.integers(0, 4, size=6)
    classifier = torch.nn.Linear(3, 4)
    gallery = _with_oracle_loss(Embeddings(ids, old, embedding_table(ids, old)), transformed, new, labels, classifier)
    weight, bias = classifier.weight.detach().numpy(), classifier.bias.detach().numpy()
    logits = transformed @ weight.T + bias
    log_p = logits - np.log(np.exp(logits).sum(1, keepdims=True))
    smoothed_ce = -(0.9 * log_p[np.arange(6), labels] + 0.1 * log_p.mean(1))
    expected = ((new - transformed) ** 2).mean(1) + smoothed_ce
    assert gallery.table.column("oracle_loss").to_numpy() == pytest.approx(expected, rel=1e-5)
    assert np.array_equal(gallery.ids, ids) and gallery.vectors is old
