"""Streaming, parallel loads of an old-embedding table into the index (raybackfill.index.loading) on the session's
Ray cluster, from a multi-file, multi-row-group table on local disk and on the moto S3 server; bounded samples."""

from __future__ import annotations

import contextlib
import uuid

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from raybackfill.data import storage
from raybackfill.data.schema import EMBEDDING, ID, MODEL, SchemaError, embedding_table
from raybackfill.index.loading import LoadConfig, load_old_table, sample_rows
from raybackfill.index.router import RouterConfig, create_index, destroy_index, get
from raybackfill.index.shard import IndexConfig
from raybackfill.types import Space

DIM = 8


def _write(uri: str, name: str, table: pa.Table, row_group_size: int) -> None:
    """One file with row groups of ``row_group_size`` rows (local or s3://)."""
    fs, path = storage.resolve(storage.join(uri, name))
    fs.create_dir(path.rsplit("/", 1)[0], recursive=True)
    pq.write_table(table, path, filesystem=fs, row_group_size=row_group_size)


def _table(ids: np.ndarray, vectors: np.ndarray, model: str = "v1") -> pa.Table:
    return embedding_table(ids, vectors, model=model)


@pytest.fixture
def make_index(ray_cluster):
    names = []

    def make(**index) -> object:
        name = f"test-load-{uuid.uuid4().hex[:8]}"
        names.append(name)
        return create_index(RouterConfig(name=name, shards=3, shard_num_cpus=0.1, index=IndexConfig(**index)))

    yield make
    for name in names:
        with contextlib.suppress(ValueError):
            destroy_index(name)


def _bad_table(uri: str) -> tuple[np.ndarray, np.ndarray, dict[int, str]]:
    """Three files of 4-row row groups: 60 rows, of which id 7 repeats (in the third file), id 12 has a NaN, id 30
    is a zero vector and id 41 a null vector. Returns the good ids, their vectors and the bad ids' reasons."""
    rng = np.random.default_rng(0)
    ids = np.arange(60, dtype=np.int64)
    vectors = rng.standard_normal((60, DIM)).astype(np.float32)
    vectors[12, 3] = np.nan
    vectors[30] = 0
    table = _table(ids, vectors)
    column = table.column(EMBEDDING).combine_chunks()
    nulls = pa.FixedSizeListArray.from_arrays(column.values, DIM, mask=pa.array(ids == 41))
    table = table.set_column(table.schema.get_field_index(EMBEDDING), EMBEDDING, nulls)
    _write(uri, "part-00000.parquet", table.slice(0, 20), 4)
    _write(uri, "part-00001.parquet", table.slice(20, 30), 4)
    extra = rng.standard_normal((2, DIM)).astype(np.float32)
    repeat = _table(np.array([7, 99]), extra)
    _write(uri, "part-00002.parquet", pa.concat_tables([table.slice(50, 10), repeat]), 4)
    good = np.setdiff1d(ids, [12, 30, 41])
    reasons = {7: "duplicate id", 12: "non-finite", 30: "zero embedding", 41: "null embedding"}
    return np.r_[good, 99], np.r_[vectors[good], extra[1:]], reasons


@pytest.fixture(params=["local", "s3"])
def table_uri(request, tmp_path) -> str:
    return request.getfixturevalue("s3_bucket") + "/old" if request.param == "s3" else str(tmp_path / "old")


def test_a_multi_file_table_loads_in_parallel_with_bad_rows_quarantined_by_reason(make_index, table_uri, tmp_path):
    good_ids, good_vectors, reasons = _bad_table(table_uri)
    quarantine = str(tmp_path / "quarantine")
    router = make_index()
    seen: list[int] = []
    summary = load_old_table(
        router, table_uri, config=LoadConfig(batch_rows=5, in_flight=3, quarantine_uri=quarantine),
        on_progress=seen.append,
    )  # fmt: skip
    assert (summary.items, summary.quarantined, summary.version, summary.dim) == (len(good_ids), 4, "v1", DIM)
    assert summary.row_groups == 5 + 8 + 3 and sum(seen) == 62 and summary.trained_on == 0
    progress = get(router.progress.remote())
    assert progress.counts[Space.OLD] == len(good_ids) and progress.total == len(good_ids)
    assert all(shard[Space.OLD] > 0 for shard in progress.per_shard)  # every shard got its part
    stored = get(router.vectors.remote(good_ids))
    unit = good_vectors / np.linalg.norm(good_vectors, axis=1, keepdims=True)
    np.testing.assert_allclose(stored.old, unit, rtol=1e-5, atol=1e-6)
    # The first occurrence of id 7 is the one served.
    assert np.allclose(get(router.vectors.remote(np.array([7]))).old, unit[good_ids == 7])
    table = storage.read_table(quarantine)
    got = dict(zip(table.column(ID).to_pylist(), table.column("reason").to_pylist(), strict=True))
    assert sorted(got) == sorted(reasons) and all(got[i].startswith(r) for i, r in reasons.items())
    assert set(table.column("stage").to_pylist()) == {"load"}
    top = get(router.search.remote(good_vectors[:3], None, 1, "old"))
    assert top.ids[:, 0].tolist() == good_ids[:3].tolist()


