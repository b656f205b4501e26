"""The embed jobs: the actor pool's resource request and sizes, and resuming a table on a real local Ray
cluster (a SIGKILLed `raybackfill embed` re-run ends with every id exactly once; a complete table is left as it
is; a table made by other models is refused)."""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

import raybackfill.backfill.run as backfill_run
import raybackfill.cli.embed as cli_embed
import raybackfill.embed.pipeline as pipeline
from raybackfill.cli.backfill import add_arguments
from raybackfill.cli.backfill import run as run_backfill_command
from raybackfill.cli.main import main
from raybackfill.data import storage
from raybackfill.data.loading import quarantined_ids, write_quarantine
from raybackfill.data.schema import EMBEDDING, ID, IMAGE, embedding_table, image_table
from raybackfill.data.synth import synthesize
from raybackfill.embed.pipeline import MANIFEST, EmbedResult, PoolConfig, read_manifest, transform_embeddings
from raybackfill.models.artifacts import ModelSpec, save_model
from raybackfill.models.registry import build_model

ROOT = Path(__file__).resolve().parents[1]
N = 96
DIM = 8
CORRUPT_ID = 7


class _RecordingDataset:
    """Stands in for a Ray Dataset: records what the actor stage asks ``map_batches`` for."""

    def __init__(self) -> None:
        self.kwargs: dict = {}

    def map_batches(self, fn, **kwargs):
        self.kwargs = kwargs
        return self


def _requested_gpus(pool: PoolConfig) -> float:
    ds = _RecordingDataset()
    pipeline.map_embed(ds, pipeline.EncoderInputs({EMBEDDING: "unused"}, "image", {}, {}), pool)
    return ds.kwargs["num_gpus"]


def test_an_explicit_gpus_per_actor_is_requested_as_is_even_when_the_cluster_has_no_gpu(monkeypatch):
    monkeypatch.setattr(pipeline.ray, "cluster_resources", lambda: {"CPU": 2.0})  # a GPU pool scaled to zero
    assert _requested_gpus(PoolConfig(gpus_per_actor=1)) == 1
    assert _requested_gpus(PoolConfig(gpus_per_actor=0.5)) == 0.5
    assert _requested_gpus(PoolConfig(gpus_per_actor=0)) == 0


@pytest.mark.parametrize(("resources", "expected"), [({"CPU": 2.0}, 0.0), ({"CPU": 8.0, "GPU": 4.0}, 1.0)])
def test_no_gpus_per_actor_requests_one_gpu_only_when_the_cluster_has_gpus_now(monkeypatch, resources, expected):
    monkeypatch.setattr(pipeline.ray, "cluster_resources", lambda: resources)
    assert _requested_gpus(PoolConfig()) == expected


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"actors": 0}, "actors must be at least 1, got 0"),
        ({"batch_size": 0}, "batch_size must be at least 1"),
        ({"rows_per_shard": 0}, "rows_per_shard must be at least 1"),
        ({"cpus_per_actor": -1.0}, "cpus_per_actor must be non-negative"),
        ({"gpus_per_actor": -0.5}, "gpus_per_actor must be non-negative"),
    ],
)
def test_pool_sizes_ray_cannot_run_are_refused_with_the_field_named(kwargs, message):
    with pytest.raises(ValueError, match=message):
        PoolConfig(**kwargs)


def test_embed_with_zero_actors_fails_with_a_message_before_ray_starts(monkeypatch, capsys):
    monkeypatch.setattr(cli_embed, "init_ray", lambda address, py_modules=None: pytest.fail("Ray was started"))
    assert main(["embed", "--gallery", "i", "--model", "m", "--out", "o", "--actors", "0"]) == 2
    assert "raybackfill embed: error: actors must be at least 1, got 0" in capsys.readouterr().err


def test_gpus_per_actor_on_the_embed_command_reaches_the_actor_pool(monkeypatch):
    pools = []
    monkeypatch.setattr(cli_embed, "init_ray", lambda address, py_modules=None: None)
    monkeypatch.setattr(pipeline, "embed_gallery", lambda gallery, models, out, pool, trust: pools.append(pool)
                        or EmbedResult(out, 1, 0, 1))  # fmt: skip
    assert main(["embed", "--gallery", "i", "--model", "m", "--out", "o", "--gpus-per-actor", "1"]) == 0
    assert main(["embed", "--gallery", "i", "--model", "m", "--out", "o"]) == 0
    assert [p.gpus_per_actor for p in pools] == [1.0, None]


