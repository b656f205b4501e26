"""The backfill orchestrator on a real local Ray cluster: plan order, tier order, exactly-once across a
SIGKILL, budgets, quarantine, and queries that keep working while the index is being moved."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from raybackfill.backfill.ledger import Ledger
from raybackfill.backfill.plan import FILE, PLAN_COLUMNS, RANK, ROW, ROW_GROUP, PlanConfig, ensure_plan, read_plan
from raybackfill.backfill.run import BackfillConfig, new_space_sample, run_backfill, summary_table
from raybackfill.backfill.sink import TooManyBadRows
from raybackfill.data.schema import ID, IMAGE, embedding_table, image_table
from raybackfill.data.storage import read_table, write_table
from raybackfill.data.synth import synthesize
from raybackfill.embed.pipeline import PoolConfig
from raybackfill.index.loading import LoadConfig, load_old_table
from raybackfill.index.router import RouterConfig, create_index, destroy_index, get
from raybackfill.index.shard import IndexConfig
from raybackfill.models.artifacts import ModelSpec, save_model
from raybackfill.models.registry import build_model

ROOT = Path(__file__).resolve().parents[1]
N = 16
DIM = 8
CORRUPT_ID = 5
UNKNOWN_ID = 99
POOL = PoolConfig(batch_size=4)


def _save(uri: Path, architecture: str, version: str, nan: bool = False, **kwargs) -> str:
    module = build_model(architecture, **kwargs)
    if nan:
        with torch.no_grad():
            module.embedding.weight.fill_(float("nan"))
    save_model(module, str(uri), ModelSpec(architecture, version, kwargs))
    return str(uri)


@pytest.fixture(scope="module")
def inputs(tmp_path_factory) -> dict:
    """16 synthetic images (id 5 corrupt) plus one image with no old embedding (id 99); tiny models."""
    torch.manual_seed(0)
    root = tmp_path_factory.mktemp("backfill-inputs")
    synth = synthesize(classes=4, per_class=N // 4, size=16)
    images = synth.column(IMAGE).to_pylist()
    images[CORRUPT_ID] = b"not an image"
    ids = np.r_[synth.column(ID).to_numpy(), UNKNOWN_ID]
    gallery = image_table(ids, [*images, images[0]], labels=ids % 4)
    write_table(gallery, str(root / "gallery"), rows_per_shard=9)
    old = np.random.default_rng(0).standard_normal((N, DIM)).astype(np.float32)
    write_table(embedding_table(ids[:N], old, model="old-v1"), str(root / "old"), rows_per_shard=8)
    cnn = {"embedding_dim": DIM, "num_classes": 4, "width": 4}
    mlp = {"old_dim": DIM, "new_dim": DIM, "hidden_dim": 8, "mixer_dim": 8}
    return {
        "root": root,
        "gallery": str(root / "gallery"),
        "old": str(root / "old"),
        "old_vectors": old,
        "new": _save(root / "new", "small_cnn", "new-v2", **cnn),
        "nan_model": _save(root / "nan", "small_cnn", "new-nan", nan=True, **cnn),
        "fastfill": _save(root / "fastfill", "fastfill_transformation", "new-v2", **mlp),
    }


@pytest.fixture(scope="module")
def id_plan(inputs, ray_cluster) -> str:
    """One plan (policy id, 2 tiers) built once; tests copy it so they skip the plan's two Ray Data passes."""
    uri = str(inputs["root"] / "id-plan")
    ensure_plan(_id_plan_config(inputs), uri, str(inputs["root"] / "id-plan-quarantine"))
    return uri


def _id_plan_config(inputs) -> PlanConfig:
    return PlanConfig(gallery=inputs["gallery"], old_embeddings=inputs["old"], policy="id", tiers=2)


def _out_with_plan(id_plan: str, out: Path) -> str:
    shutil.copytree(id_plan, out / "plan")
    return str(out)


