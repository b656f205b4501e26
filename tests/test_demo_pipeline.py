"""The demo end to end on tiny data (numbers are noise at this size: only structure and invariants)."""

import json
import os

import numpy as np
import pytest

from raybackfill.adapters.fit import auto_kinds
from raybackfill.data import storage
from raybackfill.data.schema import ID
from raybackfill.demo.adapters import adapter_model_name
from raybackfill.demo.configs import DemoConfig, DemoScale, Fit
from raybackfill.demo.evaluation import METHOD_ORDERS, method_orders
from raybackfill.demo.pipeline import run_demo
from raybackfill.demo.summary import chain_block, summary
from raybackfill.demo.training import TRANSFORMATIONS
from raybackfill.eval.diagnostics import ORACLE_ORDER
from raybackfill.eval.offline import CHAIN_PLOT_FILE, output_files
from raybackfill.eval.report import load_report
from raybackfill.models.artifacts import read_spec
from raybackfill.train import api

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
    """One tiny demo, scored by l2 distance, with diagnostics and the v1 -> v2 -> v3 chain; ``held_out`` records
    every (ids, validation mask) a training run drew. (test_demo_online.py runs the default, cosine, without
    diagnostics or chain.)"""
    out = str(tmp_path_factory.mktemp("demo") / "out")
    seen, held_out = [], []

    def online(artifacts):
        seen.append(artifacts)
        return ONLINE

    def recording_holdout(ids, *args, **kwargs):
        mask = real_holdout(ids, *args, **kwargs)
        held_out.append((np.asarray(ids).copy(), mask.copy()))
        return mask

    real_holdout = api.holdout
    config = DemoConfig(out=out, scale=TINY, old_classes="0-2", seed=3, require_learning=False, metric="l2",
                        diagnostics=True, chain=True, chain_v2_fraction=0.4)  # fmt: skip
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(api, "holdout", recording_holdout)
        report = run_demo(config, online=online)
    return config, report, seen, held_out


def _runs(report):
    return {(r["method"], r["policy"]): r for r in report["runs"]}


def test_report_has_every_method_and_order_with_full_curves(demo):
    config, report, _, _ = demo
    runs = _runs(report)
    assert set(runs) == {(m, str(o)) for m in METHOD_ORDERS for o in method_orders(m, with_diagnostics=True)}
    assert ("fastfill", "column:oracle_loss") in runs
    for run in report["runs"]:
        assert run["betas"] == pytest.approx(np.linspace(0, 1, TINY.beta_points))
        assert len(run["top1"]) == len(run["map"]) == len(run["nfr"]) == TINY.beta_points
        for key in ("auc_top1", "auc_map", "relative_gain_top1"):
            assert key in run
    for anchor in ("old_old", "new_new"):
        assert 0 <= report["anchors"][anchor]["top1"] <= 1 and 0 <= report["anchors"][anchor]["map"] <= 1
    assert report["queries"]["evaluated"] == 12  # 6 classes x 10 images x 0.2 query fraction
    assert report["metric"] == "l2"
    # Methods with a priority order get a band of random orders (seeds 3, 4, ...) to be judged against.
    for (method, policy), run in runs.items():
        banded = policy == "random" and len(METHOD_ORDERS[method]) > 1
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
    _, report, _, _ = demo
    training = report["training"]
    assert training["backbone_lr"] == 1e-3 and list(training["lr_search"]) == ["0.001"]
    for name in ("old", "new", "bct", "ract"):
        kept = training["backbones"][name]
        assert kept["epochs"] == 1 and kept["best_epoch"] == 0 and 0.0 <= kept["train_accuracy"] <= 1.0


def test_curves_start_and_end_at_their_anchors(demo):
    _, report, _, _ = demo
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
    _, report, _, _ = demo
    runs = _runs(report)
    unc, rand = runs[("fastfill", "uncertainty")], runs[("fastfill", "random")]
    assert unc["top1"][0] == rand["top1"][0] and unc["top1"][-1] == rand["top1"][-1]


def test_online_hook_gets_the_artifacts_and_fills_the_online_section(demo):
    config, report, seen, _ = demo
    assert report["online"] == ONLINE
    (artifacts,) = seen
    assert artifacts.layout.out == config.out
    for uri in (artifacts.images, artifacts.embeddings, artifacts.gallery_old, *artifacts.splits.values()):
        assert os.path.isdir(uri), uri
    for name in ("old", "new", "bct", "ract", "side_info", *TRANSFORMATIONS, "psi", "adapter_procrustes"):
        assert os.path.isfile(os.path.join(artifacts.models[name], "model.json")), name


def test_a_second_demo_in_the_same_directory_is_refused(demo):
    config, _, _, _ = demo
    with pytest.raises(FileExistsError, match="choose a new --out"):
        run_demo(config)


def test_no_choice_made_in_training_sees_an_evaluation_id(demo):
    # Every training run (backbones at each candidate learning rate, side-information, transformations, psi)
    # draws its validation rows with holdout(); those rows pick the learning rate and each run's epoch.
    _, _, (artifacts,), held_out = demo
    split_ids = {
        name: storage.read_table(uri, columns=[ID]).column(ID).to_numpy() for name, uri in artifacts.splits.items()
    }
    evaluation = np.concatenate([split_ids["gallery"], split_ids["query"]])
    # new/bct/ract, old at one rate, transformations, psi, side-info, the label-free mlp and fastfill adapters,
    # the chain's v3 and h23
    runs = 3 + 1 + len(TRANSFORMATIONS) + 1 + 1 + 2 + 2
    assert len(held_out) == runs
    for ids, validation in held_out:
        assert validation.any(), "each run holds rows out"
        assert np.isin(ids, split_ids["train"]).all()
        assert not np.isin(ids, evaluation).any()
    validation_of_old_classes = [ids[mask] for ids, mask in held_out if np.isin(ids, split_ids["train_old"]).all()]
    assert validation_of_old_classes, "the old model (which picks the learning rate) holds out old-class rows"