def test_gpus_per_actor_on_the_backfill_command_reaches_the_actor_pool(monkeypatch):
    configs = []
    monkeypatch.setattr("raybackfill.runtime.init_ray", lambda address, py_modules=None: None)
    monkeypatch.setattr(backfill_run, "run_backfill", configs.append)
    monkeypatch.setattr(backfill_run, "summary_table", lambda summary: "")
    parser = argparse.ArgumentParser()
    add_arguments(parser)  # what `raybackfill backfill` and jobs/backfill.py parse
    required = ["--gallery", "g", "--old-embeddings", "o", "--upgrade", "m", "--method", "bct", "--policy", "id",
                "--out", "x", "--no-index"]  # fmt: skip
    run_backfill_command(parser.parse_args([*required, "--gpus-per-actor", "1"]))
    run_backfill_command(parser.parse_args(required))
    assert [c.pool.gpus_per_actor for c in configs] == [1.0, None]


# ---- resuming on a real cluster ------------------------------------------------------------------------


def _save(uri: Path, architecture: str, version: str, **kwargs) -> str:
    save_model(build_model(architecture, **kwargs), str(uri), ModelSpec(architecture, version, kwargs))
    return str(uri)


@pytest.fixture(scope="module")
def inputs(tmp_path_factory) -> dict:
    """N small images in 4 shards (id 7 corrupt), two backbones with different versions, a side-info model. The
    backbone is a ResNet-18 (~25 ms a batch of 2 here) so that a killed job is still streaming after its first
    shard: with a tiny CNN the whole table was written within the 10 ms the test polls at."""
    torch.manual_seed(0)
    root = tmp_path_factory.mktemp("embed-inputs")
    synth = synthesize(classes=4, per_class=N // 4, size=32)
    images = synth.column(IMAGE).to_pylist()
    images[CORRUPT_ID] = b"not an image"
    ids = synth.column(ID).to_numpy()
    storage.write_table(image_table(ids, images, labels=ids % 4), str(root / "images"), rows_per_shard=N // 4)
    cnn = {"embedding_dim": DIM, "num_classes": 4, "width": 4}
    return {
        "images": str(root / "images"),
        "model": _save(root / "m-v1", "resnet18", "m-v1", embedding_dim=DIM, num_classes=4),
        "other": _save(root / "m-v2", "small_cnn", "m-v2", **cnn),
        "side": _save(root / "side", "small_cnn", "side-v1", **cnn),
    }


def _shard_digests(out: str) -> dict[str, str]:
    return {uri: hashlib.sha256(Path(uri).read_bytes()).hexdigest() for uri in storage.list_shards(out)}


def _file_bytes(out: str) -> dict[Path, bytes]:
    return {p: p.read_bytes() for p in Path(out).rglob("*") if p.is_file()}


def _embed_job(inputs: dict, out: str, address: str) -> subprocess.Popen:
    """The embed command in its own process (the job entry point), with small batches and shards."""
    args = [sys.executable, str(ROOT / "jobs" / "embed.py"), *_embed_args(inputs, out), "--address", address]
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    return subprocess.Popen(args, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)


def _embed_args(inputs: dict, out: str, model: str | None = None) -> list[str]:
    model = model or inputs["model"]
    return ["--gallery", inputs["images"], "--model", model, "--out", out, "--batch-size", "2", "--rows-per-shard", "4"]


@pytest.mark.slow
def test_an_embed_killed_part_way_and_rerun_ends_with_every_id_once_and_a_finished_table_is_left_as_is(
    inputs, ray_cluster, tmp_path, capsys
):
    out = str(tmp_path / "emb")
    job = _embed_job(inputs, out, ray_cluster.get_runtime_context().gcs_address)
    try:  # SIGKILL the job as soon as it has committed a shard (the rest is still streaming)
        deadline = time.monotonic() + 300
        while (
            not (storage.exists(out) and storage.list_shards(out))
            and job.poll() is None
            and time.monotonic() < deadline
        ):
            time.sleep(0.01)
        assert job.poll() is None, f"the job ended before it was killed: {job.stdout.read().decode()[-3000:]}"
        job.send_signal(signal.SIGKILL)
    finally:
        job.wait(timeout=30)
    partial = storage.read_table(out, [ID]).column(ID).to_numpy()
    print(f"killed after {len(partial)} rows in {len(storage.list_shards(out))} shards")
    assert 0 < len(partial) < N - 1 and len(partial) == len(np.unique(partial))
    assert read_manifest(out) == pipeline.Manifest({EMBEDDING: "m-v1"})  # written first, not complete
    committed = _shard_digests(out)
    # A row the killed run quarantined as non-finite (a model that gives NaN for some images only is hard to
    # build): the re-run must neither embed it nor lose it.
    nan_id = int(np.setdiff1d(np.arange(N), [*partial, CORRUPT_ID])[0])
    write_quarantine(storage.join(out, "_quarantine"), np.array([nan_id]), ["non-finite embedding"], stage="embed")

    assert main(["embed", *_embed_args(inputs, out)]) == 0
    assert f"({N - 2} in the table, 2 quarantined)" in capsys.readouterr().out
    ids = storage.read_table(out, [ID]).column(ID).to_numpy()
    quarantined = quarantined_ids(storage.join(out, "_quarantine"), ("decode", "embed"))
    assert len(ids) == len(np.unique(ids)) and sorted(quarantined) == sorted([CORRUPT_ID, nan_id])
    assert sorted([*ids, *quarantined]) == list(range(N))  # every id exactly once: embedded or quarantined
    assert {uri: digest for uri, digest in _shard_digests(out).items() if uri in committed} == committed
    manifest = json.loads(Path(out, MANIFEST).read_bytes())
    assert manifest == {"models": {EMBEDDING: "m-v1"}, "complete": True, "rows": N - 2, "quarantined": 2}

    files = _file_bytes(out)
    assert main(["embed", *_embed_args(inputs, out)]) == 0
    assert f"is already complete ({N - 2} embeddings, 2 quarantined): nothing to do" in capsys.readouterr().out
    assert _file_bytes(out) == files


def test_a_table_made_by_other_models_is_refused_whether_complete_or_partial(inputs, ray_cluster, tmp_path, capsys):
    out = str(tmp_path / "emb")
    assert main(["embed", *_embed_args(inputs, out, model=inputs["other"])]) == 0
    capsys.readouterr()
    partial = tmp_path / "partial"  # the same table as a killed run would have left it: manifest not complete
    partial.mkdir()
    os.link(storage.list_shards(out)[0], partial / "part-00000.parquet")
    (partial / MANIFEST).write_text(json.dumps({"models": {EMBEDDING: "m-v2"}}))
    for table in (out, str(partial)):
        files = _file_bytes(table)
        assert main(["embed", *_embed_args(inputs, table)]) == 2
        err = capsys.readouterr().err
        assert f"{table}: holds embeddings by models {{'embedding': 'm-v2'}}, not {{'embedding': 'm-v1'}}" in err
        assert main(["embed", *_embed_args(inputs, table, model=inputs["other"]), "--side-info-model",
                     inputs["side"]]) == 2  # fmt: skip
        assert "not {'embedding': 'm-v2', 'side_info': 'side-v1'}" in capsys.readouterr().err
        assert _file_bytes(table) == files


def test_a_directory_with_shards_but_no_manifest_is_refused(inputs, ray_cluster, tmp_path, capsys):
    out = str(tmp_path / "emb")
    storage.write_table(embedding_table(np.arange(3), np.zeros((3, DIM), np.float32), model="m-v1"), out)
    assert main(["embed", *_embed_args(inputs, out)]) == 2
    assert f"{out}: holds shards but no {MANIFEST}" in capsys.readouterr().err


def test_a_transform_that_lost_its_last_shards_and_completion_continues_with_every_id_once(ray_cluster, tmp_path):
    old, out = str(tmp_path / "old"), str(tmp_path / "new")
    ids = np.arange(24)
    vectors = np.random.default_rng(0).standard_normal((len(ids), DIM)).astype(np.float32)
    storage.write_table(embedding_table(ids, vectors, model="old-v1"), old, rows_per_shard=8)
    fct = _save(tmp_path / "fct", "forward_transformation", "fct-v1", old_dim=DIM, new_dim=DIM, hidden_dim=8,
                mixer_dim=8)  # fmt: skip
    pool = PoolConfig(batch_size=4, rows_per_shard=4, gpus_per_actor=0)
    first = transform_embeddings(old, fct, out, pool=pool, progress=False)
    assert (first.rows, first.written, first.already_complete) == (24, 24, False)
    lost = storage.list_shards(out)[-2:]  # what a kill before the last two shards would have left
    lost_rows = sum(storage.read_footer(uri).num_rows for uri in lost)
    for uri in lost:
        os.unlink(uri)
    (Path(out) / MANIFEST).write_text(json.dumps({"models": {EMBEDDING: "fct-v1"}}))
    kept = _shard_digests(out)

    again = transform_embeddings(old, fct, out, pool=pool, progress=False)
    table = storage.read_table(out)
    assert sorted(table.column(ID).to_pylist()) == list(range(24))
    assert set(table.column("model").to_pylist()) == {"fct-v1"}
    assert (again.rows, again.written, again.already_complete) == (24, lost_rows, False)
    assert {uri: d for uri, d in _shard_digests(out).items() if uri in kept} == kept
    assert transform_embeddings(old, fct, out, pool=pool, progress=False).already_complete
