"""Bad input: each fault gets a message naming the item or file; bad rows are quarantined while the good
rows finish, and input that is invalid as a whole stops the job before it writes anything. Files an
earlier run committed are byte-for-byte unchanged afterwards (checksums). S3 credentials never appear in
an error or in the captured output of a failing S3 job."""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import test_backfill_run as backfill_run
from test_backfill_run import DIM, ROOT, N, _address, _out_with_plan

from raybackfill.backfill.ledger import MARKER, Ledger
from raybackfill.backfill.run import BackfillConfig, run_backfill
from raybackfill.data.schema import EMBEDDING, ID, IMAGE, SchemaError, embedding_table, image_table
from raybackfill.data.storage import StorageError, read_table, write_table
from raybackfill.data.synth import synthesize
from raybackfill.embed.pipeline import PoolConfig
from raybackfill.models.artifacts import ArtifactError

inputs, id_plan = backfill_run.inputs, backfill_run.id_plan
SECRET_ENV = "AWS_SECRET_ACCESS_KEY"


def _checksums(root: str) -> dict[str, str]:
    """sha256 of every file under ``root`` (relative path -> digest)."""
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(Path(root).rglob("*")) if p.is_file()}  # fmt: skip


def _config(inputs, out: str, **overrides) -> BackfillConfig:
    base = dict(
        gallery=inputs["gallery"], old_embeddings=inputs["old"], upgrade=inputs["new"], out=out, method="bct",
        policy="id", tiers=2, max_bad_fraction=0.5, index=None, pool=PoolConfig(batch_size=4), progress=False,
    )  # fmt: skip
    return BackfillConfig(**{**base, **overrides})


@pytest.fixture(scope="module")
def committed(inputs, id_plan, tmp_path_factory) -> str:
    """An output that a budgeted run (no index) has partly written: plan, quarantine and 4 re-embedded ids."""
    out = _out_with_plan(id_plan, tmp_path_factory.mktemp("committed") / "out")
    run_backfill(_config(inputs, out, budget=4))
    assert len(Ledger(out).ids(Ledger(out).new_uri)) == 4
    return out


def _rewrite_last_shard(table_dir: str, change) -> None:
    last = sorted(Path(table_dir).glob("*.parquet"))[-1]
    pq.write_table(change(pq.read_table(last)), last)


def _empty_file(table_dir: str) -> None:
    (Path(table_dir) / "zz-empty.parquet").write_bytes(b"")


def _duplicate_id(table_dir: str) -> None:
    first = sorted(Path(table_dir).glob("*.parquet"))[0]
    table = pq.read_table(first)
    pq.write_table(pa.concat_tables([table, table.slice(0, 1)]), first)


def _wrong_dim(table_dir: str) -> None:
    def change(table: pa.Table) -> pa.Table:
        return embedding_table(table.column(ID).to_numpy(), np.zeros((table.num_rows, DIM - 2), np.float32))

    _rewrite_last_shard(table_dir, change)


def _truncate_weights(model_dir: str) -> None:
    path = Path(model_dir) / "model.safetensors"
    path.write_bytes(path.read_bytes()[:100])


def _bad_model_json(model_dir: str) -> None:
    (Path(model_dir) / "model.json").write_text('{"format_version": 1, "architecture": "small_cnn"')


# (input changed, how it is broken, the error, what the message must say). Each case breaks a copy of one
# input in place, so the committed plan (which names the input paths) still applies.
WHOLE_INPUT_FAULTS = [
    ("gallery", lambda d: _rewrite_last_shard(d, lambda t: t.drop_columns([IMAGE])), SchemaError,
     r"part-\d+\.parquet: missing column 'image'"),
    ("gallery", _empty_file, StorageError, r"zz-empty\.parquet: cannot read parquet footer"),
    ("gallery", _duplicate_id, SchemaError, r"gallery: column 'id' has duplicate ids: 0"),
    ("old", _empty_file, StorageError, r"zz-empty\.parquet: cannot read parquet footer"),
    ("old", lambda d: _rewrite_last_shard(d, lambda t: t.drop_columns([EMBEDDING])), SchemaError,
     r"part-\d+\.parquet: missing column 'embedding'"),
    ("old", _wrong_dim, SchemaError, rf"part-\d+\.parquet: column 'embedding' has dim {DIM - 2}, but .* dim {DIM}"),
    ("old", _duplicate_id, SchemaError, r"old: column 'id' has duplicate ids: 0"),
    ("new", _bad_model_json, ArtifactError, r"new/model\.json: not valid JSON"),
    ("new", _truncate_weights, ArtifactError,
     r"new/model\.safetensors: not a readable safetensors file, truncated or corrupt"),
]  # fmt: skip


@pytest.mark.parametrize(
    ("which", "breaks", "error", "message"), WHOLE_INPUT_FAULTS,
    ids=["gallery-missing-column", "gallery-empty-file", "gallery-duplicate-ids", "old-empty-file",
         "old-missing-column", "old-wrong-dim", "old-duplicate-ids", "bad-model-json", "truncated-weights"],
)  # fmt: skip
def test_input_invalid_as_a_whole_stops_the_job_before_it_writes_anything(
    inputs, committed, tmp_path, which, breaks, error, message
):
    source = Path(inputs[which])
    saved = tmp_path / "saved"
    shutil.copytree(source, saved)
    before = _checksums(committed)
    fresh = tmp_path / "fresh-out"
    try:
        breaks(str(source))
        for out in (committed, str(fresh)):  # a resumed job and a first run alike
            with pytest.raises(error, match=message):
                run_backfill(_config(inputs, out))
    finally:
        shutil.rmtree(source)
        shutil.copytree(saved, source)
    assert _checksums(committed) == before  # nothing committed changed, nothing was added
    assert not fresh.exists()


