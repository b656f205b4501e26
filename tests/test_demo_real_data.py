"""`raybackfill demo --quick --data` on real images as a user brings them: scikit-learn's handwritten digits,
exported as a class-per-folder tree and imported with the ImageFolder importer (so the table is sorted by class).
"""

from __future__ import annotations

import json
import os

import numpy as np
import pyarrow as pa
import pytest
from real_data import export_digits

from raybackfill.cli.main import main
from raybackfill.data import storage
from raybackfill.data.importers import import_image_folder
from raybackfill.data.schema import LABEL


@pytest.fixture(scope="module")
def digits(tmp_path_factory) -> str:
    root = tmp_path_factory.mktemp("digits")
    uri = str(root / "table")
    import_image_folder(str(export_digits(root / "folder")), uri, size=16)
    return uri


@pytest.mark.slow
def test_quick_demo_on_the_real_digits_gives_the_new_model_a_wide_lead(ray_cluster, digits, tmp_path, capsys):
    out = str(tmp_path / "demo")
    assert main(["demo", "--quick", "--data", digits, "--out", out]) == 0
    captured = capsys.readouterr()
    printed, logged = captured.out, captured.err
    for model in ("old", "new", "bct", "ract"):
        assert f"  {model} model:" in logged and "validation" in logged
    assert len(printed.strip().splitlines()) <= 25 and f"{out}/report.md" in printed
    with open(os.path.join(out, "report.json")) as f:
        report = json.load(f)
    old, new = report["anchors"]["old_old"], report["anchors"]["new_new"]
    # The old model saw 5 of the 10 digits; the new one all of them.
    assert new["top1"] > old["top1"] + 0.08
    assert new["map"] > old["map"] + 0.2
    trained = json.loads(storage.read_bytes(os.path.join(out, "models", "new", "model.json")))["training"]
    assert trained["val_accuracy"] > 0.9 and trained["chance_accuracy"] < 0.15
    # The backbones' learning rate was chosen on the old model's validation split, among three.
    training = report["training"]
    assert len(training["lr_search"]) == 3 and f"{training['backbone_lr']:g}" in training["lr_search"]
    assert training["lr_search"][f"{training['backbone_lr']:g}"] == max(training["lr_search"].values())
    assert set(training["backbones"]) == {"old", "new", "bct", "ract"}
    assert f"learning rate {training['backbone_lr']:g}" in logged


def test_demo_on_random_labels_stops_with_the_not_learned_message(ray_cluster, digits, tmp_path, capsys):
    table = storage.read_table(digits)
    labels = np.random.default_rng(0).permutation(table.column(LABEL).to_numpy())
    random_labels = str(tmp_path / "random")
    storage.write_table(table.set_column(table.schema.get_field_index(LABEL), LABEL, pa.array(labels)), random_labels)
    out = str(tmp_path / "demo")
    assert main(["demo", "--quick", "--data", random_labels, "--out", out]) == 2
    err = capsys.readouterr().err
    assert "raybackfill demo: error: the old model did not learn: validation accuracy" in err
    assert "largest class" in err
    assert not os.path.exists(os.path.join(out, "report.json"))


def test_train_backbone_command_fails_on_a_model_that_did_not_learn(ray_cluster, digits, tmp_path, capsys):
    table = storage.read_table(digits)
    labels = np.random.default_rng(1).permutation(table.column(LABEL).to_numpy())
    uri = str(tmp_path / "random")
    storage.write_table(table.set_column(table.schema.get_field_index(LABEL), LABEL, pa.array(labels)), uri)
    argv = ["train", "backbone", "--images", uri, "--out", str(tmp_path / "m"), "--workers", "0", "--epochs", "2",
            "--storage", str(tmp_path / "runs"), "--embedding-dim", "16"]  # fmt: skip
    assert main(argv) == 1
    captured = capsys.readouterr()
    assert "kept epoch" in captured.out and "val_accuracy" in captured.out
    assert "the m model did not learn" in captured.err
