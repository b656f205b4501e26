"""Adapters end to end without a cluster: held-out scores, the label-free losses, closed-form fits saved as
artefacts the transform command and the backfill's checks accept, and the gate."""

from __future__ import annotations

import json
import os

import numpy as np
import pyarrow as pa
import pytest
import torch

from raybackfill.adapters import losses
from raybackfill.adapters.fit import AdapterConfig, auto_kinds, fit_adapter, split_pairs, train_adapter
from raybackfill.adapters.gate import AdapterGateError, check_adapter
from raybackfill.adapters.paired import NEW, NEW_MODEL, OLD, OLD_MODEL, Pairs, pairs_from_table, read_pairs
from raybackfill.adapters.scores import neighbour_recall, score_adapter, top_k
from raybackfill.cli.main import main
from raybackfill.cli.transform import transform_table
from raybackfill.data import storage
from raybackfill.data.schema import EMBEDDING, ID, LABEL, SchemaError, embedding_table, fixed_size_list, vectors_of
from raybackfill.eval.metrics import prepare
from raybackfill.models.artifacts import load_model, read_spec
from raybackfill.types import AdapterDirection, AdapterKind, Metric


def _clustered(rng: np.random.Generator, n: int, dim: int, classes: int = 8) -> tuple[np.ndarray, np.ndarray]:
    labels = rng.integers(0, classes, size=n)
    centres = rng.normal(size=(classes, dim)) * 2.0
    return (centres[labels] + rng.normal(size=(n, dim))).astype(np.float32), labels


def _semi_orthogonal(rng: np.random.Generator, rows: int, cols: int) -> np.ndarray:
    q, _ = np.linalg.qr(rng.normal(size=(max(rows, cols), min(rows, cols))))
    return q if rows >= cols else q.T


def _pairs_table(old: np.ndarray, new: np.ndarray, labels: np.ndarray | None = None) -> pa.Table:
    ids = np.arange(len(old), dtype=np.int64) * 3 + 5
    columns = {ID: pa.array(ids), OLD: fixed_size_list(old), NEW: fixed_size_list(new)}
    if labels is not None:
        columns[LABEL] = pa.array(labels.astype(np.int32))
    columns[OLD_MODEL] = pa.array(["v1"] * len(ids))
    columns[NEW_MODEL] = pa.array(["v2"] * len(ids))
    return pa.table(columns)


@pytest.fixture(scope="module")
def rotated(tmp_path_factory) -> tuple[str, np.ndarray, np.ndarray]:
    """Pairs whose new space is an exact isometry of the old one into more dimensions (16 -> 24)."""
    rng = np.random.default_rng(0)
    old, labels = _clustered(rng, 500, 16)
    new = (old @ _semi_orthogonal(rng, 16, 24)).astype(np.float32)
    uri = str(tmp_path_factory.mktemp("pairs") / "rotated")
    storage.write_table(_pairs_table(old, new, labels), uri)
    return uri, old, new


# ----------------------------------------------------------------------------- scores and losses


def test_top_k_and_neighbour_recall_hand_computed():
    q = prepare(np.array([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0]]), Metric.COSINE)
    # cosine: item 0 and 1 are orthogonal; item 2 is 45 degrees from both. Ties rank by position.
    np.testing.assert_array_equal(top_k(q, q, 2, Metric.COSINE, exclude_self=True), [[2, 1], [2, 0], [0, 1]])
    np.testing.assert_array_equal(top_k(q, q, 1, Metric.COSINE, exclude_self=False)[:, 0], [0, 1, 2])
    np.testing.assert_allclose(neighbour_recall(np.array([[2, 1], [0, 2]]), np.array([[2, 1], [2, 1]])), [1.0, 0.5])


def test_score_adapter_of_a_perfect_a_useless_and_a_reverse_adapter():
    rng = np.random.default_rng(1)
    old, labels = _clustered(rng, 200, 8)
    q = _semi_orthogonal(rng, 8, 8)
    new = old @ q
    perfect = score_adapter("old-to-new", old, new, new.copy(), labels=labels, k=5)
    assert perfect.recall == 1.0 and perfect.pair_top1 == 1.0 and perfect.pairs == 200
    assert perfect.labelled is not None
    assert perfect.labelled["adapted_top1"] == perfect.labelled["new_new_top1"]
    useless = score_adapter("old-to-new", old, new, rng.normal(size=new.shape), k=5)
    assert useless.recall < 0.2 and useless.labelled is None
    reverse = score_adapter(AdapterDirection.NEW_TO_OLD, old, new, new @ q.T, k=5, metric="l2")
    assert reverse.recall == pytest.approx(1.0) and reverse.metric == "l2"
    with pytest.raises(ValueError, match="dim"):
        score_adapter("old-to-new", old, np.zeros((200, 4)), old)


