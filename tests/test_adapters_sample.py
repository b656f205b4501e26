"""`raybackfill sample` on a real local Ray cluster with tiny encoders of different dimensions."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest
import torch

from raybackfill.adapters.paired import NEW, OLD, SIDE, read_pairs
from raybackfill.adapters.sample import SAMPLE_JSON, choose_ids, paired_sample
from raybackfill.cli.main import main
from raybackfill.data import storage
from raybackfill.data.schema import ID, IMAGE, SchemaError, image_table, vectors_of
from raybackfill.data.synth import synthesize
from raybackfill.embed.pipeline import PoolConfig, embed_gallery
from raybackfill.models.artifacts import ModelSpec, save_model
from raybackfill.models.registry import build_model

CORRUPT_ID = 6


def _save(uri: str, version: str, dim: int) -> str:
    kwargs = {"embedding_dim": dim, "num_classes": 4, "width": 4}
    save_model(build_model("small_cnn", **kwargs), uri, ModelSpec("small_cnn", version, kwargs))
    return uri


@pytest.fixture(scope="module")
def inputs(tmp_path_factory) -> dict:
    """40 images of 4 classes in 2 shards (id 6 corrupt), old (dim 8), new (dim 12) and side (dim 4) encoders."""
    torch.manual_seed(0)
    root = tmp_path_factory.mktemp("sample-inputs")
    synth = synthesize(classes=4, per_class=10, size=16)
    images = synth.column(IMAGE).to_pylist()
    images[CORRUPT_ID] = b"not an image"
    ids = synth.column(ID).to_numpy()
    labels = synth.column("label").to_numpy()
    storage.write_table(image_table(ids, images, labels=labels), str(root / "images"), rows_per_shard=20)
    return {
        "images": str(root / "images"),
        "labels": dict(zip(ids.tolist(), labels.tolist(), strict=True)),
        "old": _save(str(root / "old"), "v1", 8),
        "new": _save(str(root / "new"), "v2", 12),
        "side": _save(str(root / "side"), "side-v1", 4),
    }


def test_choose_ids_uniform_and_stratified_are_seeded_and_exact():
    ids = np.arange(100, 200)
    strata = np.repeat([0, 1, 2], [50, 30, 20])
    uniform = choose_ids(ids, 10, seed=1)
    assert len(np.unique(uniform)) == 10 and np.isin(uniform, ids).all()
    np.testing.assert_array_equal(uniform, choose_ids(ids[::-1], 10, seed=1))
    assert not np.array_equal(uniform, choose_ids(ids, 10, seed=2))
    chosen = choose_ids(ids, 10, strata=strata, seed=0)
    per_class = np.bincount(strata[np.isin(ids, chosen)], minlength=3)
    assert per_class.tolist() == [5, 3, 2]
    # 7 of 100: exact shares 3.5, 2.1, 1.4 -> floors 3, 2, 1 and the one left goes to the largest remainder (0.5)
    assert np.bincount(strata[np.isin(ids, choose_ids(ids, 7, strata=strata))]).tolist() == [4, 2, 1]
    np.testing.assert_array_equal(choose_ids(ids, 500), ids)
    with pytest.raises(ValueError, match="at least 1"):
        choose_ids(ids, 0)


def test_paired_sample_embeds_both_models_in_one_pass_and_matches_the_embed_job(ray_cluster, inputs, tmp_path):
    out = str(tmp_path / "pairs")
    pool = PoolConfig(batch_size=8)
    result = paired_sample(
        inputs["images"], inputs["old"], inputs["new"], 40, out, stratify_by="label", seed=0,
        side_info_encoder=inputs["side"], pool=pool,
    )  # fmt: skip
    assert (result.requested, result.rows, result.quarantined) == (40, 39, 1)
    assert result.per_class == {0: 10, 1: 10, 2: 10, 3: 10}
    pairs = read_pairs(out)
    assert CORRUPT_ID not in pairs.ids and len(pairs) == 39
    assert pairs.old.shape == (39, 8) and pairs.new.shape == (39, 12) and pairs.side is not None
    assert (pairs.old_version, pairs.new_version) == ("v1", "v2")
    assert pairs.labels is not None
    assert pairs.labels.tolist() == [inputs["labels"][i] for i in pairs.ids.tolist()]
    # the same vectors as embedding the gallery with each encoder on its own
    for column, model in ((OLD, "old"), (NEW, "new"), (SIDE, "side")):
        alone = str(tmp_path / f"alone-{column}")
        embed_gallery(inputs["images"], {"embedding": inputs[model]}, alone, pool=pool, progress=False)
        table = storage.read_table(alone).sort_by(ID)
        np.testing.assert_array_equal(table.column(ID).to_numpy(), pairs.ids)
        np.testing.assert_allclose(vectors_of(table), getattr(pairs, column if column != SIDE else "side"), atol=1e-5)
    record = json.loads(storage.read_bytes(os.path.join(out, SAMPLE_JSON)))
    assert record["models"] == {"old": "v1", "new": "v2", "side": "side-v1"} and record["quarantined"] == 1
    with pytest.raises(FileExistsError, match="already holds a table"):
        paired_sample(inputs["images"], inputs["old"], inputs["new"], 5, out)


def test_sample_command_uniform_subset_and_bad_stratification_column(ray_cluster, inputs, tmp_path, capsys):
    out = str(tmp_path / "pairs")
    args = ["sample", "--gallery", inputs["images"], "--old-encoder", inputs["old"], "--new-encoder", inputs["new"]]
    assert main([*args, "--n", "12", "--seed", "3", "--out", out, "--batch-size", "4"]) == 0
    printed = capsys.readouterr().out
    pairs = read_pairs(out)
    expected = choose_ids(np.arange(40), 12, seed=3)
    np.testing.assert_array_equal(pairs.ids, expected[expected != CORRUPT_ID])
    assert f"wrote {len(pairs)} pairs to {out} (12 sampled" in printed
    assert main([*args, "--n", "5", "--stratify-by", "colour", "--out", str(tmp_path / "x")]) == 2
    assert "no column 'colour' to stratify by" in capsys.readouterr().err
    with pytest.raises(SchemaError, match="integer classes"):
        paired_sample(inputs["images"], inputs["old"], inputs["new"], 5, str(tmp_path / "y"), stratify_by=IMAGE)


def test_sample_and_adapter_on_s3(ray_cluster, inputs, s3_bucket):
    from raybackfill.adapters.fit import AdapterConfig, train_adapter
    from raybackfill.adapters.gate import check_adapter

    pairs_uri, adapter_uri = f"{s3_bucket}/pairs", f"{s3_bucket}/models/adapter"
    result = paired_sample(inputs["images"], inputs["old"], inputs["new"], 40, pairs_uri, pool=PoolConfig(batch_size=8))
    assert result.rows == 39 and storage.exists(f"{pairs_uri}/{SAMPLE_JSON}")
    report = train_adapter(pairs_uri, adapter_uri, "affine", AdapterConfig(min_recall=0.0, test_fraction=0.25))
    assert report.passed
    record = check_adapter(adapter_uri, 0.0, direction="old-to-new")
    assert report.chosen is not None
    # held out: a quarter of each class of 10, 10, 10 and 9 pairs, rounded: 3 + 3 + 3 + 2
    assert record["paired"] == pairs_uri and record["score"]["pairs"] == report.chosen.score.pairs == 11