def test_an_unreachable_s3_input_is_named_without_credentials(inputs, committed, s3_server, monkeypatch):
    monkeypatch.setenv("AWS_ENDPOINT_URL", "http://127.0.0.1:9")  # nothing listens on the discard port
    before = _checksums(committed)
    with pytest.raises(StorageError) as err:
        run_backfill(_config(inputs, committed, gallery="s3://gallery-bucket/gallery"))
    assert "s3://gallery-bucket/gallery" in str(err.value)
    assert os.environ[SECRET_ENV] not in str(err.value)
    assert _checksums(committed) == before


def test_a_failing_s3_job_keeps_credentials_out_of_its_logs(inputs, s3_server, ray_cluster):
    """The job entry point against an S3 endpoint that does not answer: its whole output is captured."""
    env = {**os.environ, "PYTHONPATH": str(ROOT), "AWS_ENDPOINT_URL": "http://127.0.0.1:9"}
    args = [
        sys.executable, str(ROOT / "jobs" / "backfill.py"), "--gallery", "s3://gallery-bucket/gallery",
        "--old-embeddings", inputs["old"], "--upgrade", inputs["new"], "--method", "bct", "--policy", "id",
        "--out", "s3://out-bucket/backfill", "--no-index", "--no-progress", "--address", _address(),
    ]  # fmt: skip
    done = subprocess.run(args, env=env, capture_output=True, text=True, timeout=300)
    logs = done.stdout + done.stderr
    assert done.returncode != 0 and "s3://gallery-bucket/gallery" in logs
    assert os.environ[SECRET_ENV] not in logs


@pytest.fixture(scope="module")
def bad_rows(inputs, tmp_path_factory) -> dict:
    """16 images with per-row faults: truncated PNG, bytes that are no image, empty bytes; NaN and inf old vectors.
    (An image of another size is not a fault: it is resized.)"""
    root = tmp_path_factory.mktemp("bad-rows")
    synth = synthesize(classes=4, per_class=N // 4, size=16)
    images = synth.column(IMAGE).to_pylist()
    images[3] = images[3][: len(images[3]) // 2]
    images[5] = b"not an image"
    images[7] = b""
    ids = synth.column(ID).to_numpy()
    write_table(image_table(ids, images, labels=ids % 4), str(root / "gallery"), rows_per_shard=8)
    old = np.random.default_rng(0).standard_normal((N, DIM)).astype(np.float32)
    old[9, 0], old[11, 2] = np.nan, np.inf
    write_table(embedding_table(ids, old, model="old-v1"), str(root / "old"), rows_per_shard=8)
    return {
        "gallery": str(root / "gallery"),
        "old": str(root / "old"),
        "out": str(root / "out"),
        "bad_images": {3: "", 5: "not an image format", 7: "empty image bytes"},
        "bad_vectors": {9, 11},
    }


@pytest.mark.slow
def test_bad_rows_are_quarantined_by_id_and_the_good_rows_finish_without_touching_earlier_batches(
    inputs, bad_rows, ray_cluster
):
    config = _config(
        inputs, bad_rows["out"], gallery=bad_rows["gallery"], old_embeddings=bad_rows["old"], method="fastfill",
        transformation=inputs["fastfill"], tiers=1,
    )  # fmt: skip
    ledger = Ledger(bad_rows["out"])
    first = run_backfill(BackfillConfig(**{**config.__dict__, "budget": 6}))
    assert not first.complete
    before = _checksums(bad_rows["out"])
    summary = run_backfill(config)
    after = _checksums(bad_rows["out"])
    # Earlier batches untouched (the tracks' markers move on by design).
    batches = {path: digest for path, digest in before.items() if not path.endswith(MARKER)}
    assert {path: after.get(path) for path in batches} == batches
    assert summary.complete

    bad_images, bad_vectors = set(bad_rows["bad_images"]), bad_rows["bad_vectors"]
    quarantine = read_table(ledger.quarantine_uri).to_pydict()
    by_id = {i: (stage, reason) for i, stage, reason in zip(
        quarantine[ID], quarantine["stage"], quarantine["reason"], strict=True)}  # fmt: skip
    assert set(by_id) == bad_images | bad_vectors and len(quarantine[ID]) == len(by_id)
    for i, expected in bad_rows["bad_images"].items():
        stage, reason = by_id[i]
        assert stage == "decode" and reason and expected in reason
    assert {by_id[i] for i in bad_vectors} == {("transform", "non-finite embedding")}
    # Every good row once: images re-embedded (NaN-vector items too), stored vectors transformed.
    new_ids = ledger.ids(ledger.new_uri)
    assert len(new_ids) == len(np.unique(new_ids)) and set(new_ids) == set(range(N)) - bad_images
    transformed = ledger.ids(ledger.transformed_uri)
    assert len(transformed) == len(np.unique(transformed)) and set(transformed) == set(range(N)) - bad_vectors
    for path in ledger.files(ledger.new_uri):
        assert np.isfinite(np.stack(pq.read_table(path).column(EMBEDDING).to_numpy(zero_copy_only=False))).all()
