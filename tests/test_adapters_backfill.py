"""An adapter fitted without labels drives a real backfill: the gate, the instant phase through the adapter and
the uncertainty scores of its label-free FastFill head (real local Ray cluster, tiny encoders)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from raybackfill.adapters.fit import AdapterConfig, train_adapter
from raybackfill.adapters.sample import paired_sample
from raybackfill.cli.main import main
from raybackfill.data import storage
from raybackfill.data.schema import ID, IMAGE, UNCERTAINTY, image_table, vectors_of
from raybackfill.data.synth import synthesize
from raybackfill.embed.pipeline import PoolConfig, embed_gallery
from raybackfill.models.artifacts import ModelSpec, load_model, read_spec, save_model
from raybackfill.models.registry import build_model
from raybackfill.models.transformations import apply_transformation
from raybackfill.train.trainer import TrainConfig


def _save(uri: str, version: str, dim: int) -> str:
    kwargs = {"embedding_dim": dim, "num_classes": 4, "width": 4}
    save_model(build_model("small_cnn", **kwargs), uri, ModelSpec("small_cnn", version, kwargs))
    return uri


@pytest.fixture(scope="module")
def upgrade(ray_cluster, tmp_path_factory) -> dict:
    torch.manual_seed(0)
    root = tmp_path_factory.mktemp("adapter-backfill")
    synth = synthesize(classes=4, per_class=12, size=16)
    ids = synth.column(ID).to_numpy()
    gallery = str(root / "gallery")
    storage.write_table(image_table(ids, synth.column(IMAGE).to_pylist()), gallery, rows_per_shard=24)  # no labels
    old, new = _save(str(root / "old"), "v1", 8), _save(str(root / "new"), "v2", 12)
    pool = PoolConfig(batch_size=8)
    embed_gallery(gallery, {"embedding": old}, str(root / "old-emb"), pool=pool, progress=False)
    paired_sample(gallery, old, new, 48, str(root / "pairs"), pool=pool)
    train = TrainConfig(name="ff", storage_path=str(root / "runs"), num_workers=0, epochs=3, batch_size=16)
    report = train_adapter(str(root / "pairs"), str(root / "ff"), "fastfill", AdapterConfig(min_recall=0.0,
                           test_fraction=0.25), train=train)  # fmt: skip
    assert report.passed
    return {"root": root, "gallery": gallery, "old": str(root / "old-emb"), "new": new, "ff": str(root / "ff")}


@pytest.mark.slow
def test_a_label_free_fastfill_adapter_backfills_by_its_uncertainty_behind_its_gate(upgrade, tmp_path, capsys):
    recall = read_spec(upgrade["ff"]).adapter["score"]["recall"]
    args = ["backfill", "--gallery", upgrade["gallery"], "--old-embeddings", upgrade["old"], "--upgrade",
            upgrade["new"], "--method", "fastfill", "--transformation", upgrade["ff"], "--policy", "uncertainty",
            "--tiers", "4", "--batch-size", "8", "--no-index", "--no-progress"]  # fmt: skip
    refused = str(tmp_path / "refused")
    assert main([*args, "--min-adapter-recall", f"{min(recall + 0.01, 1.0)}", "--out", refused]) == 2
    assert "is below the required" in capsys.readouterr().err
    assert not (tmp_path / "refused").exists()
    out = str(tmp_path / "bf")
    assert main([*args, "--min-adapter-recall", f"{recall}", "--out", out]) == 0
    # the instant phase served every stored old embedding through the adapter, exactly as it maps them
    stored = storage.read_table(upgrade["old"]).sort_by(ID)
    transformed = storage.read_committed(f"{out}/transformed", [ID, "embedding", UNCERTAINTY]).sort_by(ID)
    np.testing.assert_array_equal(transformed.column(ID).to_numpy(), stored.column(ID).to_numpy())
    expected, uncertainty = apply_transformation(load_model(upgrade["ff"]).module, vectors_of(stored))
    assert uncertainty is not None
    np.testing.assert_allclose(vectors_of(transformed), expected, atol=1e-5)
    # its label-free uncertainty is what the backfill stored and ordered by; then every item was re-embedded
    np.testing.assert_allclose(transformed.column(UNCERTAINTY).to_numpy(), uncertainty, atol=1e-5)
    new = storage.read_committed(f"{out}/new", [ID])
    assert sorted(new.column(ID).to_numpy().tolist()) == sorted(stored.column(ID).to_numpy().tolist())
