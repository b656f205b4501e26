"""Trained adapters on Ray Train (local mode, and one real worker): the label-free FCT MLP, FastFill's head on
the label-free loss, psi, and `train adapter --kind auto`."""

from __future__ import annotations

import json
import os

import numpy as np
import pyarrow as pa
import pytest
import torch
from scipy.stats import spearmanr

from raybackfill.adapters.fit import AdapterConfig, fit_adapter, split_pairs, train_adapter
from raybackfill.adapters.losses import item_loss
from raybackfill.adapters.paired import NEW, NEW_MODEL, OLD, OLD_MODEL, SIDE, read_pairs
from raybackfill.cli.main import main
from raybackfill.cli.transform import transform_table
from raybackfill.data import storage
from raybackfill.data.schema import EMBEDDING, ID, SIDE_INFO, fixed_size_list, vectors_of
from raybackfill.models.artifacts import load_model, read_spec
from raybackfill.models.transformations import apply_transformation
from raybackfill.train.trainer import TrainConfig
from raybackfill.types import AdapterKind

N, D_OLD, D_NEW = 600, 12, 16


@pytest.fixture(scope="module")
def pairs_uri(tmp_path_factory) -> str:
    """A nonlinear map old -> new; items with old[:, 0] > 1 get a noisy new embedding (the hard region)."""
    rng = np.random.default_rng(0)
    labels = rng.integers(0, 6, size=N)
    old = (rng.normal(size=(6, D_OLD))[labels] * 2 + rng.normal(size=(N, D_OLD))).astype(np.float32)
    new = np.tanh(old @ rng.normal(size=(D_OLD, D_NEW)) / 3) * 3
    hard = old[:, 0] > 1.0
    new[hard] += rng.normal(size=(int(hard.sum()), D_NEW)) * 2.0
    side = np.c_[old[:, :2], rng.normal(size=(N, 2))].astype(np.float32)
    table = pa.table({
        ID: pa.array(np.arange(N, dtype=np.int64)), OLD: fixed_size_list(old),
        NEW: fixed_size_list(new.astype(np.float32)), SIDE: fixed_size_list(side),
        OLD_MODEL: pa.array(["v1"] * N), NEW_MODEL: pa.array(["v2"] * N),
    })  # fmt: skip
    uri = str(tmp_path_factory.mktemp("trained") / "pairs")
    storage.write_table(table, uri)
    return uri


def _train(tmp_path, name: str, **kwargs) -> TrainConfig:
    return TrainConfig(
        name=name, storage_path=str(tmp_path / "runs"), num_workers=kwargs.pop("num_workers", 0),
        epochs=kwargs.pop("epochs", 25), batch_size=64, lr=3e-3, **kwargs,
    )  # fmt: skip


def test_the_mlp_adapter_learns_a_nonlinear_map_better_than_an_affine_one(ray_cluster, pairs_uri, tmp_path):
    pairs = read_pairs(pairs_uri)
    mlp = fit_adapter("mlp", pairs, AdapterConfig(), _train(tmp_path, "mlp"))
    affine = fit_adapter("affine", pairs, AdapterConfig())
    assert mlp.architecture == "forward_transformation"
    assert mlp.training["epochs"] == 25 and "val_loss" in mlp.training
    assert mlp.score.recall > 0.3 and mlp.score.pair_top1 > 0.3
    assert mlp.score.recall > affine.score.recall
    # the run's validation rows are carved from the fit rows, never the gate's held-out ones
    fit_rows, _ = split_pairs(pairs, AdapterConfig())
    assert mlp.fit["fit_rows"] == int(fit_rows.sum())


