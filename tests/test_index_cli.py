"""`raybackfill serve | query | status | snapshot | promote | rollback | stop` on the session's Ray cluster."""

from __future__ import annotations

import argparse
import contextlib
import json
import uuid

import numpy as np
import pytest
import ray
from index_testing import kill_and_wait_for_restart

from raybackfill import NAMESPACE
from raybackfill.cli import lifecycle
from raybackfill.cli.index import format_status, progress_bar, register
from raybackfill.data.images import encode_png
from raybackfill.data.schema import embedding_table
from raybackfill.data.storage import write_table
from raybackfill.index.progress import Progress
from raybackfill.index.router import connect, destroy_index, get
from raybackfill.index.snapshot import latest_version


def run(*argv: str) -> int:
    parser = argparse.ArgumentParser(prog="raybackfill")
    commands = parser.add_subparsers(dest="command", required=True)
    register(commands)
    lifecycle.register(commands)
    args = parser.parse_args(list(argv))
    return args.func(args)


@pytest.fixture
def index_name(ray_cluster):
    name = f"test-cli-{uuid.uuid4().hex[:8]}"
    yield name
    with contextlib.suppress(ValueError):  # the test may have stopped it already
        destroy_index(name)


def test_serve_query_status_and_lifecycle(index_name, tmp_path, capsys):
    rng = np.random.default_rng(0)
    ids = np.arange(100, 160)
    old = rng.standard_normal((60, 8)).astype(np.float32)
    table_uri = str(tmp_path / "old")
    write_table(embedding_table(ids, old, model="v1"), table_uri)

    assert run("serve", "--old-embeddings", table_uri, "--shards", "2", "--name", index_name) == 0
    assert "serving 60 items of model 'v1' (dim 8" in capsys.readouterr().out
    with pytest.raises(ValueError, match="already serves 60 items"):
        run("serve", "--old-embeddings", table_uri, "--shards", "2", "--name", index_name)

    run("query", "--id", "105", "--strategy", "old", "--k", "60", "--json", "--name", index_name)
    hits = json.loads(capsys.readouterr().out)[0]
    unit = old / np.linalg.norm(old, axis=1, keepdims=True)  # the default metric is cosine
    scores = unit @ unit[5]
    assert [h["id"] for h in hits[:3]] == (ids[np.argsort(-scores)][:3]).tolist()
    assert {h["space"] for h in hits} == {"old"} and len(hits) == 60

    router = connect(index_name)
    get(router.upsert.remote(ids[:10], old[:10] * 2, "new", "v2"))
    np.save(tmp_path / "q.npy", old[5])
    run("query", "--vector", str(tmp_path / "q.npy"), "--strategy", "compatible", "--k", "3", "--name", index_name)
    table = capsys.readouterr().out
    assert table.splitlines()[0].split() == ["rank", "id", "score", "space"]
    assert table.splitlines()[1].split()[1:] == ["105", f"{1.0:.5f}", "new"]
    with pytest.raises(ValueError, match=r"takes 2 --vector file\(s\), got 1"):
        run("query", "--vector", str(tmp_path / "q.npy"), "--strategy", "rank_merge", "--name", index_name)
    with pytest.raises(ValueError, match="item 150 has no new-space vector yet"):
        run("query", "--id", "150", "--strategy", "compatible", "--name", index_name)
    with pytest.raises(ValueError, match="image and text queries need --model DIR"):
        run("query", "--image", str(tmp_path / "q.npy"), "--name", index_name)

    run("status", "--name", index_name)
    status = capsys.readouterr().out
    assert "phase idle" in status and "new model  [#####" in status
    assert ["all", "50", "0", "10", "60"] in [line.split() for line in status.splitlines()]

    with pytest.raises(ValueError, match="cannot promote: 50 items"):
        run("promote", "--name", index_name)
    run("rollback", "--name", index_name)
    assert capsys.readouterr().out.strip() == "rollback: phase rolled_back (old 60, transformed 0, new 0)"
    run("stop", "--name", index_name)
    assert capsys.readouterr().out.startswith(f"stopped: {index_name}-shard-000, {index_name}-shard-001")
    with pytest.raises(ValueError, match="no index named"):
        run("status", "--name", index_name)