@pytest.fixture
def make_index(inputs, ray_cluster):
    names = []

    def make(name: str):
        router = create_index(RouterConfig(name=name, shards=2, shard_num_cpus=0.1))
        get(router.load_old.remote(np.arange(N), inputs["old_vectors"], "old-v1"))
        names.append(name)
        return router

    yield make
    for name in names:
        destroy_index(name)


def _ledger_ids(ledger: Ledger, directory: str) -> np.ndarray:
    return np.concatenate([pq.read_table(f, columns=[ID]).column(ID).to_numpy() for f in ledger.files(directory)])


def test_plan_tiers_hold_ids_and_gallery_locations_in_policy_order_and_quarantine_unknown_ids(inputs, id_plan):
    plan = read_plan(id_plan)
    assert plan.total == N  # the 16 ids with an old embedding; id 99 has none
    gallery = {uri: pq.read_table(uri) for uri in plan.gallery_files}
    ranks = []
    for tier in plan.tiers:
        table = pa.concat_tables([pq.read_table(f) for f in tier.files])
        assert table.column_names == list(PLAN_COLUMNS)  # ids, ranks and locations: no image bytes
        ranks.append(np.sort(table.column(RANK).to_numpy()))
        # policy "id": ascending ids first, so tier t holds ids 8t .. 8t+7
        assert sorted(table.column(ID).to_pylist()) == list(range(8 * tier.index, 8 * tier.index + 8))
        for row in table.to_pylist():  # every location points at the row of that id in the original gallery
            located = gallery[plan.gallery_files[row[FILE]]].slice(row[ROW], 1)  # one row group per file here
            assert row[ROW_GROUP] == 0 and located.column(ID)[0].as_py() == row[ID]
    assert np.array_equal(np.concatenate(ranks), np.arange(N))
    quarantine = read_table(str(inputs["root"] / "id-plan-quarantine"))
    assert quarantine.column(ID).to_pylist() == [UNKNOWN_ID]
    assert "unknown id" in quarantine.column("reason")[0].as_py()
    with pytest.raises(ValueError, match="holds a plan for"):
        ensure_plan(PlanConfig(inputs["gallery"], inputs["old"], policy="random", tiers=2), id_plan, "unused")


