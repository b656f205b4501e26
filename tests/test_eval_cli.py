"""`raybackfill eval run | compare | live` and jobs/evaluate.py, end to end on small tables written here."""

from __future__ import annotations

import argparse
import importlib.util
import json
import uuid
from pathlib import Path

import numpy as np
import pytest
import torch

from raybackfill.backfill.policies import entropy_scores, priority_order, priority_scores, uncertainty_scores
from raybackfill.cli.eval import register
from raybackfill.data import storage
from raybackfill.data.schema import embedding_table
from raybackfill.eval.curves import BackfillSpaces, auc_mean, backfill_curve, even_betas
from raybackfill.eval.metrics import EvalConfig, evaluate
from raybackfill.index.router import RouterConfig, create_index, destroy_index, get
from raybackfill.models.artifacts import ModelSpec, save_model
from raybackfill.models.registry import build_model

REPO = Path(__file__).resolve().parents[1]
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
N_GALLERY, N_QUERIES, DIM, CLASSES = 40, 20, 8, 4


def run(*argv: str) -> int:
    """The eval commands under a `raybackfill` parser of their own (independent of cli/main.py's list)."""
    parser = argparse.ArgumentParser(prog="raybackfill")
    register(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(argv)
    return args.func(args)


@pytest.fixture(scope="module")
def tables(tmp_path_factory):
    """Old (noisy), new (clean) and transformed (in between) embeddings; the non-old tables are shuffled."""
    root = tmp_path_factory.mktemp("eval-tables")
    rng = np.random.default_rng(11)
    centres = rng.standard_normal((CLASSES, DIM)) * 2
    data = {"g_ids": 100 + rng.permutation(500)[:N_GALLERY], "q_ids": 900 + np.arange(N_QUERIES)}
    data["g_labels"] = rng.integers(0, CLASSES, N_GALLERY).astype(np.int32)
    data["q_labels"] = rng.integers(0, CLASSES, N_QUERIES).astype(np.int32)
    for who, n in (("g", N_GALLERY), ("q", N_QUERIES)):
        base = centres[data[f"{who}_labels"]]
        for space, noise in (("old", 3.0), ("new", 0.7), ("transformed", 1.5), ("psi", 2.5)):
            data[f"{who}_{space}"] = (base + noise * rng.standard_normal((n, DIM))).astype(np.float32)
    data["uncertainty"] = rng.random(N_GALLERY).astype(np.float32)
    uris = {}
    for who, prefix in (("g", "gallery"), ("q", "queries")):
        ids, labels = data[f"{who}_ids"], data[f"{who}_labels"]
        for space in ("old", "new", "transformed", "psi"):
            rows = np.arange(len(ids)) if space == "old" else rng.permutation(len(ids))
            extra = {"label": labels[rows]} if space == "old" else {}
            if who == "g" and space == "transformed":
                extra["uncertainty"] = data["uncertainty"][rows]
            uri = str(root / f"{prefix}-{space}")
            storage.write_table(embedding_table(ids[rows], data[f"{who}_{space}"][rows], extra=extra), uri)
            uris[f"{prefix}_{space}"] = uri
    return uris, data


def table_args(uris: dict[str, str], *spaces: str) -> list[str]:
    args = ["--queries-old", uris["queries_old"], "--queries-new", uris["queries_new"]]
    args += ["--gallery-old", uris["gallery_old"], "--gallery-new", uris["gallery_new"]]
    if "transformed" in spaces:
        args += ["--gallery-transformed", uris["gallery_transformed"]]
    if "psi" in spaces:
        args += ["--psi-queries", uris["queries_psi"]]
    return args


def curve_for(data, spaces: BackfillSpaces, order: np.ndarray, reference: np.ndarray, points: int):
    return backfill_curve(
        spaces, order, data["q_labels"], data["g_labels"], reference, betas=even_betas(points), config=EvalConfig()
    )


def test_run_writes_report_plot_and_markdown_matching_the_library(tables, tmp_path, capsys):
    uris, data = tables
    out = tmp_path / "fct"
    orders = ["--order", "random", "--order", "id", "--order", "column:uncertainty"]
    assert run("eval", "run", *table_args(uris, "transformed"), "--method", "fct", *orders, "--out", str(out)) == 0

    report = json.loads((out / "report.json").read_text())
    assert (report["schema"], report["metric"], report["protocol"]) == (1, "cosine", "disjoint")
    assert report["queries"] == {"evaluated": N_QUERIES, "dropped": 0}
    assert set(report["anchors"]) == {"old_old", "new_new", "new_old", "new_transformed"}
    assert [(r["method"], r["policy"], r["strategy"]) for r in report["runs"]] == [
        ("fct", "random", "compatible"),
        ("fct", "id", "compatible"),
        ("fct", "column:uncertainty", "compatible"),
    ]
    # The tables were matched by id (non-old tables are shuffled): numbers equal the library on aligned arrays.
    old_old = evaluate(data["q_old"], data["g_old"], data["q_labels"], data["g_labels"])
    new_new = evaluate(data["q_new"], data["g_new"], data["q_labels"], data["g_labels"])
    assert report["anchors"]["old_old"]["map"] == pytest.approx(old_old.map)
    assert report["anchors"]["new_new"]["top1"] == pytest.approx(new_new.top1)
    spaces = BackfillSpaces.compatible(data["q_new"], data["g_transformed"], data["g_new"])
    expected = curve_for(data, spaces, priority_order(data["uncertainty"], data["g_ids"]), old_old.correct_top1, 21)
    by_uncertainty = report["runs"][2]
    assert len(by_uncertainty["betas"]) == 21
    np.testing.assert_allclose(by_uncertainty["map"], expected.map)
    np.testing.assert_allclose(by_uncertainty["nfr"], expected.nfr)
    for entry in report["runs"]:  # endpoints: transformed gallery at beta=0, new/new at beta=1
        assert entry["top1"][0] == pytest.approx(report["anchors"]["new_transformed"]["top1"])
        assert entry["map"][-1] == pytest.approx(new_new.map)

    assert (out / "backfill_curves.png").read_bytes().startswith(PNG_SIGNATURE)
    markdown = (out / "report.md").read_text()
    assert "| method | policy | strategy | AUC top1 |" in markdown and "| fct | column:uncertainty |" in markdown
    printed = capsys.readouterr().out
    assert "AUC top1" in printed and "new_transformed" in printed and "column:uncertainty" in printed
    assert str(out / "report.json") in printed


def test_random_seeds_measure_the_random_order_over_several_seeds_and_judge_other_orders_by_that_band(
    tables, tmp_path, capsys
):
    uris, data = tables
    out = tmp_path / "band"
    args = ["--method", "fct", "--order", "column:uncertainty", "--order", "random", "--seed", "5"]
    assert (
        run(
            "eval",
            "run",
            *table_args(uris, "transformed"),
            *args,
            "--random-seeds",
            "3",
            "--betas",
            "5",
            "--out",
            str(out),
        )
        == 0
    )

    report = json.loads((out / "report.json").read_text())
    by_uncertainty, random_run = report["runs"]
    spread = random_run["seed_aucs"]
    assert spread["seeds"] == [5, 6, 7] and "seed_aucs" not in by_uncertainty
    # The run's own curve is seed 5's; seeds 6 and 7 are the library's random orders with those seeds.
    assert spread["auc_top1"][0] == pytest.approx(random_run["auc_top1"])
    spaces = BackfillSpaces.compatible(data["q_new"], data["g_transformed"], data["g_new"])
    reference = evaluate(data["q_old"], data["g_old"], data["q_labels"], data["g_labels"]).correct_top1
    for seed, auc_top1, auc_map in zip(spread["seeds"], spread["auc_top1"], spread["auc_map"], strict=True):
        order = priority_order(priority_scores("random", data["g_ids"], seed=seed), data["g_ids"])
        expected = curve_for(data, spaces, order, reference, 5)
        assert auc_top1 == pytest.approx(auc_mean(expected.betas, expected.top1))
        assert auc_map == pytest.approx(auc_mean(expected.betas, expected.map))
    assert len(set(spread["auc_map"])) == 3, "three seeds, three different random orders"
    assert "orders against 3 random orders" in (out / "report.md").read_text()
    assert "z top1" in capsys.readouterr().out
    with pytest.raises(ValueError, match="random_seeds must be at least 1"):
        run("eval", "run", *table_args(uris, "transformed"), *args, "--random-seeds", "0", "--out", str(out))


def test_policy_orders_read_model_artefacts(tables, tmp_path):
    uris, data = tables
    torch.manual_seed(0)
    ff_kwargs = {"old_dim": DIM, "new_dim": DIM, "hidden_dim": 8, "mixer_dim": 8}
    head = build_model("fastfill_transformation", **ff_kwargs).eval()
    save_model(head, str(tmp_path / "ff"), ModelSpec("fastfill_transformation", "ff1", ff_kwargs, method="fastfill"))
    cnn_kwargs = {"embedding_dim": DIM, "num_classes": CLASSES, "width": 4}
    cnn = build_model("small_cnn", **cnn_kwargs).eval()
    save_model(cnn, str(tmp_path / "old"), ModelSpec("small_cnn", "v1", kwargs=cnn_kwargs))
    args = ["--method", "fastfill", "--order", "uncertainty", "--order", "entropy", "--betas", "5"]
    models = ["--transformation", str(tmp_path / "ff"), "--old-model", str(tmp_path / "old")]
    out = tmp_path / "out"
    assert run("eval", "run", *table_args(uris, "transformed"), *args, *models, "--out", str(out)) == 0
    report = json.loads((out / "report.json").read_text())

    reference = evaluate(data["q_old"], data["g_old"], data["q_labels"], data["g_labels"]).correct_top1
    spaces = BackfillSpaces.compatible(data["q_new"], data["g_transformed"], data["g_new"])
    weight, bias = cnn.classifier.weight.detach().numpy(), cnn.classifier.bias.detach().numpy()
    scores = {
        "uncertainty": uncertainty_scores(head, data["g_old"]),
        "entropy": entropy_scores(data["g_old"], weight, bias),
    }
    for entry in report["runs"]:
        expected = curve_for(data, spaces, priority_order(scores[entry["policy"]], data["g_ids"]), reference, 5)
        np.testing.assert_allclose(entry["top1"], expected.top1)
        np.testing.assert_allclose(entry["map"], expected.map)

    with pytest.raises(ValueError, match="needs the FastFill transformation artefact"):
        run("eval", "run", *table_args(uris, "transformed"), "--method", "fastfill", "--order", "uncertainty",
            "--out", str(tmp_path / "x"))  # fmt: skip


def test_missing_inputs_for_the_method_are_named(tables, tmp_path):
    uris, _ = tables
    with pytest.raises(ValueError, match="give --psi-queries"):
        run("eval", "run", *table_args(uris), "--method", "rank_merge_psi", "--out", str(tmp_path / "a"))
    with pytest.raises(ValueError, match="give --gallery-transformed"):
        run("eval", "run", *table_args(uris), "--method", "fct", "--out", str(tmp_path / "b"))
    with pytest.raises(ValueError, match="unknown order 'fancy'"):
        run("eval", "run", *table_args(uris), "--method", "bct", "--order", "fancy", "--out", str(tmp_path / "c"))
    with pytest.raises(ValueError, match="not_there.* neither the old nor the transformed"):
        run("eval", "run", *table_args(uris), "--method", "bct", "--order", "column:not_there", "--out", str(tmp_path))


def load_job():
    spec = importlib.util.spec_from_file_location("evaluate_job", REPO / "jobs" / "evaluate.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_job_takes_the_run_flags_and_compare_prints_reports_side_by_side(tables, tmp_path, capsys):
    uris, _ = tables
    merge, psi = tmp_path / "merge", tmp_path / "psi"
    job = load_job()
    assert job.main([*table_args(uris), "--method", "rank_merge", "--betas", "3", "--out", str(merge)]) == 0
    assert run("eval", "run", *table_args(uris, "psi"), "--method", "rank_merge_psi", "--betas", "3",
               "--out", str(psi)) == 0  # fmt: skip
    psi_report = json.loads((psi / "report.json").read_text())
    assert psi_report["runs"][0]["strategy"] == "rank_merge" and "psi_old" in psi_report["anchors"]
    capsys.readouterr()

    reports = [str(merge / "report.json"), str(psi / "report.json")]
    assert run("eval", "compare", *reports, "--keys", "auc_top1", "max_nfr") == 0
    printed = capsys.readouterr().out
    assert f"{reports[0]}: metric cosine" in printed and f"{reports[0]}: AUC top1" in printed
    assert f"{reports[1]}: max NFR" in printed
    assert "rank_merge      random" in printed and "rank_merge_psi  random" in printed
    assert run("eval", "compare", *reports, "--markdown") == 0
    assert "| rank_merge_psi | random | rank_merge |" in capsys.readouterr().out


def test_merge_joins_reports_of_separate_jobs_into_one_report_with_every_curve(tables, tmp_path, capsys):
    uris, _ = tables
    plain, psi, merged = tmp_path / "plain", tmp_path / "psi", tmp_path / "merged"
    run("eval", "run", *table_args(uris), "--method", "rank_merge", "--betas", "3", "--out", str(plain))
    run("eval", "run", *table_args(uris, "psi"), "--method", "rank_merge_psi", "--betas", "3", "--out", str(psi))
    capsys.readouterr()
    parts = [json.loads((d / "report.json").read_text()) for d in (plain, psi)]

    assert run("eval", "merge", str(plain / "report.json"), str(psi / "report.json"), "--out", str(merged)) == 0
    report = json.loads((merged / "report.json").read_text())
    assert report["runs"] == parts[0]["runs"] + parts[1]["runs"]
    assert report["anchors"] == parts[0]["anchors"] | parts[1]["anchors"]
    assert (merged / "backfill_curves.png").stat().st_size > 0 and (merged / "report.md").exists()
    assert "rank_merge_psi" in capsys.readouterr().out
    with pytest.raises(ValueError, match="appears twice"):
        run("eval", "merge", str(plain / "report.json"), str(plain / "report.json"), "--out", str(tmp_path / "x"))


def test_live_command_reads_probe_tables_and_prints_quality(ray_cluster, tables, capsys):
    uris, data = tables
    name = f"test-eval-live-{uuid.uuid4().hex[:8]}"
    router = create_index(RouterConfig(name=name, shards=1))
    try:
        get(router.load_old.remote(data["g_ids"], data["g_old"], "v1"))
        argv = ["eval", "live", "--name", name, "--probes-old", uris["queries_old"]]
        argv += ["--probes-new", uris["queries_new"], "--gallery-labels", uris["gallery_old"]]
        argv += ["--max-probes", "8", "--k", "5"]
        assert run(*argv, "--strategy", "old", "--json") == 0
        reading = json.loads(capsys.readouterr().out)
        assert (reading["strategy"], reading["k"], reading["probes"], reading["protocol"]) == ("old", 5, 8, "disjoint")
        assert 0 <= reading["top1"] <= 1 and 0 <= reading["map_at_k"] <= 1
        assert run(*argv, "--strategy", "old") == 0
        assert f"top-1 {reading['top1']:.3f}, mAP@5 {reading['map_at_k']:.3f} over 8 probes" in capsys.readouterr().out
    finally:
        destroy_index(name)


def brute_force_l2(queries, gallery, q_labels, g_labels):
    """Top-1 and mAP@all by Euclidean distance, one query at a time (nearest first, ties by gallery position)."""
    top1, aps = [], []
    for q, label in zip(queries, q_labels, strict=True):
        distances = np.sqrt(((gallery.astype(np.float64) - q) ** 2).sum(axis=1))
        relevant = g_labels[np.argsort(distances, kind="stable")] == label
        hits = np.flatnonzero(relevant)
        top1.append(relevant[0])
        aps.append(np.mean(np.arange(1, len(hits) + 1) / (hits + 1)))
    return np.mean(top1), np.mean(aps)


def test_metric_l2_scores_by_euclidean_distance_like_a_brute_force_search(tables, tmp_path):
    uris, data = tables
    out = tmp_path / "l2"
    args = ["--method", "fct", "--order", "id", "--betas", "5", "--metric", "l2"]
    assert run("eval", "run", *table_args(uris, "transformed"), *args, "--out", str(out)) == 0
    report = json.loads((out / "report.json").read_text())
    assert report["metric"] == "l2"
    q, g = data["q_labels"], data["g_labels"]
    for anchor, (queries, gallery) in {"old_old": ("q_old", "g_old"), "new_new": ("q_new", "g_new"),
                                       "new_transformed": ("q_new", "g_transformed")}.items():  # fmt: skip
        top1, mean_ap = brute_force_l2(data[queries], data[gallery], q, g)
        assert report["anchors"][anchor]["top1"] == pytest.approx(top1), anchor
        assert report["anchors"][anchor]["map"] == pytest.approx(mean_ap, rel=1e-5), anchor
    # The curve: the first floor(beta * N) items by id carry new vectors, the others transformed ones.
    (curve,) = report["runs"]
    by_id = np.argsort(data["g_ids"])
    for beta, top1_at, map_at in zip(curve["betas"], curve["top1"], curve["map"], strict=True):
        gallery = data["g_transformed"].copy()
        done = by_id[: int(np.floor(round(beta * N_GALLERY, 6)))]
        gallery[done] = data["g_new"][done]
        top1, mean_ap = brute_force_l2(data["q_new"], gallery, q, g)
        assert (top1_at, map_at) == pytest.approx((top1, mean_ap), rel=1e-5), beta
    # Cosine ranks differently on these unnormalised vectors: the flag is not ignored.
    cosine = evaluate(data["q_old"], data["g_old"], q, g)
    assert (cosine.top1, cosine.map) != pytest.approx((report["anchors"]["old_old"]["top1"],
                                                       report["anchors"]["old_old"]["map"]))  # fmt: skip