def test_serve_snapshots_the_loaded_gallery_so_a_restarted_shard_comes_back_with_it(index_name, tmp_path, capsys):
    ids = np.arange(40)
    old = np.random.default_rng(2).standard_normal((40, 8)).astype(np.float32)
    write_table(embedding_table(ids, old, model="v1"), str(tmp_path / "old"))
    snapshots = str(tmp_path / "snapshots")
    run("serve", "--old-embeddings", str(tmp_path / "old"), "--snapshot-uri", snapshots, "--name", index_name)
    assert "snapshot of 2 shards" in capsys.readouterr().out
    first = latest_version(f"{snapshots}/shard-000")
    assert first is not None

    router = connect(index_name)
    get(router.upsert.remote(ids[:4], old[:4], "new", "v2"))
    run("snapshot", "--name", index_name)
    assert "snapshot of 2 shards" in capsys.readouterr().out
    assert latest_version(f"{snapshots}/shard-000") != first

    shard = ray.get_actor(f"{index_name}-shard-000", namespace=NAMESPACE)
    kill_and_wait_for_restart(shard)
    assert get(router.progress.remote()).counts == {"old": 36, "transformed": 0, "new": 4}


def test_snapshot_of_an_index_without_a_snapshot_uri_is_a_clear_error(index_name, tmp_path, capsys):
    write_table(embedding_table(np.arange(6), np.ones((6, 4), np.float32), model="v1"), str(tmp_path / "old"))
    run("serve", "--old-embeddings", str(tmp_path / "old"), "--name", index_name)
    with pytest.raises(ValueError, match="no snapshot_uri"):
        run("snapshot", "--name", index_name)


def test_image_queries_embed_with_the_model_of_the_matching_space(index_name, tmp_path, capsys):
    import torch

    from raybackfill.data.preprocessing import ImagePreprocessing
    from raybackfill.models.artifacts import ModelSpec, save_model
    from raybackfill.models.backbones import small_cnn

    torch.manual_seed(0)
    kwargs = {"embedding_dim": 8, "num_classes": 3, "width": 4}
    model_uri = str(tmp_path / "model-v1")
    module = small_cnn(**kwargs).eval()
    save_model(module, model_uri, ModelSpec("small_cnn", "v1", kwargs=kwargs, metric="l2"))
    rng = np.random.default_rng(1)
    pixels = rng.integers(0, 256, size=(16, 16, 3), dtype=np.uint8)
    (tmp_path / "query.png").write_bytes(encode_png(pixels))
    with torch.inference_mode():
        query = module.embed(torch.from_numpy(ImagePreprocessing(crop=16).normalise(pixels[None]))).numpy()
    gallery = np.concatenate([query + 0.01, rng.standard_normal((20, 8)).astype(np.float32)])
    write_table(embedding_table(np.arange(21), gallery, model="v1"), str(tmp_path / "old"))
    run("serve", "--old-embeddings", str(tmp_path / "old"), "--metric", "l2", "--name", index_name)
    capsys.readouterr()

    run(
        "query",
        "--image",
        str(tmp_path / "query.png"),
        "--model",
        model_uri,
        "--strategy",
        "old",
        "--k",
        "2",
        "--json",
        "--name",
        index_name,
    )
    hits = json.loads(capsys.readouterr().out)[0]
    assert hits[0]["id"] == 0 and hits[0]["score"] == pytest.approx(8 * 0.01**2, rel=1e-2)
    # One space only: a compatible query against it is an old query, made by the same encoder.
    query = ("query", "--image", str(tmp_path / "query.png"), "--model", model_uri, "--k", "2", "--json")
    run(*query, "--strategy", "compatible", "--name", index_name)
    assert json.loads(capsys.readouterr().out)[0] == hits
    # Once an upgrade has a new space, that space needs its own encoder.
    get(connect(index_name).upsert.remote(np.array([1]), np.ones((1, 8), np.float32), "new", "v-next"))
    with pytest.raises(ValueError, match="needs a --model for the new space"):
        run(
            "query",
            "--image",
            str(tmp_path / "query.png"),
            "--model",
            model_uri,
            "--strategy",
            "rank_merge",
            "--name",
            index_name,
        )