def test_bad_rows_without_a_quarantine_are_refused_naming_the_file_and_ids(make_index, tmp_path):
    uri = str(tmp_path / "old")
    _bad_table(uri)
    with pytest.raises(SchemaError, match=r"part-0000\d\.parquet \(row group \d\): 1 bad rows \(ids (7|12|30|41);"):
        load_old_table(make_index(), uri, config=LoadConfig(in_flight=1))


def test_a_file_of_another_dim_or_two_model_versions_is_refused_before_anything_loads(make_index, tmp_path):
    rng = np.random.default_rng(1)
    uri = str(tmp_path / "dims")
    _write(uri, "part-00000.parquet", _table(np.arange(4), rng.standard_normal((4, DIM)).astype(np.float32)), 2)
    _write(uri, "part-00001.parquet", _table(np.arange(4, 8), rng.standard_normal((4, 4)).astype(np.float32)), 2)
    router = make_index()
    with pytest.raises(SchemaError, match="part-00001.parquet: column 'embedding' has dim 4, but .* has dim 8"):
        load_old_table(router, uri)
    assert get(router.progress.remote()).total == 0

    mixed = str(tmp_path / "mixed")
    table = pa.concat_tables(
        [_table(np.arange(4), rng.standard_normal((4, DIM)).astype(np.float32), model=m) for m in ("v1",)]
        + [_table(np.arange(4, 8), rng.standard_normal((4, DIM)).astype(np.float32), model="v0")]
    )
    _write(mixed, "part-00000.parquet", table, 4)
    with pytest.raises(SchemaError, match="column 'model' holds \\['v0'\\], not only 'v1'"):
        load_old_table(make_index(), mixed)
    # An explicit version serves the table as that model, whatever its 'model' column says.
    assert load_old_table(make_index(), mixed, version="v1").items == 8


def test_a_sample_reads_only_some_row_groups_and_is_deterministic(tmp_path):
    uri = str(tmp_path / "many")
    rng = np.random.default_rng(2)
    for f in range(4):
        ids = np.arange(250 * f, 250 * (f + 1))
        _write(uri, f"part-{f:05d}.parquet", _table(ids, rng.standard_normal((250, DIM)).astype(np.float32)), 10)
    sample = sample_rows(uri, 10, [ID, EMBEDDING], seed=3)
    ids = sample.column(ID).to_numpy()
    assert len(ids) == 10 and len(np.unique(ids)) == 10 and sample.column_names == [ID, EMBEDDING]
    assert len(np.unique(ids // 10)) <= 4  # drawn among 4 groups of 10 rows (SAMPLE_SPREAD x 10), not all 100
    assert sample_rows(uri, 10, [ID], seed=3).column(ID).to_pylist() == ids.tolist()
    assert sample_rows(uri, 10, [ID], seed=4).column(ID).to_pylist() != ids.tolist()
    assert sorted(sample_rows(uri, 5000, [ID]).column(ID).to_pylist()) == list(range(1000))  # all of a small table
    # Over many seeds every row group is drawn: the sample is spread over the whole table.
    drawn = np.concatenate([sample_rows(uri, 10, [ID], seed=s).column(ID).to_numpy() for s in range(200)])
    assert len(np.unique(drawn // 10)) == 100 and MODEL not in sample.column_names


def test_an_index_kind_that_needs_training_is_trained_on_a_sample_before_the_load(make_index, tmp_path):
    assert IndexConfig(factory="IVF4,Flat").needs_training
    uri = str(tmp_path / "old")
    rng = np.random.default_rng(5)
    vectors = rng.standard_normal((400, DIM)).astype(np.float32)
    _write(uri, "part-00000.parquet", _table(np.arange(200), vectors[:200]), 50)
    _write(uri, "part-00001.parquet", _table(np.arange(200, 400), vectors[200:]), 50)
    router = make_index(factory="IVF4,Flat", search_params={"nprobe": 4})
    summary = load_old_table(router, uri, config=LoadConfig(batch_rows=7, train_sample=100))
    # Batches of 7 rows split over 3 shards are smaller than nlist: only a space trained first takes them.
    assert summary.trained_on == 100 and summary.items == 400
    top = get(router.search.remote(vectors[:5], None, 1, "old"))
    assert top.ids[:, 0].tolist() == list(range(5))
