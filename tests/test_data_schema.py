import numpy as np
import pyarrow as pa
import pytest

from raybackfill.data.schema import (
    SchemaError,
    embedding_table,
    image_table,
    validate_embedding_table,
    validate_image_table,
    vectors_of,
)


def _images(n=3):
    return image_table(np.arange(n), [b"x"] * n, labels=np.arange(n) % 2)


def test_valid_image_table_is_returned_with_canonical_types():
    table = pa.table({"id": pa.array([1, 2], pa.int32()), "image": [b"a", b"b"], "label": pa.array([0, 1], pa.int64())})
    out = validate_image_table(table, "f.parquet")
    assert out.schema.field("id").type == pa.int64()
    assert out.schema.field("label").type == pa.int32()


def test_missing_column_error_names_file_and_column():
    table = _images().drop(["image"])
    with pytest.raises(SchemaError, match=r"shard-7\.parquet: missing column 'image'"):
        validate_image_table(table, "shard-7.parquet")


def test_label_required_for_training_only():
    table = _images().drop(["label"])
    validate_image_table(table, "f")
    with pytest.raises(SchemaError, match="missing column 'label'"):
        validate_image_table(table, "f", require_label=True)


def test_wrong_image_type_is_reported():
    table = pa.table({"id": [1], "image": ["not bytes"]})
    with pytest.raises(SchemaError, match="column 'image' must be binary"):
        validate_image_table(table, "f")


def test_duplicate_ids_are_named():
    table = image_table([5, 6, 5, 7, 7], [b"x"] * 5)
    with pytest.raises(SchemaError, match="duplicate ids: 5, 7"):
        validate_image_table(table, "f")


def test_extra_columns_pass_through():
    table = image_table([1], [b"x"], extra={"url": ["http://x"]})
    assert validate_image_table(table, "f").column("url").to_pylist() == ["http://x"]


def test_embedding_round_trip_is_exact():
    rng = np.random.default_rng(0)
    emb = rng.normal(size=(4, 3)).astype(np.float32)
    table = embedding_table(np.arange(4), emb, side_info=emb[:, :2], uncertainty=np.ones(4), model="v1")
    validate_embedding_table(table, "e", dim=3)
    np.testing.assert_array_equal(vectors_of(table), emb)
    np.testing.assert_array_equal(vectors_of(table, "side_info"), emb[:, :2])
    assert table.column("model").to_pylist() == ["v1"] * 4


def test_vectors_of_sliced_and_chunked_tables():
    emb = np.arange(12, dtype=np.float32).reshape(6, 2)
    table = embedding_table(np.arange(6), emb)
    np.testing.assert_array_equal(vectors_of(table.slice(2, 3)), emb[2:5])
    chunked = pa.concat_tables([table.slice(0, 2), table.slice(2, 4)])
    np.testing.assert_array_equal(vectors_of(chunked), emb)


def test_wrong_embedding_dim_is_reported():
    table = embedding_table(np.arange(2), np.zeros((2, 4)))
    with pytest.raises(SchemaError, match="has dim 4, expected 8"):
        validate_embedding_table(table, "emb.parquet", dim=8)


def test_nan_embeddings_are_reported_with_ids():
    emb = np.zeros((3, 2), dtype=np.float32)
    emb[1, 0] = np.nan
    with pytest.raises(SchemaError, match=r"NaN/inf in 1 rows \(ids \[11\]\)"):
        validate_embedding_table(embedding_table([10, 11, 12], emb), "e")


def test_embedding_column_must_be_fixed_size_list():
    table = pa.table({"id": [1], "embedding": pa.array([[1.0, 2.0]])})
    with pytest.raises(SchemaError, match="fixed_size_list"):
        validate_embedding_table(table, "e")


def test_vectors_of_a_slice_from_row_zero_of_a_larger_block():
    emb = np.arange(40, dtype=np.float32).reshape(10, 4)
    table = embedding_table(np.arange(10), emb)
    np.testing.assert_array_equal(vectors_of(table.slice(0, 4)), emb[:4])
    np.testing.assert_array_equal(vectors_of(table.slice(6)), emb[6:])