def test_fastfill_on_the_label_free_loss_predicts_each_items_error(ray_cluster, pairs_uri, tmp_path):
    pairs = read_pairs(pairs_uri)
    out = str(tmp_path / "fastfill")
    config = AdapterConfig(min_recall=0.0)
    report = train_adapter(pairs, out, "fastfill", config, train=_train(tmp_path, "ff"))
    assert report.passed
    spec = read_spec(out)
    assert spec.architecture == "fastfill_transformation" and spec.method == "fastfill"
    assert spec.adapter["kind"] == "fastfill" and spec.adapter["fit"]["loss"] == "mse_cosine"
    _, held_out = split_pairs(pairs, config)
    test = pairs.take(held_out)
    h, uncertainty = apply_transformation(load_model(out).module, test.old)
    assert uncertainty is not None
    target = test.new / np.linalg.norm(test.new, axis=1, keepdims=True)  # the fit's normalised target
    error = item_loss(torch.from_numpy(h), torch.from_numpy(target), "mse_cosine").numpy()
    assert spearmanr(error, test.old[:, 0] > 1.0).statistic > 0.5  # the noisy region is where h errs
    # the head predicts each held-out item's label-free error: the uncertainty order needs no labels
    result = spearmanr(uncertainty, error)
    assert result.statistic > 0.2 and result.pvalue < 0.01


def test_side_information_reaches_the_trained_adapter_and_the_transform(ray_cluster, pairs_uri, tmp_path):
    out = str(tmp_path / "fct-side")
    report = train_adapter(
        pairs_uri, out, "mlp", AdapterConfig(side_info=True, min_recall=0.0), train=_train(tmp_path, "s", epochs=2)
    )
    assert report.passed
    spec = read_spec(out)
    assert spec.method == "fct_side_info" and spec.dims == {"old": D_OLD, "side": 4, "new": D_NEW}
    # `raybackfill transform` (the backfill's instant-phase batch function) feeds it the stored side_info column
    old, mapped = str(tmp_path / "old"), str(tmp_path / "mapped")
    table = storage.read_table(pairs_uri)
    storage.write_table(
        pa.table({ID: table.column(ID), EMBEDDING: table.column(OLD), SIDE_INFO: table.column(SIDE)}), old
    )
    transform_table(old, out, mapped)
    assert vectors_of(storage.read_table(mapped)).shape == (N, D_NEW)
    storage.write_table(pa.table({ID: table.column(ID), EMBEDDING: table.column(OLD)}), str(tmp_path / "no-side"))
    with pytest.raises((ValueError, OSError), match="side_info"):
        transform_table(str(tmp_path / "no-side"), out, str(tmp_path / "mapped2"))


def test_psi_trains_on_a_real_ray_train_worker(ray_cluster, pairs_uri, tmp_path):
    out = str(tmp_path / "psi")
    train = _train(tmp_path, "psi", num_workers=1, cpus_per_worker=0.5, epochs=3)
    report = train_adapter(pairs_uri, out, "mlp", AdapterConfig(direction="new-to-old", min_recall=0.0), train=train)
    assert report.passed
    spec = read_spec(out)
    assert spec.architecture == "reverse_transformation" and spec.method == "rank_merge_psi"
    assert spec.dims == {"new": D_NEW, "old": D_OLD} and spec.training["epochs"] == 3
    assert os.path.isdir(tmp_path / "runs" / "psi-mlp")  # the run's checkpoints, under the kind's own name


def test_train_adapter_auto_fits_every_kind_prints_the_table_and_keeps_the_best(ray_cluster, pairs_uri, tmp_path,
                                                                               capsys):  # fmt: skip
    out = str(tmp_path / "auto")
    code = main(["train", "adapter", "--paired", pairs_uri, "--kind", "auto", "--min-recall", "0.1", "--out", out,
                 "--workers", "0", "--epochs", "4", "--storage", str(tmp_path / "runs")])  # fmt: skip
    printed = capsys.readouterr().out
    assert code == 0
    rows = [line for line in printed.splitlines() if line.split() and line.split()[0] in {k.value for k in AdapterKind}]
    assert {line.split()[0] for line in rows} == {k.value for k in AdapterKind}
    recalls = [float(line.split()[1]) for line in rows]
    assert recalls == sorted(recalls, reverse=True)  # best first
    kept = [line for line in rows if "(kept)" in line]
    assert len(kept) == 1 and kept[0] == rows[0]
    record = json.loads(storage.read_bytes(os.path.join(out, "model.json")))["adapter"]
    assert record["kind"] == rows[0].split()[0] and record["score"]["recall"] == pytest.approx(recalls[0], abs=1e-4)