def test_label_free_losses_hand_computed_and_the_uncertainty_optimum_is_the_log_error():
    h = torch.tensor([[3.0, 4.0], [1.0, 0.0]])
    t = torch.tensor([[0.0, 0.0], [1.0, 0.0]])
    assert losses.item_loss(h, t, "mse").tolist() == [12.5, 0.0]
    h2, t2 = torch.tensor([[1.0, 1.0]]), torch.tensor([[1.0, 0.0]])
    assert losses.item_loss(h2, t2, "cosine").item() == pytest.approx(1 - 1 / np.sqrt(2))
    assert losses.adapter_loss(h2, t2, "mse_cosine").item() == pytest.approx(0.5 + 1 - 1 / np.sqrt(2))
    s = torch.tensor([0.0, 0.0], requires_grad=True)
    target = torch.tensor([[2.0, 0.0], [0.0, 0.5]])
    error = losses.item_loss(torch.zeros(2, 2), target, "mse")  # [2.0, 0.125]
    optimiser = torch.optim.SGD([s], lr=0.5)
    for _ in range(400):
        optimiser.zero_grad()
        losses.uncertainty_loss(torch.zeros(2, 2), s, target, "mse").backward()
        optimiser.step()
    np.testing.assert_allclose(s.detach().numpy(), np.log(error.numpy()), atol=1e-4)
    with pytest.raises(ValueError, match="adapter loss"):
        losses.item_loss(h, t, "hinge")


# ----------------------------------------------------------------------------- paired tables


def test_paired_table_is_validated_and_read_in_id_order():
    rng = np.random.default_rng(2)
    table = _pairs_table(rng.normal(size=(6, 3)), rng.normal(size=(6, 4)), np.arange(6))
    shuffled = table.take(pa.array([3, 1, 0, 5, 2, 4]))
    pairs = pairs_from_table(shuffled, "t")
    assert pairs.ids.tolist() == sorted(pairs.ids.tolist())
    np.testing.assert_array_equal(pairs.old, vectors_of(table, OLD))
    assert (pairs.old_version, pairs.new_version) == ("v1", "v2") and pairs.labels is not None
    with pytest.raises(SchemaError, match=r"needs columns \['new'\]"):
        pairs_from_table(table.drop_columns([NEW]), "t")
    with pytest.raises(SchemaError, match="duplicate"):
        pairs_from_table(pa.concat_tables([table, table]), "t")
    bad = table.set_column(1, OLD, fixed_size_list(np.full((6, 3), np.nan, dtype=np.float32)))
    with pytest.raises(SchemaError, match="NaN"):
        pairs_from_table(bad, "t")
    mixed = table.set_column(table.schema.get_field_index(OLD_MODEL), OLD_MODEL, pa.array(["a", "b"] * 3))
    with pytest.raises(SchemaError, match="versions"):
        pairs_from_table(mixed, "t")


def test_the_held_out_split_is_seeded_stratified_and_shared_by_every_kind(rotated):
    pairs = read_pairs(rotated[0])
    config = AdapterConfig(test_fraction=0.25)
    fit_rows, test_rows = split_pairs(pairs, config)
    assert not (fit_rows & test_rows).any() and (fit_rows | test_rows).all()
    assert test_rows.sum() == pytest.approx(0.25 * len(pairs), abs=8)
    np.testing.assert_array_equal(split_pairs(pairs, config)[1], test_rows)
    assert not np.array_equal(split_pairs(pairs, AdapterConfig(test_fraction=0.25, seed=1))[1], test_rows)
    with pytest.raises(ValueError, match="too few"):
        split_pairs(pairs.take(np.arange(3)), config)


# ----------------------------------------------------------------------------- closed-form adapters


@pytest.mark.parametrize("kind", [AdapterKind.PROCRUSTES, AdapterKind.AFFINE, AdapterKind.LOWRANK])
def test_closed_form_adapters_recover_an_exact_isometry(rotated, kind):
    pairs = read_pairs(rotated[0])
    fitted = fit_adapter(kind, pairs, AdapterConfig(rank=16 if kind is AdapterKind.LOWRANK else None))
    assert fitted.score.recall == pytest.approx(1.0)
    assert fitted.score.pair_top1 == 1.0
    assert fitted.score.labelled is not None
    assert fitted.score.labelled["adapted_top1"] == pytest.approx(fitted.score.labelled["new_new_top1"])