def test_label_free_adapters_sit_next_to_fct_in_the_report(demo):
    config, report, (artifacts,), _ = demo
    section = report["adapters"]
    rows = {r["name"]: r for r in section["rows"]}
    kinds = [adapter_model_name(k) for k in auto_kinds("old-to-new")]
    assert set(rows) == {*kinds, *TRANSFORMATIONS}
    assert all(rows[k]["label_free"] for k in kinds) and not any(rows[m]["label_free"] for m in TRANSFORMATIONS)
    old_old = report["anchors"]["old_old"]
    assert section["old_old"] == {"top1": old_old["top1"], "map": old_old["map"]}
    for name, row in rows.items():
        assert row["above_old_old"] == (row["top1"] > old_old["top1"]), name
        assert row["top1_vs_old_old"] == pytest.approx(row["top1"] - old_old["top1"])
    assert section["below_old_old"] == [n for n, r in rows.items() if not r["above_old_old"]]
    # FCT / FastFill rows are the report's new_<method> anchors; every adapter is a saved, scored artefact
    for method in TRANSFORMATIONS:
        assert rows[method]["top1"] == report["anchors"][f"new_{method}"]["top1"]
    train_rows = storage.read_table(artifacts.splits["train"], columns=[ID]).num_rows
    for kind in kinds:
        record = read_spec(artifacts.models[kind]).adapter
        assert record["score"] == rows[kind]["gate"]["score"] and "labelled" not in record["score"], "no labels"
        assert record["score"]["pairs"] + record["fit"]["fit_rows"] == train_rows, "fitted on the train split only"
    with open(os.path.join(config.out, "report.md")) as f:
        assert "adapters (label-free) vs FCT with classifier" in f.read()
    assert "label-free adapters" in summary(report, [])


def test_the_terminal_summary_is_short_and_points_to_every_file(demo):
    config, report, _, _ = demo
    files = [f"{config.out}/{name}" for name in output_files(report)]
    text = summary(report, files)
    # The chain adds its own short block to the rest.
    assert len(summary({k: v for k, v in report.items() if k != "chain"}, files).splitlines()) <= 25
    block = "\n".join(chain_block(report["chain"])).splitlines()
    assert len(block) <= 10 and len(text.splitlines()) <= 25 + len(block) + 1
    assert all(path in text for path in files)
    for method in METHOD_ORDERS:
        assert f"\n{method} " in text
    assert "oracle" not in text, "a diagnostic bound is never reported as a method's best order"
    with open(os.path.join(config.out, "report.md")) as f:
        assert "column:oracle_loss" in f.read(), "report.md keeps every table"


def test_without_diagnostics_the_oracle_order_is_not_evaluated():
    assert ORACLE_ORDER not in method_orders("fastfill") and ORACLE_ORDER in method_orders("fastfill", True)
    assert method_orders("bct", True) == method_orders("bct")


def test_the_chain_section_has_both_v2_states_and_a_plot(demo):
    config, report, (artifacts,), _ = demo
    chain = report["chain"]
    assert [v["name"] for v in chain["variants"]] == ["v2_at_40", "v2_at_100"]
    assert chain["v2_fraction"] == 0.4 and chain["models"]["h12"] == "fastfill"
    # v1/v1 and v2/v2 are the demo's own anchors, measured on the same queries
    assert chain["anchors"]["v1_v1"] == report["anchors"]["old_old"]
    assert chain["anchors"]["v2_v2"] == report["anchors"]["new_new"]
    for variant in chain["variants"]:
        for run in variant["runs"]:
            assert run["betas"] == pytest.approx(np.linspace(0, 1, TINY.beta_points))
            assert run["top1"][-1] == pytest.approx(chain["anchors"]["v3_v3"]["top1"])
        served = variant["served"]
        assert all(sum(shares) == pytest.approx(1.0) for shares in zip(*served.values(), strict=True))
    assert [run["policy"] for run in chain["variants"][0]["runs"]] == ["uncertainty", "composed_first", "random"]
    random_run = chain["variants"][0]["runs"][-1]
    assert len(random_run["seed_aucs"]["seeds"]) == TINY.random_seeds
    v3 = chain["v3"]
    assert v3["width"] == 2 * TINY.width and v3["above_v2"] == (v3["val_accuracy"] > v3["v2_val_accuracy"])
    assert os.path.isfile(os.path.join(config.out, CHAIN_PLOT_FILE)) and CHAIN_PLOT_FILE in output_files(report)
    assert os.path.isfile(os.path.join(config.out, "models", "v3", "model.json"))
    assert os.path.isfile(os.path.join(config.out, "models", "h23", "model.json"))
    with open(os.path.join(config.out, "report.md")) as f:
        assert "chained upgrade v1 -> v2 -> v3" in f.read()
    assert "v2_at_40" in summary(report, [])