def test_fastfill_backfill_writes_tiers_in_order_exactly_once_while_queries_keep_working(inputs, make_index, tmp_path):
    router = make_index("bf-full")
    out = str(tmp_path / "out")
    stop, errors, answered = threading.Event(), [], [0]
    rng = np.random.default_rng(1)
    q_old, q_new = rng.standard_normal((3, DIM)).astype(np.float32), rng.standard_normal((3, DIM)).astype(np.float32)

    def query() -> None:
        while not stop.is_set():
            try:
                result = get(router.search.remote(q_old, q_new, 5, "rank_merge"), timeout=60)
                assert (result.ids >= 0).all() and len(np.unique(result.ids[0])) == 5
                answered[0] += 1
            except Exception as err:  # every failure is a finding
                errors.append(err)
            time.sleep(0.05)

    client = threading.Thread(target=query)
    client.start()
    try:
        summary = run_backfill(BackfillConfig(
            gallery=inputs["gallery"], old_embeddings=inputs["old"], upgrade=inputs["new"], out=out,
            method="fastfill", transformation=inputs["fastfill"], policy="uncertainty", tiers=2,
            max_bad_fraction=0.5, index="bf-full", pool=POOL, progress=False,
        ))  # fmt: skip
    finally:
        stop.set()
        client.join()
    assert not errors and answered[0] > 0

    ledger = Ledger(out)
    # Instant phase: every stored old embedding transformed once.
    assert sorted(_ledger_ids(ledger, ledger.transformed_uri)) == list(range(N))
    # Backfill: every id except the corrupt image re-embedded exactly once.
    new_ids = _ledger_ids(ledger, ledger.new_uri)
    assert len(new_ids) == len(set(new_ids)) and set(new_ids) == set(range(N)) - {CORRUPT_ID}
    # OUT/new reads as one embedding table (its tier directories are its shards), e.g. for `eval run`.
    assert sorted(read_table(ledger.new_uri).column(ID).to_pylist()) == sorted(new_ids)
    # Tier order: every batch of tier 0 was committed before the first batch of tier 1.
    mtimes = [[os.stat(f).st_mtime_ns for f in ledger.files(ledger.tier_uri(t))] for t in range(2)]
    assert all(mtimes) and max(mtimes[0]) <= min(mtimes[1])
    # ... and tier 0 is the higher-uncertainty half of the plan.
    plan = read_plan(ledger.plan_uri)
    tier0 = set(pa.concat_tables([pq.read_table(f) for f in plan.tiers[0].files]).column(ID).to_pylist())
    # The tier markers count what the tiers hold; the summary reads them, not the batches.
    tracks = [ledger.track(ledger.tier_uri(t)) for t in range(2)]
    assert [t.position for t in tracks] == [8, 8] and sum(t.items for t in tracks) == N - 1
    assert set(_ledger_ids(ledger, ledger.tier_uri(0))) == tier0 - {CORRUPT_ID}

    quarantine = read_table(ledger.quarantine_uri)
    reasons = dict(zip(quarantine.column(ID).to_pylist(), quarantine.column("stage").to_pylist(), strict=True))
    assert reasons == {CORRUPT_ID: "decode", UNKNOWN_ID: "plan"}
    progress = get(router.progress.remote())
    assert progress.counts == {"old": 0, "transformed": 1, "new": N - 1} and progress.phase == "done"
    assert summary.complete and summary.new == N - 1 and summary.backfill_quarantined == 1
    assert [(p.name, p.items, p.quarantined) for p in summary.phases] == [
        ("plan", N, 1),
        ("instant", N, 0),
        ("backfill", N - 1, 1),
    ]
    assert "backfill complete" in summary_table(summary)


def _address() -> str:
    import ray

    return ray.get_runtime_context().gcs_address


def _run_job(inputs, out: str, name: str, address: str) -> subprocess.Popen:
    args = [
        sys.executable, str(ROOT / "jobs" / "backfill.py"), "--gallery", inputs["gallery"], "--old-embeddings",
        inputs["old"], "--upgrade", inputs["new"], "--method", "bct", "--policy", "id", "--tiers", "2", "--out", out,
        "--index", name, "--batch-size", "2", "--max-bad-fraction", "0.5", "--no-progress", "--address", address,
    ]  # fmt: skip
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    return subprocess.Popen(args, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)


def test_budget_then_a_sigkilled_run_then_a_rerun_end_with_every_id_once(inputs, id_plan, make_index, tmp_path):
    router = make_index("bf-resume")
    out = _out_with_plan(id_plan, tmp_path / "out")
    ledger = Ledger(out)
    config = BackfillConfig(
        gallery=inputs["gallery"], old_embeddings=inputs["old"], upgrade=inputs["new"], out=out, method="bct",
        policy="id", tiers=2, max_bad_fraction=0.5, index="bf-resume", pool=PoolConfig(batch_size=2),
        progress=False,
    )  # fmt: skip
    partial = run_backfill(BackfillConfig(**{**config.__dict__, "budget": 3}))
    assert sorted(_ledger_ids(ledger, ledger.new_uri)) == [0, 1, 2]  # policy id: lowest ids first
    assert not partial.complete and get(router.progress.remote()).phase == "paused"

    # Continue in a real process (the job entry point) and SIGKILL it as soon as it has written a batch
    # (tier 0's rest: the kill lands while tier 1 is being read and embedded).
    before = len(ledger.files(ledger.new_uri))
    job = _run_job(inputs, out, "bf-resume", _address())
    try:
        deadline = time.monotonic() + 300
        while len(ledger.files(ledger.new_uri)) == before and job.poll() is None and time.monotonic() < deadline:
            time.sleep(0.02)
        assert job.poll() is None, f"the job ended before it was killed: {job.stdout.read().decode()[-3000:]}"
        job.send_signal(signal.SIGKILL)
    finally:
        job.wait(timeout=30)
    written = len(_ledger_ids(ledger, ledger.new_uri))
    assert 3 < written < N - 1

    summary = run_backfill(config)
    new_ids = _ledger_ids(ledger, ledger.new_uri)
    assert len(new_ids) == len(np.unique(new_ids)) and set(new_ids) == set(range(N)) - {CORRUPT_ID}
    assert summary.complete and summary.phases[-1].items == N - 1 - written
    assert get(router.progress.remote()).counts == {"old": 1, "transformed": 0, "new": N - 1}

    # An index that lost the moved items (here: rolled back) gets them back from the ledger on start.
    get(router.rollback.remote())
    again = run_backfill(config)
    assert again.replayed == N - 1 and again.phases[-1].items == 0
    assert get(router.progress.remote()).counts == {"old": 1, "transformed": 0, "new": N - 1}
    # When the index already matches the ledger, a start re-sends nothing (the cheap path).
    assert run_backfill(config).replayed == 0