def test_train_adapter_writes_an_artefact_that_transform_and_the_backfill_checks_accept(rotated, tmp_path):
    uri, old, new = rotated
    out = str(tmp_path / "procrustes")
    report = train_adapter(uri, out, "procrustes", AdapterConfig(min_recall=0.95))
    assert report.passed and report.chosen is not None and report.chosen.kind is AdapterKind.PROCRUSTES
    spec = read_spec(out)
    assert spec.architecture == "linear_forward" and spec.method == "fct" and spec.dims == {"old": 16, "new": 24}
    record = spec.adapter
    assert record["kind"] == "procrustes" and record["direction"] == "old-to-new"
    assert (record["old_model"], record["new_model"], record["paired"]) == ("v1", "v2", uri)
    assert record["score"]["recall"] == pytest.approx(1.0) and record["score"]["k"] == 10
    assert record["fit"]["normalize"] is True
    # `raybackfill transform` runs it as it runs any transformation: old vectors -> new space (up to the norm)
    ids = np.arange(len(old), dtype=np.int64)
    storage.write_table(embedding_table(ids, old, model="v1"), str(tmp_path / "old"))
    transform_table(str(tmp_path / "old"), out, str(tmp_path / "mapped"))
    mapped = vectors_of(storage.read_table(str(tmp_path / "mapped")).sort_by(ID))
    unit = new / np.linalg.norm(new, axis=1, keepdims=True)
    np.testing.assert_allclose(mapped, unit, atol=1e-4)
    assert check_adapter(out, 0.95, direction="old-to-new")["kind"] == "procrustes"
    with pytest.raises(AdapterGateError, match="needs new-to-old"):
        check_adapter(out, None, direction="new-to-old")
    with pytest.raises(FileExistsError):
        train_adapter(uri, out, "procrustes", AdapterConfig(min_recall=0.95))


def test_a_reverse_adapter_is_psi_for_the_query_side(rotated, tmp_path):
    uri, old, new = rotated
    out = str(tmp_path / "psi")
    report = train_adapter(uri, out, "affine", AdapterConfig(direction="new-to-old", min_recall=0.95))
    assert report.passed
    spec = read_spec(out)
    assert spec.architecture == "linear_reverse" and spec.method == "rank_merge_psi"
    assert spec.dims == {"new": 24, "old": 16}
    assert spec.adapter["fit"]["lambda"] == 0.0  # exact data: least squares wins on validation
    module = load_model(out).module
    psi = module(torch.from_numpy(new[:20])).detach().numpy()
    unit = old[:20] / np.linalg.norm(old[:20], axis=1, keepdims=True)
    np.testing.assert_allclose(psi, unit, atol=1e-4)
    with pytest.raises(ValueError, match="old-to-new only"):
        fit_adapter("fastfill", read_pairs(uri), AdapterConfig(direction="new-to-old"), train=None)
    assert AdapterKind.FASTFILL not in auto_kinds("new-to-old")


def test_below_the_bar_nothing_is_written_and_the_report_says_why(tmp_path):
    rng = np.random.default_rng(3)
    old, _ = _clustered(rng, 300, 8)
    unrelated, _ = _clustered(rng, 300, 8)
    uri = str(tmp_path / "pairs")
    storage.write_table(_pairs_table(old, unrelated), uri)
    out = str(tmp_path / "adapter")
    report = train_adapter(uri, out, ["procrustes", "affine", "lowrank"], AdapterConfig(min_recall=0.5))
    assert not report.passed and report.spec is None
    assert not os.path.exists(out)
    table = report.table()
    assert table.count("below bar") == 3 and "(kept)" not in table
    assert all(f.score.recall < 0.5 for f in report.fitted)


def test_side_information_feeds_a_closed_form_adapter(tmp_path):
    rng = np.random.default_rng(4)
    old, _ = _clustered(rng, 400, 6)
    side = rng.normal(size=(400, 4)).astype(np.float32)
    new = (np.c_[old, side] @ rng.normal(size=(10, 12))).astype(np.float32)  # new depends on the side-information too
    table = _pairs_table(old, new).append_column("side", fixed_size_list(side))
    uri = str(tmp_path / "pairs")
    storage.write_table(table, uri)
    pairs = read_pairs(uri)
    # an exact linear map of the raw vectors: fitted without normalising (as for an l2 index)
    with_side = fit_adapter("affine", pairs, AdapterConfig(side_info=True, metric="l2"))
    without = fit_adapter("affine", pairs, AdapterConfig(metric="l2"))
    assert with_side.score.recall == pytest.approx(1.0) and without.score.recall < 0.9
    assert with_side.module.dims == {"old": 6, "new": 12, "side": 4}
    with pytest.raises(ValueError, match="no 'side' column"):
        fit_adapter("affine", Pairs(pairs.ids, pairs.old, pairs.new), AdapterConfig(side_info=True))
    with pytest.raises(ValueError, match="only an old-to-new"):
        AdapterConfig(direction="new-to-old", side_info=True)


