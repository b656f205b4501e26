"""The issue's acceptance on real images: two backbones trained here on scikit-learn's handwritten digits (the old
one on half the digits, the new one on all, different dimensions), a paired sample of a disjoint gallery, and
every adapter fitted WITHOUT labels. On held-out pairs, each adapter's new-query top-1 on the adapted old gallery
must beat old/old (labels are used only to score)."""

from __future__ import annotations

import dataclasses

import pyarrow.compute as pc
import pytest
from real_data import export_digits

from raybackfill.adapters.fit import AdapterConfig, fit_adapter, split_pairs
from raybackfill.adapters.paired import Pairs, read_pairs
from raybackfill.adapters.sample import paired_sample
from raybackfill.adapters.scores import score_adapter
from raybackfill.data import storage
from raybackfill.data.importers import import_image_folder
from raybackfill.data.schema import ID, LABEL, embedding_table
from raybackfill.embed.pipeline import PoolConfig
from raybackfill.models.artifacts import load_model
from raybackfill.models.transformations import apply_transformation
from raybackfill.train.api import train_backbone, train_transformation
from raybackfill.train.trainer import TrainConfig
from raybackfill.types import AdapterKind


@pytest.fixture(scope="module")
def upgrade(ray_cluster, tmp_path_factory) -> dict:
    """Digits split by id parity: even ids train the backbones, odd ids are the gallery that is sampled."""
    root = tmp_path_factory.mktemp("digits-adapters")
    table_uri = str(root / "table")
    import_image_folder(str(export_digits(root / "folder")), table_uri, size=16)
    table = storage.read_table(table_uri)
    even = pc.equal(pc.bit_wise_and(table.column(ID), 1), 0)
    train, gallery = table.filter(even), table.filter(pc.invert(even))
    old_train = train.filter(pc.less(train.column(LABEL), 5))  # the old model saw digits 0-4
    for name, part in (("old-train", old_train), ("new-train", train), ("gallery", gallery)):
        storage.write_table(part, str(root / name))
    models = {}
    for name, dim, epochs in (("old", 32, 6), ("new", 48, 8)):
        config = TrainConfig(name=name, storage_path=str(root / "runs"), num_workers=0, epochs=epochs, batch_size=32,
                             lr=3e-3)  # fmt: skip
        train_backbone(str(root / f"{name}-train"), str(root / name), embedding_dim=dim, backbone_kwargs={"width": 8},
                       num_classes=10, train=config, augment=False)  # fmt: skip
        models[name] = str(root / name)
    pairs = str(root / "pairs")
    paired_sample(str(root / "gallery"), models["old"], models["new"], 10_000, pairs, pool=PoolConfig(batch_size=128))
    return {"pairs": pairs, "runs": str(root / "runs"), "new_model": models["new"], "root": root}


@pytest.mark.slow
def test_every_adapter_fitted_without_labels_lifts_new_query_top1_above_old_old(upgrade):
    labelled = read_pairs(upgrade["pairs"])
    assert labelled.labels is not None and len(labelled) == 898
    unlabelled = Pairs(labelled.ids, labelled.old, labelled.new)  # what the fits see: no labels
    config = AdapterConfig(test_fraction=0.3, min_recall=None)
    _, test_rows = split_pairs(unlabelled, config)
    held = labelled.take(test_rows)
    train = TrainConfig(name="adapter", storage_path=upgrade["runs"], num_workers=0, epochs=30, batch_size=64, lr=3e-3)
    figures = {}
    for kind in AdapterKind:
        fitted = fit_adapter(kind, unlabelled, config, train)
        mapped, _ = apply_transformation(fitted.module, held.old)
        score = score_adapter("old-to-new", held.old, held.new, mapped, labels=held.labels)
        assert score.labelled is not None
        figures[kind.value] = score.labelled | {"recall": score.recall}
    # FCT with the new model's classifier and the labels, on the same fit rows: what the adapters replace
    fit = labelled.take(~test_rows)
    root = upgrade["root"]
    for name, vectors in (("fct-old", fit.old), ("fct-new", fit.new)):
        storage.write_table(embedding_table(fit.ids, vectors, extra={LABEL: fit.labels}), str(root / name))
    train_transformation(str(root / "fct-old"), str(root / "fct-new"), str(root / "fct"),
                         new_model=upgrade["new_model"], train=dataclasses.replace(train, name="fct"))  # fmt: skip
    mapped, _ = apply_transformation(load_model(str(root / "fct")).module, held.old)
    score = score_adapter("old-to-new", held.old, held.new, mapped, labels=held.labels)
    assert score.labelled is not None
    figures["fct (labels)"] = score.labelled | {"recall": score.recall}
    anchors = next(iter(figures.values()))
    print(f"\nheld-out pairs {len(held)}: old/old top-1 {anchors['old_old_top1']:.4f} "
          f"mAP {anchors['old_old_map']:.4f}, "
          f"new/new top-1 {anchors['new_new_top1']:.4f} mAP {anchors['new_new_map']:.4f}")  # fmt: skip
    for kind, f in figures.items():
        print(f"{kind:<13} new query / adapted old gallery: top-1 {f['adapted_top1']:.4f}, mAP {f['adapted_map']:.4f}, "
              f"recall@10 {f['recall']:.4f}")  # fmt: skip
    assert anchors["new_new_top1"] > anchors["old_old_top1"]  # the upgrade is worth having
    for kind, f in figures.items():
        assert f["adapted_top1"] > f["old_old_top1"], f"{kind}: {f}"