def test_nan_outputs_are_quarantined_and_too_many_fail_the_job_cleanly(inputs, id_plan, make_index, tmp_path):
    router = make_index("bf-nan")
    out = _out_with_plan(id_plan, tmp_path / "out")
    config = BackfillConfig(
        gallery=inputs["gallery"], old_embeddings=inputs["old"], upgrade=inputs["nan_model"], out=out,
        method="bct", policy="id", tiers=2, max_bad_fraction=0.2, index="bf-nan", pool=POOL, progress=False,
    )  # fmt: skip
    with pytest.raises(TooManyBadRows, match="quarantined"):
        run_backfill(config)
    ledger = Ledger(out)
    assert len(ledger.ids(ledger.new_uri)) == 0  # no vector written, nothing half-written
    # The all-bad batches are committed (empty files): their positions are done, their rows quarantined.
    assert ledger.track(ledger.tier_uri(0)).quarantined == ledger.track(ledger.tier_uri(0)).position > 0
    quarantine = read_table(ledger.quarantine_uri)
    reasons = dict(zip(quarantine.column(ID).to_pylist(), quarantine.column("reason").to_pylist(), strict=True))
    assert reasons.pop(CORRUPT_ID, "corrupt image").startswith("corrupt image")  # in tier 0: maybe reached
    assert reasons and set(reasons.values()) == {"non-finite embedding"}
    assert set(quarantine.column(ID).to_pylist()) <= set(range(8))  # stopped in the first tier
    progress = get(router.progress.remote())
    assert progress.counts["new"] == 0 and progress.phase == "paused" and "quarantined" in progress.last_error


@pytest.mark.parametrize("method", ["bct", "fastfill"])
def test_an_index_kind_that_needs_training_gets_its_new_space_trained_before_the_first_upsert(
    inputs, id_plan, ray_cluster, tmp_path, method
):
    """Batches of 2 items split over 2 shards are smaller than nlist=4: only spaces trained up front take them
    (old: on a sample of the old table at load; new: on transformed old embeddings (fastfill), or on a sample
    embedded by the new model up front (bct))."""
    index = IndexConfig(factory="IVF4,Flat", search_params={"nprobe": 4})
    assert index.needs_training
    name = f"bf-train-{method}"
    router = create_index(RouterConfig(name=name, shards=2, shard_num_cpus=0.1, index=index))
    try:
        loaded = load_old_table(router, inputs["old"], config=LoadConfig(batch_rows=2, train_sample=N))
        assert loaded.trained_on == N and loaded.items == N
        out = _out_with_plan(id_plan, tmp_path / "out")
        extra = {"transformation": inputs["fastfill"]} if method == "fastfill" else {}
        summary = run_backfill(BackfillConfig(
            gallery=inputs["gallery"], old_embeddings=inputs["old"], upgrade=inputs["new"], out=out, method=method,
            policy="id", tiers=2, max_bad_fraction=0.5, index=name, pool=PoolConfig(batch_size=2), progress=False,
            train_sample=N, **extra,
        ))  # fmt: skip
        assert summary.complete and get(router.progress.remote()).counts["new"] == N - 1
        q = inputs["old_vectors"][:2]
        assert (get(router.search.remote(q, q, 3, "rank_merge")).ids >= 0).all()
    finally:
        destroy_index(name)