# ----------------------------------------------------------------------------- the CLI and the gate


def test_train_adapter_cli_refuses_below_the_bar_and_writes_above_it(rotated, tmp_path, capsys):
    uri = rotated[0]
    out = str(tmp_path / "a")
    code = main(["train", "adapter", "--paired", uri, "--kind", "lowrank", "--rank", "2", "--min-recall", "0.99",
                 "--out", out])  # fmt: skip
    captured = capsys.readouterr()
    assert code == 1 and not os.path.exists(out)
    assert "below --min-recall 0.99" in captured.err and "nothing written" in captured.err
    assert "lowrank" in captured.out and "below bar" in captured.out
    code = main(["train", "adapter", "--paired", uri, "--kind", "procrustes", "--min-recall", "0.99", "--out", out])
    captured = capsys.readouterr()
    assert code == 0 and "wrote procrustes adapter 'a'" in captured.out and "(kept)" in captured.out
    record = json.loads(storage.read_bytes(os.path.join(out, "model.json")))["adapter"]
    assert record["min_recall"] == 0.99
    with pytest.raises(SystemExit):  # the bar is the user's call: no default
        main(["train", "adapter", "--paired", uri, "--kind", "affine", "--out", str(tmp_path / "b")])
    assert "--min-recall" in capsys.readouterr().err


def test_check_adapter_refuses_a_low_score_an_unscored_model_and_a_bad_bar(rotated, tmp_path):
    out = str(tmp_path / "low")
    train_adapter(rotated[0], out, "lowrank", AdapterConfig(rank=2, min_recall=None))
    recall = read_spec(out).adapter["score"]["recall"]
    assert recall < 0.99
    assert check_adapter(out, None)["kind"] == "lowrank"
    assert check_adapter(out, recall)["score"]["recall"] == recall
    with pytest.raises(AdapterGateError, match=r"recall@10 .* is below the required 0\.9900"):
        check_adapter(out, 0.99)
    with pytest.raises(ValueError, match=r"in \[0, 1\]"):
        check_adapter(out, 1.5)
    # a transformation trained with labels has no adapter record: a bar refuses it, no bar lets it through
    from raybackfill.models.artifacts import ModelSpec, save_model
    from raybackfill.models.registry import build_model

    plain = str(tmp_path / "fct")
    save_model(build_model("linear_forward", old_dim=2, new_dim=2), plain, ModelSpec("linear_forward", "fct",
               kwargs={"old_dim": 2, "new_dim": 2}))  # fmt: skip
    assert check_adapter(plain, None, direction="old-to-new") == {}
    with pytest.raises(AdapterGateError, match="no recorded adapter score"):
        check_adapter(plain, 0.5)


def test_backfill_cli_refuses_an_adapter_below_min_adapter_recall_before_starting(rotated, tmp_path, capsys):
    out = str(tmp_path / "low")
    train_adapter(rotated[0], out, "lowrank", AdapterConfig(rank=2, min_recall=None))
    code = main(["backfill", "--gallery", str(tmp_path / "g"), "--old-embeddings", str(tmp_path / "o"),
                 "--upgrade", str(tmp_path / "new"), "--method", "fct", "--policy", "random", "--transformation", out,
                 "--min-adapter-recall", "0.99", "--out", str(tmp_path / "bf"), "--no-index"])  # fmt: skip
    assert code == 2
    assert "is below the required 0.9900" in capsys.readouterr().err
    assert not os.path.exists(tmp_path / "bf")
    code = main(["backfill", "--gallery", "g", "--old-embeddings", "o", "--upgrade", "n", "--method", "rank_merge",
                 "--policy", "random", "--min-adapter-recall", "0.5", "--out", str(tmp_path / "bf")])  # fmt: skip
    assert code == 2 and "--min-adapter-recall gates --transformation" in capsys.readouterr().err


def test_the_stored_embedding_column_name_is_what_transform_reads(tmp_path):
    # a paired table is not an embedding table: transform refuses it with a message naming the column
    rng = np.random.default_rng(5)
    storage.write_table(_pairs_table(rng.normal(size=(10, 3)), rng.normal(size=(10, 3))), str(tmp_path / "p"))
    out = str(tmp_path / "a")
    train_adapter(str(tmp_path / "p"), out, "procrustes", AdapterConfig(min_recall=None, test_fraction=0.3))
    with pytest.raises(SchemaError, match=EMBEDDING):
        transform_table(str(tmp_path / "p"), out, str(tmp_path / "t"))