def test_status_text_and_progress_bar():
    assert progress_bar(0.5, width=10) == "[#####.....]"
    assert progress_bar(1.5, width=4) == "[####]"
    progress = Progress(
        name="idx",
        phase="backfill",
        counts={"old": 6, "transformed": 2, "new": 2},
        per_shard=[{"old": 4, "transformed": 1, "new": 0}, {"old": 2, "transformed": 1, "new": 2}],
        total=10,
        remaining=8,
        rate=2.0,
        eta_seconds=4.0,
        started_at=0.0,
        updated_at=3725.0,
        last_error="upsert: boom",
    )
    text = format_status(progress, now=3725.0).splitlines()
    assert text[0] == "index idx   phase backfill   started 1970-01-01 00:00:00 UTC (1:02:05 ago)"
    assert text[3].split() == ["0", "4", "1", "0", "5"]
    assert text[5].split() == ["all", "6", "2", "2", "10"]
    assert text[7] == "new model  [######........................]  20.0%"
    assert text[9] == "rate 2.0 items/s   remaining 8   ETA 0:00:04"
    assert text[10] == "last error: upsert: boom"


def test_serve_any_factory_trains_the_old_space_and_query_sets_search_params(index_name, tmp_path, capsys):
    rng = np.random.default_rng(3)
    vectors = rng.standard_normal((300, 8)).astype(np.float32)
    write_table(embedding_table(np.arange(300), vectors, model="v1"), str(tmp_path / "old"))
    np.save(tmp_path / "q.npy", vectors[7])
    with pytest.raises(ValueError, match="factory 'IVF4,Junk' is not an index FAISS can build"):
        run("serve", "--old-embeddings", str(tmp_path / "old"), "--index", "IVF4,Junk", "--name", index_name)
    argv = ["--old-embeddings", str(tmp_path / "old"), "--index", "IVF4,SQ8", "--train-sample", "200"]
    with pytest.raises(ValueError, match="build_params: 'efConstruction' does not apply to index 'IVF4,SQ8'"):
        run("serve", *argv, "--ef-construction", "100", "--name", index_name)
    assert run("serve", *argv, "--nprobe", "1", "--name", index_name) == 0
    out = capsys.readouterr().out
    assert "serving 300 items of model 'v1'" in out and "IVF4,SQ8" in out
    health = get(connect(index_name).health.remote())
    assert health["config"]["index"]["factory"] == "IVF4,SQ8"
    assert health["config"]["index"]["search_params"] == {"nprobe": 1}
    assert health["config"]["index"]["build_params"] == {}
    query = ["query", "--vector", str(tmp_path / "q.npy"), "--strategy", "old", "--k", "300", "--json"]
    run(*query, "--nprobe", "4", "--name", index_name)  # every list: every item comes back
    hits = json.loads(capsys.readouterr().out)[0]
    assert hits[0]["id"] == 7 and sorted(h["id"] for h in hits) == list(range(300))
    run(*query, "--name", index_name)  # the index's nprobe=1: one list of four
    assert len(json.loads(capsys.readouterr().out)[0]) < 300
    with pytest.raises(ValueError, match="'efSearch' does not apply to index 'IVF4,SQ8'"):
        run(*query, "--ef-search", "32", "--name", index_name)