def _nearest_distance(sample: np.ndarray, reference: np.ndarray) -> np.ndarray:
    return np.min(np.linalg.norm(sample[:, None, :] - reference[None, :, :], axis=2), axis=1)


def test_the_new_space_is_trained_on_transformed_old_embeddings_or_on_images_embedded_up_front(inputs, ray_cluster):
    from raybackfill.data.storage import open_table
    from raybackfill.embed.actors import transform_batch
    from raybackfill.encoders import load_encoder
    from raybackfill.models.artifacts import load_model

    gallery, old = open_table(inputs["gallery"]), open_table(inputs["old"])
    base = dict(gallery=inputs["gallery"], old_embeddings=inputs["old"], upgrade=inputs["new"], out="unused",
                policy="id", pool=POOL)  # fmt: skip
    # FastFill: a sample of the stored vectors, transformed (every sampled vector is one of the table's, mapped).
    fastfill = BackfillConfig(**base, method="fastfill", transformation=inputs["fastfill"], train_sample=5)
    sample = new_space_sample(fastfill, gallery, old)
    transformed = transform_batch(load_model(inputs["fastfill"]).module, old.read())["embedding"]
    assert sample.shape == (5, DIM) and (_nearest_distance(sample, transformed) < 1e-4).all()
    # BCT: gallery images embedded by the new encoder; the corrupt image is left out of the sample.
    bct = BackfillConfig(**base, method="bct", train_sample=100)
    sample = new_space_sample(bct, gallery, old)
    images = [b for i, b in zip(gallery.read().column(ID).to_pylist(), gallery.read().column(IMAGE).to_pylist(),
                                strict=True) if i != CORRUPT_ID]  # fmt: skip
    encoder = load_encoder(inputs["new"])
    encoder.with_size(16)  # the gallery's image size, as the pipeline resolves it
    embedded, ok, _ = encoder.embed_rows(images)
    assert ok.all() and sample.shape == (N, DIM)  # 17 gallery rows, 1 corrupt
    assert (_nearest_distance(sample, embedded) < 1e-4).all()


def test_an_old_embedding_table_changed_after_the_plan_is_refused_by_the_instant_phase(inputs, ray_cluster, tmp_path):
    """The instant phase's ledger counts the old table's rows by position: a table rewritten since the plan
    would shift them, so the phase refuses it before it transforms anything."""
    old = str(tmp_path / "old")
    shutil.copytree(inputs["old"], old)
    out = str(tmp_path / "out")
    config = BackfillConfig(
        gallery=inputs["gallery"], old_embeddings=old, upgrade=inputs["new"], out=out, method="fastfill",
        transformation=inputs["fastfill"], policy="id", tiers=2, max_bad_fraction=0.5, index=None, pool=POOL,
        progress=False, budget=0,
    )  # fmt: skip
    ensure_plan(config.plan_config(), Ledger(out).plan_uri, Ledger(out).quarantine_uri)
    last = sorted(Path(old).glob("*.parquet"))[-1]
    table = pq.read_table(last)
    last.unlink()
    write_table(table.slice(0, table.num_rows - 1), old, append=True)  # one row fewer, in a new file
    with pytest.raises(OSError, match="the table changed since the plan was built"):
        run_backfill(config)
    assert not Path(out, "transformed").exists()
