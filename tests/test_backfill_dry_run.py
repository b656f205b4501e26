"""`backfill --dry-run` on a real local cluster: it writes nothing, and its counts are the real run's."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from raybackfill.backfill.estimate import StreamTiming, dry_run, time_stream
from raybackfill.backfill.run import BackfillConfig, run_backfill
from raybackfill.cli.main import main
from raybackfill.data import storage
from raybackfill.data.schema import ID, IMAGE, image_table
from raybackfill.data.synth import synthesize
from raybackfill.embed.pipeline import PoolConfig, embed_gallery
from raybackfill.models.artifacts import ModelSpec, save_model
from raybackfill.models.registry import build_model


def _save(uri: str, architecture: str, version: str, **kwargs) -> str:
    save_model(build_model(architecture, **kwargs), uri, ModelSpec(architecture, version, kwargs))
    return uri


@pytest.fixture(scope="module")
def inputs(ray_cluster, tmp_path_factory) -> dict:
    """48 images in 3 shards, 40 of them with a stored old embedding, a new model and a FastFill transformation."""
    torch.manual_seed(0)
    root = tmp_path_factory.mktemp("dry-run")
    synth = synthesize(classes=4, per_class=12, size=16)
    ids = synth.column(ID).to_numpy()
    storage.write_table(image_table(ids, synth.column(IMAGE).to_pylist(), labels=ids % 4), str(root / "gallery"),
                        rows_per_shard=16)  # fmt: skip
    cnn = {"num_classes": 4, "width": 4}
    old = _save(str(root / "old"), "small_cnn", "v1", embedding_dim=8, **cnn)
    new = _save(str(root / "new"), "small_cnn", "v2", embedding_dim=12, **cnn)
    fastfill = _save(str(root / "ff"), "fastfill_transformation", "ff", old_dim=8, new_dim=12, hidden_dim=8,
                     mixer_dim=8)  # fmt: skip
    embedded = str(root / "old-all")
    embed_gallery(str(root / "gallery"), {"embedding": old}, embedded, progress=False)
    table = storage.read_table(embedded).sort_by(ID)
    storage.write_table(table.slice(0, 40), str(root / "old-emb"))
    return {"root": root, "gallery": str(root / "gallery"), "old": str(root / "old-emb"), "new": new, "ff": fastfill}


def _files(root) -> dict[str, int]:
    return {str(p): p.stat().st_size for p in root.rglob("*") if p.is_file()}


def test_time_stream_measures_the_first_batch_and_the_steady_rate(ray_cluster):
    import ray

    timing, parts = time_stream(ray.data.range(40, override_num_blocks=4).map_batches(lambda b: b, batch_size=None))
    assert timing.rows == 40 and sum(len(p[ID]) for p in parts) == 40 and timing.batches >= 1
    assert timing.rate > 0 and timing.first_seconds >= 0
    manual = StreamTiming(rows=30, first_seconds=2.0, first_rows=10, rate=5.0, batches=3)
    assert manual.seconds_for(10) == 2.0 and manual.seconds_for(60) == pytest.approx(12.0)
    assert manual.seconds_for(0) == 0.0


def test_dry_run_writes_nothing_and_counts_what_the_real_run_does(inputs, tmp_path, capsys):
    out = str(tmp_path / "bf")
    before = _files(inputs["root"])
    args = ["backfill", "--gallery", inputs["gallery"], "--old-embeddings", inputs["old"], "--upgrade", inputs["new"],
            "--method", "fastfill", "--transformation", inputs["ff"], "--policy", "uncertainty", "--tiers", "4",
            "--batch-size", "8", "--out", out, "--no-index", "--budget", "30", "--dry-run"]  # fmt: skip
    assert main(args) == 0
    printed = capsys.readouterr().out
    assert _files(inputs["root"]) == before and not (tmp_path / "bf").exists()
    assert "dry run (nothing written): 40 items planned of 48 gallery rows and 40 old embeddings" in printed
    assert "30 to re-embed in this run; 4 tiers of 10" in printed
    for phase in ("plan", "instant", "backfill"):
        assert any(line.startswith(phase) for line in printed.splitlines())
    config = BackfillConfig(
        gallery=inputs["gallery"], old_embeddings=inputs["old"], upgrade=inputs["new"], out=out, method="fastfill",
        transformation=inputs["ff"], policy="uncertainty", tiers=4, budget=30, index=None,
        pool=PoolConfig(batch_size=8), progress=False,
    )  # fmt: skip
    report = dry_run(config)
    assert not (tmp_path / "bf").exists()
    phases = {p.name: p for p in report.phases}
    assert (phases["plan"].items, phases["instant"].items, phases["backfill"].items) == (40, 40, 30)
    assert all(p.seconds > 0 and p.bytes_written > 0 for p in report.phases)
    assert report.storage_bytes == sum(p.bytes_written for p in report.phases)
    summary = run_backfill(config)  # the real run: the same counts
    assert summary.total == report.planned and summary.new == report.to_reembed
    real = {p.name: p.items for p in summary.phases}
    assert real["instant"] == phases["instant"].items and real["backfill"] == phases["backfill"].items
    with pytest.raises(ValueError, match="at least 2"):
        dry_run(config, sample_batches=1)
    assert np.isfinite(report.seconds)
