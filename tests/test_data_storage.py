import os

import numpy as np
import pyarrow.parquet as pq
import pytest

from raybackfill.data import storage
from raybackfill.data.schema import SchemaError, embedding_table


def _table(n=10, offset=0):
    return embedding_table(np.arange(offset, offset + n), np.full((n, 2), offset, dtype=np.float32))


def test_write_table_shards_and_reads_back(tmp_path):
    uri = str(tmp_path / "t")
    result = storage.write_table(_table(25), uri, rows_per_shard=10)
    assert [os.path.basename(s) for s in result.shards] == [f"part-0000{i}.parquet" for i in range(3)]
    assert storage.read_table(uri).column("id").to_pylist() == list(range(25))


def test_a_table_reads_its_subdirectories_but_not_its_quarantine_or_temporary_files(tmp_path):
    uri = str(tmp_path / "new")  # laid out as the backfill writes it: one directory per priority tier
    storage.write_table(_table(4, offset=10), str(tmp_path / "new" / "tier-00001"))
    storage.write_table(_table(4), str(tmp_path / "new" / "tier-00000"))
    storage.write_table(_table(2, offset=90), str(tmp_path / "new" / "_quarantine"))
    (tmp_path / "new" / "tier-00001" / ".tmp-part-00009.parquet").write_bytes(b"half a write")
    shards = [os.path.relpath(s, uri) for s in storage.list_shards(uri)]
    assert shards == ["tier-00000/part-00000.parquet", "tier-00001/part-00000.parquet"]
    assert storage.read_table(uri).column("id").to_pylist() == [0, 1, 2, 3, 10, 11, 12, 13]


def test_open_table_resolves_shards_and_footers_once(tmp_path, monkeypatch):
    uri = str(tmp_path / "t")
    storage.write_table(_table(25), uri, rows_per_shard=10)
    table = storage.open_table(uri)
    assert table.shards == tuple(storage.list_shards(uri)) and table.num_rows == 25
    assert table.schema.names == ["id", "embedding"] and len(table.shard_schemas()) == 3
    monkeypatch.setattr(storage, "read_footer", lambda uri: pytest.fail("footer read again"))
    assert storage.open_table(table) is table
    assert table.read(["id"]).column("id").to_pylist() == list(range(25))
    os.makedirs(tmp_path / "empty")
    with pytest.raises(storage.StorageError, match="empty: table has no parquet shards"):
        storage.open_table(str(tmp_path / "empty"))


def test_existing_shard_is_never_overwritten(tmp_path):
    uri = str(tmp_path / "t")
    storage.write_shard(_table(3), uri, "part-00000.parquet")
    with pytest.raises(storage.ShardExistsError, match="refusing to overwrite"):
        storage.write_shard(_table(5, offset=100), uri, "part-00000.parquet")
    assert storage.read_table(uri).num_rows == 3


def test_skip_makes_a_repeated_write_idempotent(tmp_path):
    uri = str(tmp_path / "t")
    first = storage.write_shard(_table(3), uri, "b.parquet", if_exists="skip")
    second = storage.write_shard(_table(3), uri, "b.parquet", if_exists="skip")
    assert first == second and storage.read_table(uri).num_rows == 3


def test_new_table_refuses_existing_shards_unless_appending(tmp_path):
    uri = str(tmp_path / "t")
    storage.write_table(_table(3), uri)
    with pytest.raises(storage.ShardExistsError, match="already has 1 shard"):
        storage.write_table(_table(3, offset=3), uri)
    storage.write_table(_table(3, offset=3), uri, append=True)
    assert storage.read_table(uri).column("id").to_pylist() == list(range(6))


def test_uncommitted_temporary_files_are_invisible(tmp_path):
    uri = str(tmp_path / "t")
    storage.write_table(_table(3), uri)
    pq.write_table(_table(2, offset=50), str(tmp_path / "t" / ".tmp-deadbeef-part-00001.parquet"))
    assert storage.read_table(uri).num_rows == 3
    assert not [p for p in os.listdir(tmp_path / "t") if p.startswith(".tmp") and "deadbeef" not in p]


def test_missing_table_and_missing_column_errors_name_the_uri(tmp_path):
    with pytest.raises(storage.StorageError, match="nowhere: no such table"):
        storage.read_table(str(tmp_path / "nowhere"))
    uri = str(tmp_path / "t")
    storage.write_table(_table(3), uri)
    with pytest.raises(SchemaError, match="part-00000.parquet: missing column 'label'"):
        storage.read_table(uri, columns=["id", "label"])


def test_corrupt_parquet_file_error_names_the_file(tmp_path):
    uri = str(tmp_path / "t")
    os.makedirs(uri)
    (tmp_path / "t" / "part-00000.parquet").write_bytes(b"PAR1 this is not parquet")
    with pytest.raises(storage.StorageError, match="part-00000.parquet"):
        storage.read_table(uri)


def test_s3_round_trip_through_the_native_filesystem(s3_bucket):
    uri = f"{s3_bucket}/tables/emb"
    storage.write_table(_table(25), uri, rows_per_shard=10)
    assert [s.rsplit("/", 1)[1] for s in storage.list_shards(uri)] == [storage.shard_name(i) for i in range(3)]
    assert storage.read_table(uri).column("id").to_pylist() == list(range(25))
    with pytest.raises(storage.ShardExistsError):
        storage.write_shard(_table(1), uri, storage.shard_name(0))


def test_s3_small_files_round_trip(s3_bucket):
    storage.write_bytes(f"{s3_bucket}/m/model.json", b'{"a": 1}')
    assert storage.read_bytes(f"{s3_bucket}/m/model.json") == b'{"a": 1}'


def test_unreachable_s3_is_a_clear_error_without_credentials(s3_server, monkeypatch):
    monkeypatch.setenv("AWS_ENDPOINT_URL", "http://127.0.0.1:9")  # nothing listens on the discard port
    with pytest.raises(storage.StorageError) as err:
        storage.read_table("s3://bucket/table")
    assert "s3://bucket/table" in str(err.value)
    assert os.environ["AWS_SECRET_ACCESS_KEY"] not in str(err.value)


def test_write_bytes_can_refuse_to_replace(tmp_path, s3_bucket):
    for uri in (str(tmp_path / "m" / "model.json"), f"{s3_bucket}/m/model.json"):
        storage.write_bytes(uri, b"1", if_exists="error")
        with pytest.raises(FileExistsError, match="refusing to overwrite"):
            storage.write_bytes(uri, b"2", if_exists="error")
        storage.write_bytes(uri, b"3")
        assert storage.read_bytes(uri) == b"3"


def test_only_string_columns_are_dictionary_encoded(tmp_path):
    table = embedding_table(
        np.arange(50), np.random.default_rng(0).standard_normal((50, 4)).astype(np.float32), model="v1"
    )
    written = storage.write_shard(table, str(tmp_path / "t"), "part-00000.parquet")
    row_group = pq.ParquetFile(written).metadata.row_group(0)
    encodings = {
        row_group.column(i).path_in_schema: row_group.column(i).encodings for i in range(row_group.num_columns)
    }
    assert any("DICTIONARY" in e for e in encodings["model"])
    assert not any("DICTIONARY" in e for e in encodings["embedding.list.element"])
    assert not any("DICTIONARY" in e for e in encodings["id"])
    assert storage.read_table(written).equals(table)
